"""The journal's outbox: seq survives restarts and pruning; only acknowledged events leave."""

from __future__ import annotations

from pathlib import Path

import pytest

from cabinet import fleet_link
from cabinet import journal as journal_module
from cabinet.bus_scheduler import BusScheduler
from cabinet.controller import CabinetController
from cabinet.journal import Journal
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


def test_a_growing_outbox_raises_one_alarm_and_keeps_every_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_link, "OUTBOX_ALARM_DEPTH", 3)
    journal = Journal(tmp_path / "j.db")
    controller = CabinetController(
        cabinet_id="c",
        journal=journal,
        scheduler=BusScheduler(ModbusBus(parse_endpoint("tcp://127.0.0.1:9"))),
    )
    fleet = fleet_link.FleetLink(
        controller, lambda **kw: MqttLink("mqtt://127.0.0.1:9", client_id="t", **kw)
    )
    add(journal, 5)
    fleet._check_backlog()
    fleet._check_backlog()
    alarms = [e for e in journal.events() if e["type"] == "alarm.raised"]
    assert len(alarms) == 1 and alarms[0]["kind"] == "outbox_backlog"
    assert journal.outbox_depth() == 6  # the alarm itself is an event; nothing was dropped
    journal.mark_published(6)
    fleet._check_backlog()
    assert [e["type"] for e in journal.events()][-1] == "alarm.cleared"
