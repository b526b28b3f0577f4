"""The daemon's resident memory and CPU at steady state: 12 bays, a swap every minute.

Starts `cabinet sim` (19200 baud) and `cabinet run` with the fleet link off, lets a
rider swap once a minute (the swap-latency bench's rider), and samples the daemon's
/proc/<pid> every second: VmRSS, and CPU time (utime + stime) over wall time.
Goals (DESIGN.md §6, issue 14): resident memory at most 40 MB, idle CPU near zero.
``--display`` enables the rider's web display (``[display]``, on a free port) as well;
``--fleet`` starts a mosquitto on a free port and points ``[mqtt] url`` at it, so the
fleet link runs (status, state, events, telemetry). The daemon also takes any other
``CABINET_<SECTION>__<KEY>`` override from the environment. OpenSSL (libcrypto, libssl) is
loaded only when the configuration may need it - an mqtts:// fleet link or firmware
downloads (``[firmware] allowed_hosts``) - so it shows among the mappings of none of these
runs (``--fleet`` is mqtt://; drivers/paho_without_openssl.py).

After the table, where the memory is at the end (``/proc/PID/smaps_rollup`` and
``smaps``): anonymous (Python's objects: ``[anon]`` is mostly pymalloc's 1 MiB arenas,
``[heap]`` glibc malloc's, where pydantic-core's validators and large objects live) versus
file-backed (shared libraries' touched pages: libpython, pydantic-core, libcrypto, ...).

    .venv/bin/python bench/daemon_resources.py [--minutes N] [--display] [--fleet]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from swap_latency import BAUD, bench_cabinet, one_swap

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def smaps_kb(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup``: where the resident memory is (kB per field)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields


def resident_by_mapping(pid: int, top: int = 12) -> list[tuple[str, int]]:
    """The largest resident mappings (kB), summed per file (``[anon]``: unnamed).

    What to cut depends on which it is: an import that maps a library shows up here by
    name, Python objects show up as ``[anon]`` (pymalloc arenas) and ``[heap]`` (malloc).
    """
    per: dict[str, int] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
            name = head[5] if len(head) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            per[name] = per.get(name, 0) + int(line.split()[1])
    return sorted(per.items(), key=lambda item: -item[1])[:top]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


@contextlib.contextmanager
def fleet_broker(tmp: Path) -> Iterator[None]:
    """A mosquitto for the daemon's fleet link (``[mqtt] url`` through the environment)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\n"
        "allow_anonymous true\npersistence false\n"
    )
    broker = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # listening: a connection is accepted
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if broker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start") from None
                time.sleep(0.05)
        os.environ["CABINET_MQTT__URL"] = f"mqtt://127.0.0.1:{port}"  # the daemon inherits it
        yield
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--display", action="store_true", help="with [display] enabled")
    parser.add_argument("--fleet", action="store_true", help="with the fleet link (mosquitto)")
    args = parser.parse_args()
    if args.display:  # the daemon inherits the environment
        os.environ.update(CABINET_DISPLAY__ENABLED="true", CABINET_DISPLAY__PORT="0")
    display = os.environ.get("CABINET_DISPLAY__ENABLED", "").lower() in {"true", "1"}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.fleet:
            stack.enter_context(fleet_broker(tmp))
        cab = stack.enter_context(bench_cabinet(tmp))
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
        rollup, mappings = smaps_kb(pid), resident_by_mapping(pid)
    peak_rss, final_rss = max(rss), rss[-1]
    print(
        f"daemon at steady state, 12 bays at {BAUD} baud, {swaps} swaps in {wall:.0f} s, "
        f"display {'on' if display else 'off'}, "
        f"fleet link {'on' if os.environ.get('CABINET_MQTT__URL') else 'off'}"
    )
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| resident memory, peak | {peak_rss:.1f} MB | <= 40 MB |")
    print(f"| resident memory, at the end | {final_rss:.1f} MB | |")
    print(f"| CPU, mean over the run | {100 * cpu / wall:.1f} % of one core | near zero |")
    anon, rss_kb = rollup["Anonymous"], rollup["Rss"]
    file_mb, dirty_mb = (rss_kb - anon) / 1024, rollup["Private_Dirty"] / 1024
    print(
        f"\nat the end (smaps_rollup): anonymous {anon / 1024:.1f} MB (Python's objects: "
        f"pymalloc arenas and malloc's heap), file-backed {file_mb:.1f} MB (code, shared "
        f"libraries), private dirty {dirty_mb:.1f} MB"
    )
    print(
        "largest resident mappings: "
        + ", ".join(f"{Path(n).name} {kb / 1024:.1f}" for n, kb in mappings)
    )


if __name__ == "__main__":
    main()
