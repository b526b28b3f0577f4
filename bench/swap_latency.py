"""Swap latency on the simulator at 19200 baud: scan -> unlock, and the controller's share.

Starts `cabinet sim` (19200 baud, 2 ms slave turnaround) and `cabinet run` in their own
processes, then plays N riders who act the moment a door is open. Times come from the
simulator's timeline (when the scan line left the scanner, when each unlock frame
arrived, when the rider shut each door) and from the daemon's `swap.completed` event,
all on the wall clock of this one machine:

* scan -> unlock: scan line emitted -> unlock frame of the return bay on the wire.
  Goal: <= one bus transaction time (a 23-register status read, 37.8 ms at 19200).
* controller's share of a swap: (scan -> first unlock) + (return door shut -> dispense
  unlock) + (dispense door shut -> swap.completed): all the time not spent waiting for
  the rider. Goal: <= 1.0 s p99.

    .venv/bin/python bench/swap_latency.py [--swaps N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an install
from cabinet.daemon.journal import Journal
from cabinet.daemon.tokens import generate_keys, issue, load_private_key
from protocol import bay_map, rtu_timing
from sim.control import call
from sim.launcher import start_simulator, stop_process

REPO = Path(__file__).resolve().parent.parent
BAUD = 19200


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def ctl(control: tuple[str, int], **request: Any) -> Any:
    return await call(control[0], control[1], request)


async def wait_open_door(control: tuple[str, int], exclude: set[int]) -> int:
    while True:
        state = await ctl(control, verb="state")
        for bay in state["bays"]:
            if bay["door"] == "open" and bay["bay"] not in exclude:
                return int(bay["bay"])
        await asyncio.sleep(0.01)


def completed_ts(journal_path: Path, session_count: int) -> float | None:
    journal = Journal(journal_path)
    try:
        done = [e for e in journal.events(limit=100_000) if e["type"] == "swap.completed"]
    finally:
        journal.close()
    return done[session_count - 1]["ts"] / 1000.0 if len(done) >= session_count else None


async def one_swap(
    control: tuple[str, int], key_path: Path, journal: Path, n: int
) -> dict[str, float]:
    token = issue(load_private_key(key_path), f"R-{n}", now=int(time.time()), cabinet="bench")
    # the daemon connects to the scanner after recovering: scan again until it listens
    while (await ctl(control, verb="scan", text=token))["delivered_to"] == 0:
        await asyncio.sleep(0.05)
    ret = await wait_open_door(control, set())
    # riders return full batteries here so the cabinet never runs dry during the bench
    await ctl(control, verb="insert", bay=ret, battery=f"BAT-B{n:04d}", soc=95.0)
    await ctl(control, verb="close", bay=ret)
    out = await wait_open_door(control, {ret})
    await ctl(control, verb="take", bay=out)
    await ctl(control, verb="close", bay=out)
    while (done := completed_ts(journal, n)) is None:
        await asyncio.sleep(0.01)
    timeline = (await ctl(control, verb="state"))["timeline"]
    scan_t = max(e["t"] for e in timeline if e["what"] == "scan")
    unlocks = [e for e in timeline if e["what"] == "unlock" and e["t"] >= scan_t]
    unlock_ret = min(e["t"] for e in unlocks if e["bay"] == ret)
    unlock_out = min(e["t"] for e in unlocks if e["bay"] == out)
    close_ret = max(e["t"] for e in timeline if e["what"] == "close" and e["bay"] == ret)
    close_out = max(e["t"] for e in timeline if e["what"] == "close" and e["bay"] == out)
    return {
        "scan_to_unlock": unlock_ret - scan_t,
        "close_to_unlock": unlock_out - close_ret,
        "close_to_completed": done - close_out,
        "controller_share": (unlock_ret - scan_t) + (unlock_out - close_ret) + (done - close_out),
    }


@dataclass
class BenchCabinet:
    """`cabinet sim` + `cabinet run` at 19200 baud, started and ready."""

    daemon: subprocess.Popen[bytes]
    control: tuple[str, int]
    key: Path
    journal: Path


@contextmanager
def bench_cabinet(tmp: Path) -> Iterator[BenchCabinet]:
    """The simulator and the daemon on free ports; both stopped afterwards."""
    sim, ready = start_simulator("--baud", str(BAUD), "--seed", "11", cwd=REPO)
    keys = generate_keys(str(tmp / "backend"))
    config = tmp / "cabinet.toml"
    config.write_text(
        f'[cabinet]\nid = "bench"\nstate_dir = "{tmp}/state"\n'
        f'[bus]\nurl = "{ready["bus"]}"\n[scanner]\nurl = "{ready["scanner"]}"\n'
        f'[auth]\npublic_keys = ["{keys.public}"]\n'
    )
    daemon = subprocess.Popen(
        [sys.executable, "-m", "cabinet.console.cli", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    host, port = ready["control"].removeprefix("tcp://").split(":")
    journal = tmp / "state" / "journal.db"
    try:
        while not journal.exists() or not Journal(journal).events():
            time.sleep(0.1)
        yield BenchCabinet(daemon, (host, int(port)), keys.private, journal)
    finally:
        stop_process(daemon)
        stop_process(sim)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--swaps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir, bench_cabinet(Path(tmp_dir)) as cab:
        results = [
            asyncio.run(one_swap(cab.control, cab.key, cab.journal, n))
            for n in range(1, args.swaps + 1)
        ]
    transaction = rtu_timing.read_transaction_time(bay_map.STATUS_COUNT, BAUD, 0.002)
    print(f"{len(results)} swaps at {BAUD} baud; one bus transaction = {transaction * 1000:.1f} ms")
    print("| measure | p50 ms | p99 ms | max ms | goal |")
    print("|---|---|---|---|---|")
    goals = {"scan_to_unlock": f"<= {transaction * 1000:.1f}", "controller_share": "<= 1000 (p99)"}
    for key in ("scan_to_unlock", "close_to_unlock", "close_to_completed", "controller_share"):
        samples = [r[key] * 1000 for r in results]
        print(
            f"| {key} | {statistics.median(samples):.1f} | {percentile(samples, 0.99):.1f} | "
            f"{max(samples):.1f} | {goals.get(key, '')} |"
        )


if __name__ == "__main__":
    main()
