"""The running daemon's own 12-bay poll cycle and CPU, next to a plain pymodbus client's.

For each transport (RTU over TCP, and a pseudo-terminal serial port) and baud rate,
one ``cabinet sim`` (reply time 0, so the minimum is the bytes' time on the wire):

1. a plain pymodbus client with default settings (sync and async) reads the 12 bays'
   status blocks in a loop, as a user's own poller would;
2. the real ``cabinet run`` runs against the same simulator as it runs normally
   (heartbeat broadcasts, the cabinet board every ``bus.cabinet_board_interval_s``,
   meter, charging writes to the populated bays);
3. the plain clients poll once more (a before/after bracket shows machine drift).

Every cycle figure comes from the simulator's counters (``ctl state``: per unit the
reads, when the latest went onto the line, and the line's idle time before each
request), so master and client are measured by the same clock in the same way:
bay cycle = time between two reads of the same bay, over whole cycles. CPU per 1,000
transactions on the line: the total is the scheduler's own count (``schedstat``, ns; the
same clock for the daemon and the plain clients), printed with the user / kernel split
of ``/proc/PID/stat``, which this VM takes by sampling at each tick
(``CONFIG_TICK_CPU_ACCOUNTING``): an estimate, and the kernel part (loopback TCP, epoll)
is time no instruction count sees.

Goals (issue 16): daemon bay cycle <= 1.05 x the wire minimum at every baud and below
the plain client's; daemon CPU per 1,000 transactions <= the plain client's + 25 %.

``--profile DIR`` starts the daemon under ``bench/profiled_daemon.py`` (cProfile on CPU
time, switched on for the measurement window only; one ``.prof`` per round) to see where
its time between transactions goes. Profiling slows the daemon: the cycle and CPU
figures of a profiled round are not the daemon's. Instruction counts:
``perf stat -e instructions`` needs hardware counters this machine may not expose
(the bench says so); ``--callgrind`` adds a 19200-baud TCP round under
``valgrind --tool=callgrind`` for the daemon *and* the plain sync and async clients
(``bench/plain_poller.py``), all measured the same way: instrumentation off at start
(``--instr-atstart=no``), switched on after start-up and a settling time for a fixed
window, divided by the transactions the simulator counted in it. The plain clients are
also measured by difference of two runs (``--callgrind-reads`` more reads in one),
start-up and exit cancelling: a cross-check of the window method. Instructions are
user space only and stable on a loaded machine; they are not CPU time (see
``bench/daemon_syscalls.py`` for system calls, context switches and kernel time);
``--callgrind-cache-sim`` adds callgrind's cache and branch simulation, misses per
transaction, which say why equal instructions need not cost equal CPU.

    .venv/bin/python bench/daemon_cycle.py [--cycles N] [--transport tcp|pty|both]
        [--baud B ...] [--profile DIR] [--no-cycle] [--callgrind [--callgrind-reads N]
        [--callgrind-cache-sim] [--callgrind-daemon-only]]
    .venv/bin/python bench/daemon_cycle.py --side-by-side CHECKOUT [--baud B ...]
        [--windows N]

``--side-by-side`` compares CPU time, not instructions, between two versions on a
shared machine: ``CHECKOUT``'s daemon (a copy of the tree before a change) and this
tree's, started at the same time, each on its own simulator, measured over the same
windows (``side_by_side``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an install
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


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU a process spent in a window.

    ``total_s`` is the scheduler's own count (``sum_exec_runtime``, in ns: ``/proc/PID/
    task/*/schedstat`` from outside, ``time.process_time`` from inside), the same clock
    for the daemon and the plain clients. ``utime_s`` and ``stime_s`` are the split the
    kernel reports in ``/proc/PID/stat`` (``os.times`` from inside): this VM charges CPU
    by sampling the running context at each tick (``CONFIG_TICK_CPU_ACCOUNTING``), so the
    split is an estimate with 10 ms steps, and kernel time (loopback TCP, epoll) is in
    ``stime_s``, where no instruction count looks.
    """

    total_s: float
    utime_s: float
    stime_s: float

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.total_s + other.total_s,
            self.utime_s + other.utime_s,
            self.stime_s + other.stime_s,
        )

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.total_s - other.total_s,
            self.utime_s - other.utime_s,
            self.stime_s - other.stime_s,
        )


NO_CPU = Cpu(0.0, 0.0, 0.0)


def own_cpu() -> Cpu:
    """This process's CPU so far (the plain clients run in the bench's own process)."""
    times = os.times()
    return Cpu(time.process_time(), times.user, times.system)


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


def plain_sync(bus_url: str, baud: int, cycles: int, control: str) -> tuple[Window, Cpu]:
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
        before, cpu0 = line_reading(control), own_cpu()
        for _ in range(cycles):
            cycle()
        cpu, after = own_cpu() - cpu0, line_reading(control)
    finally:
        client.close()  # type: ignore[no-untyped-call]
    return window(before, after), cpu


def plain_async(bus_url: str, baud: int, cycles: int, control: str) -> tuple[Window, Cpu]:
    """Poll the 12 bays with pymodbus' async client, default settings; (window, CPU s)."""

    async def run() -> tuple[LineReading, LineReading, Cpu]:
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
            before, cpu0 = await asyncio.to_thread(line_reading, control), own_cpu()
            for _ in range(cycles):
                await cycle()
            cpu = own_cpu() - cpu0
            return before, await asyncio.to_thread(line_reading, control), cpu
        finally:
            client.close()

    before, after, cpu = asyncio.run(run())
    return window(before, after), cpu


# -- the daemon ------------------------------------------------------------------------


def process_cpu(pid: int) -> Cpu:
    """Another process's CPU so far: schedstat summed over its threads, and its stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    run_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            run_ns += int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:  # a thread that ended in between: missed by the total
            continue  # (measured: the daemon runs its window on its one thread)
    return Cpu(run_ns / 1e9, int(fields[11]) / TICKS, int(fields[12]) / TICKS)


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
    tmp: Path,
    ready: dict[str, Any],
    prefix: list[str],
    python_args: list[str],
    bus_extra: str = "",
    repo: Path = REPO,
) -> Iterator[subprocess.Popen[bytes]]:
    """`cabinet run` against the simulator, as systemd would start it; stopped afterwards."""
    keys = generate_keys(str(tmp / "backend"))
    state = tmp / "state"
    config = tmp / "cabinet.toml"
    config.write_text(
        f'[cabinet]\nid = "bench"\nstate_dir = "{state}"\n'
        f'[bus]\nurl = "{ready["bus"]}"\n{bus_extra}[scanner]\nurl = "{ready["scanner"]}"\n'
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
        cwd=repo,
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
    tmp: Path, ready: dict[str, Any], seconds: float, python_args: list[str], bus_extra: str
) -> tuple[Window, Cpu]:
    with running_daemon(tmp, ready, [], python_args, bus_extra) as daemon:
        time.sleep(WARM_UP_S)  # a fixed settling time, not a synchronisation
        if python_args:
            daemon.send_signal(signal.SIGUSR1)  # profiled_daemon.py: start the profile
        before, cpu0 = line_reading(ready["control"]), process_cpu(daemon.pid)
        time.sleep(seconds)  # the measurement window itself
        cpu, after = process_cpu(daemon.pid) - cpu0, line_reading(ready["control"])
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
    daemon_cpu: Cpu
    plain: dict[str, list[tuple[Window, Cpu]]]
    load: float  # 1-minute load average after the round: other work on the machine skews it

    def best_plain(self) -> tuple[str, Window, Cpu]:
        """The plain client (sync or async) with the shorter mean bay cycle."""
        best = min(
            self.plain,
            key=lambda name: statistics.fmean(w.bay_cycle_s for w, _ in self.plain[name]),
        )
        runs = self.plain[best]
        cycle = statistics.fmean(w.bay_cycle_s for w, _ in runs)
        gap = statistics.fmean(w.gap_s for w, _ in runs)
        tx = sum(w.transactions for w, _ in runs)
        cpu = sum((c for _, c in runs), NO_CPU)
        return best, Window(cycle, 0.0, tx, gap), cpu


def one_round(
    transport: str, baud: int, cycles: int, profile: Path | None, bus_extra: str = ""
) -> Round:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        bus = "tcp://127.0.0.1:0" if transport == "tcp" else f"pty://{tmp}/bus"
        proc, ready = start_simulator(
            "--baud", str(baud), "--reply-ms", "0", "--seed", "11", bus=bus, cwd=REPO
        )
        try:
            plain: dict[str, list[tuple[Window, Cpu]]] = {"sync": [], "async": []}
            runners: dict[str, Callable[..., tuple[Window, Cpu]]] = {
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
            daemon, daemon_cpu = measure_daemon(tmp, ready, seconds, python_args, bus_extra)
            for name, run in runners.items():
                plain[name].append(run(ready["bus"], baud, cycles, ready["control"]))
        finally:
            stop_process(proc)
    return Round(transport, baud, minimum, daemon, daemon_cpu, plain, os.getloadavg()[0])


def cpu_per_1000(cpu: Cpu, transactions: int) -> Cpu:
    """CPU seconds per 1,000 transactions (NaN without transactions)."""
    if not transactions:
        return Cpu(float("nan"), float("nan"), float("nan"))
    k = 1000 / transactions
    return Cpu(cpu.total_s * k, cpu.utime_s * k, cpu.stime_s * k)


def report(rounds: list[Round]) -> None:
    """Two Markdown tables: bay cycle against minimum and plain client; CPU per transaction.

    "/ min" is the bay cycle over the wire-time minimum of the 12 bay reads alone (the
    issue's goal). "daemon line time" is the wire time of everything the daemon put on
    the line per bay cycle (bays, cabinet board when due, meter, charger writes, heartbeat
    broadcasts with their 10 ms quiet), and "/ own line" its bay cycle over that: how
    close the daemon runs to the floor of the frames it chose to send (1.000 = not a
    microsecond lost between them). "gap" is the silence a master leaves before a bay
    read beyond the t3.5 it owes the line (bays 2-12; bay 1's holds the cycle's end): its
    own time between transactions, the daemon's next to the plain client's. The two
    goal columns are judged separately, so a row says which goal is met where.
    """
    print(
        "| transport | baud | wire min ms | daemon bay cycle ms | / min | plain client ms "
        "| / min | daemon line time ms | daemon / own line | daemon gap us | plain gap us "
        f"| tx per daemon cycle | <= {BAY_GOAL:.2f} x min | < plain | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rounds:
        name, plain, _ = r.best_plain()
        d = r.daemon
        own = d.bay_cycle_s / d.busy_s if d.busy_s else float("nan")
        print(
            f"| {r.transport} | {r.baud} | {r.minimum_s * 1000:.1f} | {d.bay_cycle_s * 1000:.1f} "
            f"| {d.bay_cycle_s / r.minimum_s:.3f} | {plain.bay_cycle_s * 1000:.1f} ({name}) "
            f"| {plain.bay_cycle_s / r.minimum_s:.3f} | {d.busy_s * 1000:.1f} | {own:.3f} "
            f"| {d.gap_s * 1e6:.0f} | {plain.gap_s * 1e6:.0f} | {d.per_cycle:.2f} "
            f"| {'met' if d.bay_cycle_s <= BAY_GOAL * r.minimum_s else 'NOT met'} "
            f"| {'met' if d.bay_cycle_s < plain.bay_cycle_s else 'NOT met'} | {r.load:.2f} |"
        )
    print()
    print(
        "CPU ms per 1,000 transactions: total from the scheduler (schedstat / process_time, "
        "ns); user + kernel split from /proc stat (tick-sampled estimate, 10 ms steps)"
    )
    print(
        "| transport | baud | daemon total | daemon user | daemon kernel | plain sync total "
        "| sync user | sync kernel | plain async total | async user | async kernel | goal | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rounds:
        daemon = cpu_per_1000(r.daemon_cpu, r.daemon.transactions)
        plain_cpu = {
            name: cpu_per_1000(
                sum((c for _, c in runs), NO_CPU), sum(w.transactions for w, _ in runs)
            )
            for name, runs in r.plain.items()
        }
        reference = min(c.total_s for c in plain_cpu.values())
        verdict = "met" if daemon.total_s <= CPU_GOAL * reference else "NOT met"
        cells = " | ".join(
            f"{c.total_s * 1000:.0f} | {c.utime_s * 1000:.0f} | {c.stime_s * 1000:.0f}"
            for c in (daemon, plain_cpu["sync"], plain_cpu["async"])
        )
        print(
            f"| {r.transport} | {r.baud} | {cells} | <= {CPU_GOAL:.2f} x best plain "
            f"({CPU_GOAL * reference * 1000:.0f}): {verdict} | {r.load:.2f} |"
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


CALLGRIND_BAUD = 19200
PLAIN_POLLER = REPO / "bench" / "plain_poller.py"
#: the plain clients' differencing runs: reads in the short run, and the extra reads
SHORT_READS = 200
#: more callgrind options for every subject (an experiment may add ``--cache-sim=yes``)
CALLGRIND_OPTIONS: list[str] = []


#: ``--callgrind-cache-sim``: callgrind's cache and branch simulation, for why the same
#: instructions cost one process more CPU than another (code and data footprint)
CACHE_SIM_OPTIONS = ["--cache-sim=yes", "--branch-sim=yes"]


def callgrind_events(out: Path) -> dict[str, int]:
    """The events callgrind collected (``Ir``, and misses with the cache simulation)."""
    names: list[str] = []
    totals: list[int] = []
    for line in out.read_text().splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith(("totals:", "summary:")):
            totals = [int(x) for x in line.split()[1:]]
    return dict(zip(names, totals, strict=False))


@dataclass(frozen=True, slots=True)
class Instructions:
    """One callgrind figure: who, how it was taken, instructions and transactions."""

    subject: str
    method: str
    events: dict[str, int]  # Ir, and with the cache simulation I1mr, D1mr, Bcm, ...
    transactions: int

    @property
    def instructions(self) -> int:
        return self.events.get("Ir", 0)

    @property
    def per_tx(self) -> float:
        return self.instructions / self.transactions if self.transactions else float("nan")

    def event_per_tx(self, *names: str) -> float:
        """The sum of these events per transaction (NaN if none was collected)."""
        if not self.transactions or not any(name in self.events for name in names):
            return float("nan")
        return sum(self.events.get(name, 0) for name in names) / self.transactions


def _toggled_window(process: subprocess.Popen[bytes], control_url: str, seconds: float) -> int:
    """Switch callgrind's instrumentation on for ``seconds``; transactions in between.

    The process runs under ``--instr-atstart=no``: interpreter start-up, imports,
    connecting and the first cycles are never counted, and neither is the exit.
    """
    control = shutil.which("callgrind_control") or "callgrind_control"
    subprocess.run([control, "-i", "on", str(process.pid)], check=True, capture_output=True)
    before = line_reading(control_url)
    time.sleep(seconds)  # the measurement window itself
    after = line_reading(control_url)
    subprocess.run([control, "-i", "off", str(process.pid)], check=True, capture_output=True)
    return after.transactions() - before.transactions()


def _wait_polling(process: subprocess.Popen[bytes], control_url: str, timeout_s: float) -> None:
    """Until the simulator has seen this client's reads grow (it connected and polls)."""
    first = line_reading(control_url).transactions()
    deadline = time.monotonic() + timeout_s
    while line_reading(control_url).transactions() < first + 2 * len(BAY_UNITS):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the plain client under callgrind did not start polling")
        time.sleep(0.2)


def callgrind_daemon(tmp: Path, ready: dict[str, Any], seconds: float) -> Instructions:
    """The daemon's instructions per transaction over a window after its start-up."""
    out = tmp / "daemon.callgrind"
    prefix = [
        "valgrind",
        "--tool=callgrind",
        *CALLGRIND_OPTIONS,
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    ]
    with running_daemon(tmp, ready, prefix, []) as daemon:
        time.sleep(WARM_UP_S * 3)  # settling after cabinet.started, slower under valgrind
        tx = _toggled_window(daemon, ready["control"], seconds)
    return Instructions("daemon", "window", callgrind_events(out), tx)


def callgrind_plain_window(
    kind: str, tmp: Path, ready: dict[str, Any], seconds: float
) -> Instructions:
    """A plain client's instructions per transaction, measured exactly as the daemon's."""
    out = tmp / f"{kind}-window.callgrind"
    process = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            *CALLGRIND_OPTIONS,
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(PLAIN_POLLER),
            kind,
            ready["bus"],
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        _wait_polling(process, ready["control"], timeout_s=300)
        time.sleep(WARM_UP_S)  # a few cycles more before the window, as for the daemon
        tx = _toggled_window(process, ready["control"], seconds)
    finally:
        stop_process(process, timeout_s=120)
    return Instructions(f"plain {kind}", "window", callgrind_events(out), tx)


def callgrind_plain_difference(
    kind: str, tmp: Path, ready: dict[str, Any], extra_reads: int
) -> Instructions:
    """callgrind(short + extra reads) - callgrind(short reads): start-up and exit cancel."""
    totals: list[dict[str, int]] = []
    for reads in (SHORT_READS, SHORT_READS + extra_reads):
        out = tmp / f"{kind}-{reads}.callgrind"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                *CALLGRIND_OPTIONS,
                f"--callgrind-out-file={out}",
                sys.executable,
                str(PLAIN_POLLER),
                kind,
                ready["bus"],
                "--reads",
                str(reads),
            ],
            check=True,
            capture_output=True,
            cwd=REPO,
        )
        totals.append(callgrind_events(out))
    return Instructions(
        f"plain {kind}",
        f"difference {SHORT_READS + extra_reads}-{SHORT_READS} reads",
        {name: totals[1][name] - totals[0].get(name, 0) for name in totals[1]},
        extra_reads,
    )


def callgrind_round(cycles: int, extra_reads: int, plain_kinds: tuple[str, ...]) -> None:
    """User-space instructions per transaction: the daemon next to the plain clients.

    One simulator (RTU over TCP, 19200 baud, reply time 0) serves every subject in
    turn. The daemon and the plain clients are measured the same way ("window"): under
    ``--instr-atstart=no``, instrumentation switched on after start-up and a settling
    time, for a fixed window, divided by the transactions the simulator counted. The
    plain clients are also measured by difference of two runs (N and N + extra reads,
    start-up and exit cancelling), a cross-check of the window method. callgrind counts
    user-space instructions only: kernel time (loopback TCP, epoll) is not in them.
    ``plain_kinds`` empty: the daemon alone (the plain clients' figures barely move
    between runs: 246k and 346k a transaction, sync and async, issue 16).
    """
    if shutil.which("valgrind") is None:
        print("callgrind: valgrind is not installed")
        return
    seconds = max(20.0, cycles * 0.5)
    results: list[Instructions] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        proc, ready = start_simulator(
            "--baud", str(CALLGRIND_BAUD), "--reply-ms", "0", "--seed", "11", cwd=REPO
        )
        try:
            results.append(callgrind_daemon(tmp, ready, seconds))
            for kind in plain_kinds:
                results.append(callgrind_plain_window(kind, tmp, ready, seconds))
                results.append(callgrind_plain_difference(kind, tmp, ready, extra_reads))
        finally:
            stop_process(proc)
    daemon = results[0]
    reference = min((r.per_tx for r in results[1:] if r.method == "window"), default=None)
    print(
        f"callgrind, {CALLGRIND_BAUD} baud, tcp (every subject slowed by valgrind; "
        f"load {os.getloadavg()[0]:.2f})"
    )
    cache_sim = "I1mr" in daemon.events
    extra = (
        " | L1 instruction misses / tx | L1 data misses / tx | LL misses / tx "
        "| branch mispredicts / tx"
        if cache_sim
        else ""
    )
    print(f"| subject | method | instructions | transactions | per transaction | / daemon{extra} |")
    print("|---" * (10 if cache_sim else 6) + "|")
    for r in results:
        misses = (
            f" | {r.event_per_tx('I1mr'):,.0f} | {r.event_per_tx('D1mr', 'D1mw'):,.0f} "
            f"| {r.event_per_tx('ILmr', 'DLmr', 'DLmw'):,.0f} "
            f"| {r.event_per_tx('Bcm', 'Bim'):,.0f}"
            if cache_sim
            else ""
        )
        print(
            f"| {r.subject} | {r.method} | {r.instructions:,} | {r.transactions} "
            f"| {r.per_tx:,.0f} | {r.per_tx / daemon.per_tx:.2f}{misses} |"
        )
    if reference is None:
        return
    verdict = "met" if daemon.per_tx <= CPU_GOAL * reference else "NOT met"
    print(
        f"instructions goal: daemon {daemon.per_tx:,.0f} <= {CPU_GOAL:.2f} x best plain "
        f"(window) {reference:,.0f} = {CPU_GOAL * reference:,.0f}: {verdict}"
    )


# -- side by side: CPU of two versions of the daemon at the same moments ------------------


def side_by_side(other: Path, baud: int, windows: int, seconds: float) -> None:
    """The daemon of ``other`` (another checkout) and this one, run at the same time.

    On a shared machine the CPU per transaction of one run drifts with the others' load
    by more than a change is worth (1.19-1.44 x the plain client in six rounds of the
    same code, issue 16). Two versions run side by side, each against a simulator of its
    own (RTU over TCP, reply time 0), meet the same load at the same moments; each window
    prints both, so a change shows as the same sign in every window. The bay cycle over
    the wire minimum is printed too: whether a change costs latency under that load.
    """
    trees = {"other": other.resolve(), "this": REPO}
    with contextlib.ExitStack() as stack:
        subjects: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        for name, tree in trees.items():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            proc, ready = start_simulator(
                "--baud", str(baud), "--reply-ms", "0", "--seed", "11", cwd=REPO
            )
            stack.callback(stop_process, proc)
            daemon = stack.enter_context(running_daemon(tmp, ready, [], [], repo=tree))
            subjects[name] = (daemon, ready["control"])
        time.sleep(WARM_UP_S)  # a fixed settling time, not a synchronisation
        totals = dict.fromkeys(subjects, (NO_CPU, 0))
        minimum = len(BAY_UNITS) * rtu_timing.read_transaction_time(bay_map.STATUS_COUNT, baud)
        print(
            f"side by side, tcp, {baud} baud: CPU ms per 1,000 transactions (schedstat); "
            "bay cycle / wire minimum"
        )
        print(
            f"| window | load | other ({other}) | this ({REPO}) | this / other "
            "| other cycle / min | this cycle / min |"
        )
        print("|---|---|---|---|---|---|---|")
        for n in range(1, windows + 1):
            before = {
                name: (line_reading(control), process_cpu(daemon.pid))
                for name, (daemon, control) in subjects.items()
            }
            time.sleep(seconds)  # the measurement window itself
            per_k: dict[str, float] = {}
            cycle: dict[str, float] = {}
            for name, (daemon, control) in subjects.items():
                cpu = process_cpu(daemon.pid) - before[name][1]
                line = window(before[name][0], line_reading(control))
                totals[name] = (totals[name][0] + cpu, totals[name][1] + line.transactions)
                per_k[name] = cpu_per_1000(cpu, line.transactions).total_s * 1000
                cycle[name] = line.bay_cycle_s / minimum
            print(
                f"| {n} | {os.getloadavg()[0]:.2f} | {per_k['other']:.0f} | {per_k['this']:.0f} "
                f"| {per_k['this'] / per_k['other']:.3f} | {cycle['other']:.3f} "
                f"| {cycle['this']:.3f} |"
            )
        whole = {name: cpu_per_1000(*totals[name]).total_s * 1000 for name in totals}
        print(
            f"| all | | {whole['other']:.0f} | {whole['this']:.0f} "
            f"| {whole['this'] / whole['other']:.3f} | | |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--transport", choices=["tcp", "pty", "both"], default="both")
    parser.add_argument("--baud", type=int, action="append", help="repeatable; default all")
    parser.add_argument("--profile", type=Path, help="write the daemon's cProfile here")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument(
        "--callgrind-reads",
        type=int,
        default=1000,
        help="extra reads of the plain clients' differencing runs (default 1000)",
    )
    parser.add_argument(
        "--callgrind-cache-sim",
        action="store_true",
        help="with --callgrind: simulate caches and branches too (misses per transaction)",
    )
    parser.add_argument(
        "--callgrind-daemon-only",
        action="store_true",
        help="with --callgrind: measure the daemon alone, not the plain clients too",
    )
    parser.add_argument(
        "--no-cycle",
        action="store_true",
        help="skip the cycle and CPU rounds (with --callgrind: instructions only)",
    )
    parser.add_argument(
        "--side-by-side",
        type=Path,
        metavar="CHECKOUT",
        help="instead: this daemon and CHECKOUT's at the same time, CPU per window (tcp)",
    )
    parser.add_argument("--windows", type=int, default=6, help="with --side-by-side")
    parser.add_argument(
        "--cabinet-board-interval",
        type=float,
        help="the daemon's bus.cabinet_board_interval_s (default: its own default, 1 s)",
    )
    args = parser.parse_args()
    if args.side_by_side is not None:
        for baud in args.baud or BAUDS:
            side_by_side(args.side_by_side, baud, args.windows, seconds=20.0)
        return
    bus_extra = (
        ""
        if args.cabinet_board_interval is None
        else f"cabinet_board_interval_s = {args.cabinet_board_interval}\n"
    )
    transports = ["tcp", "pty"] if args.transport == "both" else [args.transport]
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    rounds = [
        one_round(transport, baud, args.cycles, args.profile, bus_extra)
        for transport in transports
        for baud in args.baud or BAUDS
        if not args.no_cycle
    ]
    if rounds:
        report(rounds)
        print()
    if perf_instructions_available():
        print("instructions: `perf stat -e instructions:u -p PID` works on this machine")
    else:
        print("instructions: perf is present but this machine exposes no hardware counters")
    if args.callgrind_cache_sim:
        CALLGRIND_OPTIONS.extend(CACHE_SIM_OPTIONS)
    if args.callgrind:
        plain_kinds = () if args.callgrind_daemon_only else ("sync", "async")
        callgrind_round(args.cycles, args.callgrind_reads, plain_kinds)


if __name__ == "__main__":
    main()
