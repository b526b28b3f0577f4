"""The fleet simulation at growing N: the largest fleet this machine sustains.

Starts its own mosquitto on a free port for each N (``max_connections -1``, the fd
limit raised to the hard limit) and runs `cabinet sim fleet` over every core for each N
of the list, printing the fleet's own report lines; then the largest N that had every
cabinet online and 0 not delivered / 0 gaps / 0 duplicates.

    .venv/bin/python bench/fleet.py [--cabinets 500 1000 ...] [--duration S] [--pace F]

"Sustained" is about delivery; the swaps each report counts show how much service the
cabinets still give (on a saturated machine their loops lag and fewer riders get through).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = "/usr/sbin/mosquitto"
GOAL_CABINETS = 1000  # issue 14


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A mosquitto for one run: no connection cap, as many fds as the hard limit allows."""
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"per_listener_settings false\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        "persistence false\nmax_inflight_messages 0\nmax_queued_messages 100000\n"
        "max_connections -1\n"
    )
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by mosquitto
    log = (workdir / "mosquitto.log").open("wb")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # up when it accepts a connection
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            time.sleep(0.05)
        else:
            return proc, f"mqtt://127.0.0.1:{port}"
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def run_one(n: int, duration: float, pace: float, processes: int | None) -> tuple[bool, str]:
    """One fleet run against a fresh broker: whether nothing was lost, and its report."""
    with tempfile.TemporaryDirectory() as tmp:
        broker, url = _start_broker(Path(tmp))
        try:
            cmd = [sys.executable, "-m", "cabinet.console.cli", "sim", "fleet",
                   "--cabinets", str(n), "--broker", url, "--duration", str(duration),
                   "--pace", str(pace)]  # fmt: skip
            if processes is not None:
                cmd += ["--processes", str(processes)]
            started = time.monotonic()
            result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
            broker_cpu = _cpu_s(broker.pid) / (time.monotonic() - started)
        finally:
            broker.terminate()
            broker.wait(timeout=10)
    report = result.stdout.strip() or result.stderr.strip()[-2000:]
    return result.returncode == 0, f"{report}\nmosquitto: {100 * broker_cpu:.0f} % of one core"


def _cpu_s(pid: int) -> float:
    """A process's CPU time so far (utime + stime from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cabinets", type=int, nargs="+", default=[500, 1000])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--pace", type=float, default=2.0)
    parser.add_argument("--processes", type=int, default=None)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; pace {args.pace}; {args.duration:.0f} s per run")
    largest = 0
    for n in args.cabinets:
        ok, report = run_one(n, args.duration, args.pace, args.processes)
        print(report)
        print(f"-> {n} cabinets: {'sustained' if ok else 'NOT sustained'}\n", flush=True)
        if ok:
            largest = max(largest, n)
    print(
        f"largest N sustained (all online, 0 not delivered, 0 gaps, 0 duplicates): {largest} "
        f"(goal >= {GOAL_CABINETS}: {'met' if largest >= GOAL_CABINETS else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
