"""The controller's memory and its journal-first step: decide, journal, then act.

Theory of operation: every decision changes the controller's memory (session,
timers, custody, bays out of service, interlocks, baseline snapshots, pickups in
doubt) and the journal in one breath (``_committing``): if the transaction fails,
memory goes back to what the journal holds, so the daemon never acts on something
it has not recorded. ``_step`` feeds one event to the swap machine and journals
everything it decided; the bus commands among the decisions (doors, safety writes,
``bus_commands``) are handed to the bay poller only after the commit, timers are
armed here. Writes from outside the step go through one door, ``record``.

This is the bottom layer of ``CabinetController``: board readings
(``board_observations``) and people's requests (``session_requests``) build on it.
"""

from __future__ import annotations

import asyncio
import copy
import sqlite3
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog

from cabinet.core.battery_rules import DispenseRules
from cabinet.core.bay_tracker import BaySnapshot
from cabinet.core.charging_policy import ChargingRules
from cabinet.core.custody import IDENTITY_GRACE_S, CustodyChange, Where
from cabinet.core.safety import SafetyLimits, SafetyMonitor
from cabinet.core.swap_machine import (
    BOARD_SILENT,
    IDLE,
    CancelTimer,
    Command,
    CustodyToBay,
    CustodyToRider,
    Emit,
    Event,
    MarkBayFaulty,
    Phase,
    Prompt,
    RaiseAlarm,
    Start,
    StartTimer,
    SwapMachine,
    SwapState,
    Timer,
    TimerExpired,
    Unlock,
)
from cabinet.core.unit_presence import DEFAULT_OFFLINE_ALARM_S
from cabinet.daemon.bus_commands import BusCommand, MakeSafe, OperatorUnlock
from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.clock import Clock, SystemClock
from cabinet.daemon.display.challenges import ChallengeBook
from cabinet.daemon.journal import Journal
from cabinet.daemon.journal_alarm import JournalAlarm
from cabinet.daemon.journal_door import EventRecord
from cabinet.daemon.pickups_in_doubt import PickupsInDoubt
from protocol.cabinet_map import CabinetStatus
from protocol.meter_map import MeterReading

if TYPE_CHECKING:
    from cabinet.daemon.bay_poller import BayPoller

log = structlog.get_logger("controller")

DEFAULT_SILENCE_UNHEALTHY_S = 30.0  # ten heartbeat timeouts: no unit answering is not a blip
#: smoke and mains seen within a second (plus one transaction) at any baud, for the price of
#: one 5-register read a second instead of one per 12-bay cycle (docs/hardware.md)
DEFAULT_CABINET_BOARD_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """The decision rules the controller applies."""

    machine: SwapMachine = field(default_factory=SwapMachine)
    dispense: DispenseRules = field(default_factory=DispenseRules)
    charging: ChargingRules = field(default_factory=ChargingRules)
    safety: SafetyLimits = field(default_factory=SafetyLimits)
    #: a silent unit raises its alarm after this long (``bus.offline_alarm_s``)
    offline_alarm_s: float = DEFAULT_OFFLINE_ALARM_S
    #: no unit answering for this long makes the daemon unhealthy (``bus.silence_unhealthy_s``)
    silence_unhealthy_s: float = DEFAULT_SILENCE_UNHEALTHY_S
    #: the cabinet board is read this often, between bay reads (``bus.cabinet_board_interval_s``)
    cabinet_board_interval_s: float = DEFAULT_CABINET_BOARD_INTERVAL_S
    #: an unreadable pack hides the battery last seen in its bay this long
    #: (``swap.identity_grace_s``)
    identity_grace_s: float = IDENTITY_GRACE_S


class JournalFirst:
    """The session, the bay picture, custody and interlocks, changed journal first."""

    #: the hands and eyes (``bay_poller``), set by ``CabinetController``
    poller: BayPoller

    def __init__(
        self,
        *,
        cabinet_id: str,
        journal: Journal,
        scheduler: BusScheduler,
        settings: ControllerSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.cabinet_id = cabinet_id
        self.journal = journal
        self.scheduler = scheduler
        self.settings = settings or ControllerSettings()
        stored = journal.setting("dispense_min_soc_pct")
        if isinstance(stored, int | float):  # a backend's runtime change outlives a restart
            self.settings = replace(
                self.settings,
                dispense=replace(self.settings.dispense, min_soc_pct=float(stored)),
                charging=replace(self.settings.charging, ready_soc_pct=float(stored)),
            )
        self.clock: Clock = clock or SystemClock()
        self.state: SwapState = journal.active_session() or IDLE
        # deadlines on the monotonic clock (a wall-clock step must not fire or stall them);
        # the journal keeps wall-clock deadlines for people, and recover() re-arms them
        self.timers: dict[Timer, float] = {
            timer: self.clock.monotonic() + max(0.0, deadline - self.clock.wall())
            for timer, deadline in journal.timers().items()
        }
        self.ledger = journal.ledger(identity_grace_s=self.settings.identity_grace_s)
        self.baseline: dict[int, BaySnapshot] = journal.snapshots()
        self.snapshots: dict[int, BaySnapshot] = {}
        self.out_of_service: dict[int, str] = journal.out_of_service()
        # dispense bays whose board went silent while the rider was free to take the
        # battery, settled when the bay answers again
        self.pickups = PickupsInDoubt(journal)
        self.safety = SafetyMonitor(self.settings.safety)
        self.ready = False
        self.prompt = ""
        self.prompt_code = ""
        #: (session id, language) a ``swap.start`` asked for: the rider's screen and voice
        self.rider_language: tuple[str, str] | None = None
        #: the screen's QR challenges (set by the daemon when shown or required)
        self.challenges: ChallengeBook | None = None
        self.boot_id = uuid.uuid4().hex
        self._timer_wakeup = asyncio.Event()
        self.changed = asyncio.Event()  # an event was journaled: the fleet link drains it
        self._event_tick = asyncio.Event()  # replaced on every event: wakes every follower
        self.maintenance: str | None = None  # a technician's self-test holds off sessions
        self.last_cycle_at: float | None = None  # monotonic end of the last full poll cycle
        self.meter: MeterReading | None = None
        self.cabinet_status: CabinetStatus | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.journal_unwritable = JournalAlarm(
            journal=journal, clock=self.clock, record=self.record
        )
        self.poll_cycles = 0

    # -- the journal-first step --------------------------------------------------------------

    def _ts_ms(self) -> int:
        return int(self.clock.wall() * 1000)

    def emit(self, db: sqlite3.Connection, type_: str, payload: dict[str, Any]) -> None:
        """Append an event to the outbox inside the controller's own transaction.

        Callers outside the controller use ``record`` (the one door) instead.
        """
        event = self.journal.add_event(db, type_, payload, self._ts_ms())
        self.changed.set()
        self._event_tick.set()
        self._event_tick = asyncio.Event()
        log.info("event", **{k: v for k, v in event.items() if k not in {"ts"}})

    def record(
        self,
        *events: EventRecord,
        change: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """The one door for writes outside the journal-first step: events, journaled first.

        ``events`` (and ``change``, a write of state that goes with them) are committed
        in one transaction with the controller's memory rolled back if it fails (see
        ``_committing``); raises ``JournalError`` when the journal cannot take them.
        Inside an enclosing transaction (a fleet command) they share its fate.
        """
        with self._committing() as db:
            for type_, payload in events:
                self.emit(db, type_, payload)
            if change is not None:
                change(db)

    async def next_event(self) -> None:
        """Return once another event has been journaled (for ``cabinet events --follow``)."""
        await self._event_tick.wait()

    @contextmanager
    def _committing(self) -> Iterator[sqlite3.Connection]:
        """A journal transaction whose in-memory twin is rolled back with it.

        Decisions change memory first and the journal in the same breath; if the commit
        fails (disk full, database locked) memory goes back to what the journal holds,
        so the daemon never acts on something it has not recorded.
        """
        saved = (
            self.state,
            dict(self.timers),
            copy.deepcopy(self.ledger),
            dict(self.out_of_service),
            copy.deepcopy(self.safety),
            dict(self.baseline),
            copy.deepcopy(self.pickups.bays),
        )

        def restore() -> None:
            (
                self.state,
                self.timers,
                self.ledger,
                self.out_of_service,
                self.safety,
                self.baseline,
                self.pickups.bays,
            ) = saved

        try:
            with self.journal.transaction() as db:
                yield db
        except BaseException:
            restore()
            raise
        # inside an enclosing unit (a fleet command) memory follows its fate too
        self.journal.after_rollback(restore)

    def _arm(self, db: sqlite3.Connection, timer: Timer, seconds: float) -> None:
        self.timers[timer] = self.clock.monotonic() + seconds
        self.journal.set_timer(db, timer, self.clock.wall() + seconds)

    def _step(self, db: sqlite3.Connection, event: Event, io: list[Command]) -> None:
        """Feed one event to the machine and journal everything it decided."""
        if isinstance(event, TimerExpired):
            self.timers.pop(event.timer, None)  # spent, whatever the machine makes of it
            self.journal.cancel_timer(db, event.timer)
        before = self.state
        result = self.settings.machine.step(before, event)
        if result.rejected:
            log.debug("event_not_expected", detail=result.rejected)
            return
        now = self.clock.wall()
        outcome = None
        for command in result.commands:
            if isinstance(command, Unlock):
                io.append(command)
            elif isinstance(command, StartTimer):
                self._arm(db, command.timer, command.seconds)
            elif isinstance(command, CancelTimer):
                self.timers.pop(command.timer, None)
                self.journal.cancel_timer(db, command.timer)
            elif isinstance(command, Emit):
                self.emit(db, command.type, command.data)
                if command.type == "swap.completed":
                    outcome = "completed"
                elif command.type == "swap.failed":
                    outcome = str(command.data.get("reason"))
            elif isinstance(command, Prompt):
                # the rider's screen and voice key on the code
                self.prompt, self.prompt_code = command.text, command.code
                log.info("prompt", code=command.code, text=command.text)
            elif isinstance(command, MarkBayFaulty):
                self._take_out_of_service(db, command.bay, command.reason)
            elif isinstance(command, RaiseAlarm):
                self.emit(
                    db,
                    "alarm.raised",
                    {"kind": command.kind, "bay": command.bay, "detail": command.detail},
                )
            elif isinstance(command, CustodyToBay):
                self._custody(db, self.ledger.to_bay(command.battery_id, command.bay))
            elif isinstance(command, CustodyToRider):
                self._custody(
                    db,
                    self.ledger.to_rider(command.battery_id, command.rider_id, command.session_id),
                )
        self.state = result.state
        self._note_pickup_in_doubt(db, before, event)
        session_id = before.session_id or self.state.session_id
        if isinstance(event, Start):
            session_id = event.session_id
        if self.state.phase is Phase.IDLE:
            if before.phase is not Phase.IDLE or outcome is not None:
                if before.phase is Phase.IDLE:  # refused at start: record it as a session
                    self.journal.put_session(db, _with_id(event), now)
                self.journal.end_session(db, session_id, outcome or "ended", now)
                self.timers.clear()
            structlog.contextvars.unbind_contextvars("session_id")
        else:
            self.journal.put_session(db, self.state, now)
            structlog.contextvars.bind_contextvars(session_id=self.state.session_id)
        self._timer_wakeup.set()

    def _custody(self, db: sqlite3.Connection, change: CustodyChange | None) -> None:
        """Journal a custody move; a surprise is news, a battery missing or found an alarm.

        The alarm names the bay the battery was last seen in, with the ledger's reason; it
        is cleared when the battery is accounted for again (seen in a bay, deposited, or
        settled with a rider) and no other battery is missing from that bay (an operator's
        view keys alarms by kind and bay).
        """
        if change is None:
            return
        self.journal.put_custody(db, change.battery_id, change.after, self.clock.wall())
        if change.surprise:
            self.emit(
                db,
                "custody.changed",
                {
                    "battery_id": change.battery_id,
                    "from": change.before.describe() if change.before else None,
                    "to": change.after.describe(),
                },
            )
        if change.after.where is Where.MISSING:
            self.emit(
                db,
                "alarm.raised",
                {
                    "kind": "battery_missing",
                    "bay": change.before.bay if change.before else None,
                    "detail": change.detail,
                },
            )
        last_seen = change.before.bay if change.found and change.before else None
        if last_seen is not None and not self.ledger.missing_from(last_seen):
            found = (
                f"seen again in {change.after.describe()}"
                if change.after.where is Where.BAY
                else f"with {change.after.describe()}"
            )
            self.emit(
                db,
                "alarm.cleared",
                {
                    "kind": "battery_missing",
                    "bay": last_seen,
                    "detail": f"{change.battery_id} {found}",
                },
            )

    def _note_pickup_in_doubt(
        self, db: sqlite3.Connection, before: SwapState, event: Event
    ) -> None:
        """Keep a pickup in doubt: the dispense bay went silent with its door open.

        A hook of its own: the virtual campaign switches it off to show what it prevents.
        """
        self.pickups.note(db, before, self.state, event)

    def _settle_pickup(self, db: sqlite3.Connection, bay: int, snapshot: BaySnapshot) -> None:
        """The bay answers again: a battery gone from it went with the rider."""
        taken = self.pickups.settle(db, bay, snapshot)
        if taken is None:
            return
        change = self.ledger.to_rider(taken.battery_id, taken.rider_id, taken.session_id)
        self.emit(  # before _custody's alarm.cleared: the move, then what it settles
            db,
            "custody.changed",
            {
                "battery_id": taken.battery_id,
                # "missing" when the bay's unreadable pack outlasted the identity grace
                "from": change.before.describe() if change and change.before else f"bay {bay}",
                "to": f"rider {taken.rider_id} (session {taken.session_id})",
                "detail": "taken while the bay's board was silent",
            },
        )
        self._custody(db, change)

    def _take_out_of_service(self, db: sqlite3.Connection, bay: int, reason: str) -> None:
        current = self.out_of_service.get(bay)
        if current is not None and (current == reason or current != BOARD_SILENT):
            return  # keep the first real reason: only a silent board clears itself
        self.out_of_service[bay] = reason
        self.journal.set_service(db, bay, in_service=False, reason=reason)
        self.emit(db, "bay.disabled", {"bay": bay, "reason": reason, "by": "controller"})

    def feed(self, events: Iterable[Event]) -> None:
        """Step the machine through ``events``, journal first, then carry out the bus work."""
        io: list[Command] = []
        with self._committing() as db:
            for event in events:
                self._step(db, event, io)
        self._carry_out(io)

    def _carry_out(self, io: Sequence[Command | BusCommand]) -> None:
        """Hand the journaled decisions' bus commands to the poller."""
        self.poller.carry_out([c for c in io if isinstance(c, Unlock | OperatorUnlock | MakeSafe)])

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run bus I/O in the background, tracked for ``drain`` and logged if it fails."""
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background_action_failed", error=f"{type(exc).__name__}: {exc}")

    async def drain(self) -> None:
        """Wait for unlocks and safety writes in flight (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def hot_bays(self) -> list[int]:
        """The bay whose door the session is using now (read often, unlocked if wanted)."""
        state = self.state
        if state.phase is Phase.IDLE:
            return []
        if state.phase in (Phase.OPENING_DISPENSE, Phase.AWAITING_PICKUP):
            bay = state.dispense_bay
        else:
            bay = state.return_bay
        return [bay] if bay is not None else []


def _with_id(event: Event) -> SwapState:
    """A session record for a Start that was refused before any door opened."""
    assert isinstance(event, Start)
    return SwapState(session_id=event.session_id, rider_id=event.rider_id, mode=event.mode)
