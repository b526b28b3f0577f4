"""Hypothesis stateful tests: the swap machine, the bay tracker and the custody ledger together.

A model cabinet (12 bays, doors, batteries, stuck locks, silent boards) and model
riders act at random; every change of the model is turned into bay snapshots,
diffed into events by the real tracker and fed to the real machine, whose
commands act back on the model. Invariants are checked after every step:

* a door opens only on an Unlock the machine issued, for a bay its session uses;
* only a session's doors are opened while it runs;
* a battery handed out was dispensable when the session started;
* every battery the cabinet ever saw has a location, and the ledger never places
  a battery in a bay that does not hold it -- nor in a bay whose pack has hidden its id
  (BMS silent, or unplugged) for ``IDENTITY_GRACE_S`` of the model's clock, unless a
  session's open door attends to that bay;
* an active session always has a timer running, so it ends within its timeouts;
* illegal events change nothing.

Long campaign: ``CABINET_CAMPAIGN_EXAMPLES=20000 .venv/bin/pytest tests/test_swap_stateful.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import hypothesis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cabinet.core.battery_rules import (
    BatteryObs,
    DepositRules,
    DispenseRules,
    dispensable,
    judge_deposit,
    rank_dispensable,
)
from cabinet.core.bay_tracker import BaySnapshot, diff
from cabinet.core.custody import IDENTITY_GRACE_S, CustodyLedger, Where
from cabinet.core.swap_machine import (
    IDLE,
    TRANSITIONS,
    Abort,
    Candidate,
    CustodyToBay,
    CustodyToRider,
    DispensableNow,
    Emit,
    Mode,
    Phase,
    Start,
    StartTimer,
    SwapMachine,
    SwapState,
    Timer,
    TimerExpired,
    Unlock,
)
from cabinet.core.swap_machine import CancelTimer as CancelTimerCmd

BAYS = range(1, 13)
#: Phases in which the controller feeds the machine a fresh ranking (cabinet/daemon/controller.py).
RESERVATION_PHASES = (Phase.OPENING_RETURN, Phase.AWAITING_DEPOSIT, Phase.OPENING_DISPENSE)
RULES = DispenseRules()


def note(label: str) -> None:
    """Count a kind of story in the campaign's statistics (fixed stories run outside one)."""
    if hypothesis.currently_in_test_context():
        hypothesis.event(label)


@dataclass
class ModelBay:
    door_closed: bool = True
    battery: BatteryObs | None = None
    lock_stuck: bool = False
    online: bool = True
    jammed: bool = False
    out_of_service: bool = False


batteries = st.builds(
    BatteryObs,
    battery_id=st.sampled_from([None])
    | st.from_regex(r"BAT-[0-9A-F]{4}", fullmatch=True)
    | st.just("FOREIGN-1"),
    plugged=st.booleans(),
    soc_pct=st.floats(0, 100),
    health_pct=st.floats(50, 100),
    cell_temp_c=st.floats(-5, 70),
    faulted=st.booleans(),
    cycle_count=st.integers(0, 1000),
)
good_battery = st.builds(
    BatteryObs,
    battery_id=st.from_regex(r"BAT-[0-9A-F]{4}", fullmatch=True),
    plugged=st.just(True),
    soc_pct=st.floats(80, 100),
    health_pct=st.floats(70, 100),
    cell_temp_c=st.floats(10, 40),
    faulted=st.just(False),
    cycle_count=st.integers(0, 1000),
)


class SwapCabinet(RuleBasedStateMachine):
    """The model world plus the real machine, tracker and ledger."""

    def __init__(self) -> None:
        super().__init__()
        self.machine = SwapMachine()
        self.state: SwapState = IDLE
        self.bays: dict[int, ModelBay] = {n: ModelBay() for n in BAYS}
        self.snapshots: dict[int, BaySnapshot] = {}
        self.ledger = CustodyLedger()
        self.timers: set[Timer] = set()
        self.session_bays: set[int] = set()
        self.unlocked_by_session: set[int] = set()
        self.reserved_ok: dict[str, bool] = {}
        self.rider_hand: dict[str, BatteryObs] = {}  # batteries riders hold, by id
        self.seen: set[str] = set()
        # the model's clock (seconds) and, per bay, since when it has read a pack without an
        # id on every poll while no session attended to it: what the identity grace counts
        self.now = 0.0
        self.unreadable_since: dict[int, float] = {}
        self.sessions = 0
        self.rejections = 0

    # -- plumbing ---------------------------------------------------------------------------

    def snapshot(self, n: int) -> BaySnapshot:
        b = self.bays[n]
        if not b.online:
            return BaySnapshot(online=False)
        return BaySnapshot(
            online=True,
            door_closed=b.door_closed,
            locked=b.door_closed,
            battery_present=b.battery is not None,
            battery=b.battery
            if b.battery is None or b.battery.plugged
            else BatteryObs(None, plugged=False),
            lock_jammed=b.jammed,
        )

    def poll(self) -> None:
        """One poll cycle: diff every bay, feed the machine, reconcile the ledger."""
        for n in BAYS:
            cur = self.snapshot(n)
            events = diff(n, self.snapshots.get(n), cur)
            self.snapshots[n] = cur  # the latest reading, as the controller knows it
            if self.state.phase in RESERVATION_PHASES:  # as the controller does
                reserved = self.state.reserved
                self.feed(DispensableNow(self.dispensable_now()))
                if self.state.reserved not in (None, reserved):
                    # re-reserved by the latest readings: judge the battery the machine took
                    # now, as rider_arrives judges those offered at the start. Found by the
                    # 2000-example campaign: a battery shut in after the start and reserved
                    # when the first one tripped was unknown to this check, not bad
                    self.note_offered(self.state.reserved, self.state.dispense_bay)
            for event in events:
                self.feed(event)
            if cur.online:
                battery_id = cur.battery.battery_id if cur.battery else None
                attended = n in self.attended_bays()
                for change in self.ledger.observe_bay(
                    n, battery_id, present=cur.battery_present, now=self.now, attended=attended
                ):
                    if change.after.where is Where.MISSING:  # how often each rule is reached
                        unreadable = "cannot be read" in (change.detail or "")
                        note("missing: identity grace ran out" if unreadable else "missing: gone")
                if battery_id:
                    self.seen.add(battery_id)
                if cur.battery_present and battery_id is None and not attended:
                    self.unreadable_since.setdefault(n, self.now)
                else:
                    self.unreadable_since.pop(n, None)
            else:  # as the controller does when a board stops answering
                self.ledger.bay_silent(n)
                self.unreadable_since.pop(n, None)

    def attended_bays(self) -> set[int]:
        """The bay whose door the session is using now (``CabinetController.hot_bays``)."""
        state = self.state
        if state.phase is Phase.IDLE:
            return set()
        if state.phase in (Phase.OPENING_DISPENSE, Phase.AWAITING_PICKUP):
            bay = state.dispense_bay
        else:
            bay = state.return_bay
        return {bay} if bay is not None else set()

    def feed(self, event: object) -> None:
        before = self.state
        result = self.machine.step(self.state, event)  # type: ignore[arg-type]
        if result.rejected:
            self.rejections += 1
            assert result.state == before and result.commands == ()
            return
        self.state = result.state
        reserved = self.state.reserved
        if (
            reserved is not None
            and reserved != before.reserved
            and reserved not in self.reserved_ok
        ):
            # a fall-back promoted by this event (the reserved bay's door did not open, or it
            # tripped): the machine took it from its ranking of the latest readings, refreshed
            # earlier in this poll; judged on the reading it was ranked on, the one the
            # controller has (found by a loaded CI run: a battery shut in after the session
            # started, promoted when both batteries offered at the start had stuck locks)
            self.note_offered(reserved, self.state.dispense_bay, on_reading=True)
        for command in result.commands:
            self.execute(command)
        if self.state.phase is Phase.IDLE:
            self.session_bays.clear()
            self.unlocked_by_session.clear()
        else:
            self.session_bays |= {
                b for b in (self.state.return_bay, self.state.dispense_bay) if b is not None
            }

    def execute(self, command: object) -> None:
        if isinstance(command, Unlock):
            allowed = set(self.state.return_bays) | {c.bay for c in self.state.dispensable}
            assert command.bay in allowed, f"unlock of bay {command.bay} the session never chose"
            if command.bay == self.state.dispense_bay and self.state.phase is not Phase.GIVING_BACK:
                latest = self.snapshots[command.bay].battery
                assert latest is not None and dispensable(latest, RULES), (
                    f"opened dispense bay {command.bay} whose latest reading is {latest}"
                )
            self.unlocked_by_session.add(command.bay)
            bay = self.bays[command.bay]
            if bay.online and not bay.lock_stuck:
                bay.door_closed = False
            elif bay.lock_stuck:
                bay.jammed = True
        elif isinstance(command, Emit) and command.type == "swap.battery_deposited":
            latest = self.snapshots[command.data["bay"]].battery
            assert latest is not None and judge_deposit(latest, DepositRules()) is None, (
                f"accepted a battery whose latest reading is refused: {latest}"
            )
        elif isinstance(command, Emit) and command.type in ("swap.completed", "swap.failed"):
            note(f"{command.type} {command.data.get('reason', '')}".strip())
        elif isinstance(command, StartTimer):
            self.timers.add(command.timer)
        elif isinstance(command, CancelTimerCmd):
            self.timers.discard(command.timer)
        elif isinstance(command, CustodyToBay):
            self.ledger.to_bay(command.battery_id, command.bay)
        elif isinstance(command, CustodyToRider):
            if command.battery_id in self.reserved_ok:
                assert self.reserved_ok[command.battery_id], "handed out a non-dispensable battery"
            self.ledger.to_rider(command.battery_id, command.rider_id, command.session_id)

    # -- the world's rules ----------------------------------------------------------------

    @initialize(contents=st.lists(st.none() | good_battery | batteries, min_size=12, max_size=12))
    def fill(self, contents: list[BatteryObs | None]) -> None:
        used: set[str] = set()
        for n, drawn in zip(BAYS, contents, strict=True):
            battery = None if drawn is not None and drawn.battery_id in used else drawn
            if battery is not None and battery.battery_id:
                used.add(battery.battery_id)
            self.bays[n].battery = battery
        self.poll()

    @precondition(lambda self: self.state.phase is Phase.IDLE)
    @rule(mode=st.sampled_from(Mode), n=st.integers(0, 10_000))
    def rider_arrives(self, mode: Mode, n: int) -> None:
        empty = tuple(
            b
            for b in BAYS
            if self.bays[b].battery is None
            and self.bays[b].door_closed
            and self.bays[b].online
            and not self.bays[b].out_of_service
        )
        dispensable_now = self.dispensable_now()
        for c in dispensable_now:
            self.note_offered(c.battery_id, c.bay)
        self.sessions += 1
        self.feed(Start(f"s{self.sessions}", f"rider{n % 5}", mode, empty, dispensable_now))
        self.poll()

    def note_offered(self, battery_id: str, bay: int | None, *, on_reading: bool = False) -> None:
        """Whether the battery the machine may reserve really is dispensable, now.

        ``on_reading``: judged on the bay's latest reading instead of the world itself.
        """
        if bay is None:
            obs = None
        elif on_reading:
            snap = self.snapshots.get(bay)
            obs = snap.battery if snap is not None else None
        else:
            obs = self.bays[bay].battery
        self.reserved_ok[battery_id] = (
            obs is not None and obs.battery_id == battery_id and dispensable(obs, RULES)
        )

    def dispensable_now(self) -> tuple[Candidate, ...]:
        """The ranking the controller hands the machine: latest readings, usable bays."""
        candidates = [
            (b, self.snapshots[b].battery)
            for b in BAYS
            if self.snapshots.get(b)
            and self.snapshots[b].online
            and self.snapshots[b].door_closed
            and self.snapshots[b].battery
            and b != self.state.return_bay
        ]
        ranked = rank_dispensable([(b, obs) for b, obs in candidates if obs is not None], RULES)
        return tuple(
            Candidate(b, obs.battery_id)
            for b, obs in ranked
            if obs.battery_id and not self.bays[b].out_of_service
        )

    def open_empty(self) -> list[int]:
        return [b for b in BAYS if not self.bays[b].door_closed and self.bays[b].battery is None]

    def open_full(self) -> list[int]:
        return [b for b in BAYS if not self.bays[b].door_closed and self.bays[b].battery]

    def open_any(self) -> list[int]:
        return [b for b in BAYS if not self.bays[b].door_closed]

    def put(self, bay: int, battery: BatteryObs) -> None:
        if battery.battery_id is not None and (
            battery.battery_id in self.seen and battery.battery_id not in self.rider_hand
        ):
            battery = replace(battery, battery_id=None)  # one physical battery per id
        self.rider_hand.pop(battery.battery_id or "", None)
        self.bays[bay].battery = battery

    def take(self, bay: int) -> None:
        battery = self.bays[bay].battery
        assert battery is not None
        if battery.battery_id:
            self.rider_hand[battery.battery_id] = battery
        self.bays[bay].battery = None

    @precondition(lambda self: self.state.phase is not Phase.IDLE)
    @rule(battery=good_battery | batteries)
    def rider_follows_the_prompts(self, battery: BatteryObs) -> None:
        """A well-behaved rider: does what the cabinet asks, with whatever battery they hold."""
        st_ = self.state
        if st_.phase is Phase.AWAITING_DEPOSIT and st_.return_bay in self.open_empty():
            self.put(st_.return_bay, battery)
            self.bays[st_.return_bay].door_closed = True
        elif (
            st_.phase in (Phase.REJECTING, Phase.GIVING_BACK) and st_.return_bay in self.open_full()
        ):
            self.take(st_.return_bay)
            self.bays[st_.return_bay].door_closed = True
        elif st_.phase is Phase.AWAITING_PICKUP and st_.dispense_bay in self.open_full():
            self.take(st_.dispense_bay)
            self.bays[st_.dispense_bay].door_closed = True
        self.poll()

    @precondition(lambda self: bool(self.open_empty()))
    @rule(data=st.data(), battery=good_battery | batteries)
    def rider_inserts(self, data: st.DataObject, battery: BatteryObs) -> None:
        bay = data.draw(st.sampled_from(self.open_empty()))
        self.put(bay, battery)
        self.poll()

    @precondition(lambda self: bool(self.open_full()))
    @rule(data=st.data(), plugged=st.booleans())
    def rider_fiddles_with_the_plug(self, data: st.DataObject, plugged: bool) -> None:
        bay = data.draw(st.sampled_from(self.open_full()))
        battery = self.bays[bay].battery
        assert battery is not None
        self.bays[bay].battery = replace(battery, plugged=plugged)
        self.poll()

    @precondition(lambda self: bool(self.open_full()))
    @rule(data=st.data())
    def rider_takes(self, data: st.DataObject) -> None:
        self.take(data.draw(st.sampled_from(self.open_full())))
        self.poll()

    @precondition(lambda self: bool(self.open_any()))
    @rule(data=st.data())
    def rider_closes(self, data: st.DataObject) -> None:
        self.bays[data.draw(st.sampled_from(self.open_any()))].door_closed = True
        self.poll()

    @precondition(lambda self: bool(self.timers))
    @rule(data=st.data())
    def time_passes(self, data: st.DataObject) -> None:
        timer = data.draw(st.sampled_from(sorted(self.timers)))
        self.timers.discard(timer)
        self.feed(TimerExpired(timer))
        self.poll()

    @rule(seconds=st.sampled_from([IDENTITY_GRACE_S]) | st.floats(0.1, 2 * IDENTITY_GRACE_S))
    def the_clock_runs(self, seconds: float) -> None:
        """Time passes with no one at the cabinet; the boards are polled meanwhile."""
        self.now += seconds
        self.poll()

    @precondition(lambda self: self.state.phase is not Phase.IDLE)
    @rule(
        data=st.data(),
        trip=st.sampled_from([{"faulted": True}, {"cell_temp_c": 60.0}, {"soc_pct": 40.0}]),
    )
    def a_battery_trips(self, data: st.DataObject, trip: dict[str, object]) -> None:
        """A pack the session uses (the rider's, behind the open door, or the reserved one)
        faults, heats up or loses charge after the cabinet first read it."""
        bay = data.draw(st.sampled_from(sorted(self.session_bays | set(BAYS[:1]))))
        battery = self.bays[bay].battery
        if battery is not None:
            self.bays[bay].battery = replace(battery, **trip)  # type: ignore[arg-type]
        self.poll()

    @precondition(
        lambda self: (
            self.state.phase is Phase.AWAITING_DEPOSIT and self.state.return_bay in self.open_full()
        )
    )
    @rule(trip=st.sampled_from([{"faulted": True}, {"cell_temp_c": 60.0}, {"cell_temp_c": -20.0}]))
    def the_deposited_battery_turns_bad_before_the_door_shuts(
        self, trip: dict[str, object]
    ) -> None:
        """Read healthy on insertion, faulted or out of window by the time the door shuts."""
        bay = self.state.return_bay
        assert bay is not None
        battery = self.bays[bay].battery
        assert battery is not None
        self.bays[bay].battery = replace(battery, **trip)  # type: ignore[arg-type]
        self.poll()

    @rule(bay=st.sampled_from(list(BAYS)))
    def lock_sticks(self, bay: int) -> None:
        self.bays[bay].lock_stuck = True

    @rule(bay=st.sampled_from(list(BAYS)), online=st.booleans())
    def board_power(self, bay: int, online: bool) -> None:
        self.bays[bay].online = online
        self.poll()

    @precondition(lambda self: self.state.phase is not Phase.IDLE)
    @rule()
    def smoke(self) -> None:
        self.feed(Abort("smoke"))

    @rule(event=st.sampled_from([TimerExpired(t) for t in Timer]))
    def stray_event(self, event: TimerExpired) -> None:
        if event.timer not in self.timers:
            before = self.state
            result = self.machine.step(self.state, event)
            if result.rejected:
                assert result.state == before
            elif result.state.phase is not Phase.IDLE:
                assert result.state == before  # an unknown timer changes nothing

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def only_session_doors_open_during_a_session(self) -> None:
        if self.state.phase is not Phase.IDLE:
            for n in self.unlocked_by_session:
                assert (
                    n in set(self.state.return_bays) | {c.bay for c in self.state.dispensable}
                    or n in self.session_bays
                )

    @invariant()
    def active_session_has_a_timer(self) -> None:
        if self.state.phase is not Phase.IDLE:
            assert self.timers, f"{self.state.phase} with no timer: the session could hang"

    @invariant()
    def every_battery_is_somewhere(self) -> None:
        for battery_id in self.seen:
            location = self.ledger.location(battery_id)
            assert location is not None, f"{battery_id} is nowhere"
            if location.where is Where.BAY:
                assert location.bay is not None
                held = self.bays[location.bay].battery
                snap = self.snapshots.get(location.bay)
                if snap is not None and snap.online:
                    # the ledger may trail a silent board, never a talking one
                    assert held is not None, f"ledger puts {battery_id} in empty bay {location.bay}"
                    if held.plugged and held.battery_id is not None:
                        assert held.battery_id == battery_id, (
                            f"ledger puts {battery_id} in bay {location.bay}, which holds {held}"
                        )
                        continue
                    # the bay cannot say who it holds (a BMS not answering yet, an unplugged
                    # pack): the last battery seen there stays only for the identity grace.
                    # Found by this test: a battery swapped for an unreadable pack while the
                    # board was silent stayed in the ledger for as long as the pack stayed
                    # unreadable, and a stolen battery was never reported missing
                    since = self.unreadable_since.get(location.bay)
                    assert since is None or self.now - since < IDENTITY_GRACE_S, (
                        f"ledger still puts {battery_id} in bay {location.bay}, whose pack "
                        f"{held} has hidden its id for {self.now - since:.1f} s"
                    )

    @invariant()
    def reserved_battery_is_dispensable_or_none(self) -> None:
        if self.state.phase in (Phase.OPENING_DISPENSE, Phase.AWAITING_PICKUP):
            reserved = self.state.reserved
            assert reserved is not None and self.reserved_ok.get(reserved, False)


# CI runs a few hundred stories; a long campaign: CABINET_CAMPAIGN_EXAMPLES=20000
EXAMPLES = int(os.environ.get("CABINET_CAMPAIGN_EXAMPLES", "200"))
SwapCabinet.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=60, deadline=None
)
# pytest-timeout's 120 s is a hang detector; these stories are CPU work (~22 s on a worker of
# the suite) and shrinking a failing one is more: a loaded run was cut at 120 s mid-way,
# which Hypothesis reports as FlakyStrategyDefinition instead of the failing story
TestSwapCabinet = pytest.mark.timeout(600)(SwapCabinet.TestCase)


@given(
    state_phase=st.sampled_from(Phase),
    event=st.sampled_from([TimerExpired(t) for t in Timer] + [Abort("test")]),
)
def test_illegal_pairs_change_nothing(state_phase: Phase, event: object) -> None:
    state = SwapState(
        phase=state_phase,
        session_id="s",
        rider_id="r",
        return_bays=(1,),
        dispensable=(Candidate(2, "BAT-1"),),
    )
    result = SwapMachine().step(state, event)  # type: ignore[arg-type]
    if (state_phase, type(event)) not in TRANSITIONS:
        assert result.rejected and result.state == state and result.commands == ()


def test_the_story_the_campaign_guards_a_pack_that_faults_before_the_door_shuts() -> None:
    """The model's deposit invariant replayed as one fixed story (rare at random)."""
    world = SwapCabinet()
    full = [BatteryObs(f"BAT-F{i:03d}", True, 99.0, 90.0, 25.0) for i in range(10)]
    world.fill([None, None, *full])
    world.rider_arrives(Mode.SWAP, 1)
    bay = world.state.return_bay
    assert bay is not None and world.state.phase is Phase.AWAITING_DEPOSIT
    world.put(bay, BatteryObs("BAT-0001", plugged=True, soc_pct=10, health_pct=90))
    world.poll()
    world.the_deposited_battery_turns_bad_before_the_door_shuts({"faulted": True})
    world.bays[bay].door_closed = True
    world.poll()  # a deposit judged on the stale reading fails the model's invariant here
    after: SwapState = world.state
    assert after.phase is Phase.REJECTING


def test_a_battery_reserved_when_the_first_one_trips_is_judged_as_it_is_reserved() -> None:
    """Found by the 2000-example campaign: the model knew only the batteries offered at start.

    Bay 1's battery is shut in after the rider's start; the reserved one faults; the machine
    re-reserves bay 1's by the latest readings (docs/swap.md §4), which the model must judge
    then, not report as a battery it never offered.
    """
    world = SwapCabinet()
    full = [BatteryObs(f"BAT-F{i:03d}", True, 90.0, 70.0, 10.0) for i in range(2)]
    world.fill([None, None, None, *full, *[None] * 7])
    world.bays[1].door_closed = False  # left open by an earlier visit
    world.rider_arrives(Mode.SWAP, 1)
    reserved = world.state.reserved
    assert reserved is not None and world.state.phase in RESERVATION_PHASES
    world.put(1, BatteryObs("BAT-0001", True, 99.0, 99.0, 20.0))
    world.bays[1].door_closed = True
    world.poll()
    reserved_bay = world.state.dispense_bay
    assert reserved_bay is not None
    battery = world.bays[reserved_bay].battery
    assert battery is not None
    world.bays[reserved_bay].battery = replace(battery, faulted=True)
    world.poll()
    assert world.state.reserved == "BAT-0001"
    ret = world.state.return_bay
    assert ret is not None and world.state.phase is Phase.AWAITING_DEPOSIT
    world.put(ret, BatteryObs("BAT-0002", plugged=True, soc_pct=10, health_pct=90))
    world.bays[ret].door_closed = True
    world.poll()
    after: SwapState = world.state
    assert after.phase in (Phase.OPENING_DISPENSE, Phase.AWAITING_PICKUP)
    world.reserved_battery_is_dispensable_or_none()  # the old model: "BAT-0001" never offered
