"""``cabinet demo``: the whole system on one machine, with nothing to set up.

An embedded MQTT broker (amqtt, in this process), the hardware simulator and the
real daemon (``cabinet run``, as processes of their own), a backend stand-in
listening to the fleet topics, and simulated riders arriving at a steady rate —
some of them misbehaving. Without ``--duration`` a live view redraws the cabinet
until Ctrl-C; with it the demo runs headless, stops by itself and prints a
summary: swaps completed, failures by reason (and whether each is explained by
what that rider did), and events journaled against events the backend received.
Everything lives in a temporary directory and is removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from cabinet.daemon.control_client import ControlProtocolError, DaemonNotRunningError, request
from cabinet.daemon.tokens import generate_keys, load_private_key
from cabinet.demo.riders import RiderResult, Surroundings, ride, rider_stream
from cabinet.demo.view import CLEAR, Frame, render
from sim.launcher import start_simulator, stop_process

CABINET_ID = "demo-01"
DEMO_BAUD = "19200"
CHARGE_SPEEDUP = "120"  # a flat battery is full in about two minutes, not four hours
RIDER_INTERVAL_S = 6.0
READY_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 10.0
REDRAW_S = 0.5
HEADLESS_DEFAULT_S = 60.0  # `make demo` from a script must end by itself
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DemoError(Exception):
    """The demo could not be set up (one line for the user)."""


@dataclass(slots=True)
class Tally:
    """What happened, for the view and the summary."""

    results: list[RiderResult] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def add(self, result: RiderResult) -> None:
        """Record a rider's outcome, flagging one their behaviour does not explain."""
        self.results.append(result)
        mark = "" if result.explained else "   <-- UNEXPLAINED"
        self.log.append(
            f"{result.rider.rider_id} ({result.rider.behaviour}): {result.outcome}{mark}"
        )

    @property
    def completed(self) -> int:
        """Swaps that ended with the rider holding a full battery."""
        return sum(r.outcome == "completed" for r in self.results)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp: Path, sim: dict[str, Any], broker_url: str, screen_port: int) -> Path:
    config = {
        "cabinet": {"id": CABINET_ID, "state_dir": str(tmp / "state")},
        "bus": {"url": sim["bus"]},
        "scanner": {"url": sim["scanner"]},
        "mqtt": {"url": broker_url, "telemetry_interval_s": 10},
        # app riders scan the screen's dynamic QR code (through the backend stand-in)
        "auth": {"public_keys": [str(tmp / "backend.pub")], "require_challenge": True},
        "display": {"enabled": True, "port": screen_port},
        # short enough that a rider who walks away does not stall the demo for long
        "swap": {"deposit_timeout_s": 15, "take_back_timeout_s": 20, "pickup_timeout_s": 20},
    }
    lines = ['log_level = "warning"']
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = tmp / "cabinet.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """A second Ctrl-C (or the terminal closing) must not orphan the daemon mid-stop."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _spawn_daemon(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """The real ``cabinet run``, as systemd would start it; its output goes to a log file."""
    with log_path.open("ab") as log:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and CLI
            [sys.executable, "-m", "cabinet.console.cli", "run", "-c", str(config)],
            stdout=log,
            stderr=log,
            start_new_session=True,  # Ctrl-C is for the demo, which stops the daemon in order
        )


async def _wait_ready(socket: Path, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise DemoError(f"the daemon exited with {daemon.returncode} (see its log)")
        with contextlib.suppress(DaemonNotRunningError, ControlProtocolError):
            if (await request(socket, "status"))["ready"]:
                return
        await asyncio.sleep(0.1)
    raise DemoError("the daemon did not become ready in time")


class Demo:
    """Owns every part of the demo and tears them down in reverse order."""

    def __init__(self, tmp: Path, seed: int, say: Callable[[str], None]) -> None:
        self.tmp = tmp
        self.seed = seed
        self.say = say
        self.tally = Tally()
        self.started = time.monotonic()
        self.socket = tmp / "state" / "control.sock"
        self.screen_url = ""

    async def run(self, duration_s: float | None, live: bool) -> int:
        """Start everything, let riders come until stopped, summarise; the exit code."""
        from cabinet.demo.backend import Backend  # noqa: PLC0415 - only with the demo extra
        from cabinet.demo.broker import EmbeddedBroker  # noqa: PLC0415

        broker = EmbeddedBroker()
        broker_url = await broker.start()
        host, port = broker_url.removeprefix("mqtt://").split(":")
        sim_proc, sim = await asyncio.to_thread(
            start_simulator,
            "--baud",
            DEMO_BAUD,
            "--seed",
            str(self.seed),
            "--charge-speedup",
            CHARGE_SPEEDUP,
            own_session=True,
        )
        daemon: subprocess.Popen[bytes] | None = None
        backend = None
        try:
            pair = generate_keys(str(self.tmp / "backend"))
            self.screen_url = screen_url = f"http://127.0.0.1:{(screen_port := _free_port())}/"
            config = _config(self.tmp, sim, broker_url, screen_port)
            daemon = _spawn_daemon(config, self.tmp / "daemon.log")
            backend = await asyncio.to_thread(Backend, host, int(port), mqtt5=False)
            await _wait_ready(self.socket, daemon)
            self.say(f"broker {broker_url}, simulator {sim['bus']}, daemon ready")
            self.say(f"the cabinet's screen: open {screen_url} in a browser")
            control = sim["control"].removeprefix("tcp://").split(":")
            world = Surroundings(
                sim_control=(control[0], int(control[1])),
                control_socket=self.socket,
                cabinet_id=CABINET_ID,
                backend_key=load_private_key(pair.private),
                forger_key=SigningKey.generate(),
                app_swap=lambda rider: backend.app_swap(screen_url, rider),
                rng=random.Random(self.seed),
                say=(lambda _line: None) if live else self.say,
            )
            await self._riders_until_stopped(world, backend, duration_s, live)
            code, summary = self._summary(backend, await self._drain(backend))
        finally:
            # everything stops before the summary is shown: whoever reads it (a person, a
            # test) may close the terminal right away, and nothing must be left running
            with _signals_ignored():
                await self._stop(backend, daemon, sim_proc, broker)
        for line in summary:
            self.say(line)
        return code

    async def _stop(
        self,
        backend: Any,
        daemon: subprocess.Popen[bytes] | None,
        sim_proc: subprocess.Popen[str],
        broker: Any,
    ) -> None:
        if backend is not None:
            backend.close()
        if daemon is not None:
            await asyncio.to_thread(stop_process, daemon)
        await asyncio.to_thread(stop_process, sim_proc)
        await broker.stop()

    async def _riders_until_stopped(
        self, world: Surroundings, backend: Any, duration_s: float | None, live: bool
    ) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:  # the terminal closing (SIGHUP) must not orphan the daemon
            loop.add_signal_handler(sig, stop.set)
        queue = asyncio.Lock()
        next_rider = rider_stream()
        riders: set[asyncio.Task[None]] = set()

        async def one_rider() -> None:
            result = await ride(world, next_rider(), queue)
            self.tally.add(result)
            if not live:
                self.say(self.tally.log[-1])

        async def arrivals() -> None:
            while True:
                task = asyncio.create_task(one_rider())
                riders.add(task)
                task.add_done_callback(riders.discard)
                await asyncio.sleep(RIDER_INTERVAL_S)

        arriving = asyncio.create_task(arrivals())
        view = asyncio.create_task(self._view(backend)) if live else None
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), duration_s)
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            for task in (arriving, view, *riders):
                if task is not None:
                    task.cancel()
            await asyncio.gather(arriving, *riders, return_exceptions=True)
            if view is not None:
                await asyncio.gather(view, return_exceptions=True)

    async def _view(self, backend: Any) -> None:
        while True:
            status = await request(self.socket, "status")
            bays = await request(self.socket, "bays")
            after = max(0, int(status["last_event_seq"]) - 10)
            events = await request(self.socket, "events", {"after": after})
            frame = Frame(
                status=status,
                bays=bays,
                events=events,
                published=len(backend.event_list(CABINET_ID)),
                gaps=len(backend.gaps(CABINET_ID)),
                duplicates=backend.duplicates[CABINET_ID],
                riders=self.tally.log,
                completed=self.tally.completed,
                failed=len(self.tally.results) - self.tally.completed,
                elapsed_s=time.monotonic() - self.started,
                screen_url=self.screen_url,
            )
            sys.stdout.write(CLEAR + "\n".join(render(frame)) + "\n")
            sys.stdout.flush()
            await asyncio.sleep(REDRAW_S)

    async def _drain(self, backend: Any) -> int:
        """Let the outbox empty so the counts compare like for like; the last journaled seq."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            status = await request(self.socket, "status")
            received = len(backend.event_list(CABINET_ID))
            done = status["outbox_depth"] == 0 and received >= status["last_event_seq"]
            if done or time.monotonic() > deadline:
                return int(status["last_event_seq"])
            await asyncio.sleep(0.1)

    def _summary(self, backend: Any, journaled: int) -> tuple[int, list[str]]:
        results = self.tally.results
        outcomes = Counter(r.outcome for r in results if r.outcome != "completed")
        unexplained = [r for r in results if not r.explained]
        received = backend.event_list(CABINET_ID)
        lines: list[str] = []
        lines.append("")
        lines.append(
            f"demo summary ({time.monotonic() - self.started:.0f} s, cabinet {CABINET_ID})"
        )
        lines.append(f"  riders: {len(results)}")
        lines.append(f"  swaps completed: {self.tally.completed}")
        for outcome, count in sorted(outcomes.items()):
            lines.append(f"  {outcome}: {count}")
        lines.append(f"  unexplained: {len(unexplained)}")
        lines += [  # each one is a bug to chase
            f"    {r.rider.rider_id} ({r.rider.behaviour}): {r.outcome}" for r in unexplained
        ]
        lines.append(
            f"  events published: {len(received)} of {journaled} journaled received by the "
            f"backend over MQTT (gaps {len(backend.gaps(CABINET_ID))}, "
            f"duplicates {backend.duplicates[CABINET_ID]})"
        )
        lost = journaled - len(received)
        ok = not unexplained and not backend.gaps(CABINET_ID) and lost <= 0
        return (0 if ok else 3), lines


#: The simulator's seed: this one stocks the cabinet with four full batteries and five
#: part-charged ones, so the first riders are served while the others charge.
DEFAULT_SEED = 9


def main(duration_s: float | None, seed: int = DEFAULT_SEED) -> int:
    """Entry point for ``cabinet demo``."""
    try:
        import amqtt  # noqa: F401, PLC0415 - only to give a clear message when it is missing
    except ImportError:
        print(
            "cabinet: the demo needs its extra: pip install 'swap-cabinet[demo]' "
            "(or run `make demo`)",
            file=sys.stderr,
        )
        return 1
    live = duration_s is None and sys.stdout.isatty()
    if duration_s is None and not live:
        duration_s = HEADLESS_DEFAULT_S
        print(f"not a terminal: running headless for {duration_s:.0f} s (--duration S to choose)")
    with tempfile.TemporaryDirectory(prefix="cabinet-demo-") as tmp:
        demo = Demo(Path(tmp), seed, print)
        try:
            return asyncio.run(demo.run(duration_s, live))
        except DemoError as exc:
            log = Path(tmp) / "daemon.log"
            print(f"cabinet: demo: {exc}", file=sys.stderr)
            if log.exists():
                sys.stderr.write(log.read_text()[-2000:])
            return 1
