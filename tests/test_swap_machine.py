"""Single stories of the swap machine that the stateful test reaches only rarely."""

from __future__ import annotations

from cabinet.core.battery_rules import BatteryObs
from cabinet.core.bay_tracker import BaySnapshot, diff
from cabinet.core.swap_machine import (
    IDLE,
    BatteryInserted,
    BatteryRemoved,
    BayOffline,
    Candidate,
    CustodyToRider,
    DispensableNow,
    DoorClosed,
    DoorOpened,
    Emit,
    Mode,
    Phase,
    RaiseAlarm,
    Start,
    SwapMachine,
    Unlock,
)

M = SwapMachine()
GOOD = BatteryObs("BAT-R1", plugged=True, soc_pct=10, health_pct=90, cell_temp_c=25)


def run(*events: object):  # type: ignore[no-untyped-def]
    return run_from(IDLE, *events)


START = Start("s1", "R", Mode.SWAP, (1, 2), (Candidate(5, "BAT-F5"), Candidate(6, "BAT-F6")))


def test_a_silent_dispense_bay_ends_the_session_without_opening_another_full_bay() -> None:
    state, commands = run(
        START, DoorOpened(1), BatteryInserted(1, GOOD), DoorClosed(1), BayOffline(5)
    )
    assert state.phase is Phase.IDLE
    assert [c.bay for c in commands if isinstance(c, Unlock)] == [1, 5]  # never bay 6
    assert any(isinstance(c, RaiseAlarm) and c.kind == "dispense_uncertain" for c in commands)
    failed = [c for c in commands if isinstance(c, Emit) and c.type == "swap.failed"]
    assert failed[0].data["reason"] == "bay_offline"


def test_unplugging_before_shutting_the_door_is_judged_on_the_latest_reading() -> None:
    prev = BaySnapshot(online=True, door_closed=False, battery_present=True, battery=GOOD)
    unplugged = BaySnapshot(
        online=True,
        door_closed=False,
        battery_present=True,
        battery=BatteryObs(None, plugged=False),
    )
    events = diff(1, prev, unplugged)
    assert events == [BatteryInserted(1, BatteryObs(None, plugged=False))]
    state, commands = run(START, DoorOpened(1), BatteryInserted(1, GOOD), *events, DoorClosed(1))
    rejected = [c for c in commands if isinstance(c, Emit) and c.type == "swap.deposit_rejected"]
    assert rejected and rejected[0].data["reason"] == "not_plugged"
    assert state.phase is Phase.REJECTING


def test_a_battery_taken_back_unplugged_still_goes_back_to_its_rider() -> None:
    _, commands = run(
        START,
        DoorOpened(1),
        BatteryInserted(1, GOOD),
        BatteryInserted(1, BatteryObs(None, plugged=False)),
        BatteryRemoved(1, None),
    )
    assert CustodyToRider("BAT-R1", "R", "s1") in commands


def test_a_battery_put_back_before_the_door_shuts_was_not_dispensed() -> None:
    state, commands = run(
        START,
        DoorOpened(1),
        BatteryInserted(1, GOOD),
        DoorClosed(1),
        DoorOpened(5),
        BatteryRemoved(5, "BAT-F5"),
        BatteryInserted(5, BatteryObs("BAT-F5", plugged=True)),
        DoorClosed(5),
    )
    types = [c.type for c in commands if isinstance(c, Emit)]
    assert "swap.dispense_returned" in types
    assert types[-1] == "swap.failed"  # not collected after all
    assert state.phase is Phase.IDLE


def test_a_first_pickup_uses_no_return_bay() -> None:
    state, commands = run(Start("s2", "R", Mode.PICKUP, (1, 2), (Candidate(5, "BAT-F5"),)))
    assert state.phase is Phase.OPENING_DISPENSE and state.return_bay is None
    assert [c.bay for c in commands if isinstance(c, Unlock)] == [5]
    # a silent empty bay is none of this session's business
    assert M.step(state, BayOffline(1)).state == state


def test_a_reserved_battery_that_trips_before_its_door_opens_is_replaced() -> None:
    """Issue 11: the reservation is re-judged on the latest ranking until the door opens."""
    state, commands = run(
        START,
        DoorOpened(1),
        DispensableNow((Candidate(6, "BAT-F6"),)),  # bay 5's battery tripped
        BatteryInserted(1, GOOD),
        DoorClosed(1),
    )
    assert state.phase is Phase.OPENING_DISPENSE and state.dispense_bay == 6
    assert [c.bay for c in commands if isinstance(c, Unlock)] == [1, 6]  # never bay 5
    moved = [c for c in commands if isinstance(c, Emit) and c.type == "swap.dispense_reassigned"]
    assert [(e.data["from_bay"], e.data["to_bay"], e.data["reserved"]) for e in moved] == [
        (5, 6, "BAT-F6")
    ]


def test_with_nothing_left_to_hand_out_the_rider_gets_their_own_battery_back() -> None:
    state, commands = run(
        START, DoorOpened(1), BatteryInserted(1, GOOD), DispensableNow(()), DoorClosed(1)
    )
    assert state.phase is Phase.GIVING_BACK and state.return_bay == 1
    assert [c.bay for c in commands if isinstance(c, Unlock)] == [1, 1]  # only its own door
    state, more = run_from(state, DoorOpened(1), BatteryRemoved(1, "BAT-R1"), DoorClosed(1))
    assert CustodyToRider("BAT-R1", "R", "s1") in more and state.phase is Phase.IDLE


def test_a_still_dispensable_reservation_stands() -> None:
    state, commands = run(START, DispensableNow((Candidate(6, "BAT-F6"), Candidate(5, "BAT-F5"))))
    assert state.dispense_bay == 5
    assert not [c for c in commands if isinstance(c, Emit) and c.type == "swap.dispense_reassigned"]
    # the fall-backs are refreshed: if bay 5's door fails, the latest next-best is used
    assert state.dispensable == (Candidate(5, "BAT-F5"), Candidate(6, "BAT-F6"))


def test_once_the_dispense_unlock_is_out_the_reservation_is_kept() -> None:
    state, _ = run(START, DoorOpened(1), BatteryInserted(1, GOOD), DoorClosed(1))
    assert state.phase is Phase.OPENING_DISPENSE
    result = M.step(state, DispensableNow((Candidate(6, "BAT-F6"),)))
    assert result.commands == () and result.state.dispense_bay == 5


def run_from(state, *events: object):  # type: ignore[no-untyped-def]
    commands = []
    for event in events:
        result = M.step(state, event)  # type: ignore[arg-type]
        state = result.state
        commands += list(result.commands)
    return state, commands
