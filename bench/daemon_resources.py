"""The daemon's resident memory and CPU at steady state: 12 bays, a swap every minute.

Starts `cabinet sim` (19200 baud) and `cabinet run` with the fleet link off, lets a
rider swap once a minute (the swap-latency bench's rider), and samples the daemon's
/proc/<pid> every second: VmRSS, and CPU time (utime + stime) over wall time.
Goals (DESIGN.md §6): resident memory under 60 MB, idle CPU near zero.
``--display`` enables the rider's web display (``[display]``, on a free port) as well;
the daemon also takes any other ``CABINET_<SECTION>__<KEY>`` override from the
environment.

    .venv/bin/python bench/daemon_resources.py [--minutes N] [--display]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from swap_latency import BAUD, bench_cabinet, one_swap

TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--display", action="store_true", help="with [display] enabled")
    args = parser.parse_args()
    if args.display:  # the daemon inherits the environment
        os.environ.update(CABINET_DISPLAY__ENABLED="true", CABINET_DISPLAY__PORT="0")
    display = os.environ.get("CABINET_DISPLAY__ENABLED", "").lower() in {"true", "1"}
    with tempfile.TemporaryDirectory() as tmp_dir, bench_cabinet(Path(tmp_dir)) as cab:
        pid = cab.daemon.pid
        started, cpu0 = time.monotonic(), cpu_s(pid)
        rss: list[float] = []
        swaps, next_swap = 0, started
        while (now := time.monotonic()) < started + args.minutes * 60:
            if now >= next_swap:
                swaps += 1
                asyncio.run(one_swap(cab.control, cab.key, cab.journal, swaps))
                next_swap += 60.0
            rss.append(rss_mb(pid))
            time.sleep(1.0)
        wall, cpu = time.monotonic() - started, cpu_s(pid) - cpu0
    peak_rss, final_rss = max(rss), rss[-1]
    print(
        f"daemon at steady state, 12 bays at {BAUD} baud, {swaps} swaps in {wall:.0f} s, "
        f"display {'on' if display else 'off'}"
    )
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| resident memory, peak | {peak_rss:.1f} MB | < 60 MB |")
    print(f"| resident memory, at the end | {final_rss:.1f} MB | |")
    print(f"| CPU, mean over the run | {100 * cpu / wall:.1f} % of one core | near zero |")


if __name__ == "__main__":
    main()
