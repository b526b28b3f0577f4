"""``cabinet demo``: the simulator and a technician's walk through the bus, on one machine.

This is the foundation's demo: it starts the hardware simulator on free ports,
surveys the bus, opens a door the way the daemon will (heartbeat, then the unlock
pulse), lets a simulated rider put a battery in, shows a dead bay being found and
isolated, then polls the bus for ``--duration`` seconds and prints a summary.
The swap daemon, the MQTT broker and the live view join it in later issues.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable

from cabinet.bus_diagnostics import UnitReport, survey
from drivers.boards import BayBoard
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus, UnitNoAnswerError
from protocol import bay_map, rtu_timing
from protocol.units import BAY_UNITS
from sim.bus_server import SimulatedBus
from sim.cabinet_model import SimulatedCabinet
from sim.faults import FaultKind

DEMO_BAUD = 19200
DEAD_BAY = 4


def _survey_table(reports: list[UnitReport]) -> str:
    lines = [f"  {'UNIT':<5}{'NAME':<15}{'MAP':<5}{'FIRMWARE':<10}HEALTH"]
    lines += [
        f"  {r.unit:<5}{r.name:<15}{r.map_version or '-'!s:<5}{r.firmware or '-':<10}{r.health}"
        for r in reports
    ]
    return "\n".join(lines)


async def poll_cycle(bus: ModbusBus) -> tuple[float, int]:
    """Read every bay once; the cycle's duration and how many bays answered."""
    started = time.perf_counter()
    answered = 0
    for unit in BAY_UNITS:
        with contextlib.suppress(UnitNoAnswerError):
            await BayBoard(bus, unit).read_status()
            answered += 1
    return time.perf_counter() - started, answered


async def run_demo(duration_s: float, say: Callable[[str], None] = print) -> int:
    """Run the walk-through, then poll for ``duration_s`` seconds; return an exit code."""
    world = SimulatedCabinet(clock=time.monotonic, seed=2026)
    line = SimulatedBus(world, baud=DEMO_BAUD, reply_delay_s=0.002)
    port = await line.start("127.0.0.1", 0)
    say(
        f"simulator: 12 bays, cabinet board and meter on tcp://127.0.0.1:{port} "
        f"(RTU over TCP, {DEMO_BAUD} baud modelled)"
    )
    try:
        async with ModbusBus(parse_endpoint(f"tcp://127.0.0.1:{port}")) as bus:
            say("\n1. bus scan: every unit, its register map and firmware")
            say(_survey_table(await survey(bus)))

            empty = next(n for n, bay in world.bays.items() if bay.battery is None)
            board = BayBoard(bus, empty)
            say(
                f"\n2. open empty bay {empty}: heartbeat first (boards keep doors locked "
                "without one), then the unlock pulse"
            )
            await board.heartbeat(1)
            await board.unlock()
            status = await board.read_status()
            say(
                f"   bay {empty}: door {'closed' if status.door_closed else 'open'}, "
                f"latch {'engaged' if status.locked else 'released'}"
            )

            say("   a rider puts battery BAT-DEMO-0001 (12 %) in and shuts the door")
            world.insert(empty, "BAT-DEMO-0001", 12.0)
            world.close(empty)
            status = await board.read_status()
            battery = status.battery
            assert battery is not None
            say(
                f"   bay {empty} reads: {battery.battery_id}, {battery.soc_pct:.0f} % SoC, "
                f"{battery.pack_voltage_v:.1f} V, {battery.cell_temp_c:.1f} degC"
            )

            say(
                f"\n3. bay {DEAD_BAY}'s board dies: it costs one timeout per cycle, then is "
                "isolated and re-probed every few seconds"
            )
            world.inject(FaultKind.SILENT, bay=DEAD_BAY)
            for cycle in range(1, 5):
                elapsed, answered = await poll_cycle(bus)
                isolated = " (isolated)" if bus.is_isolated(DEAD_BAY) else ""
                say(f"   cycle {cycle}: {elapsed * 1000:.0f} ms, {answered}/12 bays{isolated}")
            world.heal()
            healed_at = time.monotonic()
            while bus.is_isolated(DEAD_BAY):
                await poll_cycle(bus)
            say(
                f"   board repaired: found again by a re-probe "
                f"{time.monotonic() - healed_at:.1f} s later"
            )

            minimum = len(BAY_UNITS) * rtu_timing.read_transaction_time(
                bay_map.STATUS_COUNT, DEMO_BAUD, 0.002
            )
            say(f"\n4. polling for {duration_s:.0f} s (wire-time minimum {minimum * 1000:.0f} ms)")
            samples: list[float] = []
            deadline = time.monotonic() + duration_s
            while time.monotonic() < deadline:
                elapsed, _ = await poll_cycle(bus)
                samples.append(elapsed)
    finally:
        await line.stop()
    if samples:
        mean = statistics.fmean(samples)
        say(
            f"\nsummary: {len(samples)} poll cycles, mean {mean * 1000:.0f} ms "
            f"= {mean / minimum:.3f} x the wire-time minimum"
        )
    return 0


def main(duration_s: float | None) -> int:
    """Entry point for ``cabinet demo``; without ``--duration`` it polls for 10 s."""
    return asyncio.run(run_demo(10.0 if duration_s is None else duration_s))
