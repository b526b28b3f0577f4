"""Shared fixtures: an injected clock, the simulator in-process and as a real `cabinet sim`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus
from sim.bus_server import SimulatedBus
from sim.cabinet_model import SimulatedCabinet
from sim.launcher import FREE, start_simulator, stop_process
from tests.mqtt_broker import Mosquitto

REPO = Path(__file__).resolve().parent.parent


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


def cabinet_cmd(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `cabinet` command line as a technician would."""
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
