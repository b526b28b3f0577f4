"""The fleet link: the outbox drained to MQTT, retained status/state, and remote commands.

Theory of operation: events are already committed to the journal's outbox by the
controller; the publisher sends the oldest unacknowledged ones in ``seq`` order
(a window in flight at a time) and marks each published only on the broker's
PUBACK. A broker outage just leaves them in the outbox; after a reconnect — or a
daemon restart — the backlog drains in order at full speed. Delivery is therefore
at-least-once: a duplicate carries the same ``id``, a gap in ``seq`` never happens.
On every (re)connect the retained ``status`` (online) and ``state`` are published;
the last will says offline. Commands on ``cmd/<name>`` are validated, answered on
the MQTT 5 response topic (else ``reply``) and remembered by ``request_id``, so a
retried command is never executed twice. The field bus never waits on any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ValidationError

from cabinet import __version__
from cabinet.controller import CabinetController
from cabinet.swap_machine import Mode, Phase
from drivers.mqtt_link import Message, MqttLink
from protocol import messages, topics
from protocol.units import BAY_UNITS

log = structlog.get_logger("fleet")

PUBLISH_WINDOW = 100  # events in flight at once: enough to fill the pipe, bounded memory
STATE_MIN_INTERVAL_S = 1.0  # retained state at most once a second: bandwidth on LTE
OFFLINE_PUBACK_WAIT_S = 1.0  # a stopping daemon waits this long at most for the broker


def _ms() -> int:
    return int(time.time() * 1000)


def _json(model: BaseModel) -> bytes:
    return model.model_dump_json().encode()


class CommandError(Exception):
    """A command refused with a stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FleetLink:
    """Bridges one cabinet's controller and journal to the fleet broker."""

    def __init__(
        self,
        controller: CabinetController,
        link_factory: Callable[..., MqttLink],
    ) -> None:
        self.controller = controller
        self.cabinet_id = controller.cabinet_id
        offline = messages.Status(
            ts=_ms(), online=False, version=__version__, boot_id=controller.boot_id
        )
        self.link = link_factory(
            will_topic=topics.status(self.cabinet_id),
            will_payload=_json(offline),
            on_connected=self._on_connected,
            on_message=self._on_message,
        )
        self.link.subscribe(topics.commands_filter(self.cabinet_id))
        self._state_dirty = asyncio.Event()
        self._handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "swap.start": self._swap_start,
            "state.get": self._state_get,
            "bay.disable": self._bay_disable,
            "bay.enable": self._bay_enable,
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Publish forever (supervised by the daemon)."""
        self.link.start()
        try:
            await asyncio.gather(self._drain_outbox(), self._publish_state())
        finally:
            await self._say_offline()
            self.link.stop()

    async def _say_offline(self) -> None:
        """A clean stop sends no last will: say offline ourselves (best effort, bounded)."""
        if not self.link.connected.is_set():
            return
        offline = messages.Status(
            ts=_ms(), online=False, version=__version__, boot_id=self.controller.boot_id
        )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.link.publish(topics.status(self.cabinet_id), _json(offline), retain=True),
                OFFLINE_PUBACK_WAIT_S,
            )

    def _on_connected(self) -> None:
        online = messages.Status(
            ts=_ms(), online=True, version=__version__, boot_id=self.controller.boot_id
        )
        self.link.publish(topics.status(self.cabinet_id), _json(online), retain=True)
        self._state_dirty.set()
        self.controller.changed.set()

    # -- the outbox ------------------------------------------------------------------------

    async def _drain_outbox(self) -> None:
        journal = self.controller.journal
        while True:
            await self.link.connected.wait()
            batch = journal.unpublished(PUBLISH_WINDOW)
            if not batch:
                self.controller.changed.clear()
                await self.controller.changed.wait()
                continue
            futures = [
                self.link.publish(topics.events(self.cabinet_id), self._event(e)) for e in batch
            ]
            acked: list[int] = []
            for event, future in zip(batch, futures, strict=True):
                try:
                    await future
                except (ConnectionError, asyncio.CancelledError):
                    break  # stay in order: resend from the first unacknowledged one
                acked.append(int(event["seq"]))
            if acked:
                journal.mark_published(acked)
            self._state_dirty.set()

    def _event(self, event: dict[str, Any]) -> bytes:
        data = {k: v for k, v in event.items() if k not in {"seq", "id", "type", "ts"}}
        return _json(
            messages.Event(
                ts=event["ts"],
                cabinet_id=self.cabinet_id,
                seq=event["seq"],
                id=event["id"],
                type=event["type"],
                data=data,
            )
        )

    # -- retained state ----------------------------------------------------------------------

    async def _publish_state(self) -> None:
        while True:
            await self._state_dirty.wait()
            self._state_dirty.clear()
            if self.link.connected.is_set():
                self.link.publish(topics.state(self.cabinet_id), _json(self.state()), retain=True)
            await asyncio.sleep(STATE_MIN_INTERVAL_S)

    def state(self) -> messages.State:
        """The full snapshot of DESIGN.md §4.3."""
        c = self.controller
        bays = []
        for bay in BAY_UNITS:
            snap = c.snapshots.get(bay)
            battery = snap.battery if snap is not None else None
            online = snap is not None and snap.online
            bays.append(
                messages.BayView(
                    bay=bay,
                    online=online,
                    door=("closed" if snap.door_closed else "open") if online and snap else None,
                    locked=snap.locked if online and snap else None,
                    battery_id=battery.battery_id if battery else None,
                    battery_present=snap.battery_present if online and snap else None,
                    soc_pct=battery.soc_pct if battery and battery.battery_id else None,
                    health_pct=battery.health_pct if battery and battery.battery_id else None,
                    cell_temp_c=battery.cell_temp_c if battery and battery.battery_id else None,
                    bay_temp_c=snap.bay_temp_c if online and snap else None,
                    charging=snap.charging if online and snap else None,
                    in_service=bay not in c.out_of_service,
                    out_of_service_reason=c.out_of_service.get(bay),
                )
            )
        session = None
        if c.state.phase is not Phase.IDLE:
            session = messages.SessionView(
                session_id=c.state.session_id,
                rider_id=c.state.rider_id,
                mode=c.state.mode.value,
                phase=c.state.phase.value,
                return_bay=c.state.return_bay,
                dispense_bay=c.state.dispense_bay,
            )
        cabinet = messages.CabinetView(
            smoke=c.safety.smoke,
            mains_present=not c.safety.mains_lost,
            swaps_allowed=c.safety.swaps_allowed,
        )
        return messages.State(
            ts=_ms(), cabinet_id=self.cabinet_id, cabinet=cabinet, bays=bays, session=session
        )

    def mark_state_changed(self) -> None:
        """Something an operator sees changed: publish state (rate-limited)."""
        self._state_dirty.set()

    # -- commands ----------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        name = topics.command_name(self.cabinet_id, message.topic)
        if name is None:
            return
        reply = self._handle(name, message.payload)
        props = None
        target = topics.reply(self.cabinet_id)
        if message.response_topic:
            target = message.response_topic
            if message.correlation_data is not None:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = message.correlation_data
        self.link.publish(target, json.dumps(reply).encode(), properties=props)

    def _handle(self, name: str, payload: bytes) -> dict[str, Any]:
        request_id = _request_id_of(payload)
        try:
            command, handler = self._parse(name, payload)
            request_id = command.request_id
            result = handler(command.args)
            reply = self._reply(name, request_id, ok=True, result=result)
        except CommandError as exc:
            reply = self._reply(
                name,
                request_id,
                ok=False,
                error=messages.ReplyError(code=exc.code, message=str(exc)),
            )
        self._record(name, request_id, reply)
        return reply

    def _parse(
        self, name: str, payload: bytes
    ) -> tuple[messages.Command, Callable[[dict[str, Any]], Any]]:
        """Validate a command and find its handler, or raise the precise refusal."""
        try:
            raw = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CommandError("malformed_json", f"payload is not JSON: {exc}") from None
        try:
            command = messages.Command.model_validate(raw)
        except ValidationError as exc:
            raise CommandError("invalid_command", _first_error(exc)) from None
        if command.cabinet_id not in (None, self.cabinet_id):
            raise CommandError("wrong_cabinet", f"command is for {command.cabinet_id}")
        handler = self._handlers.get(name)
        if handler is None:
            raise CommandError(
                "unknown_command", f"unknown command {name!r}; known: {sorted(self._handlers)}"
            )
        previous = self.controller.journal.command_reply(command.request_id)
        if previous is not None:
            raise CommandError(
                "duplicate_request",
                f"request_id {command.request_id} was already handled: "
                f"{'ok' if previous.get('ok') else 'refused'}",
            )
        return command, handler

    def _reply(
        self,
        name: str,
        request_id: str | None,
        *,
        ok: bool,
        result: Any = None,
        error: messages.ReplyError | None = None,
    ) -> dict[str, Any]:
        return messages.Reply(
            ts=_ms(), request_id=request_id, command=name, ok=ok, result=result, error=error
        ).model_dump(mode="json")

    def _record(self, name: str, request_id: str | None, reply: dict[str, Any]) -> None:
        error = reply.get("error") or {}
        duplicate = error.get("code") == "duplicate_request"
        with self.controller.journal.transaction() as db:
            if request_id is not None and not duplicate:
                self.controller.journal.put_command_reply(db, request_id, reply, time.time())
            self.controller.emit(
                db,
                "command.handled",
                {
                    "command": name,
                    "request_id": request_id,
                    "ok": reply["ok"],
                    "error": error.get("code"),
                },
            )

    @staticmethod
    def _args(model: type[BaseModel], args: dict[str, Any]) -> Any:
        try:
            return model.model_validate(args)
        except ValidationError as exc:
            raise CommandError("invalid_args", _first_error(exc)) from None

    def _swap_start(self, args: dict[str, Any]) -> dict[str, Any]:
        parsed = self._args(messages.SwapStartArgs, args)
        refusal = self.controller.request_session(parsed.rider_id, Mode(parsed.mode), "mqtt")
        if refusal is not None:
            raise CommandError(refusal, f"cannot start a session now: {refusal}")
        state = self.controller.state
        if state.phase is Phase.IDLE:  # refused by the machine (no battery, no bay)
            raise CommandError(
                "refused", "the cabinet could not start the session (see the swap.failed event)"
            )
        return {
            "session_id": state.session_id,
            "return_bay": state.return_bay,
            "dispense_bay": state.dispense_bay,
        }

    def _state_get(self, args: dict[str, Any]) -> dict[str, Any]:
        self._args(messages.NoArgs, args)
        return self.state().model_dump(mode="json")

    def _bay_arg(self, args: dict[str, Any]) -> int:
        bay = args.get("bay")
        if not isinstance(bay, int) or isinstance(bay, bool) or bay not in BAY_UNITS:
            raise CommandError("invalid_args", f"bay must be 1-{len(BAY_UNITS)}, got {bay!r}")
        return bay

    def _bay_disable(self, args: dict[str, Any]) -> dict[str, Any]:
        bay = self._bay_arg(args)
        reason = args.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise CommandError("invalid_args", "bay.disable needs a reason")
        self.controller.set_bay_service(bay, in_service=False, reason=reason, by="operator")
        return {"bay": bay, "in_service": False}

    def _bay_enable(self, args: dict[str, Any]) -> dict[str, Any]:
        bay = self._bay_arg(args)
        self.controller.set_bay_service(bay, in_service=True, reason="", by="operator")
        return {"bay": bay, "in_service": True}


def _request_id_of(payload: bytes) -> str | None:
    """The request_id of even an invalid command, so its error reply can be matched."""
    try:
        raw = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = raw.get("request_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and len(value) <= 64 else None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"]) or "payload"
    return f"{where}: {error['msg']}"
