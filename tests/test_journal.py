"""The journal's outbox: seq survives restarts and pruning; only acknowledged events leave."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cabinet.daemon import fleet_link
from cabinet.daemon import journal as journal_module
from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.journal import Journal, JournalUnwritableError
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus
from drivers.mqtt_link import MqttLink


def add(journal: Journal, count: int) -> list[int]:
    with journal.transaction() as db:
        return [journal.add_event(db, "t", {"n": n}, 0)["seq"] for n in range(count)]


def test_only_acknowledged_events_leave_the_outbox(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    assert add(journal, 5) == [1, 2, 3, 4, 5]
    journal.mark_published(3)
    assert [e["seq"] for e in journal.unpublished(10)] == [4, 5]
    assert journal.outbox_depth() == 2
    journal.close()
    reopened = Journal(tmp_path / "j.db")
    assert add(reopened, 1) == [6]  # gap-free across a restart
    assert reopened.outbox_depth() == 3


def test_pruned_history_never_reuses_a_seq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "EVENT_HISTORY", 2)
    journal = Journal(tmp_path / "j.db")
    add(journal, 6)
    journal.mark_published(6)
    assert [e["seq"] for e in journal.events()] == [5, 6]
    assert add(journal, 1) == [7]


def _offline_fleet_link(journal: Journal) -> fleet_link.FleetLink:
    """A fleet link whose broker never answers: only the journal side is exercised."""
    controller = CabinetController(
        cabinet_id="c",
        journal=journal,
        scheduler=BusScheduler(ModbusBus(parse_endpoint("tcp://127.0.0.1:9"))),
    )
    return fleet_link.FleetLink(
        controller, lambda **kw: MqttLink("mqtt://127.0.0.1:9", client_id="t", **kw)
    )


def test_a_growing_outbox_raises_one_alarm_and_keeps_every_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_link, "OUTBOX_ALARM_DEPTH", 3)
    journal = Journal(tmp_path / "j.db")
    fleet = _offline_fleet_link(journal)
    add(journal, 5)
    fleet._check_backlog()
    fleet._check_backlog()
    alarms = [e for e in journal.events() if e["type"] == "alarm.raised"]
    assert len(alarms) == 1 and alarms[0]["kind"] == "outbox_backlog"
    assert journal.outbox_depth() == 6  # the alarm itself is an event; nothing was dropped
    journal.mark_published(6)
    fleet._check_backlog()
    assert [e["type"] for e in journal.events()][-1] == "alarm.cleared"


FILLER_KIB = 1100


def _fill_from_outside(path: Path) -> None:
    """Another writer takes the room the cap allows (as a log filling the disk would)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE filler (b BLOB)")
    db.execute("INSERT INTO filler VALUES (zeroblob(?))", (FILLER_KIB * 1024,))
    db.close()


def test_a_full_journal_reports_the_real_error_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    journal = Journal(path, max_bytes=1024 * 1024)
    assert add(journal, 1) == [1] and journal.trouble(now=0.0) is None
    _fill_from_outside(path)
    # SQLite rolls a full transaction back by itself: the error must be the disk, not
    # "cannot rollback - no transaction is active"
    with pytest.raises(JournalUnwritableError, match="database or disk is full"):
        add(journal, 200)
    assert journal.problem == "database or disk is full"
    assert journal.trouble(now=0.0) == "database or disk is full"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE filler")
    db.close()
    assert journal.trouble(now=0.5) is not None  # re-tried at most once a second
    assert journal.trouble(now=1.5) is None
    assert journal.writable(now=1.5)  # the probe's success cleared the problem
    assert add(journal, 1) == [2]  # nothing of the failed transaction was kept


def test_little_room_left_is_trouble_before_any_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    journal = Journal(path, max_bytes=(FILLER_KIB + 200) * 1024)
    assert journal.trouble(now=0.0) is None
    _fill_from_outside(path)  # some 150 KiB left: a write would still succeed
    trouble = journal.trouble(now=0.0)
    assert trouble is not None and "KiB left for the journal" in trouble
    assert add(journal, 1) == [1]


def test_commands_are_answered_when_the_journal_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_link, "OUTBOX_ALARM_DEPTH", 1)
    journal = Journal(tmp_path / "j.db")
    fleet = _offline_fleet_link(journal)
    add(journal, 2)
    journal._db.execute("PRAGMA query_only = 1")  # every write now fails, as on a dead disk
    command = b'{"request_id": "r-1", "args": {"bay": 3, "reason": "smells of smoke"}}'
    reply = fleet._handle("bay.disable", command)
    assert reply["ok"] is False and reply["error"]["code"] == "journal_unwritable"
    assert "readonly" in reply["error"]["message"]
    fleet._check_backlog()  # the backlog alarm cannot be stored: no crash, tried again later
    assert 3 not in fleet.controller.out_of_service  # memory never runs ahead of the journal
    journal._db.execute("PRAGMA query_only = 0")
    fleet._check_backlog()
    assert [e["type"] for e in journal.events()][-1] == "alarm.raised"


def test_held_telemetry_keeps_the_newest_and_leaves_only_when_acknowledged(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j.db")
    dropped = [journal.hold_telemetry(ts, b'{"ts": %d}' % ts, keep=3) for ts in range(1, 6)]
    assert dropped == [0, 0, 0, 1, 1]  # over the cap, the oldest goes
    held = journal.held_telemetry(10)
    assert [s.ts for s in held] == [3, 4, 5] and held[0].payload == b'{"ts": 3}'
    journal.release_telemetry(held[1].id)  # PUBACKs for the first two
    journal.close()
    reopened = Journal(tmp_path / "j.db")  # a restart keeps what is not acknowledged
    assert [s.ts for s in reopened.held_telemetry(10)] == [5]
    assert reopened.hold_telemetry(6, b"{}", keep=3) == 0
    assert [s.ts for s in reopened.held_telemetry(10)] == [5, 6]  # order survives deletes
    assert reopened.telemetry_backlog() == 2
