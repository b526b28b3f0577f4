"""Full 12-bay status poll cycle against `cabinet sim`, measured against the wire-time minimum.

Runs the simulator as its own process (as on a real cabinet, the line is not in the
daemon's process), with the slave reply time set to 0 so the minimum is the bytes'
time on the wire alone: 12 x (request frame + t3.5 + reply frame + t3.5). Prints a
Markdown table: measured mean and p95 cycle, the minimum, and their ratio (goal:
<= 1.10 at every baud). A second table shows a cycle with one bay dead.

    .venv/bin/python bench/bus_cycle.py [--cycles N] [--transport tcp|pty|both]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an install
from drivers.boards import BayBoard
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus, UnitNoAnswerError
from protocol import bay_map, rtu_timing
from protocol.units import BAY_UNITS
from sim.launcher import start_simulator, stop_process

REPO = Path(__file__).resolve().parent.parent
BAUDS = (9600, 19200, 115200)


def start_sim(baud: int, bus: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    return start_simulator("--baud", str(baud), "--reply-ms", "0", bus=bus, cwd=REPO)


async def poll_cycle(bus: ModbusBus) -> tuple[float, int]:
    """Read every bay once, as the daemon's poller does; the cycle's duration and answers."""
    started = time.perf_counter()
    answered = 0
    for unit in BAY_UNITS:
        with contextlib.suppress(UnitNoAnswerError):
            await BayBoard(bus, unit).read_status()
            answered += 1
    return time.perf_counter() - started, answered


async def measure(url: str, cycles: int, timeout_s: float) -> list[float]:
    async with ModbusBus(parse_endpoint(url), timeout_s=timeout_s) as bus:
        await poll_cycle(bus)  # warm-up: connection, first-frame costs
        return [(await poll_cycle(bus))[0] for _ in range(cycles)]


def ctl(control: str, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "cabinet.console.cli", "sim", "ctl", "--control", control, *args],
        check=True,
        capture_output=True,
        cwd=REPO,
    )


def p95(samples: list[float]) -> float:
    return sorted(samples)[max(0, round(0.95 * len(samples)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--transport", choices=["tcp", "pty", "both"], default="both")
    args = parser.parse_args()
    transports = ["tcp", "pty"] if args.transport == "both" else [args.transport]
    print("| transport | baud | mean ms | p95 ms | wire minimum ms | mean / minimum |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for transport in transports:
        for baud in BAUDS:
            with tempfile.TemporaryDirectory() as tmp:
                bus = "tcp://127.0.0.1:0" if transport == "tcp" else f"pty://{tmp}/bus"
                proc, ready = start_sim(baud, bus)
                try:
                    samples = asyncio.run(measure(ready["bus"], args.cycles, 0.25))
                finally:
                    stop_process(proc)
            minimum = len(BAY_UNITS) * rtu_timing.read_transaction_time(bay_map.STATUS_COUNT, baud)
            mean = statistics.fmean(samples)
            worst = max(worst, mean / minimum)
            print(
                f"| {transport} | {baud} | {mean * 1000:.1f} | {p95(samples) * 1000:.1f} | "
                f"{minimum * 1000:.1f} | {mean / minimum:.3f} |"
            )
    print()
    print("One bay dead (19200 baud, tcp, timeout 250 ms, isolated after 3 failures):")
    print("| cycle | ms | extra over minimum ms |")
    print("|---|---|---|")
    proc, ready = start_sim(19200, "tcp://127.0.0.1:0")
    try:
        ctl(ready["control"], "fault", "silent", "--bay", "5")
        samples = asyncio.run(measure(ready["bus"], 6, 0.25))
    finally:
        stop_process(proc)
    minimum = len(BAY_UNITS) * rtu_timing.read_transaction_time(bay_map.STATUS_COUNT, 19200)
    for i, sample in enumerate(samples, start=2):  # cycle 1 was the warm-up
        print(f"| {i} | {sample * 1000:.1f} | {(sample - minimum) * 1000:.1f} |")
    print()
    print(f"worst mean / minimum: {worst:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
