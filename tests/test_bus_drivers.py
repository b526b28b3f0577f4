"""The bus master and board drivers against the simulator over real Modbus RTU framing."""

from __future__ import annotations

import asyncio

import pytest

from drivers.boards import BayBoard, CabinetBoard, EnergyMeter
from drivers.modbus_bus import (
    BusUnavailableError,
    ExceptionReplyError,
    UnitGarbledError,
    UnitIsolatedError,
    UnitNoAnswerError,
)
from protocol import bay_map
from protocol.units import BAY_UNITS
from sim.faults import FaultKind
from tests.conftest import FakeClock, master, running_sim


def run(coro):
    return asyncio.run(coro)


def _occupied(world) -> int:
    return next(n for n, bay in world.bays.items() if bay.battery is not None)


def _empty(world) -> int:
    return next(n for n, bay in world.bays.items() if bay.battery is None)


def test_a_poll_cycle_reads_every_board_as_the_hardware_reports_it() -> None:
    async def scenario() -> None:
        async with running_sim() as sim, master(sim.url) as bus:
            for unit in BAY_UNITS:
                status = await BayBoard(bus, unit).read_status()
                battery = sim.world.bays[unit].battery
                assert status.map_version == bay_map.MAP_VERSION
                assert status.door_closed and status.locked
                if battery is None:
                    assert status.battery is None and not status.battery_present
                else:
                    assert status.battery is not None
                    assert status.battery.battery_id == battery.battery_id
                    assert status.battery.soc_pct == pytest.approx(battery.soc_pct, abs=0.1)
            cabinet = await CabinetBoard(bus).read_status()
            assert cabinet.mains_present and not cabinet.smoke
            assert not cabinet.contactor_closed  # powers up open: safe default
            reading = await EnergyMeter(bus).read()
            assert reading.voltage_v == pytest.approx(230.0, abs=1.0)
            assert all(bus.unit_stats(u).ok >= 1 for u in BAY_UNITS)

    run(scenario())


def test_unlock_opens_the_door_only_while_the_daemon_heartbeats() -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with running_sim(clock) as sim, master(sim.url) as bus:
            bay = BayBoard(bus, _empty(sim.world))
            with pytest.raises(ExceptionReplyError) as refused:
                await bay.unlock()
            assert refused.value.code == 6  # fail-safe (busy): no heartbeat yet, door stays locked
            assert refused.value.heartbeat_failsafe
            assert (await bay.read_status()).door_closed
            await bay.heartbeat(1)
            await bay.unlock()
            status = await bay.read_status()
            assert not status.door_closed and not status.locked
            assert status.door_open_count == 1

    run(scenario())


def test_a_board_that_hears_no_heartbeat_stops_charging() -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with running_sim(clock) as sim, master(sim.url) as bus:
            number = next(
                n for n, b in sim.world.bays.items() if b.battery and b.battery.soc_pct < 90
            )
            bay, cabinet = BayBoard(bus, number), CabinetBoard(bus)
            await cabinet.set_contactor(closed=True)
            await bay.heartbeat(1)
            await bay.set_charger(enabled=True, current_limit_a=4.0)
            clock.advance(1.0)
            charging = await bay.read_status()
            assert charging.charging and charging.charger_current_a == pytest.approx(4.0)
            assert charging.charger_limit_a == pytest.approx(4.0)
            clock.advance(bay_map.HEARTBEAT_TIMEOUT_S + 1.0)
            silent = await bay.read_status()
            assert not silent.charging
            assert bay_map.BoardFault.HEARTBEAT_LOST in silent.board_faults
            assert bay_map.IoFlag.HEARTBEAT_OK not in silent.io

    run(scenario())


def test_a_silent_unit_is_reported_as_no_answer() -> None:
    async def scenario() -> None:
        async with running_sim() as sim, master(sim.url, timeout_s=0.25) as bus:
            sim.world.inject(FaultKind.SILENT, bay=3)
            with pytest.raises(UnitNoAnswerError) as err:
                await BayBoard(bus, 3).read_status()
            assert not isinstance(err.value, UnitGarbledError)
            assert "bay 3" in str(err.value)
            assert bus.unit_stats(3).timeouts == 1
            await BayBoard(bus, 4).read_status()  # the others are untouched

    run(scenario())


def test_corrupted_replies_are_counted_as_crc_errors_not_silence() -> None:
    async def scenario() -> None:
        async with running_sim() as sim, master(sim.url, timeout_s=0.25) as bus:
            sim.world.inject(FaultKind.CRC, unit=20)
            with pytest.raises(UnitGarbledError):
                await CabinetBoard(bus).read_status()
            assert bus.unit_stats(20).crc_errors == 1
            assert bus.unit_stats(20).timeouts == 0
            sim.world.heal(FaultKind.CRC)
            assert (await CabinetBoard(bus).read_status()).mains_present

    run(scenario())


def test_a_stuck_lock_is_reported_by_the_board() -> None:
    async def scenario() -> None:
        async with running_sim() as sim, master(sim.url) as bus:
            number = _empty(sim.world)
            sim.world.inject(FaultKind.LOCK_STUCK, bay=number)
            bay = BayBoard(bus, number)
            await bay.heartbeat(1)
            await bay.unlock()
            status = await bay.read_status()
            assert status.door_closed and status.locked
            assert bay_map.BoardFault.LOCK_JAMMED in status.board_faults

    run(scenario())


def test_a_stuck_door_sensor_keeps_reporting_closed_while_the_door_is_open() -> None:
    async def scenario() -> None:
        async with running_sim() as sim, master(sim.url) as bus:
            number = _empty(sim.world)
            sim.world.inject(FaultKind.DOOR_SENSOR_STUCK, bay=number)
            bay = BayBoard(bus, number)
            await bay.heartbeat(1)
            await bay.unlock()
            status = await bay.read_status()
            assert not sim.world.bays[number].door_closed  # the door really is open
            assert status.door_closed  # ...but the switch says shut
            assert not status.locked  # the latch tells the truth: a detectable contradiction

    run(scenario())


def test_overheating_and_thermal_runaway_show_in_the_bms_temperature() -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with running_sim(clock) as sim, master(sim.url) as bus:
            hot, runaway = [n for n, b in sim.world.bays.items() if b.battery][:2]
            sim.world.inject(FaultKind.OVERHEAT, bay=hot)
            sim.world.inject(FaultKind.THERMAL_RUNAWAY, bay=runaway)
            before = await BayBoard(bus, runaway).read_status()
            clock.advance(90.0)
            overheated = await BayBoard(bus, hot).read_status()
            assert overheated.battery is not None
            assert overheated.battery.cell_temp_c == pytest.approx(65.0, abs=0.5)
            after = await BayBoard(bus, runaway).read_status()
            assert before.battery is not None and after.battery is not None
            rise_per_s = (after.battery.cell_temp_c - before.battery.cell_temp_c) / 90.0
            assert rise_per_s >= 1.0  # the runaway signature the interlock looks for
            assert bay_map.BoardFault.OVER_TEMP in after.board_faults

    run(scenario())


def test_bms_fault_smoke_and_mains_loss_are_observed() -> None:
    async def scenario() -> None:
        async with running_sim() as sim, master(sim.url) as bus:
            number = _occupied(sim.world)
            sim.world.inject(FaultKind.BMS_FAULT, bay=number)
            sim.world.inject(FaultKind.SMOKE)
            sim.world.inject(FaultKind.MAINS_LOSS)
            status = await BayBoard(bus, number).read_status()
            assert status.battery is not None
            assert bay_map.BmsFault.INTERNAL in status.battery.faults
            cabinet = await CabinetBoard(bus).read_status()
            assert cabinet.smoke and not cabinet.mains_present
            assert (await EnergyMeter(bus).read()).voltage_v == 0.0
            sim.world.heal()
            cabinet = await CabinetBoard(bus).read_status()
            assert not cabinet.smoke and cabinet.mains_present

    run(scenario())


def test_a_dead_bay_costs_at_most_one_timeout_per_cycle_and_is_isolated() -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with (
            running_sim(clock) as sim,
            master(
                sim.url, timeout_s=0.25, isolate_after=3, reprobe_interval_s=5.0, clock=clock
            ) as bus,
        ):
            sim.world.inject(FaultKind.SILENT, bay=5)
            wire_attempts_per_cycle = []
            for _ in range(8):
                before = bus.unit_stats(5).requests
                for unit in BAY_UNITS:
                    try:
                        await BayBoard(bus, unit).read_status()
                    except UnitIsolatedError:
                        assert unit == 5
                    except UnitNoAnswerError:
                        assert unit == 5
                wire_attempts_per_cycle.append(bus.unit_stats(5).requests - before)
                clock.advance(1.0)
            assert max(wire_attempts_per_cycle) == 1  # never a retry on a failing unit
            assert wire_attempts_per_cycle[3:5] == [0, 0]  # isolated: no wire time at all
            assert sum(wire_attempts_per_cycle) < 8  # re-probed at a lower rate
            assert bus.is_isolated(5)
            assert all(bus.unit_stats(u).ok == 8 for u in BAY_UNITS if u != 5)
            sim.world.heal(FaultKind.SILENT)
            clock.advance(5.0)
            await BayBoard(bus, 5).read_status()  # the re-probe finds it again
            assert not bus.is_isolated(5)

    run(scenario())


def test_the_connection_survives_a_bus_that_goes_completely_silent() -> None:
    async def scenario() -> None:
        async with (
            running_sim() as sim,
            master(sim.url, timeout_s=0.03, isolate_after=10**6) as bus,
        ):
            for unit in BAY_UNITS:
                sim.world.inject(FaultKind.SILENT, unit=unit)
            for _ in range(3):  # pymodbus would close the link after retries+3 silences
                for unit in BAY_UNITS:
                    with pytest.raises(UnitNoAnswerError):
                        await BayBoard(bus, unit).read_status()
            sim.world.heal()
            status = await BayBoard(bus, 12).read_status()
            assert status.map_version == bay_map.MAP_VERSION
            assert sim.bus.connections == 1  # never dropped and re-dialled

    run(scenario())


def test_an_unreachable_gateway_is_a_clear_error() -> None:
    async def scenario() -> None:
        async with running_sim() as sim:
            url = sim.url
        with pytest.raises(BusUnavailableError, match="cannot connect"):
            async with master(url, timeout_s=0.25):
                pass

    run(scenario())
