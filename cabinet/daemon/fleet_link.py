"""The fleet link: the outbox drained to MQTT, retained status/state, and remote commands.

Theory of operation: events are already committed to the journal's outbox by the
controller; the publisher sends the oldest unacknowledged ones in ``seq`` order
(a window in flight at a time) and marks each published only on the broker's
PUBACK. A broker outage just leaves them in the outbox; after a reconnect — or a
daemon restart — the backlog drains in order at full speed. Delivery is therefore
at-least-once: a duplicate carries the same ``id``, a gap in ``seq`` never happens.
On every (re)connect the retained ``status`` (online) and ``state`` are published;
the last will says offline. Both are sent again after ``state_republish_s`` without a
change, for brokers that replay retained messages to exact-topic subscribers only.
Commands on ``cmd/<name>`` are validated, answered on the MQTT 5 response topic (else
``reply``) and remembered by ``request_id``, so a retried command is never executed twice.
The field bus never waits on any of this.
Telemetry is held in the journal too (``telemetry_backlog``, bounded) and published at
QoS 1 once the event outbox has nothing to send, so a backlog of samples after an
outage arrives in order with its original ``ts`` and never holds up an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
from collections.abc import Callable
from typing import Any

import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ValidationError

from cabinet import __version__
from cabinet.core.refusal_limit import RefusalLimit
from cabinet.core.swap_machine import Mode, Phase
from cabinet.daemon import views
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.firmware_service import FirmwareFetcher, FirmwareRefusedError
from cabinet.daemon.journal import JournalError
from cabinet.daemon.telemetry_backlog import TelemetryBacklog
from drivers.mqtt_link import Message, MqttLink, PublishRefusedError, confirmed_prefix
from protocol import messages, topics
from protocol.units import BAY_UNITS

log = structlog.get_logger("fleet")

PUBLISH_WINDOW = 500  # events in flight at once: enough to fill the pipe, bounded memory
STATE_MIN_INTERVAL_S = 1.0  # retained state at most once a second: bandwidth on LTE
OFFLINE_PUBACK_WAIT_S = 1.0  # a stopping daemon waits this long at most for the broker
BACKLOG_CHECK_S = 5.0  # how often the backlog is measured while the broker is away
#: Unpublished events that raise the ``outbox_backlog`` alarm (~days of a busy cabinet
#: offline; a few hundred MB). Events are never dropped: the alarm asks a person to act.
OUTBOX_ALARM_DEPTH = 100_000
#: The largest command payload that is parsed at all (docs/mqtt.md §3): real commands
#: are well under 1 KiB; a bigger one is refused (``payload_too_large``) unparsed.
MAX_COMMAND_BYTES = 64 * 1024
#: Commands executed per source (its MQTT 5 response topic, else the command topic) per
#: ``refusal_limit.WINDOW_S`` window; more are refused ``rate_limited`` unjournaled and
#: summarised in one ``command.rate_limited`` event per burst (docs/mqtt.md §3.1).
COMMANDS_PER_WINDOW = 120
#: Backoff after the broker refuses an event (PUBACK >= 0x80): a refusal is a
#: configuration problem (ACL, quota) that a person fixes, so retry soon, then rarely.
REFUSED_RETRY_MIN_S = 1.0
REFUSED_RETRY_MAX_S = 60.0
#: Telemetry held while the broker is away (``mqtt.telemetry_backlog_s``): this much time
#: at the current interval, 60 samples at the default 60 s; the oldest are dropped first.
TELEMETRY_BACKLOG_S = 3600.0
#: Retained ``state``/``status`` sent again after this long unchanged (``mqtt.
#: state_republish_s``): RabbitMQ replays retained messages only to exact-topic subscribers,
#: so a ``cabinets/+/state`` dashboard learns of a quiet cabinet only this way. ~3.5 KB a
#: time, 13.8 KB/h for an idle cabinet (a fifth of its telemetry); a busy one pays nothing.
STATE_REPUBLISH_S = 900.0


def _json(model: BaseModel) -> bytes:
    return model.model_dump_json().encode()


class CommandError(Exception):
    """A command refused with a stable code."""

    def __init__(self, code: str, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.result = result  # a duplicate carries the original reply here


class FleetLink:
    """Bridges one cabinet's controller and journal to the fleet broker."""

    def __init__(
        self,
        controller: CabinetController,
        link_factory: Callable[..., MqttLink],
        *,
        telemetry_interval_s: float = 60.0,
        telemetry_backlog_s: float = TELEMETRY_BACKLOG_S,
        state_republish_s: float = STATE_REPUBLISH_S,
        firmware: FirmwareFetcher | None = None,
    ) -> None:
        self.controller = controller
        self.firmware = firmware
        self.cabinet_id = controller.cabinet_id
        self._connect_ms = self._now_ms()  # when the current connection attempt began
        self.link = link_factory(
            will_topic=topics.status(self.cabinet_id),
            will_payload=self._will,
            on_connected=self._on_connected,
            on_message=self._on_message,
        )
        self.link.subscribe(topics.commands_filter(self.cabinet_id))
        self._state_dirty = asyncio.Event()
        self._handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "swap.start": self._swap_start,
            "state.get": self._state_get,
            "bay.open": self._bay_open,
            "bay.disable": self._bay_disable,
            "bay.enable": self._bay_enable,
            "settings.set": self._settings_set,
            "firmware.update": self._firmware_update,
        }
        stored = controller.journal.setting("telemetry_interval_s")
        self.telemetry_interval_s = float(stored) if stored else telemetry_interval_s
        self._last_state: messages.State | None = None
        self.state_republish_s = state_republish_s  # 0: only on connect and on change
        self._state_sent_at = 0.0  # monotonic; the retained state's last publish
        self._online: bytes | None = None  # this connection's ``online`` status, as sent
        self._status_sent_at = 0.0  # monotonic; its last publish
        self.telemetry_backlog_s = telemetry_backlog_s
        self.telemetry_dropped = 0  # samples dropped: over the backlog cap, or journal full
        #: set while the event outbox has nothing to send (or is backing off a refusal):
        #: held telemetry goes out only then, so events never wait behind it
        self._events_clear = asyncio.Event()
        self._telemetry = TelemetryBacklog(
            controller.journal,
            self.link,
            topics.telemetry(self.cabinet_id),
            events_clear=self._events_clear,
        )
        self._backlog_alarm = False
        self._refused_alarm: str | None = None  # the active publish_refused alarm's detail
        self._refused_delay_s = REFUSED_RETRY_MIN_S
        self._rate = RefusalLimit(COMMANDS_PER_WINDOW)  # per command source

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Publish forever (supervised by the daemon)."""
        self.link.start()
        try:
            # a TaskGroup: if one loop dies the others are cancelled with it, so a
            # supervised restart never leaves two drainers racing over the outbox
            async with asyncio.TaskGroup() as group:
                group.create_task(self._drain_outbox())
                group.create_task(self._publish_state())
                group.create_task(self._publish_telemetry())
                group.create_task(self._telemetry.drain())
                group.create_task(self._summarise_rate_limited())
        finally:
            await self._say_offline()
            self.link.stop()

    async def _say_offline(self) -> None:
        """A clean stop sends no last will: say offline ourselves (best effort, bounded)."""
        if not self.link.connected.is_set():
            return
        offline = messages.Status(
            ts=self._now_ms(), online=False, version=__version__, boot_id=self.controller.boot_id
        )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.link.publish(topics.status(self.cabinet_id), _json(offline), retain=True),
                OFFLINE_PUBACK_WAIT_S,
            )

    def _will(self) -> bytes:
        """The last will, built before each connection attempt (paho's thread).

        Its ``ts`` is the attempt's start + 1 ms and that connection's ``online: true``
        carries the start itself, so "latest status by ts" ends on the will when the
        cabinet dies; the next connection starts later still (docs/mqtt.md §6).
        """
        self._connect_ms = self._now_ms()
        offline = messages.Status(
            ts=self._connect_ms + 1,
            online=False,
            version=__version__,
            boot_id=self.controller.boot_id,
        )
        return _json(offline)

    def _on_connected(self) -> None:
        online = messages.Status(
            ts=self._connect_ms, online=True, version=__version__, boot_id=self.controller.boot_id
        )
        self._online = _json(online)
        self._status_sent_at = self.controller.clock.monotonic()
        self.link.publish(topics.status(self.cabinet_id), self._online, retain=True)
        self._state_dirty.set()
        self.controller.changed.set()

    # -- the outbox ------------------------------------------------------------------------

    async def _drain_outbox(self) -> None:
        journal = self.controller.journal
        while True:
            self._check_backlog()
            if not self.link.connected.is_set():
                self._events_clear.clear()  # what waits now goes before held telemetry
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that races the event (the daemon's stop then hangs) - the campaign found it
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BACKLOG_CHECK_S):
                        await self.link.connected.wait()
                continue
            batch = journal.unpublished(PUBLISH_WINDOW)
            if not batch:
                self._events_clear.set()
                self.controller.changed.clear()
                await self.controller.changed.wait()
                continue
            self._events_clear.clear()
            futures = [
                self.link.publish(topics.events(self.cabinet_id), self._event(e)) for e in batch
            ]
            # a refused or unconfirmed event stays in the outbox, resent in order
            confirmed, refused = await confirmed_prefix(futures)
            acked_upto = int(batch[confirmed - 1]["seq"]) if confirmed else 0
            if acked_upto:
                await self._mark_published(acked_upto)
            # no forced state here: events alone are not a state change, and the
            # retained state honours its deadbands (``significant``)
            if refused is not None:
                await self._back_off_refused(refused)
            elif acked_upto:
                self._publish_accepted()

    async def _back_off_refused(self, refused: PublishRefusedError) -> None:
        """Alarm once, then wait before resending: a refusing broker is not hammered."""
        self._events_clear.set()  # telemetry is not held hostage by a refused event
        if self._refused_alarm is None:
            self._refused_alarm = self._alarm("alarm.raised", "publish_refused", str(refused))
            if self._refused_alarm is not None:
                log.warning("publish_refused", topic=refused.topic, reason=str(refused))
        await asyncio.sleep(self._refused_delay_s)
        self._refused_delay_s = min(self._refused_delay_s * 2, REFUSED_RETRY_MAX_S)

    def _publish_accepted(self) -> None:
        """The broker takes our events again: clear the refusal alarm, reset the backoff."""
        self._refused_delay_s = REFUSED_RETRY_MIN_S
        if self._refused_alarm is not None:
            detail = f"the broker accepts events again (was: {self._refused_alarm})"
            if self._alarm("alarm.cleared", "publish_refused", detail) is not None:
                log.info("publish_accepted_again")
                self._refused_alarm = None

    def _alarm(self, type_: str, kind: str, detail: str) -> str | None:
        """Journal an alarm event; ``None`` if the journal cannot be written (retried later)."""
        try:
            self.controller.record((type_, {"kind": kind, "bay": None, "detail": detail}))
        except JournalError:
            return None
        return detail

    async def _mark_published(self, upto_seq: int) -> None:
        """Record the PUBACKs; with the journal unwritable, wait for room rather than resend.

        Nothing new can be journaled meanwhile, so there is nothing else to publish.
        """
        while True:
            try:
                self.controller.journal.mark_published(upto_seq)
            except JournalError:
                await asyncio.sleep(BACKLOG_CHECK_S)
            else:
                return

    def _check_backlog(self) -> None:
        """Raise ``outbox_backlog`` once when the outbox grows past its cap, clear it once."""
        over = self.controller.journal.outbox_depth() >= OUTBOX_ALARM_DEPTH
        if over == self._backlog_alarm:
            return
        detail = (
            f"{OUTBOX_ALARM_DEPTH}+ events wait for the broker"
            if over
            else "the backlog is back under its cap"
        )
        try:
            self.controller.record(
                (
                    "alarm.raised" if over else "alarm.cleared",
                    {"kind": "outbox_backlog", "bay": None, "detail": detail},
                )
            )
        except JournalError:
            return  # disk full: raised (or cleared) on a later check, once it can be stored
        self._backlog_alarm = over

    def _now_ms(self) -> int:
        """``ts`` from the controller's injected clock (one clock for the daemon)."""
        return int(self.controller.clock.wall() * 1000)

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
        """Retained state on every (re)connect and on significant change, at most 1/s.

        And again, with ``status``, once unchanged for ``state_republish_s``.
        """
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATE_MIN_INTERVAL_S):
                    await self._state_dirty.wait()
            forced = self._state_dirty.is_set() or self._republish_due(self._state_sent_at)
            self._state_dirty.clear()
            state = self.state()
            if self.link.connected.is_set() and (
                forced or self._last_state is None or significant(self._last_state, state)
            ):
                self.link.publish(topics.state(self.cabinet_id), _json(state), retain=True)
                self._last_state = state
                self._state_sent_at = self.controller.clock.monotonic()
            self._republish_status()
            await asyncio.sleep(STATE_MIN_INTERVAL_S)

    def _republish_due(self, sent_at: float) -> bool:
        if self.state_republish_s <= 0:
            return False
        return self.controller.clock.monotonic() - sent_at >= self.state_republish_s

    def _republish_status(self) -> None:
        """This connection's ``online`` again, byte for byte, when it is due.

        The same ``ts``, not a new one: the will that ends this connection carries its
        start + 1 ms, and a backend keeping the latest ``status`` by ``ts`` must order that
        will after every ``online`` of the connection (docs/mqtt.md §6).
        """
        if (
            self._online is None
            or not self.link.connected.is_set()
            or not self._republish_due(self._status_sent_at)
        ):
            return
        self.link.publish(topics.status(self.cabinet_id), self._online, retain=True)
        self._status_sent_at = self.controller.clock.monotonic()

    async def _publish_telemetry(self) -> None:
        """A sample every interval, held in the journal until the broker acknowledges it."""
        while True:
            await asyncio.sleep(self.telemetry_interval_s)
            sample = self.telemetry()
            self.telemetry_dropped += self._telemetry.hold(
                sample.ts, _json(sample), self.telemetry_keep()
            )

    def telemetry_keep(self) -> int:
        """How many samples are held at most: ``telemetry_backlog_s`` at the current interval."""
        # the epsilon: 0.3 s / 0.1 s is 2.999… in floating point, and means 3 samples
        return max(1, int(self.telemetry_backlog_s / self.telemetry_interval_s + 1e-9))

    def telemetry(self) -> messages.Telemetry:
        """Periodic measurements, including how the outbox is doing."""
        return views.telemetry_message(self.controller, self.telemetry_dropped)

    def state(self) -> messages.State:
        """The full snapshot of DESIGN.md §4.3."""
        return views.state_message(self.controller)

    def mark_state_changed(self) -> None:
        """Something an operator sees changed: publish state (rate-limited)."""
        self._state_dirty.set()

    # -- commands ----------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        name = topics.command_name(self.cabinet_id, message.topic)
        if name is None:
            return
        source = message.response_topic or message.topic
        clock = self.controller.clock
        if self._rate.admit(source, name, now=clock.monotonic(), ts_ms=self._now_ms()):
            reply = self._handle(name, message.payload)
        else:  # past the rate: answered, not run, not journaled (summarised later)
            payload = message.payload
            request_id = _request_id_of(payload) if len(payload) <= MAX_COMMAND_BYTES else None
            error = messages.ReplyError(
                code="rate_limited",
                message=f"over {COMMANDS_PER_WINDOW} commands a minute from this source",
            )
            reply = self._reply(name, request_id, ok=False, error=error)
        props = None
        target = topics.reply(self.cabinet_id)
        if message.response_topic:
            target = message.response_topic
            if message.correlation_data is not None:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = message.correlation_data
        self.link.publish(target, json.dumps(reply).encode(), properties=props)

    async def _summarise_rate_limited(self) -> None:
        """One ``command.rate_limited`` event per burst, once it is over."""
        while True:
            await asyncio.sleep(1.0)
            self.flush_rate_limited()

    def flush_rate_limited(self) -> None:
        """Journal the summaries of the bursts that are over (logged if it cannot be written)."""
        bursts = self._rate.due(self.controller.clock.monotonic())
        if not bursts:
            return
        with contextlib.suppress(JournalError):
            self.controller.record(
                *(
                    (
                        "command.rate_limited",
                        {
                            "source": burst.source,
                            "count": burst.count,
                            "first_ts": burst.first_ts,
                            "last_ts": burst.last_ts,
                            "commands": burst.reasons,
                        },
                    )
                    for burst in bursts
                )
            )
            log.warning("commands_rate_limited", bursts=len(bursts))

    def _handle(self, name: str, payload: bytes) -> dict[str, Any]:
        if len(payload) > MAX_COMMAND_BYTES:
            # refused before any parsing: a huge payload would cost memory for good
            error = messages.ReplyError(
                code="payload_too_large",
                message=f"payload of {len(payload)} bytes is over the {MAX_COMMAND_BYTES} cap",
            )
            reply = self._reply(name, None, ok=False, error=error)
            self._record(name, None, reply)
            return reply
        request_id = _request_id_of(payload)
        try:
            # one transaction: the effect's events and the request_id's record are on
            # disk together or not at all, so a crash between them cannot make a retry
            # act twice (docs/mqtt.md §3.1); doors unlock only after the commit
            with self.controller.journal.transaction():
                reply = self._execute(name, payload, request_id)
                self._record_in(name, reply["request_id"], reply)
        except JournalError as exc:  # disk full: the command did nothing, and says why
            error = messages.ReplyError(code="journal_unwritable", message=str(exc))
            reply = self._reply(name, request_id, ok=False, error=error)
            self._record(name, request_id, reply)
        return reply

    def _execute(self, name: str, payload: bytes, request_id: str | None) -> dict[str, Any]:
        try:
            command, handler = self._parse(name, payload)
            request_id = command.request_id
            result = handler(command.args)
            return self._reply(name, request_id, ok=True, result=result)
        except CommandError as exc:
            return self._reply(
                name,
                request_id,
                ok=False,
                result=exc.result,
                error=messages.ReplyError(code=exc.code, message=str(exc)),
            )

    def _parse(
        self, name: str, payload: bytes
    ) -> tuple[messages.Command, Callable[[dict[str, Any]], Any]]:
        """Validate a command and find its handler, or raise the precise refusal."""
        raw = _decode(payload)
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
                result=previous,
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
            ts=self._now_ms(),
            request_id=request_id,
            command=name,
            ok=ok,
            result=result,
            error=error,
        ).model_dump(mode="json")

    def _record(self, name: str, request_id: str | None, reply: dict[str, Any]) -> None:
        with contextlib.suppress(JournalError):
            self._record_in(name, request_id, reply)

    def _record_in(self, name: str, request_id: str | None, reply: dict[str, Any]) -> None:
        error = reply.get("error") or {}
        duplicate = error.get("code") == "duplicate_request"

        def reply_kept(db: sqlite3.Connection) -> None:
            if request_id is not None and not duplicate:
                self.controller.journal.put_command_reply(
                    db, request_id, reply, self.controller.clock.wall()
                )

        event = {
            "command": name,
            "request_id": request_id,
            "ok": reply["ok"],
            "error": error.get("code"),
        }
        self.controller.record(("command.handled", event), change=reply_kept)

    @staticmethod
    def _args(model: type[BaseModel], args: dict[str, Any]) -> Any:
        try:
            return model.model_validate(args)
        except ValidationError as exc:
            raise CommandError("invalid_args", _first_error(exc)) from None

    def _swap_start(self, args: dict[str, Any]) -> dict[str, Any]:
        parsed = self._args(messages.SwapStartArgs, args)
        book = self.controller.challenges  # the screen's QR challenges (cabinet/display)
        if book is not None:
            bad = book.check(parsed.challenge)
            if bad is not None:
                detail = f"challenge {parsed.challenge or '(none)'}: {bad}"
                self.controller.refuse_authorisation(bad, detail, parsed.rider_id)
                raise CommandError(bad, f"swap refused: {bad.replace('_', ' ')}")
        elif parsed.challenge is not None:  # no screen, so it showed no challenge
            self.controller.refuse_authorisation(
                "unknown_challenge", "this cabinet shows no QR challenge", parsed.rider_id
            )
            raise CommandError("unknown_challenge", "swap refused: unknown challenge")
        refusal = self.controller.request_session(parsed.rider_id, Mode(parsed.mode), "mqtt")
        if refusal is not None:
            raise CommandError(refusal, f"cannot start a session now: {refusal}")
        state = self.controller.state
        if book is not None and state.phase is not Phase.IDLE:
            book.use(parsed.challenge)
        if parsed.lang is not None and state.session_id:
            self.controller.rider_language = (state.session_id, parsed.lang)
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

    def _bay_open(self, args: dict[str, Any]) -> dict[str, Any]:
        bay = self._args(messages.BayArgs, args).bay
        refusal = self.controller.open_bay(bay, "operator")
        if refusal is not None:
            raise CommandError(refusal, f"cannot open bay {bay} now: {refusal}")
        return {"bay": bay, "unlocked": True}

    def _bay_disable(self, args: dict[str, Any]) -> dict[str, Any]:
        parsed = self._args(messages.BayDisableArgs, args)
        self.controller.set_bay_service(
            parsed.bay, in_service=False, reason=parsed.reason, by="operator"
        )
        return {"bay": parsed.bay, "in_service": False}

    def _bay_enable(self, args: dict[str, Any]) -> dict[str, Any]:
        bay = self._args(messages.BayArgs, args).bay
        self.controller.set_bay_service(bay, in_service=True, reason="", by="operator")
        return {"bay": bay, "in_service": True}

    def _firmware_update(self, args: dict[str, Any]) -> dict[str, Any]:
        parsed = self._args(messages.FirmwareUpdateArgs, args)
        if self.firmware is None:
            raise CommandError("unavailable", "this daemon does not update firmware")
        bays = list(parsed.bays) if parsed.bays else list(BAY_UNITS)
        try:
            return self.firmware.start(parsed.source, bays, force=parsed.force)
        except FirmwareRefusedError as exc:
            raise CommandError(exc.reason, str(exc)) from None

    def _settings_set(self, args: dict[str, Any]) -> dict[str, Any]:
        for key, value in args.items():  # JSON's NaN/Infinity extensions: say so plainly
            if isinstance(value, float) and math.isnan(value):
                raise CommandError("invalid_args", f"{key}: NaN is not a number")
            if isinstance(value, float) and math.isinf(value):
                raise CommandError("invalid_args", f"{key}: {value} is not a finite number")
        parsed = self._args(messages.SettingsArgs, args)
        if parsed.telemetry_interval_s is None and parsed.dispense_min_soc_pct is None:
            raise CommandError("invalid_args", "settings.set needs at least one setting")
        if parsed.dispense_min_soc_pct is not None:
            self.controller.set_dispense_threshold(parsed.dispense_min_soc_pct, "operator")
        if parsed.telemetry_interval_s is not None:
            self.telemetry_interval_s = parsed.telemetry_interval_s
            with self.controller.journal.transaction() as db:
                self.controller.journal.put_setting(
                    db, "telemetry_interval_s", parsed.telemetry_interval_s
                )
        return {
            "telemetry_interval_s": self.telemetry_interval_s,
            "dispense_min_soc_pct": self.controller.settings.dispense.min_soc_pct,
        }


SOC_DEADBAND_PCT = 1.0  # a charging battery changes the state at most every ~2 min
TEMP_DEADBAND_C = 1.0
EXACT_FIELDS = (
    "online",
    "door",
    "locked",
    "battery_id",
    "battery_present",
    "charging",
    "in_service",
    "out_of_service_reason",
)


def significant(before: messages.State, after: messages.State) -> bool:
    """Whether ``after`` differs from ``before`` enough to re-publish retained state.

    Report by exception: doors, batteries, service and session changes always count;
    SoC and temperatures only beyond their deadbands, so an idle cabinet is quiet.
    """
    if before.cabinet != after.cabinet or before.session != after.session:
        return True
    for old, new in zip(before.bays, after.bays, strict=True):
        if any(getattr(old, k) != getattr(new, k) for k in EXACT_FIELDS):
            return True
        for key, band in (
            ("soc_pct", SOC_DEADBAND_PCT),
            ("cell_temp_c", TEMP_DEADBAND_C),
            ("bay_temp_c", TEMP_DEADBAND_C),
        ):
            a, b = getattr(old, key), getattr(new, key)
            if (a is None) != (b is None) or (a is not None and abs(a - b) >= band):
                return True
    return False


def _decode(payload: bytes) -> Any:
    r"""Parse a command payload, or raise ``malformed_json`` — never anything else.

    Beyond bad syntax and bad UTF-8 this refuses what ``json.loads`` raises on or lets
    through unsafely (docs/mqtt.md §3): an integer over 4,300 digits (``ValueError``),
    nesting deeper than the interpreter's recursion limit (``RecursionError``) and a
    lone surrogate such as ``"\ud800"`` (not Unicode: no journal or reply could hold it).
    """
    try:
        raw = json.loads(payload)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise CommandError("malformed_json", f"payload is not JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise CommandError("malformed_json", "payload is not JSON: nested too deeply") from None
    try:
        json.dumps(raw, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise CommandError(
            "malformed_json", "payload is not JSON: a string holds a lone surrogate"
        ) from None
    except RecursionError:
        raise CommandError("malformed_json", "payload is not JSON: nested too deeply") from None
    return raw


def _request_id_of(payload: bytes) -> str | None:
    """The request_id of even an invalid command, so its error reply can be matched."""
    try:
        raw = _decode(payload)
    except CommandError:
        return None
    value = raw.get("request_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and len(value) <= 64 else None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"]) or "payload"
    return f"{where}: {error['msg']}"
