"""Where the daemon's CPU goes outside its Python code: system calls, context switches, kernel time.

``bench/daemon_cycle.py`` shows the daemon spending more ``/proc`` CPU per transaction
than a plain pymodbus client while callgrind (user-space instructions) says its own code
is not the bigger one. The rest is kernel time and scheduling, which callgrind does not
see. This bench looks at each process from outside, in the same way, against the same
simulator (RTU over TCP, reply time 0), one after the other:

* the daemon (``cabinet run`` as it runs normally), the plain sync client and the plain
  async client (``bench/plain_poller.py``);
* an undisturbed window: per thread (``/proc/PID/task/*``) utime and stime (tick
  samples, 100 per second), ``schedstat`` (CPU time in ns from the scheduler, its wait
  for a CPU, its time slices) and voluntary / involuntary context switches;
* a second window under ``strace -c -f -p PID``: system calls by name (strace slows
  the process, so only the counts of this window are used, never its times).

Everything is divided by the transactions the simulator counted in that window.

    .venv/bin/python bench/daemon_syscalls.py [--baud 19200] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.daemon_cycle

from bench.daemon_cycle import WARM_UP_S, line_reading, running_daemon
from sim.launcher import start_simulator, stop_process

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Counters:
    """A process's counters summed over its threads."""

    utime_s: float
    stime_s: float
    run_ns: int  # schedstat: time on a CPU
    wait_ns: int  # schedstat: time runnable but waiting for a CPU
    slices: int  # schedstat: times it was given a CPU
    voluntary: int
    involuntary: int
    threads: int
    page_faults: int = 0  # minor and major, of the whole process (stat, not per thread)

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.utime_s - other.utime_s,
            self.stime_s - other.stime_s,
            self.run_ns - other.run_ns,
            self.wait_ns - other.wait_ns,
            self.slices - other.slices,
            self.voluntary - other.voluntary,
            self.involuntary - other.involuntary,
            max(self.threads, other.threads),
            self.page_faults - other.page_faults,
        )


def counters(pid: int) -> Counters:
    """Sum over the live threads (a thread that ended inside the window is missed)."""
    utime = stime = 0
    run = wait = slices = vol = invol = threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            sched = (task / "schedstat").read_text().split()
            status = (task / "status").read_text().splitlines()
        except FileNotFoundError:
            continue
        utime += int(fields[11])
        stime += int(fields[12])
        run, wait, slices = run + int(sched[0]), wait + int(sched[1]), slices + int(sched[2])
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol += int(line.split()[1])
        threads += 1
    whole = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    faults = int(whole[7]) + int(whole[9])  # minflt, majflt
    return Counters(utime / TICKS, stime / TICKS, run, wait, slices, vol, invol, threads, faults)


@dataclass(frozen=True, slots=True)
class Measured:
    name: str
    tx: int
    cpu: Counters
    strace_tx: int
    syscalls: dict[str, int]


def parse_strace(text: str) -> dict[str, int]:
    """``strace -c`` table: syscall name -> calls (errors included)."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[0][0].isdigit() or parts[-1] == "total":
            continue
        try:
            calls[parts[-1]] = int(parts[3])
        except ValueError:
            continue
    return calls


def measure(name: str, pid: int, control: str, seconds: float, tmp: Path) -> Measured:
    time.sleep(WARM_UP_S)  # settling time after start, not a synchronisation
    before, c0 = line_reading(control), counters(pid)
    time.sleep(seconds)  # the undisturbed window
    c1, after = counters(pid), line_reading(control)
    out = tmp / f"strace-{name}.txt"
    strace = subprocess.Popen(
        ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attaching to every thread; the window starts after
    s0 = line_reading(control)
    time.sleep(seconds)
    s1 = line_reading(control)
    strace.send_signal(signal.SIGINT)
    strace.wait(timeout=30)
    # strace's count runs from attach to detach: one second longer than s0..s1; scale it
    scale = seconds / (seconds + 1.0)
    syscalls = {k: round(v * scale) for k, v in parse_strace(out.read_text()).items()}
    return Measured(
        name,
        after.transactions() - before.transactions(),
        c1 - c0,
        s1.transactions() - s0.transactions(),
        syscalls,
    )


@contextmanager
def plain_process(kind: str, bus: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "plain_poller.py"), kind, bus], cwd=REPO
    )
    try:
        yield proc
    finally:
        stop_process(proc)


def report(results: list[Measured], baud: int, seconds: float) -> None:
    print(
        f"RTU over TCP, {baud} baud, windows of {seconds:.0f} s; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print()
    names = [r.name for r in results]
    print("| per 1,000 transactions | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")

    def row(label: str, values: list[float], fmt: str) -> None:
        print(f"| {label} | " + " | ".join(format(v, fmt) for v in values) + " |")

    def per_k(value: float, tx: int) -> float:
        return 1000 * value / tx if tx else float("nan")

    row("transactions in window", [r.tx for r in results], ".0f")
    row("threads", [r.cpu.threads for r in results], ".0f")
    row("utime ms (ticks)", [per_k(r.cpu.utime_s * 1000, r.tx) for r in results], ".0f")
    row("stime ms (ticks)", [per_k(r.cpu.stime_s * 1000, r.tx) for r in results], ".0f")
    row("on-CPU ms (schedstat)", [per_k(r.cpu.run_ns / 1e6, r.tx) for r in results], ".0f")
    row("wait for CPU ms", [per_k(r.cpu.wait_ns / 1e6, r.tx) for r in results], ".0f")
    row("time slices", [per_k(r.cpu.slices, r.tx) for r in results], ".0f")
    row("voluntary switches", [per_k(r.cpu.voluntary, r.tx) for r in results], ".0f")
    row("involuntary switches", [per_k(r.cpu.involuntary, r.tx) for r in results], ".0f")
    row("page faults", [per_k(r.cpu.page_faults, r.tx) for r in results], ".0f")
    row("(strace window) transactions", [r.strace_tx for r in results], ".0f")
    totals = [per_k(sum(r.syscalls.values()), r.strace_tx) for r in results]
    row("system calls, all", totals, ".0f")
    names_seen = sorted(
        {k for r in results for k in r.syscalls},
        key=lambda k: -max(per_k(r.syscalls.get(k, 0), r.strace_tx) for r in results),
    )
    for call in names_seen:
        values = [per_k(r.syscalls.get(call, 0), r.strace_tx) for r in results]
        if max(values) >= 1:
            row(call, values, ".0f")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baud", type=int, default=19200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", choices=["daemon", "sync", "async"], action="append")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        sys.exit("strace is not installed")
    results: list[Measured] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        proc, ready = start_simulator(
            "--baud", str(args.baud), "--reply-ms", "0", "--seed", "11", cwd=REPO
        )
        control: str = ready["control"]
        try:
            for name in args.only or ["daemon", "sync", "async"]:
                subject: Any
                if name == "daemon":
                    subject = running_daemon(tmp, ready, [], [])
                else:
                    subject = plain_process(name, ready["bus"])
                with subject as process:
                    results.append(measure(name, process.pid, control, args.seconds, tmp))
        finally:
            stop_process(proc)
    report(results, args.baud, args.seconds)


if __name__ == "__main__":
    main()
