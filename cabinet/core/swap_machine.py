"""The swap state machine: one rider session at a time, as a table of transitions.

Theory of operation (sans-I/O, after h11): ``step(state, event)`` returns a
``Transition`` with the next state and the commands the runtime must carry out
(unlock a bay, start or cancel a timer, emit an event, prompt the rider, mark a
bay faulty, raise an alarm, record custody). Nothing here reads a clock, sleeps
or touches the bus; timers are commands that come back as ``TimerExpired``.

``TRANSITIONS`` maps (phase, event type) to a handler. A pair not in the table is
illegal: it is rejected and changes nothing. Events about bays the session does
not use are legal and ignored (a door elsewhere closing is not our business).

The session's doors: at most the return bay and the dispense bay are ever
unlocked, plus re-openings of the same return bay to hand a rejected (or, when no
full battery can be handed out, the rider's own) battery back. A bay whose door
fails to open is reported faulty and the next candidate is tried. The battery to
hand out is chosen and reserved when the session starts, so a swap is refused
before any door opens if nothing dispensable is left.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cabinet.core.battery_rules import BatteryObs, DepositRules, judge_deposit


class Phase(enum.StrEnum):
    """Where the session stands."""

    IDLE = "idle"
    OPENING_RETURN = "opening_return"  # unlock sent to the empty bay, door not yet seen open
    AWAITING_DEPOSIT = "awaiting_deposit"  # return door open, waiting for battery and door shut
    REJECTING = "rejecting"  # return door reopened so the rider takes a refused battery back
    OPENING_DISPENSE = "opening_dispense"
    AWAITING_PICKUP = "awaiting_pickup"
    GIVING_BACK = "giving_back"  # no full battery could be handed out: the rider's own goes back


ACTIVE_PHASES = frozenset(Phase) - {Phase.IDLE}

#: Why a bay whose board went silent is out of service. Unlike a jammed lock or an
#: overheat, this clears itself: the bay returns to service when its board answers again.
BOARD_SILENT = "board stopped answering"


class Mode(enum.StrEnum):
    """What the authorisation allows."""

    SWAP = "swap"  # return a battery, take a full one
    PICKUP = "pickup"  # first pickup: nothing to return
    RETURN = "return"  # return only (rider leaves the fleet)


class Timer(enum.StrEnum):
    """The session's timers; the runtime turns an expiry into ``TimerExpired``."""

    UNLOCK = "unlock"  # a door must be seen open this long after its unlock pulse
    DEPOSIT = "deposit"  # the rider must put the battery in and shut the door
    TAKE_BACK = "take_back"  # the rider must take a refused battery back and shut the door
    PICKUP = "pickup"  # the rider must take the full battery
    CLOSE = "close"  # the rider must shut the door after taking the battery


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds for each timer; each long enough for a person, short enough to free the bay."""

    unlock: float = 3.0  # the latch releases in well under a second; 3 s covers a busy bus
    deposit: float = 90.0
    take_back: float = 90.0
    pickup: float = 60.0
    close: float = 30.0

    def of(self, timer: Timer) -> float:
        """Seconds for ``timer``."""
        return float(getattr(self, timer.value))


@dataclass(frozen=True, slots=True)
class Candidate:
    """A battery the cabinet could hand out, ranked best first by the caller."""

    bay: int
    battery_id: str


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """An authorised rider wants a session; ``empty_bays`` and ``dispensable`` are ranked."""

    session_id: str
    rider_id: str
    mode: Mode
    empty_bays: tuple[int, ...]
    dispensable: tuple[Candidate, ...]


@dataclass(frozen=True, slots=True)
class DoorOpened:
    """A bay's door switch went from shut to open."""

    bay: int


@dataclass(frozen=True, slots=True)
class DoorClosed:
    """A bay's door switch went from open to shut."""

    bay: int


@dataclass(frozen=True, slots=True)
class BatteryInserted:
    """A battery arrived (identified or not), or the one present now reads differently.

    The bay tracker sends it again whenever any field a rule reads changes (fault bits,
    temperature, SoC, health, plug, identity), so ``battery`` is always the latest reading.
    """

    bay: int
    battery: BatteryObs


@dataclass(frozen=True, slots=True)
class BatteryRemoved:
    """The presence switch saw the battery leave."""

    bay: int
    battery_id: str | None


@dataclass(frozen=True, slots=True)
class LockJammed:
    """The board reports its latch did not release on the unlock pulse."""

    bay: int


@dataclass(frozen=True, slots=True)
class BayOffline:
    """The bay's board stopped answering on the bus."""

    bay: int


@dataclass(frozen=True, slots=True)
class TimerExpired:
    """A timer the machine started has run out."""

    timer: Timer


@dataclass(frozen=True, slots=True)
class DispensableNow:
    """The runtime's latest ranking of the batteries that may be handed out, best first.

    The reserved battery was chosen at ``Start``; it may trip (heat, a BMS fault, a
    silent board, its bay taken out of service, SoC drop) before its door opens. The
    runtime re-ranks on every reading and the machine, which stays free of I/O, decides
    whether the reservation still stands.
    """

    candidates: tuple[Candidate, ...]


@dataclass(frozen=True, slots=True)
class Abort:
    """Safety or an operator ends the session now; no further door is opened."""

    reason: str


Event = (
    Start
    | DoorOpened
    | DoorClosed
    | BatteryInserted
    | BatteryRemoved
    | LockJammed
    | BayOffline
    | TimerExpired
    | DispensableNow
    | Abort
)

# -- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unlock:
    """Pulse this bay's lock."""

    bay: int


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Start (or restart) a timer."""

    timer: Timer
    seconds: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    """Stop a timer."""

    timer: Timer


@dataclass(frozen=True, slots=True)
class Emit:
    """Publish an event of the outside contract (DESIGN.md §4.3)."""

    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the cabinet's screen or voice tells the rider now."""

    code: str
    text: str


@dataclass(frozen=True, slots=True)
class MarkBayFaulty:
    """Take a bay out of service."""

    bay: int
    reason: str


@dataclass(frozen=True, slots=True)
class RaiseAlarm:
    """Something an operator must see."""

    kind: str
    bay: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class CustodyToBay:
    """The ledger records ``battery_id`` as in ``bay`` (a confirmed deposit)."""

    battery_id: str
    bay: int


@dataclass(frozen=True, slots=True)
class CustodyToRider:
    """The ledger records ``battery_id`` as with the session's rider."""

    battery_id: str
    rider_id: str
    session_id: str


Command = (
    Unlock
    | StartTimer
    | CancelTimer
    | Emit
    | Prompt
    | MarkBayFaulty
    | RaiseAlarm
    | CustodyToBay
    | CustodyToRider
)

# -- state --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwapState:
    """The machine's whole state; IDLE carries no session."""

    phase: Phase = Phase.IDLE
    session_id: str = ""
    rider_id: str = ""
    mode: Mode = Mode.SWAP
    return_bays: tuple[int, ...] = ()  # candidates; the first is the one in use
    dispensable: tuple[Candidate, ...] = ()  # candidates; the first is reserved
    in_return_bay: BatteryObs | None = None  # what sits in the open return bay now
    # the id the rider's battery last showed: an unplugged battery hides it, and custody
    # must still follow the battery back to the rider
    return_battery_id: str | None = None
    deposited: str | None = None  # confirmed deposit (battery id)
    dispensed: str | None = None  # battery taken by the rider
    taken_back: bool = False

    @property
    def return_bay(self) -> int | None:
        """The return bay in use."""
        return self.return_bays[0] if self.return_bays else None

    @property
    def dispense_bay(self) -> int | None:
        """The dispense bay in use (its battery is reserved)."""
        return self.dispensable[0].bay if self.dispensable else None

    @property
    def reserved(self) -> str | None:
        """The battery reserved for this rider."""
        return self.dispensable[0].battery_id if self.dispensable else None


IDLE = SwapState()


@dataclass(frozen=True, slots=True)
class Transition:
    """The result of one step: next state, commands in order, or why the event was refused."""

    state: SwapState
    commands: tuple[Command, ...] = ()
    rejected: str | None = None


@dataclass(frozen=True, slots=True)
class SwapMachine:
    """Configuration of the machine: its timeouts and the rules a deposit must pass."""

    timeouts: Timeouts = field(default_factory=Timeouts)
    rules: DepositRules = field(default_factory=DepositRules)
    #: None means :data:`TRANSITIONS`; the graph test swaps in a deliberately broken one
    table: Mapping[tuple[Phase, type], Handler] | None = None

    def step(self, state: SwapState, event: Event) -> Transition:
        """Apply one event. Illegal (phase, event) pairs are rejected and change nothing."""
        bay = getattr(event, "bay", None)
        if bay is not None and state.phase is not Phase.IDLE and bay not in _session_bays(state):
            return Transition(state)  # another bay's business: legal, and none of ours
        if isinstance(event, BayOffline) and bay != _door_bay(state):
            # e.g. the reserved bay while the rider deposits: its unlock, when it comes, will
            # fail and the next candidate is tried; nothing is lost by waiting till then
            return Transition(state)
        handler = (TRANSITIONS if self.table is None else self.table).get(
            (state.phase, type(event))
        )
        if handler is None:
            return Transition(state, (), f"{type(event).__name__} is not expected in {state.phase}")
        return handler(self, state, event)

    def timer(self, timer: Timer) -> StartTimer:
        """The command that starts ``timer`` with its configured duration."""
        return StartTimer(timer, self.timeouts.of(timer))


# -- helpers ------------------------------------------------------------------------------------


def _session_bays(state: SwapState) -> tuple[int, ...]:
    return tuple(b for b in (state.return_bay, state.dispense_bay) if b is not None)


RETURN_PHASES = frozenset(
    {Phase.OPENING_RETURN, Phase.AWAITING_DEPOSIT, Phase.REJECTING, Phase.GIVING_BACK}
)


def _door_bay(state: SwapState) -> int | None:
    """The bay whose door the session is using now (the only one whose silence matters)."""
    return state.return_bay if state.phase in RETURN_PHASES else state.dispense_bay


def _ids(state: SwapState) -> dict[str, Any]:
    return {"session_id": state.session_id, "rider_id": state.rider_id}


def _fail(
    state: SwapState, reason: str, *extra: Command, prompt: str = "session ended"
) -> Transition:
    commands: list[Command] = [CancelTimer(t) for t in Timer]
    commands += extra
    commands.append(Emit("swap.failed", {**_ids(state), "reason": reason}))
    commands.append(Prompt(f"failed.{reason}", prompt))
    return Transition(IDLE, tuple(commands))


def _complete(state: SwapState) -> Transition:
    commands: list[Command] = [CancelTimer(t) for t in Timer]
    commands.append(
        Emit(
            "swap.completed",
            {
                **_ids(state),
                "mode": state.mode.value,
                "deposited": state.deposited,
                "dispensed": state.dispensed,
            },
        )
    )
    commands.append(Prompt("completed", "thank you, ride safe"))
    return Transition(IDLE, tuple(commands))


def _open_dispense(m: SwapMachine, state: SwapState, *before: Command) -> Transition:
    bay = state.dispense_bay
    if bay is None:  # every candidate tripped after the start (see ``_rejudge_reserved``)
        if state.deposited is not None:
            return _give_back(m, state, *before)
        return _fail(state, "no_dispensable_battery", prompt="no charged battery available")
    return Transition(
        replace(state, phase=Phase.OPENING_DISPENSE),
        (
            *before,
            Unlock(bay),
            m.timer(Timer.UNLOCK),
            Prompt("opening_dispense", f"take your battery from bay {bay}"),
        ),
    )


def _give_back(m: SwapMachine, state: SwapState, *before: Command) -> Transition:
    """No full battery can be handed out after a deposit: hand the rider's own back."""
    bay = state.return_bay
    assert bay is not None
    return Transition(
        replace(state, phase=Phase.GIVING_BACK, taken_back=False),
        (
            *before,
            Unlock(bay),
            m.timer(Timer.UNLOCK),
            m.timer(Timer.TAKE_BACK),
            Prompt(
                "giving_back", f"sorry, no battery can be handed out: take yours from bay {bay}"
            ),
        ),
    )


# -- handlers -----------------------------------------------------------------------------------

Handler = Callable[[SwapMachine, SwapState, Any], Transition]


def _start(m: SwapMachine, state: SwapState, ev: Start) -> Transition:
    session = SwapState(
        phase=Phase.IDLE,
        session_id=ev.session_id,
        rider_id=ev.rider_id,
        mode=ev.mode,
        return_bays=ev.empty_bays,
        dispensable=ev.dispensable,
    )
    needs_dispense = ev.mode in (Mode.SWAP, Mode.PICKUP)
    needs_return = ev.mode in (Mode.SWAP, Mode.RETURN)
    if needs_dispense and not ev.dispensable:
        return _fail(session, "no_dispensable_battery", prompt="no charged battery available")
    if needs_return and not ev.empty_bays:
        return _fail(session, "no_empty_bay", prompt="no free bay for your battery")
    if not needs_dispense:
        session = replace(session, dispensable=())
    if not needs_return:
        session = replace(session, return_bays=())
    started = Emit(
        "swap.started",
        {
            **_ids(session),
            "mode": ev.mode.value,
            "return_bay": session.return_bay,
            "dispense_bay": session.dispense_bay,
            "reserved": session.reserved,
        },
    )
    if needs_return:
        bay = session.return_bay
        assert bay is not None
        return Transition(
            replace(session, phase=Phase.OPENING_RETURN),
            (
                started,
                Unlock(bay),
                m.timer(Timer.UNLOCK),
                Prompt("opening_return", f"put your battery in bay {bay}"),
            ),
        )
    return _open_dispense(m, session, started)


def _door_failed(m: SwapMachine, state: SwapState, bay: int, reason: str) -> Transition:
    """A door in use did not open (or its board went silent): report it, try the next."""
    faulty = (
        MarkBayFaulty(bay, reason),
        Emit("bay.fault", {"bay": bay, "reason": reason}),
        CancelTimer(Timer.UNLOCK),
    )
    if state.phase is Phase.OPENING_RETURN:
        rest = state.return_bays[1:]
        if not rest:
            return _fail(state, "door_failed", *faulty, prompt="sorry, no bay could be opened")
        nxt = replace(state, return_bays=rest)
        return Transition(
            nxt,
            (
                *faulty,
                Unlock(rest[0]),
                m.timer(Timer.UNLOCK),
                Prompt("opening_return", f"put your battery in bay {rest[0]}"),
            ),
        )
    rest_d = state.dispensable[1:]
    if rest_d:
        return _open_dispense(m, replace(state, dispensable=rest_d), *faulty)
    if state.deposited is not None:
        return _give_back(m, replace(state, dispensable=()), *faulty)
    return _fail(state, "door_failed", *faulty, prompt="sorry, no bay could be opened")


def _opening_failure(m: SwapMachine, state: SwapState, ev: Any) -> Transition:
    bay = state.return_bay if state.phase is Phase.OPENING_RETURN else state.dispense_bay
    assert bay is not None
    if isinstance(ev, TimerExpired):
        if ev.timer is not Timer.UNLOCK:
            return Transition(state)
        return _door_failed(m, state, bay, "door did not open after unlock")
    if ev.bay != bay:
        return Transition(state)
    if isinstance(ev, BayOffline) and state.phase is Phase.OPENING_DISPENSE:
        # The unlock may have landed before the board went silent: its door may be open.
        # Opening a second full bay could hand out two batteries, so the session ends here.
        extra: tuple[Command, ...] = (
            MarkBayFaulty(bay, BOARD_SILENT),
            RaiseAlarm(
                "dispense_uncertain",
                bay,
                "dispense bay went silent after its unlock: check the bay",
            ),
        )
        return _fail(state, "bay_offline", *extra, prompt="sorry, this bay stopped responding")
    reason = "lock jammed" if isinstance(ev, LockJammed) else BOARD_SILENT
    return _door_failed(m, state, bay, reason)


def _ignore(_m: SwapMachine, state: SwapState, _ev: Any) -> Transition:
    return Transition(state)


def _return_door_opened(m: SwapMachine, state: SwapState, ev: DoorOpened) -> Transition:
    if ev.bay != state.return_bay:
        return Transition(state)
    return Transition(
        replace(state, phase=Phase.AWAITING_DEPOSIT),
        (
            CancelTimer(Timer.UNLOCK),
            m.timer(Timer.DEPOSIT),
            Emit("swap.door_opened", {**_ids(state), "bay": ev.bay, "purpose": "return"}),
            Prompt("insert", f"put your battery in bay {ev.bay}, plug it in and shut the door"),
        ),
    )


def _deposit_inserted(_m: SwapMachine, state: SwapState, ev: BatteryInserted) -> Transition:
    if ev.bay != state.return_bay:
        return Transition(state)
    return Transition(
        replace(
            state,
            in_return_bay=ev.battery,
            return_battery_id=ev.battery.battery_id or state.return_battery_id,
        )
    )


def _back_to_rider(state: SwapState, battery_id: str | None) -> tuple[Command, ...]:
    """The rider took their own battery back out of the return bay."""
    if battery_id is None:
        return ()
    return (CustodyToRider(battery_id, state.rider_id, state.session_id),)


def _deposit_removed(_m: SwapMachine, state: SwapState, ev: BatteryRemoved) -> Transition:
    if ev.bay != state.return_bay:
        return Transition(state)
    return Transition(
        replace(state, in_return_bay=None, return_battery_id=None),
        _back_to_rider(state, ev.battery_id or state.return_battery_id),
    )


def _deposit_door_closed(m: SwapMachine, state: SwapState, ev: DoorClosed) -> Transition:
    bay = state.return_bay
    if ev.bay != bay:
        return Transition(state)
    assert bay is not None
    battery = state.in_return_bay
    if battery is None:
        return _fail(state, "nothing_deposited", prompt="no battery detected: session cancelled")
    refusal = judge_deposit(battery, m.rules)
    if refusal is not None:
        return Transition(
            replace(state, phase=Phase.REJECTING, taken_back=False),
            (
                CancelTimer(Timer.DEPOSIT),
                Emit(
                    "swap.deposit_rejected",
                    {
                        **_ids(state),
                        "bay": bay,
                        "reason": refusal,
                        "battery_id": battery.battery_id,
                    },
                ),
                Unlock(bay),
                m.timer(Timer.UNLOCK),
                m.timer(Timer.TAKE_BACK),
                Prompt(
                    f"rejected.{refusal}",
                    f"this battery cannot be accepted ({refusal}): take it back from bay {bay}",
                ),
            ),
        )
    assert battery.battery_id is not None
    deposited = replace(state, deposited=battery.battery_id)
    confirmed = (
        CancelTimer(Timer.DEPOSIT),
        CustodyToBay(battery.battery_id, bay),
        Emit(
            "swap.battery_deposited",
            {
                **_ids(state),
                "bay": bay,
                "battery_id": battery.battery_id,
                "soc_pct": battery.soc_pct,
            },
        ),
    )
    if state.mode is Mode.RETURN:
        done = _complete(deposited)
        return Transition(done.state, confirmed + done.commands)
    return _open_dispense(m, deposited, *confirmed)


def _deposit_timeout(_m: SwapMachine, state: SwapState, ev: TimerExpired) -> Transition:
    if ev.timer is not Timer.DEPOSIT:
        return Transition(state)
    return _fail(
        state,
        "deposit_timeout",
        RaiseAlarm("door_left_open", state.return_bay, "rider never completed the deposit"),
        prompt="time is up: session cancelled",
    )


def _session_bay_offline(_m: SwapMachine, state: SwapState, ev: BayOffline) -> Transition:
    if ev.bay not in (state.return_bay, state.dispense_bay):
        return Transition(state)
    # If the rider already holds the battery, the ledger settles it when the bay reappears.
    return _fail(
        state,
        "bay_offline",
        MarkBayFaulty(ev.bay, BOARD_SILENT),
        prompt="sorry, this bay stopped responding",
    )


def _reject_removed(_m: SwapMachine, state: SwapState, ev: BatteryRemoved) -> Transition:
    if ev.bay != state.return_bay:
        return Transition(state)
    return Transition(
        replace(state, in_return_bay=None, taken_back=True, return_battery_id=None),
        _back_to_rider(state, ev.battery_id or state.return_battery_id),
    )


def _reject_inserted(_m: SwapMachine, state: SwapState, ev: BatteryInserted) -> Transition:
    if ev.bay != state.return_bay:
        return Transition(state)
    return Transition(
        replace(
            state,
            in_return_bay=ev.battery,
            taken_back=False,
            return_battery_id=ev.battery.battery_id or state.return_battery_id,
        )
    )


def _reject_door_opened(_m: SwapMachine, state: SwapState, ev: DoorOpened) -> Transition:
    if ev.bay != state.return_bay:
        return Transition(state)
    return Transition(state, (CancelTimer(Timer.UNLOCK),))


def _reject_door_closed(_m: SwapMachine, state: SwapState, ev: DoorClosed) -> Transition:
    bay = state.return_bay
    if ev.bay != bay:
        return Transition(state)
    assert bay is not None
    if state.taken_back and state.in_return_bay is None:
        return _fail(state, "deposit_rejected", prompt="please contact support about your battery")
    return _fail(
        state,
        "deposit_rejected",
        MarkBayFaulty(bay, "refused battery left in the bay"),
        RaiseAlarm("battery_retained", bay, "a refused battery was left in the bay"),
        prompt="please contact support about your battery",
    )


def _reject_timeout(m: SwapMachine, state: SwapState, ev: TimerExpired) -> Transition:
    bay = state.return_bay
    assert bay is not None
    if ev.timer is Timer.UNLOCK:
        return _fail(
            state,
            "deposit_rejected",
            MarkBayFaulty(bay, "door did not reopen"),
            RaiseAlarm("battery_retained", bay, "could not reopen the door for a refused battery"),
        )
    if ev.timer is Timer.TAKE_BACK:
        return _fail(
            state,
            "deposit_rejected",
            RaiseAlarm("door_left_open", bay, "refused battery not taken back"),
        )
    return Transition(state)


def _reject_door_problem(
    _m: SwapMachine, state: SwapState, ev: LockJammed | BayOffline
) -> Transition:
    bay = state.return_bay
    if ev.bay != bay:
        return Transition(state)
    return _fail(
        state,
        "deposit_rejected",
        MarkBayFaulty(ev.bay, "door did not reopen"),
        RaiseAlarm("battery_retained", ev.bay, "could not reopen the door for a refused battery"),
    )


def _dispense_door_opened(m: SwapMachine, state: SwapState, ev: DoorOpened) -> Transition:
    if ev.bay != state.dispense_bay:
        return Transition(state)
    return Transition(
        replace(state, phase=Phase.AWAITING_PICKUP),
        (
            CancelTimer(Timer.UNLOCK),
            m.timer(Timer.PICKUP),
            Emit("swap.door_opened", {**_ids(state), "bay": ev.bay, "purpose": "dispense"}),
            Prompt("take", f"take the battery from bay {ev.bay} and shut the door"),
        ),
    )


def _pickup_removed(m: SwapMachine, state: SwapState, ev: BatteryRemoved) -> Transition:
    if ev.bay != state.dispense_bay or state.dispensed is not None:
        return Transition(state)
    battery_id = state.reserved
    assert battery_id is not None
    return Transition(
        replace(state, dispensed=battery_id),
        (
            CancelTimer(Timer.PICKUP),
            m.timer(Timer.CLOSE),
            CustodyToRider(battery_id, state.rider_id, state.session_id),
            Emit(
                "swap.battery_dispensed", {**_ids(state), "bay": ev.bay, "battery_id": battery_id}
            ),
        ),
    )


def _pickup_put_back(m: SwapMachine, state: SwapState, ev: BatteryInserted) -> Transition:
    """The rider put the battery back before shutting the door: it was not dispensed."""
    if ev.bay != state.dispense_bay or state.dispensed is None:
        return Transition(state)
    if ev.battery.battery_id != state.dispensed:
        return Transition(state)  # something else: the ledger records the surprise
    battery_id = state.dispensed
    return Transition(
        replace(state, dispensed=None),
        (
            CancelTimer(Timer.CLOSE),
            m.timer(Timer.PICKUP),
            CustodyToBay(battery_id, ev.bay),
            Emit(
                "swap.dispense_returned", {**_ids(state), "bay": ev.bay, "battery_id": battery_id}
            ),
        ),
    )


def _pickup_door_closed(_m: SwapMachine, state: SwapState, ev: DoorClosed) -> Transition:
    if ev.bay != state.dispense_bay:
        return Transition(state)
    if state.dispensed is not None:
        return _complete(state)
    return _fail(state, "not_collected", prompt="the battery was not taken: session ended")


def _pickup_timeout(_m: SwapMachine, state: SwapState, ev: TimerExpired) -> Transition:
    bay = state.dispense_bay
    if ev.timer is Timer.PICKUP and state.dispensed is None:
        return _fail(
            state, "not_collected", RaiseAlarm("door_left_open", bay, "full battery not collected")
        )
    if ev.timer is Timer.CLOSE and state.dispensed is not None:
        done = _complete(state)
        return Transition(
            done.state,
            (
                RaiseAlarm("door_left_open", bay, "rider left without shutting the door"),
                *done.commands,
            ),
        )
    return Transition(state)


def _giveback_door_opened(_m: SwapMachine, state: SwapState, ev: DoorOpened) -> Transition:
    if ev.bay != state.return_bay:
        return Transition(state)
    return Transition(state, (CancelTimer(Timer.UNLOCK),))


def _giveback_removed(_m: SwapMachine, state: SwapState, ev: BatteryRemoved) -> Transition:
    if ev.bay != state.return_bay or state.deposited is None or state.taken_back:
        return Transition(state)
    return Transition(replace(state, taken_back=True), _back_to_rider(state, state.deposited))


def _giveback_door_closed(_m: SwapMachine, state: SwapState, ev: DoorClosed) -> Transition:
    if ev.bay != state.return_bay:
        return Transition(state)
    extra: tuple[Command, ...] = ()
    if not state.taken_back:
        extra = (
            RaiseAlarm(
                "rider_stranded", ev.bay, "rider left their battery after a failed dispense"
            ),
        )
    return _fail(state, "dispense_failed", *extra, prompt="sorry: please contact support")


def _giveback_problem(_m: SwapMachine, state: SwapState, ev: Any) -> Transition:
    bay = state.return_bay
    if isinstance(ev, TimerExpired):
        if ev.timer not in (Timer.UNLOCK, Timer.TAKE_BACK):
            return Transition(state)
    elif ev.bay != bay:
        return Transition(state)
    faulty: tuple[Command, ...] = ()
    if isinstance(ev, LockJammed | BayOffline):
        faulty = (MarkBayFaulty(ev.bay, "door did not reopen"),)
    if state.taken_back:
        return _fail(state, "dispense_failed", *faulty)
    return _fail(
        state,
        "dispense_failed",
        *faulty,
        RaiseAlarm("rider_stranded", bay, "could not hand the rider's battery back"),
        prompt="sorry: please contact support",
    )


def _rejudge_reserved(_m: SwapMachine, state: SwapState, ev: DispensableNow) -> Transition:
    """Keep the reservation while its battery is still dispensable, else take the next one.

    Before the dispense door is unlocked the reserved battery itself is re-judged; once
    the unlock is out (``OPENING_DISPENSE``) only the fall-backs behind it are refreshed,
    so that a door that fails to open is replaced by a battery that is good *now*.
    """
    if not state.dispensable:
        return Transition(state)  # a return: nothing to hand out
    reserved = state.dispensable[0]
    if reserved in ev.candidates or state.phase is Phase.OPENING_DISPENSE:
        refreshed = (reserved, *(c for c in ev.candidates if c != reserved))
        return Transition(replace(state, dispensable=refreshed))
    nxt = ev.candidates[0] if ev.candidates else None
    return Transition(
        replace(state, dispensable=ev.candidates),
        (
            Emit(
                "swap.dispense_reassigned",
                {
                    **_ids(state),
                    "from_bay": reserved.bay,
                    "to_bay": nxt.bay if nxt else None,
                    "reserved": nxt.battery_id if nxt else None,
                    "reason": "not_dispensable",
                },
            ),
        ),
    )


def _abort(_m: SwapMachine, state: SwapState, ev: Abort) -> Transition:
    extra: tuple[Command, ...] = ()
    if state.deposited is not None and state.dispensed is None:
        extra = (
            RaiseAlarm(
                "rider_stranded",
                state.return_bay,
                f"session aborted ({ev.reason}) after the deposit",
            ),
        )
    return _fail(state, ev.reason, *extra, prompt="the cabinet stopped this session")


TRANSITIONS: dict[tuple[Phase, type], Handler] = {
    (Phase.IDLE, Start): _start,
    # a door or battery change while nobody is swapping is the runtime's concern, not ours
    **{
        (Phase.IDLE, t): _ignore
        for t in (DoorOpened, DoorClosed, BatteryInserted, BatteryRemoved, LockJammed, BayOffline)
    },
    (Phase.OPENING_RETURN, DoorOpened): _return_door_opened,
    (Phase.OPENING_RETURN, TimerExpired): _opening_failure,
    (Phase.OPENING_RETURN, LockJammed): _opening_failure,
    (Phase.OPENING_RETURN, BayOffline): _opening_failure,
    (Phase.AWAITING_DEPOSIT, BatteryInserted): _deposit_inserted,
    (Phase.AWAITING_DEPOSIT, BatteryRemoved): _deposit_removed,
    (Phase.AWAITING_DEPOSIT, DoorClosed): _deposit_door_closed,
    (Phase.AWAITING_DEPOSIT, TimerExpired): _deposit_timeout,
    (Phase.AWAITING_DEPOSIT, BayOffline): _session_bay_offline,
    (Phase.REJECTING, DoorOpened): _reject_door_opened,
    (Phase.REJECTING, BatteryRemoved): _reject_removed,
    (Phase.REJECTING, BatteryInserted): _reject_inserted,
    (Phase.REJECTING, DoorClosed): _reject_door_closed,
    (Phase.REJECTING, TimerExpired): _reject_timeout,
    (Phase.REJECTING, LockJammed): _reject_door_problem,
    (Phase.REJECTING, BayOffline): _reject_door_problem,
    (Phase.OPENING_DISPENSE, DoorOpened): _dispense_door_opened,
    (Phase.OPENING_DISPENSE, TimerExpired): _opening_failure,
    (Phase.OPENING_DISPENSE, LockJammed): _opening_failure,
    (Phase.OPENING_DISPENSE, BayOffline): _opening_failure,
    (Phase.AWAITING_PICKUP, BatteryRemoved): _pickup_removed,
    (Phase.AWAITING_PICKUP, BatteryInserted): _pickup_put_back,
    (Phase.AWAITING_PICKUP, DoorClosed): _pickup_door_closed,
    (Phase.AWAITING_PICKUP, TimerExpired): _pickup_timeout,
    (Phase.AWAITING_PICKUP, BayOffline): _session_bay_offline,
    (Phase.GIVING_BACK, DoorOpened): _giveback_door_opened,
    (Phase.GIVING_BACK, BatteryRemoved): _giveback_removed,
    (Phase.GIVING_BACK, DoorClosed): _giveback_door_closed,
    (Phase.GIVING_BACK, TimerExpired): _giveback_problem,
    (Phase.GIVING_BACK, LockJammed): _giveback_problem,
    (Phase.GIVING_BACK, BayOffline): _giveback_problem,
    **{(phase, Abort): _abort for phase in ACTIVE_PHASES},
    # the reserved battery is re-judged until its door is unlocked; afterwards (and in a
    # rejection or give-back, where nothing is handed out) a fresh ranking changes nothing
    **{
        (phase, DispensableNow): _rejudge_reserved
        for phase in (Phase.OPENING_RETURN, Phase.AWAITING_DEPOSIT, Phase.OPENING_DISPENSE)
    },
    **{
        (phase, DispensableNow): _ignore
        for phase in (Phase.IDLE, Phase.REJECTING, Phase.AWAITING_PICKUP, Phase.GIVING_BACK)
    },
}
