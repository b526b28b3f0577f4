"""``cabinet sim``: start the simulated bus, scanner and control endpoint, and run until stopped.

Prints one JSON line on stdout once everything listens, naming the URLs clients
use (ports chosen by the OS when 0 was asked for), so scripts and tests never
guess a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass

from sim.bus_server import SimulatedBus, precise_sleep_until, tighten_timer_slack
from sim.cabinet_model import SimulatedCabinet
from sim.control import ControlServer
from sim.endpoints import parse_listen
from sim.pty_link import PtyLink
from sim.scanner_port import ScannerPort

DEFAULT_BUS = "tcp://127.0.0.1:5020"
DEFAULT_CONTROL = "tcp://127.0.0.1:5021"
DEFAULT_SCANNER = "tcp://127.0.0.1:5022"
DEFAULT_BAUD = 19200
DEFAULT_REPLY_MS = 2.0  # a typical bay MCU's turnaround after the request's last byte


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Everything ``cabinet sim`` takes on its command line."""

    bus: str = DEFAULT_BUS
    scanner: str = DEFAULT_SCANNER
    control: str = DEFAULT_CONTROL
    baud: int = DEFAULT_BAUD
    seed: int = 0
    reply_ms: float = DEFAULT_REPLY_MS
    charge_speedup: float = 1.0


class _PtyGateway:
    """Bridges a pseudo-terminal to the RTU-over-TCP server, as an RS-485 gateway would.

    Requests go to the server over TCP, but replies come straight from the line
    (``SimulatedBus.deliver_replies_to``) with the instant the wire-time model says
    their last byte arrives, and are written to the pty then: neither the server's nor
    the relay's latency is added to what a master measures, and nothing comes early.
    """

    def __init__(self) -> None:
        self._pty: PtyLink | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()
        self._bus: SimulatedBus | None = None

    async def start(self, path: str, port: int, bus: SimulatedBus) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self._writer = writer

        def relay(data: bytes) -> None:
            bus.request_arriving()
            writer.write(data)

        self._pty = PtyLink(path, on_data=relay)
        self._bus = bus
        bus.deliver_replies_to(self.deliver)
        self._tasks = [
            asyncio.create_task(self._replies(reader)),
            asyncio.create_task(self._deliver_when_due()),
        ]

    def deliver(self, reply: bytes, due: float) -> None:
        """Queue ``reply`` for the pty; its last byte is due at ``due`` (perf_counter)."""
        self._outbox.put_nowait((reply, due))

    async def _deliver_when_due(self) -> None:
        # The line is half-duplex, so replies fall due in the order they were made.
        while True:
            reply, due = await self._outbox.get()
            await precise_sleep_until(due)
            if self._pty is not None and self._bus is not None:
                self._pty.write(reply)
                self._bus.replies_out += 1

    async def _replies(self, reader: asyncio.StreamReader) -> None:
        # anything the server still sends itself (none while the bus delivers to us)
        while data := await reader.read(4096):
            if self._pty is not None:
                self._pty.write(data)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._pty is not None:
            self._pty.close()
        if self._writer is not None:
            self._writer.close()


async def serve(options: SimOptions, *, ready: asyncio.Event | None = None) -> None:
    """Run the simulator until SIGINT/SIGTERM (or until cancelled)."""
    bus_spec = parse_listen(options.bus, allow_mbap=True)
    tighten_timer_slack()
    scanner_spec = parse_listen(options.scanner)
    control_spec = parse_listen(options.control, allow_pty=False)
    world = SimulatedCabinet(
        clock=time.monotonic, seed=options.seed, charge_speedup=options.charge_speedup
    )
    bus = SimulatedBus(
        world, baud=options.baud, reply_delay_s=options.reply_ms / 1000.0, seed=options.seed
    )
    scanner = ScannerPort()
    gateway = _PtyGateway()
    info: dict[str, object] = {"baud": options.baud, "seed": options.seed}
    control = ControlServer(world, scanner, bus.counters_json, info)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        if bus_spec.kind == "pty":
            internal_port = await bus.start("127.0.0.1", 0)
            await gateway.start(bus_spec.path, internal_port, bus)
            # 8N1 on the pty: Linux ptys refuse (EINVAL) a second tcsetattr with parity set,
            # which pyserial issues when pymodbus adjusts the timeout. The wire-time model
            # still counts 11-bit characters, as on the real 8E1 line.
            bus_url = f"serial://{bus_spec.path}?baud={options.baud}&parity=N"
        else:
            port = await bus.start(bus_spec.host, bus_spec.port, mbap=bus_spec.kind == "modbus-tcp")
            bus_url = f"{bus_spec.kind}://{bus_spec.host}:{port}"
        scanner_url = await scanner.start(scanner_spec)
        control_url = await control.start(control_spec.host, control_spec.port)
        endpoints = {"bus": bus_url, "scanner": scanner_url, "control": control_url, **info}
        info["endpoints"] = {"bus": bus_url, "scanner": scanner_url, "control": control_url}
        sys.stdout.write(json.dumps({"ready": endpoints}) + "\n")
        sys.stdout.flush()
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await control.stop()
        await scanner.stop()
        await gateway.stop()
        await bus.stop()
