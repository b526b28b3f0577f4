"""A silent unit is news once, an alarm once, and news again once: the sans-I/O rules."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cabinet.core.unit_presence import UnitPresence

T0 = 1000.0
WALL0 = 1_764_000_000.0


def test_silence_is_news_once_then_an_alarm_once_then_recovery_once() -> None:
    p = UnitPresence(offline_alarm_s=60.0)
    assert p.answered(5, now=T0, wall=WALL0) == []  # answering is not news
    went = p.silent(5, now=T0, wall=WALL0)
    assert [(e.type, e.data) for e in went] == [("bay.offline", {"bay": 5})]
    assert p.silent(5, now=T0 + 30, wall=WALL0 + 30) == []  # still silent: nothing new
    alarm = p.due(T0 + 60)
    assert [(e.type, e.data["kind"], e.data["bay"]) for e in alarm] == [
        ("alarm.raised", "board_silent", 5)
    ]
    assert p.due(T0 + 120) == []
    back = p.answered(5, now=T0 + 125, wall=WALL0 + 125)
    assert [e.type for e in back] == ["bay.online", "alarm.cleared"]
    assert back[0].data == {"bay": 5, "offline_s": 125.0}
    assert p.answered(5, now=T0 + 126, wall=WALL0 + 126) == []


def test_the_cabinet_board_and_the_meter_are_named_by_unit_and_role() -> None:
    p = UnitPresence(offline_alarm_s=0.0)
    events = p.silent(21, now=T0, wall=WALL0)
    assert [(e.type, e.data) for e in events] == [
        ("unit.offline", {"unit": 21, "role": "meter"}),
        ("alarm.raised", {"kind": "meter_silent", "bay": None, "detail": "silent for 0 s"}),
    ]
    back = p.answered(21, now=T0 + 2, wall=WALL0 + 2)
    assert back[0].data == {"unit": 21, "role": "meter", "offline_s": 2.0}
    assert back[1].data["kind"] == "meter_silent"
    assert p.silent(20, now=T0, wall=WALL0)[1].data["kind"] == "cabinet_board_silent"


def test_an_outage_spanning_a_restart_is_neither_repeated_nor_shortened() -> None:
    before = UnitPresence(offline_alarm_s=60.0)
    before.silent(7, now=T0, wall=WALL0)
    stored = before.as_json()
    # the daemon restarts 100 s later on a monotonic clock that began again
    after = UnitPresence.from_json(stored, offline_alarm_s=60.0, now=5.0, wall=WALL0 + 100)
    assert after.silent(7, now=5.0, wall=WALL0 + 100)[0].type == "alarm.raised"  # overdue
    back = after.answered(7, now=10.0, wall=WALL0 + 105)
    assert back[0].data["offline_s"] == 105.0


@given(st.lists(st.tuples(st.sampled_from([1, 2, 20, 21]), st.booleans()), max_size=40))
def test_offline_and_online_alternate_per_unit(steps: list[tuple[int, bool]]) -> None:
    p = UnitPresence(offline_alarm_s=3.0)
    last: dict[int, str] = {}
    for i, (unit, answered) in enumerate(steps):
        now = T0 + i
        events = (p.answered if answered else p.silent)(unit, now=now, wall=WALL0 + i)
        for event in events:
            if event.type.endswith(("offline", "online")):
                kind = event.type.split(".")[1]
                who = int(event.data.get("bay") or event.data["unit"])
                assert last.get(who) != kind, steps  # never the same news twice in a row
                last[who] = kind
