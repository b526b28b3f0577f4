"""The running daemon's own 12-bay poll cycle and CPU, next to a plain pymodbus client's.

For each transport (RTU over TCP, and a pseudo-terminal serial port) and baud rate,
one ``cabinet sim`` (reply time 0, so the minimum is the bytes' time on the wire):

1. a plain pymodbus client with default settings (sync and async) reads the 12 bays'
   status blocks in a loop, as a user's own poller would;
2. the real ``cabinet run`` runs against the same simulator as it runs normally
   (heartbeat broadcasts, cabinet board, meter, charging writes to the populated bays);
3. the plain clients poll once more (a before/after bracket shows machine drift).

Every cycle figure comes from the simulator's counters (``ctl state``: per unit the
reads, when the latest went onto the line, and the line's idle time before each
request), so master and client are measured by the same clock in the same way:
bay cycle = time between two reads of the same bay, over whole cycles. CPU is the
process's utime + stime (``/proc``) per 1,000 transactions on the line.

Goals (issue 16): daemon bay cycle <= 1.05 x the wire minimum at every baud and below
the plain client's; daemon CPU per 1,000 transactions <= the plain client's + 25 %.

``--profile DIR`` starts the daemon under ``bench/profiled_daemon.py`` (cProfile on CPU
time, switched on for the measurement window only; one ``.prof`` per round) to see where
its time between transactions goes. Profiling slows the daemon: the cycle and CPU
figures of a profiled round are not the daemon's. Instruction counts:
``perf stat -e instructions`` needs hardware counters this machine may not expose
(the bench says so); ``--callgrind`` runs one extra 19200-baud TCP round with the
daemon under ``valgrind --tool=callgrind`` and reports instructions per transaction.

    .venv/bin/python bench/daemon_cycle.py [--cycles N] [--transport tcp|pty|both]
        [--baud B ...] [--profile DIR] [--callgrind]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymodbus.client import (
    AsyncModbusSerialClient,
    AsyncModbusTcpClient,
    ModbusSerialClient,
    ModbusTcpClient,
)
from pymodbus.framer import FramerType

from cabinet.daemon.journal import Journal, JournalError
from cabinet.daemon.tokens import generate_keys
from protocol import bay_map, rtu_timing
from protocol.units import BAY_UNITS
from sim.control import call
from sim.launcher import start_simulator, stop_process

REPO = Path(__file__).resolve().parent.parent
BAUDS = (9600, 19200, 115200)
TICKS = os.sysconf("SC_CLK_TCK")
WARM_UP_S = 3.0  # after cabinet.started: recovery reads and first charger writes are done
BAY_GOAL = 1.05  # daemon bay cycle / wire minimum
CPU_GOAL = 1.25  # daemon CPU per 1,000 transactions / the plain client's


@dataclass(frozen=True, slots=True)
class LineReading:
    """One ``ctl state`` reading of the simulator's bus counters."""

    now: float
    units: dict[int, dict[str, Any]]
    broadcasts: int
    broadcast_s: float

    def transactions(self) -> int:
        """Frames a master put on the line: unit requests plus broadcasts."""
        return sum(int(u["requests"]) for u in self.units.values()) + self.broadcasts

    def line_busy_s(self) -> float:
        """Wire time of every frame so far, broadcasts and the quiet they impose included."""
        return sum(float(u["busy_s"]) for u in self.units.values()) + self.broadcast_s


@dataclass(frozen=True, slots=True)
class Window:
    """What the line saw between two readings."""

    bay_cycle_s: float  # mean over the bays of (time between two reads of that bay)
    cycles: float
    transactions: int
    gap_s: float  # mean line silence a master left before a bay read, beyond t3.5 (bays 2-12)
    busy_s: float = 0.0  # wire time per cycle of everything the master sent (bays and extras)

    @property
    def per_cycle(self) -> float:
        return self.transactions / self.cycles if self.cycles else 0.0


def line_reading(control: str) -> LineReading:
    host, port = control.removeprefix("tcp://").split(":")
    state = asyncio.run(call(host, int(port), {"verb": "state"}))
    bus = state["bus"]
    units = {int(unit): counters for unit, counters in bus["units"].items()}
    return LineReading(
        float(bus["now"]),
        units,
        int(bus.get("broadcasts", 0)),
        float(bus.get("broadcast_s", 0.0)),
    )


def window(before: LineReading, after: LineReading) -> Window:
    cycles: list[float] = []
    per_bay: list[float] = []
    gaps: list[float] = []
    for unit in BAY_UNITS:
        a, b = before.units[unit], after.units[unit]
        reads = int(b["reads"]) - int(a["reads"])
        if reads <= 0:
            continue
        cycles.append(reads)
        if int(a["reads"]) > 0:
            per_bay.append((float(b["last_read_at"]) - float(a["last_read_at"])) / reads)
        if unit != BAY_UNITS[0]:  # bay 1's silence holds the cycle's end: pacing, extras
            gaps.append((float(b["idle_before_s"]) - float(a["idle_before_s"])) / reads)
    mean_cycles = statistics.fmean(cycles) if cycles else 0.0
    return Window(
        bay_cycle_s=statistics.fmean(per_bay) if per_bay else float("nan"),
        cycles=mean_cycles,
        transactions=after.transactions() - before.transactions(),
        gap_s=statistics.fmean(gaps) if gaps else float("nan"),
        busy_s=(after.line_busy_s() - before.line_busy_s()) / mean_cycles if cycles else 0.0,
    )


# -- the plain client: what a user would write with pymodbus' defaults ------------------


def plain_sync(bus_url: str, baud: int, cycles: int, control: str) -> tuple[Window, float]:
    """Poll the 12 bays with pymodbus' sync client, default settings; (window, CPU s)."""
    client: ModbusTcpClient | ModbusSerialClient
    if bus_url.startswith("tcp://"):
        host, port = bus_url.removeprefix("tcp://").split(":")
        client = ModbusTcpClient(host, port=int(port), framer=FramerType.RTU)
    else:
        client = ModbusSerialClient(bus_url.removeprefix("serial://").split("?")[0], baudrate=baud)
    assert client.connect()
    try:

        def cycle() -> None:
            for unit in BAY_UNITS:
                reply = client.read_input_registers(
                    bay_map.STATUS_START, count=bay_map.STATUS_COUNT, device_id=unit
                )
                assert not reply.isError()

        cycle()  # warm-up
        before, cpu0 = line_reading(control), time.process_time()
        for _ in range(cycles):
            cycle()
        cpu, after = time.process_time() - cpu0, line_reading(control)
    finally:
        client.close()  # type: ignore[no-untyped-call]
    return window(before, after), cpu


def plain_async(bus_url: str, baud: int, cycles: int, control: str) -> tuple[Window, float]:
    """Poll the 12 bays with pymodbus' async client, default settings; (window, CPU s)."""

    async def run() -> tuple[LineReading, LineReading, float]:
        client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if bus_url.startswith("tcp://"):
            host, port = bus_url.removeprefix("tcp://").split(":")
            client = AsyncModbusTcpClient(host, port=int(port), framer=FramerType.RTU)
        else:
            path = bus_url.removeprefix("serial://").split("?")[0]
            client = AsyncModbusSerialClient(path, baudrate=baud)
        assert await client.connect()
        try:

            async def cycle() -> None:
                for unit in BAY_UNITS:
                    reply = await client.read_input_registers(
                        bay_map.STATUS_START, count=bay_map.STATUS_COUNT, device_id=unit
                    )
                    assert not reply.isError()

            await cycle()
            before, cpu0 = await asyncio.to_thread(line_reading, control), time.process_time()
            for _ in range(cycles):
                await cycle()
            cpu = time.process_time() - cpu0
            return before, await asyncio.to_thread(line_reading, control), cpu
        finally:
            client.close()

    before, after, cpu = asyncio.run(run())
    return window(before, after), cpu


# -- the daemon ------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _started(journal: Path) -> bool:
    if not journal.exists():
        return False
    try:
        j = Journal(journal)
    except JournalError:
        return False  # the daemon holds it while it sets WAL mode
    try:
        return any(e["type"] == "cabinet.started" for e in j.events(limit=1000))
    finally:
        j.close()


@contextmanager
def running_daemon(
    tmp: Path, ready: dict[str, Any], prefix: list[str], python_args: list[str]
) -> Iterator[subprocess.Popen[bytes]]:
    """`cabinet run` against the simulator, as systemd would start it; stopped afterwards."""
    keys = generate_keys(str(tmp / "backend"))
    state = tmp / "state"
    config = tmp / "cabinet.toml"
    config.write_text(
        f'[cabinet]\nid = "bench"\nstate_dir = "{state}"\n'
        f'[bus]\nurl = "{ready["bus"]}"\n[scanner]\nurl = "{ready["scanner"]}"\n'
        f'[auth]\npublic_keys = ["{keys.public}"]\n'
    )
    log = (tmp / "daemon.log").open("ab")
    daemon = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            *(python_args or ["-m", "cabinet.console.cli"]),
            "run",
            "-c",
            str(config),
        ],
        stdout=log,
        stderr=log,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60 * (10 if prefix else 1)
        while not _started(state / "journal.db"):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: see {tmp / 'daemon.log'}")
            time.sleep(0.1)
        yield daemon
    finally:
        stop_process(daemon, timeout_s=120 if prefix else 10)
        log.close()


def measure_daemon(
    tmp: Path, ready: dict[str, Any], seconds: float, python_args: list[str]
) -> tuple[Window, float]:
    with running_daemon(tmp, ready, [], python_args) as daemon:
        time.sleep(WARM_UP_S)  # a fixed settling time, not a synchronisation
        if python_args:
            daemon.send_signal(signal.SIGUSR1)  # profiled_daemon.py: start the profile
        before, cpu0 = line_reading(ready["control"]), cpu_s(daemon.pid)
        time.sleep(seconds)  # the measurement window itself
        cpu, after = cpu_s(daemon.pid) - cpu0, line_reading(ready["control"])
        if python_args:
            out = Path(python_args[-1])
            daemon.send_signal(signal.SIGUSR2)  # profiled_daemon.py: write the profile
            while not out.exists() and daemon.poll() is None:
                time.sleep(0.05)
    return window(before, after), cpu


# -- one round and the report -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Round:
    transport: str
    baud: int
    minimum_s: float
    daemon: Window
    daemon_cpu_s: float
    plain: dict[str, list[tuple[Window, float]]]

    def best_plain(self) -> tuple[str, Window, float]:
        """The plain client (sync or async) with the shorter mean bay cycle."""
        best = min(
            self.plain,
            key=lambda name: statistics.fmean(w.bay_cycle_s for w, _ in self.plain[name]),
        )
        runs = self.plain[best]
        cycle = statistics.fmean(w.bay_cycle_s for w, _ in runs)
        gap = statistics.fmean(w.gap_s for w, _ in runs)
        tx = sum(w.transactions for w, _ in runs)
        cpu = sum(c for _, c in runs)
        return best, Window(cycle, 0.0, tx, gap), cpu


def one_round(transport: str, baud: int, cycles: int, profile: Path | None) -> Round:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        bus = "tcp://127.0.0.1:0" if transport == "tcp" else f"pty://{tmp}/bus"
        proc, ready = start_simulator(
            "--baud", str(baud), "--reply-ms", "0", "--seed", "11", bus=bus, cwd=REPO
        )
        try:
            plain: dict[str, list[tuple[Window, float]]] = {"sync": [], "async": []}
            runners: dict[str, Callable[..., tuple[Window, float]]] = {
                "sync": plain_sync,
                "async": plain_async,
            }
            for name, run in runners.items():
                plain[name].append(run(ready["bus"], baud, cycles, ready["control"]))
            minimum = len(BAY_UNITS) * rtu_timing.read_transaction_time(bay_map.STATUS_COUNT, baud)
            python_args: list[str] = []
            if profile is not None:
                out = profile / f"daemon-{transport}-{baud}.prof"
                python_args = [str(REPO / "bench" / "profiled_daemon.py"), str(out)]
            seconds = max(10.0, cycles * minimum * 1.3)
            daemon, daemon_cpu = measure_daemon(tmp, ready, seconds, python_args)
            for name, run in runners.items():
                plain[name].append(run(ready["bus"], baud, cycles, ready["control"]))
        finally:
            stop_process(proc)
    return Round(transport, baud, minimum, daemon, daemon_cpu, plain)


def per_1000(cpu: float, transactions: int) -> float:
    return 1000 * cpu / transactions if transactions else float("nan")


def report(rounds: list[Round]) -> None:
    """Two Markdown tables: bay cycle against minimum and plain client; CPU per transaction.

    "daemon line time" is the wire time of everything the daemon put on the line per bay
    cycle (bays, cabinet board, meter, charger writes, heartbeat broadcasts with their
    10 ms quiet): the floor of its bay cycle while it does those extras every cycle. "gap"
    is the silence a master leaves before a bay read beyond the t3.5 it owes the line
    (bays 2-12; bay 1's holds the cycle's end): its own time between transactions.
    """
    print(
        "| transport | baud | wire min ms | daemon bay cycle ms | / min | plain client ms "
        "| / min | daemon line time ms | daemon gap us | plain gap us | tx per daemon cycle "
        "| goal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rounds:
        name, plain, _ = r.best_plain()
        d = r.daemon
        ok = d.bay_cycle_s <= BAY_GOAL * r.minimum_s and d.bay_cycle_s < plain.bay_cycle_s
        print(
            f"| {r.transport} | {r.baud} | {r.minimum_s * 1000:.1f} | {d.bay_cycle_s * 1000:.1f} "
            f"| {d.bay_cycle_s / r.minimum_s:.3f} | {plain.bay_cycle_s * 1000:.1f} ({name}) "
            f"| {plain.bay_cycle_s / r.minimum_s:.3f} | {d.busy_s * 1000:.1f} "
            f"| {d.gap_s * 1e6:.0f} "
            f"| {plain.gap_s * 1e6:.0f} | {d.per_cycle:.2f} "
            f"| <= {BAY_GOAL:.2f} x min and < plain: {'met' if ok else 'NOT met'} |"
        )
    print()
    print("| transport | baud | daemon CPU ms / 1000 tx | plain sync | plain async | goal |")
    print("|---|---|---|---|---|---|")
    for r in rounds:
        daemon = per_1000(r.daemon_cpu_s, r.daemon.transactions)
        plain_cpu = {
            name: per_1000(sum(c for _, c in runs), sum(w.transactions for w, _ in runs))
            for name, runs in r.plain.items()
        }
        reference = min(plain_cpu.values())
        verdict = "met" if daemon <= CPU_GOAL * reference else "NOT met"
        print(
            f"| {r.transport} | {r.baud} | {daemon * 1000:.0f} | {plain_cpu['sync'] * 1000:.0f} "
            f"| {plain_cpu['async'] * 1000:.0f} | <= {CPU_GOAL:.2f} x best plain "
            f"({CPU_GOAL * reference * 1000:.0f}): {verdict} |"
        )


# -- instructions -------------------------------------------------------------------------


def perf_instructions_available() -> bool:
    perf = shutil.which("perf")
    if perf is None:
        return False
    result = subprocess.run(
        [perf, "stat", "-x,", "-e", "instructions:u", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "<not supported>" not in result.stderr and result.returncode == 0


def callgrind_round(cycles: int) -> None:
    """Instructions per transaction of the daemon under callgrind (19200 baud, TCP)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("callgrind: valgrind is not installed")
        return
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        out = tmp / "callgrind.out"
        proc, ready = start_simulator(
            "--baud", "19200", "--reply-ms", "0", "--seed", "11", cwd=REPO
        )
        prefix = [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        try:
            with running_daemon(tmp, ready, prefix, []) as daemon:
                time.sleep(WARM_UP_S * 3)
                control = shutil.which("callgrind_control") or "callgrind_control"
                subprocess.run([control, "-i", "on", str(daemon.pid)], check=True)
                before = line_reading(ready["control"])
                time.sleep(max(20.0, cycles * 0.5))
                after = line_reading(ready["control"])
                subprocess.run([control, "-i", "off", str(daemon.pid)], check=True)
        finally:
            stop_process(proc)
        total = 0
        for line in out.read_text().splitlines():
            if line.startswith("totals:") or line.startswith("summary:"):
                total = int(line.split()[1])
        tx = after.transactions() - before.transactions()
        print(
            f"callgrind (19200 baud, tcp, daemon slowed down by valgrind): {total:,} instructions "
            f"for {tx} transactions = {total / max(tx, 1):,.0f} per transaction"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--transport", choices=["tcp", "pty", "both"], default="both")
    parser.add_argument("--baud", type=int, action="append", help="repeatable; default all")
    parser.add_argument("--profile", type=Path, help="write the daemon's cProfile here")
    parser.add_argument("--callgrind", action="store_true")
    args = parser.parse_args()
    transports = ["tcp", "pty"] if args.transport == "both" else [args.transport]
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    rounds = [
        one_round(transport, baud, args.cycles, args.profile)
        for transport in transports
        for baud in args.baud or BAUDS
    ]
    report(rounds)
    print()
    if perf_instructions_available():
        print("instructions: `perf stat -e instructions:u -p PID` works on this machine")
    else:
        print("instructions: perf is present but this machine exposes no hardware counters")
    if args.callgrind:
        callgrind_round(args.cycles)


if __name__ == "__main__":
    main()
