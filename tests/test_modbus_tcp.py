"""Modbus/TCP (MBAP) gateways: the master, the daemon and a third-party client through one.

A serial-to-Ethernet gateway in Modbus/TCP mode is the common field installation; the
simulator offers the same mode (``cabinet sim --bus modbus-tcp://...``), and what it
serves there is checked with mbpoll, a master we did not write.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from drivers.boards import BayBoard, CabinetBoard, EnergyMeter
from drivers.bus_url import BusUrlError, TcpEndpoint, parse_endpoint
from drivers.modbus_bus import ModbusBus, UnitNoAnswerError
from protocol import bay_map
from protocol.units import BAY_UNITS
from sim.bus_server import SimulatedBus
from sim.cabinet_model import SimulatedCabinet
from sim.mbap_gateway import to_mbap, to_rtu
from tests.conftest import SimProcess, cabinet_cmd, start_sim_process, stop_sim_process
from tests.field_cabinet import field_cabinet
from tests.test_swap_end_to_end import SWAP_STEPS, collect, deposit


@asynccontextmanager
async def gateway_and_master() -> AsyncIterator[tuple[SimulatedCabinet, SimulatedBus, ModbusBus]]:
    world = SimulatedCabinet(clock=time.monotonic, seed=7)
    line = SimulatedBus(world, baud=115200, reply_delay_s=0.0, seed=7)
    port = await line.start("127.0.0.1", 0, mbap=True)
    # the daemon's default timeout, not 100 ms: the in-process gateway shares this event loop,
    # and a CPU-starved worker timed out a healthy board (as test_bus_drivers' did)
    bus = ModbusBus(parse_endpoint(f"modbus-tcp://127.0.0.1:{port}"), timeout_s=0.25)
    await bus.connect()
    try:
        yield world, line, bus
    finally:
        bus.close()
        await line.stop()


def test_a_modbus_tcp_url_names_a_gateway_speaking_mbap() -> None:
    endpoint = parse_endpoint("modbus-tcp://10.0.0.5:502")
    assert endpoint == TcpEndpoint("10.0.0.5", 502, "mbap")
    assert str(endpoint) == "modbus-tcp://10.0.0.5:502"
    assert parse_endpoint("tcp://10.0.0.5:502") == TcpEndpoint("10.0.0.5", 502, "rtu")
    with pytest.raises(BusUrlError, match="needs a host and a port"):
        parse_endpoint("modbus-tcp://10.0.0.5")


def test_a_gateway_url_may_give_its_line_speed_and_nothing_else() -> None:
    """``?baud=``: the gateway's serial line, for the quiet after a broadcast there."""
    endpoint = parse_endpoint("tcp://10.0.0.5:502?baud=9600")
    assert endpoint == TcpEndpoint("10.0.0.5", 502, "rtu", baud=9600)
    assert str(endpoint) == "tcp://10.0.0.5:502?baud=9600"
    assert parse_endpoint("modbus-tcp://10.0.0.5:502?baud=115200").baud == 115200
    assert parse_endpoint("tcp://10.0.0.5:502").baud is None  # not known: not guessed
    with pytest.raises(BusUrlError, match="baud 9601 is not one of"):
        parse_endpoint("tcp://10.0.0.5:502?baud=9601")
    # a serial option on a gateway URL was silently dropped: now it is named
    with pytest.raises(BusUrlError, match=r"unknown option.*parity"):
        parse_endpoint("tcp://10.0.0.5:502?baud=9600&parity=E")


def test_mbap_and_rtu_frames_translate_as_a_gateway_does() -> None:
    # golden frames: FC04 read of 23 registers at 0 from unit 5, transaction id 0x0102
    adu = bytes.fromhex("0102 0000 0006 05 04 0000 0017")
    ids, rtu = to_rtu(adu) or (b"", b"")
    assert ids == bytes.fromhex("0102 0000")
    assert rtu == bytes.fromhex(
        "05 04 0000 0017 b180"
    )  # the RTU frame on the line, CRC low byte first
    assert to_mbap(ids, rtu) == adu
    assert to_rtu(adu[:-1]) is None  # a partial ADU waits for its rest


def test_the_master_polls_every_board_through_a_modbus_tcp_gateway() -> None:
    async def scenario() -> None:
        async with gateway_and_master() as (world, _line, bus):
            for unit in BAY_UNITS:
                status = await BayBoard(bus, unit).read_status()
                battery = world.bays[unit].battery
                assert status.map_version == bay_map.MAP_VERSION
                if battery is None:
                    assert status.battery is None
                else:
                    assert status.battery is not None
                    assert status.battery.battery_id == battery.battery_id
            assert (await CabinetBoard(bus).read_status()).mains_present
            assert (await EnergyMeter(bus).read()).voltage_v == pytest.approx(230.0, abs=1.0)
            empty = next(n for n, bay in world.bays.items() if bay.battery is None)
            board = BayBoard(bus, empty)
            await board.heartbeat(1)
            await board.unlock()  # the write's echo comes back through the MBAP header
            assert not (await board.read_status()).door_closed

    asyncio.run(scenario())


def test_a_silent_or_garbling_board_behind_the_gateway_is_silence_not_a_crc_error() -> None:
    async def scenario() -> None:
        async with gateway_and_master() as (world, line, bus):
            world.silent_units.add(4)
            with pytest.raises(UnitNoAnswerError) as silent:
                await bus.read_input(4, 0, bay_map.STATUS_COUNT)
            assert type(silent.value) is UnitNoAnswerError
            # a reply garbled on the RS-485 side is dropped by the gateway: no CRC on TCP
            world.crc_units[6] = 1.0
            with pytest.raises(UnitNoAnswerError) as garbled:
                await bus.read_input(6, 0, bay_map.STATUS_COUNT)
            assert type(garbled.value) is UnitNoAnswerError
            assert line.counters[6].corrupted == 1
            assert bus.unit_stats(6).timeouts == 1 and bus.unit_stats(6).crc_errors == 0
            assert len(await bus.read_input(5, 0, bay_map.STATUS_COUNT)) == bay_map.STATUS_COUNT

    asyncio.run(scenario())


def test_a_daemon_on_a_modbus_tcp_gateway_serves_a_swap(tmp_path: Path) -> None:
    with field_cabinet(tmp_path, sim_bus="modbus-tcp://127.0.0.1:0") as cab:
        assert cab.sim.bus.startswith("modbus-tcp://")
        started = cab.swap_begins("R-MBAP")
        session, ret, out = started["session_id"], started["return_bay"], started["dispense_bay"]
        deposit(cab, ret, "BAT-MBAP1")
        collect(cab, out)
        done = cab.wait_event("swap.completed", session_id=session)
        assert done["deposited"] == "BAT-MBAP1"
        assert cab.session_events(session) == SWAP_STEPS


@pytest.fixture
def sim_mbap() -> Iterator[SimProcess]:
    sim = start_sim_process(
        "--baud", "115200", "--reply-ms", "0", "--seed", "3", bus="modbus-tcp://127.0.0.1:0"
    )
    yield sim
    stop_sim_process(sim)


def _registers(text: str) -> dict[int, int]:
    """mbpoll's ``[addr]: value`` lines."""
    lines = (line.split(":") for line in text.splitlines() if line.startswith("["))
    return {int(addr.strip("[]")): int(value) for addr, value in lines}


def _battery_id(regs: dict[int, int]) -> str:
    """BATTERY_ID per docs/hardware.md: registers 8-15, two chars each, high byte first."""
    raw = b"".join(regs[a].to_bytes(2, "big") for a in range(8, 16))
    return raw.rstrip(b"\0").decode("ascii")


@pytest.mark.skipif(shutil.which("mbpoll") is None, reason="mbpoll is not installed")
def test_mbpoll_reads_a_bay_through_the_simulator_in_modbus_tcp_mode(sim_mbap: SimProcess) -> None:
    bay = next(b for b in sim_mbap.state()["bays"] if b["battery"] is not None)
    port = sim_mbap.bus.rsplit(":", 1)[1]
    read = subprocess.run(
        [
            *("mbpoll", "-m", "tcp", "-a", str(bay["bay"]), "-0", "-r", "0"),
            *("-c", str(bay_map.STATUS_COUNT), "-t", "3", "-p", port, "127.0.0.1", "-1"),
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert read.returncode == 0, read.stdout + read.stderr
    regs = _registers(read.stdout)
    now = sim_mbap.state()["bays"][bay["bay"] - 1]
    # the values docs/hardware.md documents for an occupied, closed, locked bay
    assert len(regs) == bay_map.STATUS_COUNT
    assert regs[0] == 2  # MAP_VERSION: the simulator's boards report 2
    assert regs[1] == 0x0103  # FIRMWARE_VERSION "1.3"
    io = regs[3]
    assert (
        io & 0x0001 and io & 0x0002 and io & 0x0004 and io & 0x0010
    )  # closed, locked, present, BMS
    assert _battery_id(regs) == now["battery"]["id"]
    assert regs[16] / 10 == pytest.approx(now["battery"]["soc_pct"], abs=0.5)  # SOC, 0.1 %


def test_bus_scan_goes_through_a_modbus_tcp_gateway(sim_mbap: SimProcess) -> None:
    result = cabinet_cmd("bus", "scan", "--bus", sim_mbap.bus)
    assert result.returncode == 0, result.stderr
    assert "14 of 14 units answered (directly on the bus)" in result.stdout
