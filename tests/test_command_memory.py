"""The commands table is an idempotency window, not a history: it stays bounded."""

from __future__ import annotations

from pathlib import Path

from cabinet.daemon import journal as journal_mod
from cabinet.daemon.journal import Journal


def remember(journal: Journal, request_id: str, at: float) -> None:
    with journal.transaction() as db:
        journal.put_command_reply(db, request_id, {"request_id": request_id, "ok": True}, at)


def test_thousands_of_fresh_ids_keep_the_table_bounded(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        remember(journal, "first", 1000.0)
        total = journal_mod.COMMAND_WINDOW_MAX + 2_000
        for n in range(total):  # a backend polling state.get with fresh ids, 10/s
            remember(journal, f"poll-{n}", 1000.0 + n / 10)
        assert journal.command_memory() == journal_mod.COMMAND_WINDOW_MAX
        assert journal.command_reply("first") is None  # beyond the window: forgotten
        # a retry inside the window still gets its original reply
        last = f"poll-{total - 1}"
        assert journal.command_reply(last) == {"request_id": last, "ok": True}
    finally:
        journal.close()


def test_replies_older_than_the_window_are_forgotten(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        remember(journal, "old", 0.0)
        remember(journal, "recent", journal_mod.COMMAND_WINDOW_S - 60)
        assert journal.command_reply("old") is not None  # still inside the window
        remember(journal, "now", journal_mod.COMMAND_WINDOW_S + 1)
        assert journal.command_reply("old") is None
        assert journal.command_reply("recent") is not None
        assert journal.command_memory() == 2
    finally:
        journal.close()
