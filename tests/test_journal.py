"""The journal's outbox: seq survives restarts and pruning; only acknowledged events leave."""

from __future__ import annotations

from pathlib import Path

import pytest

from cabinet import journal as journal_module
from cabinet.journal import Journal


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
