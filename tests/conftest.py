"""Shared fixtures: an injected clock, the simulator in-process and as a real `cabinet sim`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pytest
import structlog

from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus
from sim.bus_server import SimulatedBus
from sim.cabinet_model import SimulatedCabinet
from sim.launcher import FREE, start_simulator, stop_process
from tests.mqtt_broker import Mosquitto

REPO = Path(__file__).resolve().parent.parent


def fresh_python(script: str, *, env: dict[str, str] | None = None) -> str:
    """``script``'s output from a new interpreter in the checkout: what a fresh process loads.

    It must exit 0 (its stderr is the failure's message) within a minute.
    """
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


class FakeClock:
    """Time that moves only when a test says so (DESIGN.md §3.6: time is injected)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class InProcessSim:
    world: SimulatedCabinet
    bus: SimulatedBus
    url: str


@contextlib.asynccontextmanager
async def running_sim(
    clock: FakeClock | None = None, *, seed: int = 7, baud: int = 115200, reply_ms: float = 0.0
) -> AsyncIterator[InProcessSim]:
    """The simulated bus on a free port of this event loop, over real RTU framing."""
    world = SimulatedCabinet(clock=clock or time.monotonic, seed=seed)
    bus = SimulatedBus(world, baud=baud, reply_delay_s=reply_ms / 1000.0, seed=seed)
    port = await bus.start("127.0.0.1", 0)
    try:
        yield InProcessSim(world, bus, f"tcp://127.0.0.1:{port}")
    finally:
        await bus.stop()


@contextlib.asynccontextmanager
async def master(url: str, **kwargs: Any) -> AsyncIterator[ModbusBus]:
    """A connected bus master."""
    bus = ModbusBus(parse_endpoint(url), **kwargs)
    await bus.connect()
    try:
        yield bus
    finally:
        bus.close()


# Commands that are a program of their own (a daemon, a server, a demo with its own
# children and signal handling): always a real process. Every other command is a request
# and an answer; it runs in-process (below), which is the same `main()` without ~0.4 s of
# interpreter and import start-up per call: the suite makes hundreds of them.
OWN_PROCESS = {"run", "demo"}


def _is_own_process(args: tuple[str, ...]) -> bool:
    if args[:1] == ("sim",):
        return args[1:2] != ("ctl",)  # the simulator itself and the fleet simulation
    return args[:1] != () and args[0] in OWN_PROCESS


class _ThreadStream(io.TextIOBase):
    """sys.stdout/stderr while in-process commands run: each command's thread writes to its
    own buffer; every other thread (the test's, a broker's) to where it wrote before."""

    def __init__(self, name: str) -> None:
        self.buffers: dict[int, io.StringIO] = {}
        self.fallback: TextIO = getattr(sys, name)

    def _target(self) -> TextIO:
        return self.buffers.get(threading.get_ident(), self.fallback)

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return False  # a pipe, as for a real child process

    def writable(self) -> bool:
        return True


_STDOUT = _ThreadStream("stdout")
_STDERR = _ThreadStream("stderr")
_IN_PROCESS_LOCK = threading.Lock()


def cabinet_cmd(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `cabinet` command line as a technician would: its exit code, stdout, stderr.

    In-process (the console script's own `main`, on a thread of its own so a test may call
    it from inside an event loop), except for the commands in OWN_PROCESS, which get a real
    process. `cabinet_process` always starts one, for what only a process shows;
    CABINET_TEST_CLI_PROCESS=1 makes every call one (to tell a harness effect from a bug).
    """
    if _is_own_process(args) or os.environ.get("CABINET_TEST_CLI_PROCESS"):
        return cabinet_process(*args, timeout=timeout, env=env)
    with _IN_PROCESS_LOCK:
        return _in_process(args, timeout, env or {})


def _in_process(
    args: tuple[str, ...], timeout: float, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    from cabinet.console.cli import main  # noqa: PLC0415 - only for the tests that use it

    out, err = io.StringIO(), io.StringIO()
    outcome: dict[str, Any] = {}

    def run() -> None:
        me = threading.get_ident()
        _STDOUT.buffers[me], _STDERR.buffers[me] = out, err
        try:
            outcome["code"] = main(list(args))
        except SystemExit as exc:  # argparse's usage errors and --help
            if isinstance(exc.code, str):
                err.write(exc.code + "\n")
                outcome["code"] = 1
            else:
                outcome["code"] = exc.code or 0
        except BaseException as exc:  # noqa: BLE001 - a real process would show the traceback
            outcome["error"] = exc
        finally:
            del _STDOUT.buffers[me], _STDERR.buffers[me]

    saved_env = dict(os.environ)
    saved_log_config = structlog.get_config()
    os.environ.update(env)
    _STDOUT.fallback, _STDERR.fallback = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _STDOUT, _STDERR  # type: ignore[assignment]
    worker = threading.Thread(target=run, name=f"cabinet {' '.join(args[:2])}", daemon=True)
    try:
        worker.start()
        worker.join(timeout)
    finally:
        sys.stdout, sys.stderr = _STDOUT.fallback, _STDERR.fallback
        os.environ.clear()
        os.environ.update(saved_env)
        structlog.configure(**saved_log_config)  # the command set its own level and output
    command = ["cabinet", *args]
    if worker.is_alive():
        raise subprocess.TimeoutExpired(command, timeout, out.getvalue(), err.getvalue())
    if "error" in outcome:
        raise AssertionError(f"cabinet {' '.join(args)} raised") from outcome["error"]
    return subprocess.CompletedProcess(command, outcome["code"], out.getvalue(), err.getvalue())


def cabinet_process(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real `cabinet` command line as a process of its own (start-up, exit, signals)."""
    return subprocess.run(
        [sys.executable, "-m", "cabinet.console.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


def cabinet_popen(*args: str) -> subprocess.Popen[str]:
    """The real `cabinet` command line left running (a follow, an update, a self-test)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cabinet.console.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


@dataclass
class SimProcess:
    proc: subprocess.Popen[str]
    bus: str
    scanner: str
    control: str

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cabinet_cmd("sim", "ctl", "--control", self.control, *args)

    def state(self) -> dict[str, Any]:
        result = self.ctl("state")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def start_sim_process(*extra: str, bus: str = FREE, scanner: str = FREE) -> SimProcess:
    proc, ready = start_simulator(*extra, bus=bus, scanner=scanner, cwd=REPO)
    return SimProcess(proc, ready["bus"], ready["scanner"], ready["control"])


def stop_sim_process(sim: SimProcess) -> None:
    stop_process(sim.proc)


@pytest.fixture
def sim_process() -> Iterator[SimProcess]:
    """A real `cabinet sim` process on free ports (RTU over TCP)."""
    sim = start_sim_process("--baud", "115200", "--reply-ms", "0")
    yield sim
    stop_sim_process(sim)


@pytest.fixture
def sim_pty(tmp_path: Path) -> Iterator[SimProcess]:
    """A real `cabinet sim` whose bus and scanner are pseudo-terminals (serial ports)."""
    sim = start_sim_process(
        "--baud",
        "115200",
        "--reply-ms",
        "0",
        bus=f"pty://{tmp_path}/bus",
        scanner=f"pty://{tmp_path}/scanner",
    )
    yield sim
    stop_sim_process(sim)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto of this test's own on a free port, stopped and restarted at will."""
    mosquitto = Mosquitto(tmp_path)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()
