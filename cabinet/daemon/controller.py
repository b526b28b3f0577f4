"""The cabinet controller: decides, journals first, and hands the bus work to the poller.

Theory of operation: the controller holds the cabinet's picture (session, bay
snapshots, custody, interlocks, which units answer) and never touches the bus.
The bay poller (``bay_poller``) reads the boards and hands each reading to
``observe_bay``: ``bay_tracker.diff`` turns snapshot changes into events for the
swap machine; the machine's commands are committed to the journal in one
transaction *with* the new snapshot baseline, custody moves and events, and only
then carried out — bus commands (``bus_commands``: doors, safety writes) go back
to the poller, timers are armed here. Safety interlocks and the charging policy
see every reading too. Everything else that writes the journal (the fleet link,
the control server, the firmware service) goes through one door, ``record``.

A bay whose unit the bus isolated is reported offline (``bay.offline``/
``unit.offline`` once, an alarm after ``offline_alarm_s``, see
``unit_presence``). A charger-off or contactor-open is carried out even when the
journal cannot record it (``safety_writes``: done once a read-back confirms it).
After a restart, ``recover`` diffs the journaled baseline against fresh readings
before any door is opened, keeps the session's journaled deadlines but gives the
rider at least ``RECOVERY_GRACE_S`` (they waited for the reboot too) — never a
full new timeout, or a daemon restarting in a loop would keep an abandoned
session, and the cabinet, busy forever — and re-sends an unlock whose door was
never seen to open.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import sqlite3
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from cabinet import __version__
from cabinet.core.battery_rules import DispenseRules, rank_dispensable
from cabinet.core.bay_tracker import BaySnapshot, diff
from cabinet.core.charging_policy import BayChargeView, ChargingRules, plan
from cabinet.core.safety import (
    AbortSession,
    Alarm,
    AllChargersOff,
    ChargerOff,
    IsolateBay,
    OpenContactor,
    SafetyAction,
    SafetyLimits,
    SafetyMonitor,
)
from cabinet.core.swap_machine import (
    BOARD_SILENT,
    IDLE,
    Abort,
    BayOffline,
    CancelTimer,
    Candidate,
    Command,
    CustodyToBay,
    CustodyToRider,
    DispensableNow,
    Emit,
    Event,
    MarkBayFaulty,
    Mode,
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
from cabinet.core.unit_presence import DEFAULT_OFFLINE_ALARM_S, PresenceEvent, UnitPresence
from cabinet.daemon.bay_poller import (
    MIN_POLL_CYCLE_S,  # noqa: F401 - its old home
    BayPoller,
)
from cabinet.daemon.bus_commands import BusCommand, MakeSafe, OperatorUnlock, SafetyTarget
from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.clock import (
    Clock,
    SystemClock,
)  # one clock for the daemon (cabinet/daemon/clock.py)
from cabinet.daemon.display.challenges import ChallengeBook
from cabinet.daemon.journal import Journal, JournalError
from cabinet.daemon.safety_writes import SafetyWrite
from drivers.modbus_bus import BusUnavailableError
from protocol.cabinet_map import CabinetStatus
from protocol.meter_map import MeterReading
from protocol.units import BAY_UNITS

log = structlog.get_logger("controller")

#: After a restart a running timer gets at least this long: the rider waited for the
#: reboot. Found by the virtual fault campaign (seed 2): full re-arming on every restart
#: let a crash-looping daemon keep a walked-away session open forever.
RECOVERY_GRACE_S = 15.0
PENDING_PICKUPS = "pending_pickups"
DEFAULT_SILENCE_UNHEALTHY_S = 30.0  # ten heartbeat timeouts: no unit answering is not a blip
UNITS_OFFLINE = "units_offline"
#: One event for ``record``: its type and payload.
EventRecord = tuple[str, dict[str, Any]]


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


def _material(snapshot: BaySnapshot) -> tuple[Any, ...]:
    """The parts of a snapshot whose change is worth a journal write."""
    return (
        snapshot.online,
        snapshot.door_closed,
        snapshot.locked,
        snapshot.battery_present,
        snapshot.battery_id,
        snapshot.battery.plugged if snapshot.battery else None,
        snapshot.lock_jammed,
    )


#: Phases in which the session's reserved battery (or its fall-backs) may still change.
RESERVATION_PHASES = frozenset(
    {Phase.OPENING_RETURN, Phase.AWAITING_DEPOSIT, Phase.OPENING_DISPENSE}
)


@dataclass(frozen=True, slots=True)
class BusOutage:
    """The adapter or gateway cannot be reached."""

    error: str
    since: float  # monotonic
    since_wall: float


class CabinetController:
    """Owns the swap session, the bay picture, custody, interlocks and charging."""

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
        self.ledger = journal.ledger()
        self.baseline: dict[int, BaySnapshot] = journal.snapshots()
        self.snapshots: dict[int, BaySnapshot] = {}
        self.out_of_service: dict[int, str] = journal.out_of_service()
        # dispense bays whose board went silent while the rider was free to take the
        # battery: bay -> [battery, rider, session], settled when the bay answers again
        self.pending_pickups: dict[int, list[str]] = {
            int(bay): list(v) for bay, v in (journal.setting(PENDING_PICKUPS) or {}).items()
        }
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
        self.journal_alarm: str | None = None  # why the journal cannot be written (an alarm)
        # -- bus truth: who answers, is the bus there (the poller reports, this journals)
        self.presence = UnitPresence.from_json(
            journal.setting(UNITS_OFFLINE),
            offline_alarm_s=self.settings.offline_alarm_s,
            now=self.clock.monotonic(),
            wall=self.clock.wall(),
        )
        self.bus_lost: BusOutage | None = None
        self.poll_cycles = 0
        self._journal_alarm_stored = False  # its alarm.raised made it into the journal
        # the hands and eyes: reads the boards into observe_bay and carries out bus
        # commands; its background I/O is spawned here (late-bound: tests replace _spawn)
        self.poller = BayPoller(self, scheduler, spawn=lambda coro: self._spawn(coro))  # noqa: PLW0108

    @property
    def safety_writes(self) -> dict[SafetyTarget, SafetyWrite]:
        """The safety writes not yet confirmed by a read-back (the poller re-tries them)."""
        return self.poller.safety.writes

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
            copy.deepcopy(self.pending_pickups),
        )

        def restore() -> None:
            (
                self.state,
                self.timers,
                self.ledger,
                self.out_of_service,
                self.safety,
                self.baseline,
                self.pending_pickups,
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

    def _custody(self, db: sqlite3.Connection, change: Any) -> None:
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
            if change.after.where.value == "missing":
                self.emit(
                    db,
                    "alarm.raised",
                    {
                        "kind": "battery_missing",
                        "bay": change.before.bay if change.before else None,
                        "detail": f"{change.battery_id} left its bay without a session",
                    },
                )

    def _note_pickup_in_doubt(
        self, db: sqlite3.Connection, before: SwapState, event: Event
    ) -> None:
        """The dispense bay went silent while its door was open for the rider.

        Whether they took the battery is unknown until the bay answers again; the door
        was opened for them, so if it is gone then, it went with them (not "missing").
        Found by the virtual fault campaign (seed 105).
        """
        if (
            isinstance(event, BayOffline)
            and before.phase is Phase.AWAITING_PICKUP
            and event.bay == before.dispense_bay
            and before.reserved is not None
            and self.state.phase is Phase.IDLE
        ):
            self.pending_pickups[event.bay] = [before.reserved, before.rider_id, before.session_id]
            self.journal.put_setting(db, PENDING_PICKUPS, self.pending_pickups)

    def _settle_pickup(self, db: sqlite3.Connection, bay: int, snapshot: BaySnapshot) -> None:
        pending = self.pending_pickups.get(bay)
        if pending is None or (snapshot.battery_present and snapshot.battery_id is None):
            return  # nothing in doubt, or the BMS has not said which battery sits there yet
        battery_id, rider_id, session_id = self.pending_pickups.pop(bay)
        if snapshot.battery_id != battery_id:
            self._custody(db, self.ledger.to_rider(battery_id, rider_id, session_id))
            self.emit(
                db,
                "custody.changed",
                {
                    "battery_id": battery_id,
                    "from": f"bay {bay}",
                    "to": f"rider {rider_id} (session {session_id})",
                    "detail": "taken while the bay's board was silent",
                },
            )
        self.journal.put_setting(db, PENDING_PICKUPS, self.pending_pickups)

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

    # -- observations: the poller hands every reading in --------------------------------------

    def _moves_machine(self, events: list[Event]) -> bool:
        """Whether ``events`` would change the session or make it act (a pure dry run)."""
        state = self.state
        for event in events:
            result = self.settings.machine.step(state, event)
            if result.commands or result.state != state:
                return True
            state = result.state
        return False

    def observe_bay(self, bay: int, snapshot: BaySnapshot) -> None:
        """Take a fresh reading of ``bay`` through tracker, machine, ledger and interlocks."""
        prev = self.baseline.get(bay)
        events: list[Event] = diff(bay, prev, snapshot)
        io: list[Command] = []
        safety: list[SafetyAction] = []
        if snapshot.online:
            cell = snapshot.battery.cell_temp_c if snapshot.battery else None
            safety = self.safety.observe_bay(bay, self.clock.monotonic(), cell, snapshot.bay_temp_c)
        material = prev is None or _material(prev) != _material(snapshot)
        if self.ready and self.state.phase in RESERVATION_PHASES:
            # the reserved battery is re-judged on every reading until its door opens
            # (after this reading's safety trips, before this reading's door-shut); not
            # during recovery, while some bays are not yet re-read and would look absent
            events.insert(0, DispensableNow(self._dispensable_now({bay: snapshot})))
        back = snapshot.online and self.out_of_service.get(bay) == BOARD_SILENT
        try:
            # the tracker reports every changed reading (a charging pack's SoC each poll); only
            # those that move the machine are worth a journal write
            if self._moves_machine(events) or material or safety or back:
                self._commit_reading(bay, snapshot, events, safety, io, back=back)
        except BaseException:
            # making a bay safe needs no record: a charger-off is carried out even when the
            # journal could not be written (a full disk must not keep a hot pack charging)
            self._safety_io([a for a in safety if not isinstance(a, AbortSession)])
            raise
        self.baseline[bay] = snapshot
        self.snapshots[bay] = snapshot
        self._carry_out(io)
        self._safety_io(safety)

    def _commit_reading(
        self,
        bay: int,
        snapshot: BaySnapshot,
        events: list[Event],
        safety: list[SafetyAction],
        io: list[Command],
        *,
        back: bool,
    ) -> None:
        """Journal what one reading changed, memory and disk together (see ``_committing``)."""
        with self._committing() as db:
            for event in events:
                self._step(db, event, io)
            if snapshot.online:
                self._settle_pickup(db, bay, snapshot)
                expected = bay == self.state.return_bay and self.state.phase in (
                    Phase.AWAITING_DEPOSIT,
                    Phase.REJECTING,
                    Phase.GIVING_BACK,
                )
                for change in self.ledger.observe_bay(
                    bay,
                    snapshot.battery_id,
                    present=snapshot.battery_present,
                    expected=expected,
                ):
                    self._custody(db, change)
            self.journal.put_snapshot(db, bay, snapshot)
            self._safety_journal(db, safety)
            if back:
                del self.out_of_service[bay]
                self.journal.set_service(db, bay, in_service=True, reason="")
                self.emit(
                    db,
                    "bay.enabled",
                    {"bay": bay, "by": "controller", "reason": "board answering again"},
                )

    def _safety_journal(self, db: sqlite3.Connection, actions: list[SafetyAction]) -> None:
        for action in actions:
            if isinstance(action, IsolateBay):
                self._take_out_of_service(db, action.bay, action.reason)
            elif isinstance(action, Alarm):
                self.emit(
                    db,
                    "alarm.raised" if action.active else "alarm.cleared",
                    {"kind": action.kind, "bay": action.bay, "detail": action.detail},
                )

    def _safety_io(self, actions: list[SafetyAction]) -> None:
        for action in actions:
            if isinstance(action, ChargerOff):
                self._carry_out([MakeSafe(("charger", action.bay))])
            elif isinstance(action, AllChargersOff):
                self._carry_out([MakeSafe(("charger", bay)) for bay in BAY_UNITS])
            elif isinstance(action, OpenContactor):
                self._carry_out([MakeSafe(("contactor", None))])
            elif isinstance(action, AbortSession) and self.state.phase is not Phase.IDLE:
                self.feed([Abort(action.reason)])

    def observe_cabinet(self, status: CabinetStatus) -> bool:
        """Take a cabinet board reading through the interlocks.

        Returns whether the contactor should be closed now (the poller writes it; the
        next reading checks it). One that should be open but reads closed is this
        reading's read-back: its confirmed opening is started here.
        """
        self.cabinet_status = status
        actions = self.safety.observe_cabinet(
            smoke=status.smoke, mains_present=status.mains_present
        )
        if actions:
            with self._committing() as db:
                self._safety_journal(db, actions)
            self._safety_io(actions)
        want_closed = not self.safety.smoke and not self.safety.mains_lost
        if status.contactor_closed == want_closed:
            return False
        if not want_closed:
            self._carry_out([MakeSafe(("contactor", None))])
        return want_closed

    def board_unreadable(self, bay: int, reason: str) -> None:
        """A bay board answers with a register map this daemon cannot read: out of service."""
        with self._committing() as db:
            self._take_out_of_service(db, bay, reason)

    def charging_plan(self) -> dict[int, float]:
        """The charging current for every answering bay (the poller writes it)."""
        views = {
            bay: BayChargeView(
                snap, bay not in self.out_of_service, self.safety.charging_allowed(bay)
            )
            for bay, snap in self.snapshots.items()
            if snap.online
        }
        return plan(views, self.settings.charging)

    def safety_still_wanted(self, target: SafetyTarget) -> bool:
        """Whether a charger-off or contactor-open is still required by the interlocks."""
        kind, bay = target
        if kind == "contactor":
            return self.safety.smoke or self.safety.mains_lost
        assert bay is not None
        return not self.safety.charging_allowed(bay)

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

    # -- bus truth: who answers, and is the bus there at all --------------------------------

    def unit_answered(self, unit: int) -> None:
        """``unit`` answered the poller: back online if it was not."""
        now, wall = self.clock.monotonic(), self.clock.wall()
        self._journal_presence(lambda p: p.answered(unit, now=now, wall=wall))

    def unit_silent(self, unit: int) -> None:
        """The bus isolated ``unit`` after repeated silence."""
        now, wall = self.clock.monotonic(), self.clock.wall()
        self._journal_presence(lambda p: p.silent(unit, now=now, wall=wall))

    def presence_alarms_due(self) -> None:
        """Raise the alarms of units silent for ``offline_alarm_s`` (once a poll cycle)."""
        now = self.clock.monotonic()
        self._journal_presence(lambda p: p.due(now))

    def _journal_presence(self, change: Callable[[UnitPresence], list[PresenceEvent]]) -> None:
        """Journal a unit going silent, its alarm or its recovery, with the outages kept.

        The change is made on a copy, kept only once journaled: news the journal did not
        take is news again on the next reading, not lost.
        """
        presence = copy.deepcopy(self.presence)
        events = change(presence)
        if not events:
            self.presence = presence
            return
        try:
            self.record(
                *((event.type, event.data) for event in events),
                change=lambda db: self.journal.put_setting(db, UNITS_OFFLINE, presence.as_json()),
            )
        except JournalError:
            return  # journal_unwritable is its own alarm; the log has the event lines
        self.presence = presence
        for event in events:
            level = log.info if event.type.endswith("online") else log.warning
            level("unit_presence", type=event.type, **event.data)

    def bus_unavailable(self, exc: BusUnavailableError) -> None:
        """The adapter or gateway is gone: news once; the poller reopens it."""
        if self.bus_lost is not None:
            return
        self.bus_lost = BusOutage(str(exc), self.clock.monotonic(), self.clock.wall())
        log.error("bus_lost", error=str(exc))
        with contextlib.suppress(JournalError):
            self.record(("bus.lost", {"error": str(exc)}))

    def bus_restored(self, tries: int) -> None:
        """The poller reopened the adapter: say how long it was gone."""
        lost, self.bus_lost = self.bus_lost, None
        assert lost is not None
        outage_s = round(self.clock.wall() - lost.since_wall, 1)
        log.info("bus_restored", outage_s=outage_s, tries=tries)
        with contextlib.suppress(JournalError):
            self.record(("bus.restored", {"outage_s": outage_s}))

    # -- start-up and the timers --------------------------------------------------------------

    async def recover(self) -> None:
        """Rebuild the picture from the boards before any door opens (DESIGN.md §5)."""
        await self.poller.read_everything()
        resumed = self.state.session_id if self.state.phase is not Phase.IDLE else None
        io: list[Command] = []
        with self._committing() as db:
            if self.state.phase is not Phase.IDLE:
                machine = self.settings.machine
                now = self.clock.monotonic()
                for timer, deadline in list(self.timers.items()):
                    grace = min(machine.timeouts.of(timer), RECOVERY_GRACE_S)
                    self._arm(db, timer, max(deadline - now, grace))
                door_bay = self.hot_bays()
                if (
                    self.state.phase
                    in (
                        Phase.OPENING_RETURN,
                        Phase.OPENING_DISPENSE,
                        Phase.REJECTING,
                        Phase.GIVING_BACK,
                    )
                    and door_bay
                ):
                    snap = self.snapshots.get(door_bay[0])
                    if snap is not None and snap.door_closed:
                        io.append(Unlock(door_bay[0]))
                        self._arm(db, Timer.UNLOCK, machine.timeouts.unlock)
            self.emit(
                db,
                "cabinet.started",
                {"version": __version__, "boot_id": self.boot_id, "resumed_session": resumed},
            )
        self._carry_out(io)
        self.ready = True
        self._timer_wakeup.set()

    async def timers_forever(self) -> None:
        """Turn deadlines into ``TimerExpired`` events."""
        while True:
            self._timer_wakeup.clear()
            if self.timers and self.ready:
                delay = max(0.0, min(self.timers.values()) - self.clock.monotonic())
            else:
                delay = None
            try:  # asyncio.timeout: wait_for can swallow a racing cancellation on 3.11
                async with asyncio.timeout(delay):
                    await self._timer_wakeup.wait()
            except TimeoutError:
                now = self.clock.monotonic()
                due = [t for t, deadline in self.timers.items() if deadline <= now]
                self.feed([TimerExpired(t) for t in due])

    # -- session requests ---------------------------------------------------------------------

    def _usable_bays(self, latest: dict[int, BaySnapshot]) -> dict[int, BaySnapshot]:
        """Bays a session may use now: answering, shut, in service, not tripped."""
        return {
            bay: snap
            for bay, snap in {**self.snapshots, **latest}.items()
            if snap.online
            and snap.door_closed
            and bay not in self.out_of_service
            and bay not in self.safety.tripped
        }

    def _dispensable_now(self, latest: dict[int, BaySnapshot]) -> tuple[Candidate, ...]:
        """Batteries that may be handed out by their latest readings, best first.

        The session's own return bay is never a candidate: after a deposit it holds the
        rider's battery, which goes back to them as such, not as a "fresh" one.
        """
        usable = self._usable_bays(latest)
        ranked = rank_dispensable(
            (
                (bay, snap.battery)
                for bay, snap in usable.items()
                if snap.battery is not None and bay != self.state.return_bay
            ),
            self.settings.dispense,
        )
        return tuple(Candidate(bay, b.battery_id) for bay, b in ranked if b.battery_id is not None)

    def _start_event(self, rider_id: str, mode: Mode) -> Start:
        usable = self._usable_bays({})
        empty = tuple(sorted(bay for bay, snap in usable.items() if not snap.battery_present))
        dispensable = self._dispensable_now({})
        return Start(uuid.uuid4().hex[:12], rider_id, mode, empty, dispensable)

    def set_bay_service(self, bay: int, *, in_service: bool, reason: str, by: str) -> None:
        """An operator or technician takes a bay out of service or puts it back.

        Putting a bay back also lifts a latched over-temperature trip: a person has
        looked at it.
        """
        with self._committing() as db:
            if in_service:
                self.out_of_service.pop(bay, None)
                self.journal.set_service(db, bay, in_service=True, reason="")
                self._safety_journal(db, self.safety.clear_bay(bay))
                self.emit(db, "bay.enabled", {"bay": bay, "by": by, "reason": reason})
            else:
                self.out_of_service[bay] = reason
                self.journal.set_service(db, bay, in_service=False, reason=reason)
                self.emit(db, "bay.disabled", {"bay": bay, "reason": reason, "by": by})

    def open_bay(self, bay: int, by: str) -> str | None:
        """Open a bay for an operator or technician, outside any session; or say why not."""
        refusal = self.refusal()
        if refusal is not None:
            return refusal
        with self._committing() as db:
            self.emit(db, "bay.opened", {"bay": bay, "by": by})
            # unlocked once the record is on disk: inside a fleet command's transaction
            # that is with its request_id (docs/mqtt.md §3.1), never for a rolled-back one
            self.journal.after_commit(lambda: self._carry_out([OperatorUnlock(bay)]))
        return None

    def set_dispense_threshold(self, min_soc_pct: float, by: str) -> None:
        """Change the dispensing SoC threshold at runtime (persisted in the journal)."""
        dispense = replace(self.settings.dispense, min_soc_pct=min_soc_pct)
        charging = replace(self.settings.charging, ready_soc_pct=min_soc_pct)
        self.settings = replace(self.settings, dispense=dispense, charging=charging)
        with self._committing() as db:
            self.journal.put_setting(db, "dispense_min_soc_pct", min_soc_pct)
            self.emit(db, "settings.changed", {"dispense_min_soc_pct": min_soc_pct, "by": by})

    def refusal(self) -> str | None:
        """Why no session can start now, or None."""
        if not self.ready:
            return "not_ready"
        if not self.journal_writable():
            return "journal_unwritable"
        if self.state.phase is not Phase.IDLE:
            return "busy"
        if self.maintenance is not None:
            return "maintenance"
        if not self.safety.swaps_allowed:
            return "safety_lockout"
        return None

    def journal_writable(self) -> bool:
        """Whether the journal takes writes (re-tried while it does not).

        Nothing is decided without the journal, so while it cannot be written no rider is
        accepted and the ``journal_unwritable`` alarm stands: in ``status`` and ``state``
        at once, in the event stream as soon as an event can be stored again.
        """
        trouble = self.journal.trouble(self.clock.monotonic())
        if trouble is not None and self.journal_alarm is None:
            log.error("journal_unwritable_refusing_riders", reason=trouble)
            self.journal_alarm = trouble
            self._journal_alarm_stored = self._store_journal_alarm(raised=True, cleared=False)
        elif trouble is None and self.journal_alarm is not None:
            raised = not self._journal_alarm_stored
            if self._store_journal_alarm(raised=raised, cleared=True):
                log.info("journal_writable_accepting_riders")
                self.journal_alarm = None
        return trouble is None

    def _store_journal_alarm(self, *, raised: bool, cleared: bool) -> bool:
        detail = f"the journal cannot be written: {self.journal_alarm}"
        try:
            with self._committing() as db:
                if raised:
                    self.emit(
                        db,
                        "alarm.raised",
                        {"kind": "journal_unwritable", "bay": None, "detail": detail},
                    )
                if cleared:
                    self.emit(
                        db,
                        "alarm.cleared",
                        {"kind": "journal_unwritable", "bay": None, "detail": "writable again"},
                    )
        except JournalError:
            return False  # a full disk usually takes this too: stored once there is room
        return True

    def refuse_session(self, rider_id: str, reason: str, source: str) -> None:
        """Record that a rider was turned away before any door opened."""
        with self._committing() as db:
            self.emit(
                db, "swap.refused", {"rider_id": rider_id, "reason": reason, "source": source}
            )

    def request_session(
        self, rider_id: str, mode: Mode, source: str, *, token: tuple[str, int] | None = None
    ) -> str | None:
        """Start a session for an authorised rider; returns why not, or None if started.

        ``token`` is a QR token's (nonce, expiry): ``replayed`` if it was spent already,
        else spent in the very transaction that starts the session. A session refused
        before any door opens (no battery to hand out, no free bay) leaves it usable.
        """
        refusal = self.refusal()
        if refusal is not None:
            self.refuse_session(rider_id, refusal, source)
            return refusal
        start = self._start_event(rider_id, mode)
        io: list[Command] = []
        with self._committing() as db:
            if token is not None and self.journal.token_spent(token[0]):
                return "replayed"
            log.info("session_requested", rider_id=rider_id, mode=mode.value, source=source)
            self._step(db, start, io)
            if token is not None and self.state.phase is not Phase.IDLE:
                self.journal.spend_token(db, token[0], token[1], int(self.clock.wall()))
        self._carry_out(io)
        return None

    def refuse_authorisation(self, reason: str, detail: str, rider_id: str | None) -> None:
        """Record a refused token or command (forged, expired, replayed, malformed)."""
        with self._committing() as db:
            self.emit(
                db, "auth.refused", {"reason": reason, "detail": detail, "rider_id": rider_id}
            )

    async def drain(self) -> None:
        """Wait for unlocks and safety writes in flight (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


def _with_id(event: Event) -> SwapState:
    """A session record for a Start that was refused before any door opened."""
    assert isinstance(event, Start)
    return SwapState(session_id=event.session_id, rider_id=event.rider_id, mode=event.mode)
