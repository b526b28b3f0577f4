"""The custody ledger's grace for identity: an unreadable pack cannot hide a battery forever.

Found by the stateful swap story: a bay's board went silent, the battery the ledger
placed there was swapped for a pack whose BMS id cannot be read, and the ledger kept
the old battery in the bay for as long as the new pack stayed unreadable -- a stolen
battery never reported missing. The ledger now gives an unidentified pack
``IDENTITY_GRACE_S`` to say who it is; past that, the battery last seen there is
missing, with a detail that says why.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cabinet.core.custody import (
    BOARD_WAKE_S,
    IDENTITY_GRACE_S,
    CustodyChange,
    CustodyLedger,
    Location,
    Where,
)

BAY = 10
OLD = "BAT-0827"


def ledger_with_old_battery() -> CustodyLedger:
    """Bay 10 holds BAT-0827, read and recorded at t=0."""
    ledger = CustodyLedger()
    ledger.observe_bay(BAY, OLD, present=True, now=0.0)
    assert ledger.location(OLD) == Location(Where.BAY, bay=BAY)
    return ledger


def unreadable(ledger: CustodyLedger, now: float, *, attended: bool = False) -> list[CustodyChange]:
    """Bay 10 reads a pack present without an id (plugged with a silent BMS, or unplugged)."""
    return list(ledger.observe_bay(BAY, None, present=True, now=now, attended=attended))


def test_within_the_grace_an_unreadable_pack_leaves_the_battery_where_it_was() -> None:
    ledger = ledger_with_old_battery()
    assert unreadable(ledger, 100.0) == []
    assert unreadable(ledger, 100.0 + IDENTITY_GRACE_S - 0.1) == []
    assert ledger.location(OLD) == Location(Where.BAY, bay=BAY)


def test_past_the_grace_the_battery_last_seen_there_is_missing_and_the_detail_says_why() -> None:
    ledger = ledger_with_old_battery()
    assert unreadable(ledger, 100.0) == []
    (change,) = ledger.observe_bay(BAY, None, present=True, now=100.0 + IDENTITY_GRACE_S)
    assert change.battery_id == OLD
    assert change.before == Location(Where.BAY, bay=BAY)
    assert change.after.where is Where.MISSING and change.after.bay == BAY  # last seen there
    assert change.surprise
    assert (
        change.detail
        == f"bay {BAY} holds a pack whose id cannot be read; {OLD} was last seen there"
    )
    # said once: the pack staying unreadable is no news
    assert unreadable(ledger, 1000.0) == []
    assert ledger.location(OLD) == Location(Where.MISSING, bay=BAY)


def test_the_pack_read_as_the_same_battery_in_time_ends_the_grace_and_changes_nothing() -> None:
    ledger = ledger_with_old_battery()
    assert unreadable(ledger, 100.0) == []
    assert ledger.observe_bay(BAY, OLD, present=True, now=100.0 + IDENTITY_GRACE_S - 1) == []
    # a later spell of silence from the BMS gets a whole grace of its own
    assert unreadable(ledger, 200.0) == []
    assert unreadable(ledger, 200.0 + IDENTITY_GRACE_S - 0.1) == []
    assert ledger.location(OLD) == Location(Where.BAY, bay=BAY)
    assert [c.battery_id for c in unreadable(ledger, 200.0 + IDENTITY_GRACE_S)] == [OLD]


def test_the_pack_read_as_another_battery_follows_the_old_rules() -> None:
    ledger = ledger_with_old_battery()
    assert unreadable(ledger, 100.0) == []
    changes = ledger.observe_bay(BAY, "BAT-0999", present=True, now=110.0)
    assert [(c.battery_id, c.after, c.surprise) for c in changes] == [
        ("BAT-0999", Location(Where.BAY, bay=BAY), True),
        (OLD, Location(Where.MISSING, bay=BAY), True),
    ]
    assert changes[1].detail == f"{OLD} left its bay without a session"
    # the grace went with the unreadable pack: nothing pending for the new battery
    assert ledger.observe_bay(BAY, "BAT-0999", present=True, now=110.0 + IDENTITY_GRACE_S) == []


def test_a_bay_emptied_during_the_grace_follows_the_old_rule() -> None:
    ledger = ledger_with_old_battery()
    assert unreadable(ledger, 100.0) == []
    (change,) = ledger.observe_bay(BAY, None, present=False, now=105.0)
    assert change.after == Location(Where.MISSING, bay=BAY)
    assert change.detail == f"{OLD} left its bay without a session"


def test_an_unreadable_pack_in_a_bay_that_holds_no_recorded_battery_is_nobody_s_news() -> None:
    ledger = CustodyLedger()
    assert unreadable(ledger, 0.0) == []
    assert unreadable(ledger, 10 * IDENTITY_GRACE_S) == []
    assert not ledger.wants_reading(BAY, None, present=True, now=10 * IDENTITY_GRACE_S)


def test_a_bay_the_session_s_open_door_attends_to_runs_no_grace() -> None:
    """The rider at the open door settles the battery (the swap machine): no alarm meanwhile."""
    ledger = ledger_with_old_battery()
    assert unreadable(ledger, 100.0, attended=True) == []
    assert unreadable(ledger, 100.0 + 5 * IDENTITY_GRACE_S, attended=True) == []
    # left alone, the grace starts from the first unattended reading
    assert unreadable(ledger, 500.0) == []
    assert unreadable(ledger, 500.0 + IDENTITY_GRACE_S - 0.1) == []
    assert [c.battery_id for c in unreadable(ledger, 500.0 + IDENTITY_GRACE_S)] == [OLD]


def test_a_board_answering_again_gives_its_pack_a_wake_window_not_a_new_grace() -> None:
    ledger = ledger_with_old_battery()
    assert unreadable(ledger, 100.0) == []
    ledger.bay_silent(BAY)
    assert unreadable(ledger, 125.0) == []  # back after 25 s: at least BOARD_WAKE_S more
    assert unreadable(ledger, 125.0 + BOARD_WAKE_S - 0.1) == []
    assert [c.battery_id for c in unreadable(ledger, 125.0 + BOARD_WAKE_S)] == [OLD]


def test_a_board_isolated_every_few_seconds_does_not_hide_a_swap_for_ever() -> None:
    ledger = ledger_with_old_battery()
    now, changes = 100.0, unreadable(ledger, 100.0)
    while not changes and now < 100.0 + 10 * IDENTITY_GRACE_S:
        ledger.bay_silent(BAY)  # a few bad reads ...
        now += 5.0
        changes = unreadable(ledger, now)  # ... and it answers at the re-probe
        now += 15.0
        changes = changes or unreadable(ledger, now)
    assert [c.battery_id for c in changes] == [OLD]
    assert now <= 100.0 + IDENTITY_GRACE_S + BOARD_WAKE_S


def test_a_missing_battery_seen_again_comes_back_from_where_it_was_last_seen() -> None:
    ledger = ledger_with_old_battery()
    unreadable(ledger, 100.0)
    unreadable(ledger, 100.0 + IDENTITY_GRACE_S)
    assert ledger.missing_from(BAY) == [OLD]
    (change,) = ledger.observe_bay(3, OLD, present=True, now=500.0)
    assert change.before == Location(Where.MISSING, bay=BAY) and change.found
    assert change.after == Location(Where.BAY, bay=3) and change.surprise
    assert ledger.missing_from(BAY) == []


def test_the_grace_length_is_the_ledger_s_own() -> None:
    ledger = CustodyLedger(identity_grace_s=2.0)
    ledger.observe_bay(BAY, OLD, present=True, now=0.0)
    assert unreadable(ledger, 1.0) == []
    assert [c.battery_id for c in unreadable(ledger, 3.0)] == [OLD]


readings = st.tuples(
    st.sampled_from([None, OLD, "BAT-0999"]),  # the id the bay reads
    st.booleans(),  # present
    st.booleans(),  # attended
    st.floats(0.0, 2 * IDENTITY_GRACE_S),  # time since the last reading
    st.booleans(),  # the board went silent before this reading
)


@given(st.lists(readings, max_size=30))
def test_a_repeated_reading_the_ledger_does_not_want_changes_nothing(
    story: list[tuple[str | None, bool, bool, float, bool]],
) -> None:
    """The daemon skips a reading equal to the last unless ``wants_reading``: that is safe."""
    ledger = ledger_with_old_battery()
    now = 0.0
    last: tuple[str | None, bool, bool] | None = None
    for battery_id, present, attended, dt, silent in story:
        now += dt
        if silent:
            ledger.bay_silent(BAY)
            last = None  # the board coming back is a reading of its own
        reading = (battery_id if present else None, present, attended)
        wanted = ledger.wants_reading(BAY, reading[0], present=present, now=now, attended=attended)
        if not ledger.may_want_reading(BAY, reading[0], present=present):
            assert not wanted, "the daemon's cheap check would have skipped a wanted reading"
        before = (dict(ledger.items()), dict(ledger.graces))
        changes = ledger.observe_bay(BAY, reading[0], present=present, now=now, attended=attended)
        if reading == last and not wanted:
            assert changes == []
            after = (dict(ledger.items()), dict(ledger.graces))
            assert after == before, "a skipped reading would have changed the ledger"
        last = reading
