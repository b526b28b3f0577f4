"""A deposit is judged on the latest reading at door-shut (issue 11, "Safety" item 1).

The bay tracker must hand the machine every change of a field the deposit and
dispense rules read, not only identity and plug, or a battery that faults or
heats up between its first reading and the door shutting is accepted.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from cabinet.core.battery_rules import BatteryObs, DepositRules, judge_deposit
from cabinet.core.bay_tracker import BaySnapshot, diff
from cabinet.core.swap_machine import (
    IDLE,
    BatteryInserted,
    Candidate,
    DoorClosed,
    DoorOpened,
    Emit,
    Mode,
    Phase,
    Start,
    SwapMachine,
)

M = SwapMachine()
GOOD = BatteryObs("BAT-R1", plugged=True, soc_pct=10, health_pct=90, cell_temp_c=25)
START = Start("s1", "R", Mode.SWAP, (1, 2), (Candidate(5, "BAT-F5"),))

#: every field of the BMS reading a rule reads, each with a value that differs from GOOD's
CHANGES = st.one_of(
    st.just({"faulted": True}),
    st.floats(-40, 120).filter(lambda t: t != GOOD.cell_temp_c).map(lambda t: {"cell_temp_c": t}),
    st.floats(0, 100).filter(lambda s: s != GOOD.soc_pct).map(lambda s: {"soc_pct": s}),
    st.floats(0, 100).filter(lambda h: h != GOOD.health_pct).map(lambda h: {"health_pct": h}),
    st.integers(1, 5000).map(lambda c: {"cycle_count": c}),
    st.just({"plugged": False}),
    st.sampled_from(["BAT-R2", "ACME-1"]).map(lambda i: {"battery_id": i}),
)


def _in_bay(battery: BatteryObs, *, door_closed: bool) -> BaySnapshot:
    return BaySnapshot(online=True, door_closed=door_closed, battery_present=True, battery=battery)


@given(CHANGES, st.booleans())
def test_every_change_of_a_judged_field_reaches_the_machine(
    change: dict[str, object], shut_in_same_poll: bool
) -> None:
    later = replace(GOOD, **change)  # type: ignore[arg-type]
    events = diff(
        1, _in_bay(GOOD, door_closed=False), _in_bay(later, door_closed=shut_in_same_poll)
    )
    # the latest reading is handed over, before the door-shut it must be judged with
    assert BatteryInserted(1, later) in events
    if shut_in_same_poll:
        assert events.index(BatteryInserted(1, later)) < events.index(DoorClosed(1))


def test_an_unchanged_reading_produces_no_event() -> None:
    snap = _in_bay(GOOD, door_closed=False)
    assert diff(1, snap, snap) == []


@given(CHANGES)
def test_the_deposit_is_judged_on_the_reading_at_door_shut(change: dict[str, object]) -> None:
    later = replace(GOOD, **change)  # type: ignore[arg-type]
    first = _in_bay(GOOD, door_closed=False)
    shut = _in_bay(later, door_closed=True)
    state, emitted = IDLE, []
    for event in (START, DoorOpened(1), BatteryInserted(1, GOOD), *diff(1, first, shut)):
        result = M.step(state, event)
        state = result.state
        emitted += [c for c in result.commands if isinstance(c, Emit)]
    refusal = judge_deposit(later, DepositRules())
    types = [e.type for e in emitted]
    if refusal is None:
        assert "swap.battery_deposited" in types and state.phase is Phase.OPENING_DISPENSE
    else:
        rejected = [e for e in emitted if e.type == "swap.deposit_rejected"]
        assert rejected[0].data["reason"] == refusal
        assert "swap.battery_deposited" not in types and state.phase is Phase.REJECTING


def test_a_battery_that_faults_after_its_first_reading_is_refused() -> None:
    """The story a rider could exploit: healthy when read, faulted when the door shuts."""
    faulted = replace(GOOD, faulted=True)
    events = diff(1, _in_bay(GOOD, door_closed=False), _in_bay(faulted, door_closed=True))
    state = IDLE
    emitted: list[Emit] = []
    for event in (START, DoorOpened(1), BatteryInserted(1, GOOD), *events):
        result = M.step(state, event)
        state = result.state
        emitted += [c for c in result.commands if isinstance(c, Emit)]
    assert [e.data["reason"] for e in emitted if e.type == "swap.deposit_rejected"] == ["faulted"]
