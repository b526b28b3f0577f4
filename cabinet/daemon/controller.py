"""The cabinet controller: the daemon's runtime around the sans-I/O decisions.

Theory of operation: the poller reads one bay at a time through the bus
scheduler and turns each report into a snapshot; ``bay_tracker.diff`` turns
snapshot changes into events for the swap machine; the machine's commands are
committed to the journal in one transaction *with* the new snapshot baseline,
custody moves and events, and only then carried out (doors unlocked, timers
armed). Safety interlocks and the charging policy see every reading too.

A reading that fails is stale, not news: the last snapshot stands until the bus
isolates the unit (a few consecutive failures), and only then is the bay
reported offline (``bay.offline``/``unit.offline`` once, an alarm after
``offline_alarm_s``, see ``unit_presence``). A charger-off or contactor-open is
done only once reading the board back confirms it; until then it is re-sent at
safety priority and ``safety_write_failed`` stands. After a restart, ``recover``
diffs the journaled baseline against fresh readings before any door is opened,
keeps the session's journaled deadlines but gives the rider at least
``RECOVERY_GRACE_S`` (they waited for the reboot too) — never a full new
timeout, or a daemon restarting in a loop would keep an abandoned session, and
the cabinet, busy forever — and re-sends an unlock whose door was never seen to
open.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from cabinet import __version__
from cabinet.core.battery_rules import DispenseRules, rank_dispensable
from cabinet.core.bay_tracker import OFFLINE, BaySnapshot, diff, snapshot_from_status
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
    LockJammed,
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
from cabinet.daemon.bus_scheduler import BusScheduler, Priority
from cabinet.daemon.clock import (
    Clock,
    SystemClock,
)  # one clock for the daemon (cabinet/daemon/clock.py)
from cabinet.daemon.display.challenges import ChallengeBook
from cabinet.daemon.journal import Journal, JournalError
from drivers.boards import BayBoard, CabinetBoard, EnergyMeter
from drivers.modbus_bus import (
    HEARTBEAT_FAILSAFE_EXCEPTION,
    BusError,
    BusUnavailableError,
    ExceptionReplyError,
    ModbusBus,
    UnitIsolatedError,
)
from protocol import bay_map
from protocol.cabinet_map import CabinetStatus
from protocol.errors import ProtocolError, UnknownMapVersionError
from protocol.meter_map import MeterReading
from protocol.units import BAY_UNITS, CABINET_BOARD_UNIT, ENERGY_METER_UNIT

log = structlog.get_logger("controller")

# A bay board in heartbeat fail-safe refuses an unlock with 0x06 (busy: retry after a
# heartbeat); 0x04 (device failure) is a failing board. Rule in docs/hardware.md.
HEARTBEAT_FAILSAFE_CODE = HEARTBEAT_FAILSAFE_EXCEPTION
HOT_BAY_INTERVAL_S = 0.1  # a session's bay is re-read this often: a door seen open within ~0.1 s
HEARTBEAT_INTERVAL_S = 1.0  # five per board timeout: one lost broadcast never trips a board
CHARGER_REFRESH_S = 60.0  # re-send unchanged charger settings: a rebooted board forgets them
METER_INTERVAL_S = 10.0
#: After a restart a running timer gets at least this long: the rider waited for the
#: reboot. Found by the virtual fault campaign (seed 2): full re-arming on every restart
#: let a crash-looping daemon keep a walked-away session open forever.
RECOVERY_GRACE_S = 15.0
PENDING_PICKUPS = "pending_pickups"
#: A poll cycle never starts sooner than this after the previous one started. A healthy
#: cycle takes longer anyway (12 bays + cabinet board: ~0.1 s of wire at 115200 baud,
#: ~0.9 s at 9600); this only bites when every call fails at once (adapter gone, every
#: unit isolated), where it caps the poller at 4 cycles a second instead of a busy loop.
MIN_POLL_CYCLE_S = 0.25
#: Pauses between tries of an unconfirmed safety write: quick at first (one lost frame),
#: then once a second for as long as it takes — never a busy loop on a dead board.
SAFETY_RETRY_S = (0.2, 0.4, 0.8, 1.0)
#: Pauses between attempts to reopen a lost adapter or gateway.
BUS_REOPEN_S = (0.5, 1.0, 2.0, 5.0, 10.0)
DEFAULT_SILENCE_UNHEALTHY_S = 30.0  # ten heartbeat timeouts: no unit answering is not a blip
UNITS_OFFLINE = "units_offline"


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

#: A safety write's target: ("charger", bay) or ("contactor", None).
SafetyTarget = tuple[str, int | None]


@dataclass(slots=True)
class SafetyWrite:
    """A charger-off or contactor-open not yet confirmed by reading the board back."""

    target: SafetyTarget
    due: float  # monotonic: the next try
    tries: int = 0
    busy: bool = False  # a try is on the bus now
    alarmed: bool = False  # its ``safety_write_failed`` alarm is journaled
    error: str = ""


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
        self._last_read: dict[int, float] = {}
        self._commanded: dict[int, tuple[bool, float, float]] = {}
        self._heartbeat_counter = 0
        self._last_meter = float("-inf")
        self.meter: MeterReading | None = None
        self.cabinet_status: CabinetStatus | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.on_unlock_sent: Callable[[int], None] | None = None  # for latency measurement
        self.journal_alarm: str | None = None  # why the journal cannot be written (an alarm)
        # -- bus truth: who answers, which safety writes are unconfirmed, is the bus there
        self.presence = UnitPresence.from_json(
            journal.setting(UNITS_OFFLINE),
            offline_alarm_s=self.settings.offline_alarm_s,
            now=self.clock.monotonic(),
            wall=self.clock.wall(),
        )
        self.safety_writes: dict[SafetyTarget, SafetyWrite] = {}
        self._safety_wakeup = asyncio.Event()
        self.last_answer_at = self.clock.monotonic()  # a unit answered (any unit, any call)
        self._answers_seen = 0
        self.bus_lost: BusOutage | None = None
        self._heartbeat_failing = False
        self.poll_cycles = 0
        self._journal_alarm_stored = False  # its alarm.raised made it into the journal

    # -- the journal-first step --------------------------------------------------------------

    def _ts_ms(self) -> int:
        return int(self.clock.wall() * 1000)

    def emit(self, db: sqlite3.Connection, type_: str, payload: dict[str, Any]) -> None:
        """Append an event to the outbox (inside the caller's transaction)."""
        event = self.journal.add_event(db, type_, payload, self._ts_ms())
        self.changed.set()
        self._event_tick.set()
        self._event_tick = asyncio.Event()
        log.info("event", **{k: v for k, v in event.items() if k not in {"ts"}})

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

    def _feed(self, events: Iterable[Event]) -> None:
        io: list[Command] = []
        with self._committing() as db:
            for event in events:
                self._step(db, event, io)
        self._carry_out(io)

    def _carry_out(self, io: list[Command]) -> None:
        for command in io:
            if isinstance(command, Unlock):
                self._spawn(self._unlock(command.bay))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background_action_failed", error=f"{type(exc).__name__}: {exc}")

    async def _unlock(self, bay: int) -> None:
        session_id = self.state.session_id

        async def unlock_if_still_wanted(bus: ModbusBus) -> bool:
            # Checked when the frame is about to go out, not when it was queued: a session
            # aborted meanwhile (smoke) must not have a door open after the fact.
            if self.state.session_id != session_id or bay not in self._hot_bays():
                return False
            await BayBoard(bus, bay).unlock()
            return True

        try:
            try:
                sent = await self.scheduler.submit(Priority.UNLOCK, unlock_if_still_wanted)
            except ExceptionReplyError as exc:
                if exc.code != HEARTBEAT_FAILSAFE_CODE:
                    raise
                # the board is in heartbeat fail-safe, not jammed: heartbeat, then once more
                await self._heartbeat(Priority.UNLOCK)
                sent = await self.scheduler.submit(Priority.UNLOCK, unlock_if_still_wanted)
        except ExceptionReplyError as exc:
            failsafe = exc.code == HEARTBEAT_FAILSAFE_CODE
            log.warning(
                "unlock_refused",
                bay=bay,
                error=str(exc),
                cause="heartbeat fail-safe" if failsafe else "board failure",
            )
            if not failsafe:
                self._feed([LockJammed(bay)])
            return
        except BusError as exc:
            log.warning("unlock_failed", bay=bay, error=str(exc))
            return  # the unlock timer will notice the door never opened
        if not sent:
            log.info("unlock_dropped", bay=bay, reason="session no longer wants this door")
            return
        if self.on_unlock_sent is not None:
            self.on_unlock_sent(bay)
        await self._read_bay(bay, Priority.ACTIVE)

    # -- observations -------------------------------------------------------------------------

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
                self._make_safe(("charger", action.bay))
            elif isinstance(action, AllChargersOff):
                for bay in BAY_UNITS:
                    self._make_safe(("charger", bay))
            elif isinstance(action, OpenContactor):
                self._make_safe(("contactor", None))
            elif isinstance(action, AbortSession) and self.state.phase is not Phase.IDLE:
                self._feed([Abort(action.reason)])

    async def refresh_bay(self, bay: int) -> BaySnapshot | None:
        """Read ``bay`` now (ahead of routine polling); its snapshot, or None if unknown."""
        await self._read_bay(bay, Priority.ACTIVE)
        return self.snapshots.get(bay)

    async def _read_bay(self, bay: int, priority: Priority) -> None:
        self._last_read[bay] = self.clock.monotonic()
        try:
            status = await self.scheduler.submit(
                priority, lambda bus: BayBoard(bus, bay).read_status()
            )
        except BusUnavailableError as exc:
            self._bus_unavailable(exc)
            return  # nobody was asked: the bay's picture is stale, not news
        except UnitIsolatedError:
            self._presence_silent(bay)
            self.observe_bay(bay, OFFLINE)
            return
        except UnknownMapVersionError as exc:
            self._presence_answered(bay)
            with self._committing() as db:
                self._take_out_of_service(db, bay, str(exc))
            return
        except (BusError, ProtocolError):
            if self.scheduler.bus.is_isolated(bay):
                self._presence_silent(bay)
                self.observe_bay(bay, OFFLINE)
            return  # stale: the last snapshot stands until the unit is isolated
        self._presence_answered(bay)
        try:
            self.observe_bay(bay, snapshot_from_status(status))
        except JournalError:
            return  # not recorded, so not acted on: the next reading retries (journal.py logs it)

    async def _read_cabinet(self) -> None:
        try:
            status = await self.scheduler.submit(
                Priority.ROUTINE, lambda bus: CabinetBoard(bus).read_status()
            )
        except BusUnavailableError as exc:
            self._bus_unavailable(exc)
            return
        except (BusError, ProtocolError):
            if self.scheduler.bus.is_isolated(CABINET_BOARD_UNIT):
                self._presence_silent(CABINET_BOARD_UNIT)
            return
        self._presence_answered(CABINET_BOARD_UNIT)
        self.cabinet_status = status
        actions = self.safety.observe_cabinet(
            smoke=status.smoke, mains_present=status.mains_present
        )
        if actions:
            with self._committing() as db:
                self._safety_journal(db, actions)
            self._safety_io(actions)
        want_closed = not self.safety.smoke and not self.safety.mains_lost
        if status.contactor_closed != want_closed:
            if want_closed:
                await self._contactor(closed=True, priority=Priority.ROUTINE)
            else:  # this reading is the read-back: the contactor is still closed
                self._make_safe(("contactor", None))

    async def _contactor(self, *, closed: bool, priority: Priority) -> None:
        """Close the contactor (routine: the next cabinet reading checks it)."""
        try:
            await self.scheduler.submit(
                priority, lambda bus: CabinetBoard(bus).set_contactor(closed=closed)
            )
        except BusError as exc:
            log.info("contactor_write_failed", closed=closed, error=str(exc))

    async def _charger(self, bay: int, amps: float, priority: Priority) -> None:
        enabled = amps > 0.0
        try:
            await self.scheduler.submit(
                priority,
                lambda bus: BayBoard(bus, bay).set_charger(enabled=enabled, current_limit_a=amps),
            )
        except BusError as exc:
            log.debug("charger_write_failed", bay=bay, error=str(exc))
            self._commanded.pop(bay, None)
            return
        self._commanded[bay] = (enabled, amps, self.clock.monotonic())

    async def _apply_charging(self) -> None:
        views = {
            bay: BayChargeView(
                snap, bay not in self.out_of_service, self.safety.charging_allowed(bay)
            )
            for bay, snap in self.snapshots.items()
            if snap.online
        }
        now = self.clock.monotonic()
        for bay, amps in plan(views, self.settings.charging).items():
            last = self._commanded.get(bay)
            if (
                last is None
                or (last[0], last[1]) != (amps > 0, amps)
                or (now - last[2] > CHARGER_REFRESH_S)
            ):
                await self._charger(bay, amps, Priority.ROUTINE)

    async def _heartbeat(self, priority: Priority = Priority.ACTIVE) -> None:
        self._heartbeat_counter = (self._heartbeat_counter + 1) & 0xFFFF
        counter = self._heartbeat_counter
        try:
            await self.scheduler.submit(
                priority,
                lambda bus: bus.broadcast_register(bay_map.CommandReg.HEARTBEAT, counter),
            )
        except BusError as exc:
            if not self._heartbeat_failing:  # once per episode, not once a second
                log.warning("heartbeat_failed", error=str(exc))
            self._heartbeat_failing = True
        else:
            if self._heartbeat_failing:
                log.info("heartbeat_sent_again")
            self._heartbeat_failing = False

    async def heartbeat_forever(self) -> None:
        """Tell the boards we are alive, in a task of its own so a poller crash cannot stop it."""
        while True:
            await self._heartbeat()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    def _hot_bays(self) -> list[int]:
        state = self.state
        if state.phase is Phase.IDLE:
            return []
        if state.phase in (Phase.OPENING_DISPENSE, Phase.AWAITING_PICKUP):
            bay = state.dispense_bay
        else:
            bay = state.return_bay
        return [bay] if bay is not None else []

    async def _read_hot_bays(self) -> None:
        for bay in self._hot_bays():
            if self.clock.monotonic() - self._last_read.get(bay, 0.0) >= HOT_BAY_INTERVAL_S:
                await self._read_bay(bay, Priority.ACTIVE)

    async def _read_meter_if_due(self) -> None:
        now = self.clock.monotonic()
        if now - self._last_meter < METER_INTERVAL_S:
            return
        self._last_meter = now
        try:
            self.meter = await self.scheduler.submit(
                Priority.ROUTINE, lambda bus: EnergyMeter(bus).read()
            )
        except BusUnavailableError as exc:
            self._bus_unavailable(exc)
            return
        except (BusError, ProtocolError):
            if self.scheduler.bus.is_isolated(ENERGY_METER_UNIT):
                self._presence_silent(ENERGY_METER_UNIT)
            return
        self._presence_answered(ENERGY_METER_UNIT)

    # -- bus truth: who answers, and is the bus there at all --------------------------------

    def _presence_answered(self, unit: int) -> None:
        now, wall = self.clock.monotonic(), self.clock.wall()
        self._journal_presence(lambda p: p.answered(unit, now=now, wall=wall))

    def _presence_silent(self, unit: int) -> None:
        now, wall = self.clock.monotonic(), self.clock.wall()
        self._journal_presence(lambda p: p.silent(unit, now=now, wall=wall))

    def _presence_alarms_due(self) -> None:
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
            with self._committing() as db:
                for event in events:
                    self.emit(db, event.type, event.data)
                self.journal.put_setting(db, UNITS_OFFLINE, presence.as_json())
        except JournalError:
            return  # journal_unwritable is its own alarm; the log has the event lines
        self.presence = presence
        for event in events:
            level = log.info if event.type.endswith("online") else log.warning
            level("unit_presence", type=event.type, **event.data)

    def unit_silence_s(self) -> float:
        """Seconds since any unit last answered anything (a read, a write, an exception)."""
        answers = sum(stats.ok for stats in self.scheduler.bus.stats.values())
        if answers != self._answers_seen:
            self._answers_seen = answers
            self.last_answer_at = self.clock.monotonic()
        return self.clock.monotonic() - self.last_answer_at

    def _bus_unavailable(self, exc: BusUnavailableError) -> None:
        """The adapter or gateway is gone: news once; the poller reopens it."""
        if self.bus_lost is not None:
            return
        self.bus_lost = BusOutage(str(exc), self.clock.monotonic(), self.clock.wall())
        log.error("bus_lost", error=str(exc))
        try:
            with self._committing() as db:
                self.emit(db, "bus.lost", {"error": str(exc)})
        except JournalError:
            pass

    async def _reopen_bus(self) -> None:
        """Reopen the adapter with back-off until it opens, then say how long it was gone."""
        tries = 0
        while True:
            await asyncio.sleep(BUS_REOPEN_S[min(tries, len(BUS_REOPEN_S) - 1)])
            tries += 1
            try:
                await self.scheduler.submit(Priority.SAFETY, _reopen)
            except BusUnavailableError as exc:
                if tries == 1:
                    log.warning("bus_reopen_failing", error=str(exc))
                continue
            break
        lost, self.bus_lost = self.bus_lost, None
        assert lost is not None
        outage_s = round(self.clock.wall() - lost.since_wall, 1)
        log.info("bus_restored", outage_s=outage_s, tries=tries)
        try:
            with self._committing() as db:
                self.emit(db, "bus.restored", {"outage_s": outage_s})
        except JournalError:
            pass

    # -- safety writes: confirmed by reading the board back -----------------------------------

    def _make_safe(self, target: SafetyTarget) -> None:
        """Charger off / contactor open, now, and again until a read-back confirms it."""
        write = self.safety_writes.get(target)
        if write is None:
            write = self.safety_writes[target] = SafetyWrite(target, due=self.clock.monotonic())
        if write.due <= self.clock.monotonic():  # else its back-off is running
            self._spawn(self._try_safety_write(target))

    def _safety_still_wanted(self, target: SafetyTarget) -> bool:
        kind, bay = target
        if kind == "contactor":
            return self.safety.smoke or self.safety.mains_lost
        assert bay is not None
        return not self.safety.charging_allowed(bay)

    async def _try_safety_write(self, target: SafetyTarget) -> None:
        """One try: the write at SAFETY priority, then the read-back that confirms it."""
        write = self.safety_writes.get(target)
        if write is None or write.busy:
            return
        write.busy = True
        try:
            if not self._safety_still_wanted(target):
                self._safety_settled(write, "no longer required")
                return
            error = await self._safety_attempt(target)
        finally:
            write.busy = False
        if error is None:
            self._safety_settled(write, "confirmed by read-back")
            return
        write.tries += 1
        write.error = error
        pause = SAFETY_RETRY_S[min(write.tries - 1, len(SAFETY_RETRY_S) - 1)]
        write.due = self.clock.monotonic() + pause
        self._safety_wakeup.set()
        if not write.alarmed:
            what = "charger off" if target[0] == "charger" else "main contactor open"
            log.error("safety_write_failed", target=target[0], bay=target[1], error=error)
            write.alarmed = self._safety_alarm(
                write, active=True, detail=f"{what} not confirmed: {error}"
            )

    async def _safety_attempt(self, target: SafetyTarget) -> str | None:
        """Write and read back; None if confirmed, else why not."""
        kind, bay = target
        problem: str | None = None
        try:
            if kind == "charger":
                assert bay is not None
                await self.scheduler.submit(
                    Priority.SAFETY,
                    lambda bus: BayBoard(bus, bay).set_charger(enabled=False, current_limit_a=0.0),
                )
            else:
                await self.scheduler.submit(
                    Priority.SAFETY, lambda bus: CabinetBoard(bus).set_contactor(closed=False)
                )
        except BusError as exc:  # the reply may be lost while the write landed: read back
            problem = f"write failed: {exc}"
        try:
            if kind == "charger":
                assert bay is not None
                regs = await self.scheduler.submit(
                    Priority.SAFETY,
                    lambda bus: bus.read_holding(bay, bay_map.CommandReg.CHARGER_ENABLE, 1),
                )
                still_on = bool(regs[0])
            else:
                status = await self.scheduler.submit(
                    Priority.SAFETY, lambda bus: CabinetBoard(bus).read_status()
                )
                still_on = status.contactor_closed
        except (BusError, ProtocolError) as exc:
            return f"{problem}; read-back failed: {exc}" if problem else f"read-back failed: {exc}"
        if still_on:
            board = "the board" if kind == "charger" else "the cabinet board"
            return f"{board} still reads {'charger enabled' if kind == 'charger' else 'closed'}"
        if kind == "charger":
            assert bay is not None
            self._commanded[bay] = (False, 0.0, self.clock.monotonic())
        return None

    def _safety_settled(self, write: SafetyWrite, how: str) -> None:
        if write.alarmed and not self._safety_alarm(write, active=False, detail=how):
            write.due = self.clock.monotonic() + SAFETY_RETRY_S[-1]  # cleared on a later try
            return
        self.safety_writes.pop(write.target, None)
        if write.tries:
            log.info("safety_write_settled", target=write.target[0], bay=write.target[1], how=how)

    def _safety_alarm(self, write: SafetyWrite, *, active: bool, detail: str) -> bool:
        try:
            with self._committing() as db:
                self.emit(
                    db,
                    "alarm.raised" if active else "alarm.cleared",
                    {"kind": "safety_write_failed", "bay": write.target[1], "detail": detail},
                )
        except JournalError:
            return False  # not journaled: raised or cleared on the next try
        return True

    async def safety_writes_forever(self) -> None:
        """Re-try every unconfirmed safety write when its back-off is over."""
        while True:
            self._safety_wakeup.clear()
            now = self.clock.monotonic()
            for target, write in list(self.safety_writes.items()):
                if write.due <= now and not write.busy:
                    await self._try_safety_write(target)
            pending = [w.due for w in self.safety_writes.values() if not w.busy]
            delay = max(0.0, min(pending) - self.clock.monotonic()) if pending else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._safety_wakeup.wait()

    # -- long-running loops ------------------------------------------------------------------

    async def recover(self) -> None:
        """Rebuild the picture from the boards before any door opens (DESIGN.md §5)."""
        await self._heartbeat()
        await self._read_cabinet()
        for bay in BAY_UNITS:
            await self._read_bay(bay, Priority.ACTIVE)
        resumed = self.state.session_id if self.state.phase is not Phase.IDLE else None
        io: list[Command] = []
        with self._committing() as db:
            if self.state.phase is not Phase.IDLE:
                machine = self.settings.machine
                now = self.clock.monotonic()
                for timer, deadline in list(self.timers.items()):
                    grace = min(machine.timeouts.of(timer), RECOVERY_GRACE_S)
                    self._arm(db, timer, max(deadline - now, grace))
                door_bay = self._hot_bays()
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

    async def poll_forever(self) -> None:
        """The poll cycle: every bay once, the session's bays often, heartbeat, charging.

        Paced: a cycle starts at most every ``MIN_POLL_CYCLE_S`` (the session's bays are
        still read every ``HOT_BAY_INTERVAL_S`` meanwhile), and a lost adapter is reopened
        with back-off before the next cycle — so calls that fail at once never make a
        busy loop.
        """
        while True:
            started = self.clock.monotonic()
            if self.bus_lost is not None:
                await self._reopen_bus()
            for bay in BAY_UNITS:
                await self._read_bay(bay, Priority.ROUTINE)
                await self._read_hot_bays()
            await self._read_cabinet()
            await self._apply_charging()
            await self._read_meter_if_due()
            self._presence_alarms_due()
            self.last_cycle_at = self.clock.monotonic()
            self.poll_cycles += 1
            await self._pace(started)

    async def _pace(self, started: float) -> None:
        """Wait out the rest of the minimum cycle, keeping the session's bays fresh."""
        while (left := started + MIN_POLL_CYCLE_S - self.clock.monotonic()) > 0:
            await asyncio.sleep(min(left, HOT_BAY_INTERVAL_S))
            await self._read_hot_bays()

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
                self._feed([TimerExpired(t) for t in due])

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
            self.journal.after_commit(lambda: self._spawn(self._operator_unlock(bay)))
        return None

    async def _operator_unlock(self, bay: int) -> None:
        try:
            await self.scheduler.submit(Priority.UNLOCK, lambda bus: BayBoard(bus, bay).unlock())
        except BusError as exc:
            with self._committing() as db:
                self.emit(db, "bay.fault", {"bay": bay, "reason": f"remote open failed: {exc}"})

    def forget_charger_command(self, bay: int) -> None:
        """Someone else drove this bay's charger: the policy re-sends its setting next cycle."""
        self._commanded.pop(bay, None)

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


async def _reopen(bus: ModbusBus) -> None:
    """Close and reopen the port (a job on the bus master: no transaction is in flight)."""
    bus.close()
    await bus.connect()


def _with_id(event: Event) -> SwapState:
    """A session record for a Start that was refused before any door opened."""
    assert isinstance(event, Start)
    return SwapState(session_id=event.session_id, rider_id=event.rider_id, mode=event.mode)
