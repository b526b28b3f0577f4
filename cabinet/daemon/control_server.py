"""The daemon's control socket: the technician CLI's way into the running cabinet.

A Unix socket (mode 0660: the service's user and group only; the directory it
lives in is the service's) speaking the JSON-lines protocol of
``control_client``. Every request is answered by the daemon's own objects — the
controller's picture, the bus scheduler, the journal — so a technician's
``cabinet bus read`` queues behind a rider's unlock instead of fighting it for
the serial line, and a ``bay open`` is journaled like an operator's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cabinet import __version__
from cabinet.daemon import views
from cabinet.daemon.bus_diagnostics import UnitReport, survey_unit
from cabinet.daemon.bus_scheduler import Priority
from cabinet.daemon.config import CabinetConfig
from cabinet.daemon.control_client import MAX_LINE_BYTES, check_socket_path, encode, is_running
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.doctor import FleetFacts, run_checks
from cabinet.daemon.firmware_service import FirmwareRefusedError, FirmwareService
from cabinet.daemon.selftest import SelftestRefusedError, run_selftest
from cabinet.daemon.task_health import TaskHealth
from drivers.modbus_bus import BusError, ModbusBus
from protocol import messages
from protocol.units import ALL_UNITS, BAY_UNITS

log = structlog.get_logger("control")

SOCKET_MODE = 0o660
EVENT_PAGE = 1000


class RequestError(Exception):
    """A refused request: ``code`` for scripts, the message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class HungUpError(Exception):
    """The client went away before its answer was ready."""


class AlreadyRunningError(Exception):
    """Another daemon answers on the control socket: two masters on one bus is never right."""


class _Args(BaseModel):
    """A request's arguments: no unknown fields and no coercion (``true`` is not unit 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class EventsArgs(_Args):
    """``events``: a page after a seq, or a follow."""

    after: int = Field(default=0, ge=0)
    limit: int = Field(default=EVENT_PAGE, ge=1, le=10_000)
    follow: bool = False


class SelftestArgs(_Args):
    """``selftest``: which bays, and how long to wait for a technician to shut a door."""

    bays: list[int] | None = Field(default=None, min_length=1)
    close_timeout_s: float = Field(default=60.0, gt=0, le=600)


class FirmwareUpdateArgs(_Args):
    """``firmware.update``: the image itself (the CLI reads the file), and where."""

    image_b64: str = Field(max_length=2 * 1024 * 1024)
    bays: list[int] = Field(min_length=1, max_length=12)
    force: bool = False


class BusReadArgs(_Args):
    """``bus.read``: one Modbus read."""

    unit: int = Field(ge=1, le=247)
    address: int = Field(ge=0, le=0xFFFF)
    count: int = Field(ge=1, le=125)
    holding: bool = False


class BusWriteArgs(_Args):
    """``bus.write``: one Modbus write (single or multiple registers)."""

    unit: int = Field(ge=1, le=247)
    address: int = Field(ge=0, le=0xFFFF)
    values: list[int] = Field(min_length=1, max_length=123)


Progress = Callable[[Any], Awaitable[None]]
Handler = Callable[[dict[str, Any], Progress], Awaitable[Any]]


ArgsT = TypeVar("ArgsT", bound=BaseModel)


def _parse(model: type[ArgsT], args: dict[str, Any]) -> ArgsT:
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "args"
        raise RequestError("invalid_args", f"{where}: {error['msg']}") from None


class ControlServer:
    """Answers the technician CLI on behalf of the running daemon."""

    def __init__(
        self,
        controller: CabinetController,
        *,
        config: CabinetConfig,
        config_path: Path | None,
        tasks: TaskHealth,
        fleet: Callable[[], FleetFacts | None] = lambda: None,
        firmware: FirmwareService | None = None,
    ) -> None:
        self.controller = controller
        self.config = config
        self.config_path = config_path
        self.tasks = tasks
        self.fleet = fleet
        self.firmware = firmware or FirmwareService(controller, [])
        self.path = config.cabinet.control_socket_path
        # monotonic: NTP setting a 1970 clock after boot must not add 56 years to the uptime
        self.started_at = controller.clock.monotonic()
        self._verbs: dict[str, Handler] = {
            "status": self._status,
            "bays": self._bays,
            "events": self._events,
            "doctor": self._doctor,
            "selftest": self._selftest,
            "bay.open": self._bay_open,
            "bay.disable": self._bay_disable,
            "bay.enable": self._bay_enable,
            "bus.scan": self._bus_scan,
            "bus.read": self._bus_read,
            "bus.write": self._bus_write,
            "firmware.status": self._firmware_status,
            "firmware.update": self._firmware_update,
        }

    async def claim(self) -> None:
        """Refuse to start beside a running daemon; clear a socket a dead one left behind."""
        check_socket_path(self.path)
        if await is_running(self.path):
            raise AlreadyRunningError(f"another daemon is running (it answers on {self.path})")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def run(self) -> None:
        """Serve forever (supervised by the daemon)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_LINE_BYTES
        )
        os.chmod(self.path, SOCKET_MODE)  # noqa: PTH101 - a socket, not a file to open
        try:
            async with server:
                await server.serve_forever()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def progress(item: Any) -> None:
            writer.write(encode({"progress": item}))
            await writer.drain()

        try:
            answer = await self._answer(reader, progress)
            writer.write(encode(answer))
            await writer.drain()
        except (ConnectionError, HungUpError):
            pass  # the technician pressed Ctrl-C: nothing to answer
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the socket down
            log.error("control_request_failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(ConnectionError):
                writer.write(
                    encode({"ok": False, "error": {"code": "internal", "message": str(exc)}})
                )
                await writer.drain()
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, progress: Progress) -> dict[str, Any]:
        try:
            verb, args = await self._request(reader)
            handler = self._verbs.get(verb)
            if handler is None:
                known = ", ".join(sorted(self._verbs))
                return _refusal("unknown_verb", f"unknown request {verb!r}; known: {known}")
            result = await _unless_hung_up(handler(args, progress), reader)
        except RequestError as exc:
            return _refusal(exc.code, str(exc))
        return {"ok": True, "result": result}

    async def _request(self, reader: asyncio.StreamReader) -> tuple[str, dict[str, Any]]:
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            raise RequestError("malformed", "request longer than the limit") from None
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError("malformed", "request is not a JSON line") from None
        if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
            raise RequestError("malformed", 'request needs {"verb": ..., "args": {...}}')
        args = request.get("args", {})
        if not isinstance(args, dict):
            raise RequestError("malformed", "args must be an object")
        return request["verb"], args

    # -- what the cabinet looks like ------------------------------------------------------------

    async def _status(self, args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
        _parse(_Args, args)
        c = self.controller
        fleet = self.fleet()
        bays = views.bay_views(c)
        return {
            "cabinet_id": c.cabinet_id,
            "version": __version__,
            "boot_id": c.boot_id,
            "uptime_s": round(c.clock.monotonic() - self.started_at),
            "ready": c.ready,
            "refusal": c.refusal(),
            "session": _dump(views.session_view(c)),
            "prompt": c.prompt or None,
            "cabinet": views.cabinet_view(c).model_dump(),
            "bays": _bay_counts(bays, c.settings.dispense.min_soc_pct),
            "mqtt": None if fleet is None else asdict(fleet),
            "outbox_depth": c.journal.outbox_depth(),
            "last_event_seq": (c.journal.last_event() or {}).get("seq", 0),
            "tasks_failing": sorted(self.tasks.failing()),
        }

    async def _bays(self, args: dict[str, Any], _progress: Progress) -> list[dict[str, Any]]:
        _parse(_Args, args)
        return [view.model_dump() for view in views.bay_views(self.controller)]

    async def _events(self, args: dict[str, Any], progress: Progress) -> list[dict[str, Any]]:
        parsed = _parse(EventsArgs, args)
        journal = self.controller.journal
        if not parsed.follow:
            return journal.events(after_seq=parsed.after, limit=parsed.limit)
        after = parsed.after
        while True:  # until the technician stops following (the connection is cancelled)
            waiter = asyncio.ensure_future(self.controller.next_event())
            for event in journal.events(after_seq=after, limit=EVENT_PAGE):
                after = event["seq"]
                await progress(event)
            await waiter

    async def _doctor(self, args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
        _parse(_Args, args)
        checks = run_checks(
            self.controller,
            config=self.config,
            config_path=self.config_path,
            fleet=self.fleet(),
            tasks=self.tasks,
            started_at=self.started_at,
        )
        return {"checks": [check.as_json() for check in checks]}

    async def _selftest(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        parsed = _parse(SelftestArgs, args)
        bays = parsed.bays or list(BAY_UNITS)
        if any(bay not in BAY_UNITS for bay in bays):
            raise RequestError("invalid_args", "bays are 1-12")
        try:
            results = await run_selftest(
                self.controller, bays=bays, close_timeout_s=parsed.close_timeout_s, report=progress
            )
        except SelftestRefusedError as exc:
            raise RequestError(exc.reason, str(exc)) from None
        return {"results": [asdict(r) for r in results]}

    # -- technician actions ---------------------------------------------------------------------

    async def _bay_open(self, args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
        bay = _parse(messages.BayArgs, args).bay
        refusal = self.controller.open_bay(bay, "technician")
        if refusal is not None:
            raise RequestError(refusal, f"cannot open bay {bay} now: {refusal}")
        return {"bay": bay, "unlocked": True}

    async def _bay_disable(self, args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
        parsed = _parse(messages.BayDisableArgs, args)
        self.controller.set_bay_service(
            parsed.bay, in_service=False, reason=parsed.reason, by="technician"
        )
        return {"bay": parsed.bay, "in_service": False}

    async def _bay_enable(self, args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
        bay = _parse(messages.BayArgs, args).bay
        self.controller.set_bay_service(bay, in_service=True, reason="", by="technician")
        return {"bay": bay, "in_service": True}

    # -- firmware -----------------------------------------------------------------------------

    async def _firmware_status(self, args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
        _parse(_Args, args)
        return {"bays": await self.firmware.status()}

    async def _firmware_update(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        parsed = _parse(FirmwareUpdateArgs, args)
        if any(bay not in BAY_UNITS for bay in parsed.bays):
            raise RequestError("invalid_args", "bays are 1-12")
        try:
            image = self.firmware.load(_decode_image(parsed.image_b64), by="technician")
            results = await self.firmware.update(
                image, parsed.bays, force=parsed.force, by="technician", report=progress
            )
        except FirmwareRefusedError as exc:
            raise RequestError(exc.reason, str(exc)) from None
        return {"version": image.version_str, "results": [asdict(r) for r in results]}

    # -- the bus, through the daemon's scheduler ---------------------------------------------------

    async def _bus_scan(self, args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
        _parse(_Args, args)
        scheduler = self.controller.scheduler
        reports = []
        for unit in ALL_UNITS:  # one unit per turn: a rider's unlock never waits for the survey

            async def job(bus: ModbusBus, unit: int = unit) -> UnitReport:
                return await survey_unit(bus, unit)

            report = await scheduler.submit(Priority.ROUTINE, job)
            reports.append({**report.as_json(), "stats": scheduler.bus.unit_stats(unit).as_json()})
        return {"units": reports}

    async def _bus_read(self, args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
        parsed = _parse(BusReadArgs, args)

        async def job(bus: ModbusBus) -> list[int]:
            read = bus.read_holding if parsed.holding else bus.read_input
            return await read(parsed.unit, parsed.address, parsed.count)

        try:
            registers = await self.controller.scheduler.submit(Priority.ROUTINE, job)
        except BusError as exc:
            raise RequestError("bus_error", str(exc)) from None
        return {
            "unit": parsed.unit,
            "table": "holding" if parsed.holding else "input",
            "address": parsed.address,
            "registers": registers,
        }

    async def _bus_write(self, args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
        parsed = _parse(BusWriteArgs, args)
        if any(not 0 <= v <= 0xFFFF for v in parsed.values):
            raise RequestError("invalid_args", "register values are 0-65535")

        async def job(bus: ModbusBus) -> None:
            if len(parsed.values) == 1:
                await bus.write_register(parsed.unit, parsed.address, parsed.values[0])
            else:
                await bus.write_registers(parsed.unit, parsed.address, parsed.values)

        c = self.controller
        try:
            await c.scheduler.submit(Priority.ROUTINE, job)
        except BusError as exc:
            raise RequestError("bus_error", str(exc)) from None
        c.record(  # a raw write can open a door: leave a trace
            (
                "bus.written",
                {
                    "unit": parsed.unit,
                    "address": parsed.address,
                    "values": parsed.values,
                    "by": "technician",
                },
            )
        )
        return {"unit": parsed.unit, "address": parsed.address, "written": parsed.values}


async def _unless_hung_up(work: Awaitable[Any], reader: asyncio.StreamReader) -> Any:
    """Run ``work`` until done or until the client hangs up, whichever comes first.

    A follow never ends by itself and a self-test waits for doors: when the
    technician presses Ctrl-C, the work is cancelled (a self-test then journals
    its end and lets sessions start again) instead of running for nobody.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise HungUpError
    return task.result()


def _decode_image(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise RequestError("invalid_args", "image_b64 is not base64") from None


def _refusal(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def _dump(model: BaseModel | None) -> dict[str, Any] | None:
    return None if model is None else model.model_dump()


def _bay_counts(bays: list[messages.BayView], ready_soc_pct: float) -> dict[str, int]:
    """The one-line answer to "can riders swap here": how many bays can do what."""
    usable = [b for b in bays if b.online and b.in_service]
    return {
        "online": sum(b.online for b in bays),
        "empty": sum(not b.battery_present for b in usable),
        "ready": sum(
            b.soc_pct is not None and b.soc_pct >= ready_soc_pct and not b.charging for b in usable
        ),
        "charging": sum(bool(b.charging) for b in usable),
        "out_of_service": sum(not b.in_service for b in bays),
    }
