"""The journal's schema version is read at open; migrations are numbered steps, run once each.

A cabinet upgraded in the field opens the journal its previous release wrote: the
migration must keep every event, custody entry and pending pickup. A cabinet
downgraded opens a journal from a newer release: it must refuse to start, saying
why, and leave the file untouched for the release that understands it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from cabinet.daemon import journal as journal_module
from cabinet.daemon.journal import Journal, JournalError, JournalTooNewError
from tests.conftest import cabinet_cmd

#: The journal's DDL as the release before schema version 2 wrote it (main at 6f91ae5),
#: copied here on purpose: a test that imported it would follow any later edit.
V1_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, rider_id TEXT NOT NULL, mode TEXT NOT NULL,
    state TEXT NOT NULL, started_at REAL NOT NULL, ended_at REAL, outcome TEXT
);
CREATE TABLE IF NOT EXISTS timers (name TEXT PRIMARY KEY, deadline REAL NOT NULL);
CREATE TABLE IF NOT EXISTS custody (
    battery_id TEXT PRIMARY KEY, location TEXT NOT NULL, bay INTEGER,
    rider_id TEXT, session_id TEXT, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bay_snapshots (bay INTEGER PRIMARY KEY, snapshot TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bay_service (
    bay INTEGER PRIMARY KEY, in_service INTEGER NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
    ts INTEGER NOT NULL, payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS used_tokens (nonce TEXT PRIMARY KEY, expires INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
    request_id TEXT PRIMARY KEY, reply TEXT NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_at ON commands (at);
"""

#: What the controller of that release stored: bay -> [battery, rider, session]
PICKUPS = {"4": ["BAT-P4", "R-7", "sess-7"], "11": ["BAT-P11", "R-8", "sess-8"]}
#: ... and, also among the settings then, which units were silent and the screen's challenges
OFFLINE = {"5": {"since_wall": 1700000000.0, "alarmed": True}}
SHOWN = {"issued": {"n-1": 1700000000}, "used": {}}


def v1_journal(path: Path, *, ddl: str = V1_DDL, version: str = "1") -> None:
    """A journal as the previous release left it: some events, custody, two pending pickups."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(ddl)
    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (version,))
    for seq in (1, 2, 3):
        db.execute(
            "INSERT INTO events VALUES (?, ?, 'bay.disabled', 1700000000000, ?)",
            (seq, f"id-{seq}", json.dumps({"bay": seq, "reason": "old"})),
        )
    db.execute("INSERT INTO meta VALUES ('last_seq', '3')")
    db.execute("INSERT INTO meta VALUES ('published_upto', '2')")
    db.execute("INSERT INTO custody VALUES ('BAT-P4', 'bay', 4, NULL, NULL, 1.0)")
    db.execute("INSERT INTO meta VALUES ('setting.pending_pickups', ?)", (json.dumps(PICKUPS),))
    db.execute("INSERT INTO meta VALUES ('setting.dispense_min_soc_pct', '92.0')")
    db.execute("INSERT INTO meta VALUES ('setting.units_offline', ?)", (json.dumps(OFFLINE),))
    db.execute("INSERT INTO meta VALUES ('setting.display_challenges', ?)", (json.dumps(SHOWN),))
    db.close()


def stored_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        (value,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    finally:
        db.close()
    return int(value)


def test_a_previous_release_journal_is_migrated_in_place_and_keeps_everything(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    v1_journal(path)
    journal = Journal(path)
    try:
        assert stored_version(path) == journal_module.SCHEMA_VERSION
        assert journal.pending_pickups() == {
            4: ["BAT-P4", "R-7", "sess-7"],
            11: ["BAT-P11", "R-8", "sess-8"],
        }
        # the runtime state left the settings table; real settings stayed there
        raw = journal._db.execute("SELECT key FROM meta WHERE key LIKE 'setting.%'").fetchall()
        assert raw == [("setting.dispense_min_soc_pct",)]
        assert journal.setting("dispense_min_soc_pct") == 92.0
        assert journal.setting("pending_pickups") is None  # no longer a setting
        assert journal.runtime_state("units_offline") == OFFLINE
        assert journal.runtime_state("display_challenges") == SHOWN
        assert journal.setting("units_offline") is None
        with journal.transaction() as db:
            journal.put_pending_pickups(db, {4: ["BAT-P4", "R-7", "sess-7"]})
        assert journal.pending_pickups() == {4: ["BAT-P4", "R-7", "sess-7"]}
        # the outbox, its watermark and the custody ledger came through untouched
        assert [e["seq"] for e in journal.unpublished(10)] == [3]
        with journal.transaction() as db:
            assert journal.add_event(db, "t", {}, 0)["seq"] == 4
        assert journal.ledger().in_bay(4) == ["BAT-P4"]
    finally:
        journal.close()


def test_a_fresh_journal_is_created_at_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    Journal(path).close()
    assert stored_version(path) == journal_module.SCHEMA_VERSION
    assert [m.version for m in journal_module.MIGRATIONS] == list(
        range(1, journal_module.SCHEMA_VERSION + 1)
    )


def test_each_migration_runs_once_in_its_own_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.db"
    Journal(path).close()
    runs: list[int] = []
    step = journal_module.Migration(
        journal_module.SCHEMA_VERSION + 1,
        "a test step",
        lambda db: runs.append(db.execute("SELECT count(*) FROM events").fetchone()[0]),
    )
    monkeypatch.setattr(journal_module, "MIGRATIONS", (*journal_module.MIGRATIONS, step))
    monkeypatch.setattr(journal_module, "SCHEMA_VERSION", step.version)
    Journal(path).close()
    Journal(path).close()
    assert runs == [0]
    assert stored_version(path) == step.version


def test_a_failing_migration_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.db"
    v1_journal(path)

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half_done (x INTEGER)")
        raise sqlite3.OperationalError("the step went wrong")

    step = journal_module.Migration(journal_module.SCHEMA_VERSION + 1, "a broken step", broken)
    monkeypatch.setattr(journal_module, "MIGRATIONS", (*journal_module.MIGRATIONS, step))
    monkeypatch.setattr(journal_module, "SCHEMA_VERSION", step.version)
    with pytest.raises(JournalError, match=r"migrat.*a broken step.*went wrong"):
        Journal(path)
    # the steps before it are committed, the broken one left no trace
    assert stored_version(path) == step.version - 1
    db = sqlite3.connect(path)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert "half_done" not in tables and "pending_pickups" in tables


def test_a_journal_from_a_newer_release_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    v1_journal(path, version=str(journal_module.SCHEMA_VERSION + 1))
    before = path.read_bytes()
    with pytest.raises(JournalTooNewError, match=r"schema version \d+, newer than this") as err:
        Journal(path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before


def test_the_daemon_refuses_to_start_on_a_newer_journal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    v1_journal(state / "journal.db", version="99")
    assert cabinet_cmd("keys", "generate", str(tmp_path / "backend")).returncode == 0
    config = tmp_path / "cabinet.toml"
    config.write_text(
        f'[cabinet]\nid = "cab-new"\nstate_dir = "{state}"\n'
        '[bus]\nurl = "tcp://127.0.0.1:9"\n'
        '[scanner]\nurl = "tcp://127.0.0.1:9"\n'
        f'[auth]\npublic_keys = ["{tmp_path / "backend.pub"}"]\n'
    )
    result = cabinet_cmd("run", "-c", str(config), timeout=60)
    assert result.returncode != 0
    assert "schema version 99, newer than this cabinet software" in result.stderr
    assert "Traceback" not in result.stderr
    assert stored_version(state / "journal.db") == 99


def test_an_opener_waits_for_another_process_holding_a_new_journal(tmp_path: Path) -> None:
    """`cabinet events` at the instant the daemon starts must not make the start fail.

    Seen once in CI: a daemon starting while the test harness opened its brand-new journal
    died with "database is locked". Two openers switching a new file into WAL mode at once
    can get that without SQLite's busy handler; this test holds the file the simpler way
    (an exclusive transaction), so it checks the waiting, not that exact interleaving.
    """
    path = tmp_path / "journal.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # the other process, mid-way through setting it up
    release = threading.Timer(0.5, holder.execute, ("COMMIT",))
    release.start()
    try:
        journal = Journal(path)  # waits for the holder instead of failing
    finally:
        release.join()
        holder.close()
    try:
        assert journal.events(limit=10) == []
    finally:
        journal.close()
