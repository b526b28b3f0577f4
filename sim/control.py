"""The simulator's control endpoint: riders and fate act on the world through it.

One JSON object per line each way over TCP, so ``cabinet sim ctl``, tests and the
demo's simulated riders all drive the simulator the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from sim.cabinet_model import SimulatedCabinet
from sim.faults import FaultKind, SimCommandError
from sim.scanner_port import ScannerPort

MAX_REQUEST_BYTES = 64 * 1024


class ControlError(Exception):
    """The control endpoint could not be reached or refused the request."""


def _int(request: dict[str, Any], key: str) -> int:
    value = request.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SimCommandError(f"{key} must be a whole number")
    return value


def _opt_int(request: dict[str, Any], key: str) -> int | None:
    return None if request.get(key) is None else _int(request, key)


def _number(request: dict[str, Any], key: str, default: float | None = None) -> float:
    value = request.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SimCommandError(f"{key} must be a number")
    return float(value)


def _kind(request: dict[str, Any], *, required: bool) -> FaultKind | None:
    raw = request.get("kind")
    if raw is None and not required:
        return None
    try:
        return FaultKind(str(raw))
    except ValueError:
        kinds = ", ".join(k.value for k in FaultKind)
        raise SimCommandError(f"unknown fault kind {raw!r}; kinds are: {kinds}") from None


class ControlServer:
    """Serves control requests against one world and its scanner port."""

    def __init__(
        self,
        world: SimulatedCabinet,
        scanner: ScannerPort,
        bus_counters: Callable[[], dict[str, Any]],
        info: dict[str, Any],
    ) -> None:
        self._world = world
        self._scanner = scanner
        self._bus_counters = bus_counters
        self._info = info
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen; return the URL clients use."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_BYTES)
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        return f"tcp://{bound_host}:{bound_port}"

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(json.dumps(self.handle_line(line)).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """Answer one request line; every refusal is an error reply, never an exception."""
        try:
            return {"ok": True, "result": self.handle(json.loads(line))}
        except json.JSONDecodeError as exc:
            return {"ok": False, "error": f"malformed JSON: {exc.msg}"}
        except SimCommandError as exc:
            return {"ok": False, "error": str(exc)}

    def handle(self, request: Any) -> Any:
        """Perform one verb."""
        if not isinstance(request, dict):
            raise SimCommandError("a request is a JSON object")
        world = self._world
        verb = request.get("verb")
        if verb == "state":
            return {
                **world.snapshot(),
                "bus": self._bus_counters(),
                "scans": self._scanner.scans,
                **self._info,
            }
        if verb == "scan":
            text = request.get("text")
            if not isinstance(text, str) or "\n" in text or "\r" in text:
                raise SimCommandError("scan needs one line of text")
            world.note("scan")
            return {"delivered_to": self._scanner.emit(text.encode("utf-8", "replace") + b"\r\n")}
        if verb == "insert":
            battery_id = request.get("battery")
            if not isinstance(battery_id, str) or not battery_id:
                raise SimCommandError("insert needs --battery ID")
            world.insert(
                _int(request, "bay"),
                battery_id,
                _number(request, "soc"),
                temp_c=_number(request, "temp", 25.0),
                plugged=not request.get("unplugged", False),
                identified=not request.get("unidentified", False),
            )
            return {"bay": request["bay"], "battery": battery_id}
        if verb == "close":
            world.close(_int(request, "bay"))
            return {"bay": request["bay"], "door": "closed"}
        if verb == "take":
            battery = world.take(_int(request, "bay"))
            return {
                "bay": request["bay"],
                "battery": battery.battery_id,
                "soc_pct": round(battery.soc_pct, 2),
            }
        if verb == "fault":
            kind = _kind(request, required=True)
            assert kind is not None
            world.inject(
                kind,
                bay=_opt_int(request, "bay"),
                unit=_opt_int(request, "unit"),
                rate=_number(request, "rate", 1.0),
            )
            return {"fault": kind.value}
        if verb == "heal":
            kind = _kind(request, required=False)
            world.heal(kind, bay=_opt_int(request, "bay"))
            return {"healed": kind.value if kind else "all"}
        raise SimCommandError(f"unknown verb {verb!r}")


async def call(host: str, port: int, request: dict[str, Any], *, timeout_s: float = 5.0) -> Any:
    """Send one request to a running simulator and return its result."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"no simulator control endpoint at tcp://{host}:{port} ({exc})") from exc
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"the simulator did not answer: {exc}") from exc
    finally:
        writer.close()
    if not line:
        raise ControlError("the simulator closed the connection without answering")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")))
    return reply.get("result")
