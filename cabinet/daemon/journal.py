"""The journal: what the cabinet must not forget, in SQLite (WAL) in ``cabinet.state_dir``.

Theory of operation: every swap-machine step is committed in one transaction —
the machine's new state, its timers' deadlines, custody moves, bay service flags
and the events it emitted — *before* any door is unlocked. A ``kill -9`` or power
cut therefore leaves either the step before or the step after, never half of one;
on restart the daemon reloads the active session and reconciles it with what the
bays report. The ``events`` table is the outbox: every event gets a gap-free
``seq`` (it survives restarts) and a unique ``id``, and stays until the fleet link
has it acknowledged. Used token nonces are kept until their expiry so a token
cannot be replayed across a reboot. Telemetry samples taken while the broker is away
wait in ``telemetry_backlog`` (bounded) until it acknowledges them.

Schema: the version is read from ``meta.schema_version`` at open. ``MIGRATIONS`` is the
numbered list of steps from an empty file to ``SCHEMA_VERSION``; each step the file has
not had runs once, in its own transaction together with the version bump, so a crash
mid-migration leaves the previous version whole. A journal from a newer release is
refused (``JournalTooNewError``) and left untouched. A released step is never edited:
a change to the schema is a new step at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from cabinet.core.battery_rules import BatteryObs
from cabinet.core.bay_tracker import BaySnapshot
from cabinet.core.custody import IDENTITY_GRACE_S, CustodyLedger, Location, Where
from cabinet.core.swap_machine import Candidate, Mode, Phase, SwapState, Timer
from cabinet.daemon.tokens import CLOCK_SKEW_S

log = structlog.get_logger("journal")

EVENT_HISTORY = 10_000  # published events kept for `cabinet events`; unpublished are never pruned
#: The idempotency window of remote commands (docs/mqtt.md): a retried ``request_id``
#: within a day — and among the last 10,000 — gets its original reply; a backend
#: retries within seconds, so a day is generous while the table stays under ~10 MB.
COMMAND_WINDOW_S = 24 * 3600.0
COMMAND_WINDOW_MAX = 10_000

#: Schema version 1, as every release up to 6f91ae5 wrote it (with IF NOT EXISTS, since that
#: release ran it at every open and added tables to it without a version bump). Frozen.
_V1_SCHEMA = """
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


#: How long an opener waits for another process that holds a new journal (setting WAL mode
#: or migrating it): a technician's `cabinet events` at the moment the daemon starts must
#: not make the start fail, nor the daemon make the technician's command fail.
OPEN_WAIT_S = 10.0
#: SQLite's page cache per connection, KiB (its default: 2000): see ``_connect``
CACHE_KIB = 512


def _connect(path: Path, max_bytes: int | None) -> tuple[sqlite3.Connection, int]:
    """Open ``path`` in WAL mode and read its schema version, waiting out a busy file.

    SQLite's busy handler does not cover switching a new file into WAL mode, so a second
    opener at that instant gets "database is locked" at once: retried here until
    ``OPEN_WAIT_S``.
    """
    deadline = time.monotonic() + OPEN_WAIT_S
    while True:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a confirmed deposit survives power loss
            # SQLite's default page cache is 2 MB per connection, resident in the daemon
            # once the journal outgrows it; its hot pages (the session row, the outbox's
            # tail, the indexes' upper levels) fit in far less, and the kernel caches the rest
            db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            if max_bytes is not None:  # ``cabinet.journal_max_mb``: full before the disk is
                (page,) = db.execute("PRAGMA page_size").fetchone()
                db.execute(f"PRAGMA max_page_count = {max(1, max_bytes // int(page))}")
            return db, _stored_version(db)
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        except BaseException:
            db.close()
            raise


class JournalError(Exception):
    """The journal cannot be opened or written (disk full, permissions, corruption)."""


class JournalUnwritableError(JournalError):
    """A write failed for want of storage (disk full, I/O error, read-only): not a bug.

    The cabinet goes on without it — it refuses riders, visibly, and keeps polling —
    and resumes by itself once a write succeeds again (docs/swap.md).
    """


class JournalTooNewError(JournalError, ValueError):
    """The journal was written by a newer release: this one refuses to start on it.

    Also a ``ValueError``, so the command line prints it as one ``cabinet: error:``
    line rather than as an internal error: it is the installation, not a bug.
    """


#: Runtime state the controller still reads and writes under its old settings key:
#: since schema version 2 it lives in the ``pending_pickups`` table.
PENDING_PICKUPS_KEY = "pending_pickups"


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Run DDL statement by statement: ``executescript`` would commit the transaction."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _v1_first_journal(db: sqlite3.Connection) -> None:
    _run_script(db, _V1_SCHEMA)


def _v2_pending_pickups_table(db: sqlite3.Connection) -> None:
    # first the whole v1 schema: a journal labelled 1 may predate tables that release
    # added to it without a bump (``commands``) if it was never opened in between
    _run_script(db, _V1_SCHEMA)
    db.execute(
        "CREATE TABLE pending_pickups (bay INTEGER PRIMARY KEY, battery_id TEXT NOT NULL, "
        "rider_id TEXT, session_id TEXT)"
    )
    row = db.execute(
        "SELECT value FROM meta WHERE key = ?", (f"setting.{PENDING_PICKUPS_KEY}",)
    ).fetchone()
    if row is not None:
        Journal.put_pending_pickups(db, {int(b): v for b, v in json.loads(row[0]).items()})
        db.execute("DELETE FROM meta WHERE key = ?", (f"setting.{PENDING_PICKUPS_KEY}",))


def _v3_telemetry_backlog_table(db: sqlite3.Connection) -> None:
    # AUTOINCREMENT: ids never come back after a delete, so id order is sample order
    db.execute(
        "CREATE TABLE telemetry_backlog (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "ts INTEGER NOT NULL, payload BLOB NOT NULL)"
    )


#: Runtime state the daemon keeps for itself (not settings a backend or operator chose):
#: which units are silent since when, the rider screen's issued QR challenges.
RUNTIME_STATE_KEYS = ("units_offline", "display_challenges")


def _v4_runtime_state_table(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE runtime_state (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for name in RUNTIME_STATE_KEYS:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (f"setting.{name}",)).fetchone()
        if row is not None:
            db.execute("INSERT INTO runtime_state VALUES (?, ?)", (name, row[0]))
            db.execute("DELETE FROM meta WHERE key = ?", (f"setting.{name}",))


def _v5_missing_batteries_keep_their_bay(db: sqlite3.Connection) -> None:
    # a battery missing before v5 kept no bay, and battery_missing is cleared by the bay
    # (journal_first._custody): take it from the alarm raised for it, while it is kept
    missing = db.execute(
        "SELECT battery_id FROM custody WHERE location = 'missing' AND bay IS NULL"
    )
    for (battery_id,) in missing.fetchall():
        row = db.execute(
            "SELECT json_extract(payload, '$.bay') FROM events WHERE type = 'alarm.raised'"
            " AND json_extract(payload, '$.kind') = 'battery_missing'"
            " AND json_extract(payload, '$.detail') = ? ORDER BY seq DESC LIMIT 1",
            (f"{battery_id} left its bay without a session",),
        ).fetchone()
        if row is not None and row[0] is not None:
            db.execute("UPDATE custody SET bay = ? WHERE battery_id = ?", (row[0], battery_id))


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered step of the schema: ``apply`` brings version - 1 to ``version``."""

    version: int
    why: str
    apply: Callable[[sqlite3.Connection], None]


#: From an empty file to the current schema, in order; append, never edit a released step.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the first journal: sessions, custody, outbox, tokens", _v1_first_journal),
    Migration(2, "pending pickups in their own table, not in settings", _v2_pending_pickups_table),
    Migration(3, "telemetry held through a broker outage", _v3_telemetry_backlog_table),
    Migration(4, "runtime state in its own table, not in settings", _v4_runtime_state_table),
    Migration(
        5,
        "a missing battery keeps the bay it was last seen in",
        _v5_missing_batteries_keep_their_bay,
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def _stored_version(db: sqlite3.Connection) -> int:
    """``meta.schema_version``, 0 for an empty file (or one cut short before its first step)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None:
            try:
                return int(row[0])
            except ValueError:
                raise JournalError(f"unreadable schema version {row[0]!r}") from None
    return 0


@dataclass(frozen=True, slots=True)
class HeldSample:
    """A telemetry sample waiting for the broker: ``id`` orders them, ``ts`` is when taken."""

    id: int
    ts: int
    payload: bytes


#: SQLite's primary result codes that mean "the storage let us down", not "a bug":
#: SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB
_STORAGE_CODES = frozenset({8, 10, 11, 13, 14, 26})
PROBE_INTERVAL_S = 1.0  # an unwritable journal is re-tried at most this often (two fsyncs)
PROBE_BYTES = 64 * 1024  # room for a swap's worth of events before saying "writable again"
#: Below this much room (disk or ``journal_max_mb``) no new session starts: a swap
#: journals a few KiB, and one that cannot journal half-way has a door open and a
#: battery in flight with nothing recorded. Far better to refuse the rider at the scan.
LOW_WATER_BYTES = 256 * 1024


def _storage_failure(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _STORAGE_CODES


def state_to_json(state: SwapState) -> str:
    """Serialise the machine state for the journal."""
    return json.dumps(asdict(state))


def state_from_json(text: str) -> SwapState:
    """Rebuild a machine state written by ``state_to_json``."""
    raw = json.loads(text)
    obs = raw["in_return_bay"]
    return SwapState(
        phase=Phase(raw["phase"]),
        session_id=raw["session_id"],
        rider_id=raw["rider_id"],
        mode=Mode(raw["mode"]),
        return_bays=tuple(raw["return_bays"]),
        dispensable=tuple(Candidate(**c) for c in raw["dispensable"]),
        in_return_bay=BatteryObs(**obs) if obs is not None else None,
        deposited=raw["deposited"],
        dispensed=raw["dispensed"],
        taken_back=raw["taken_back"],
        return_battery_id=raw.get("return_battery_id"),
    )


def snapshot_to_json(snapshot: BaySnapshot) -> str:
    """Serialise a bay snapshot."""
    return json.dumps(asdict(snapshot))


def snapshot_from_json(text: str) -> BaySnapshot:
    """Rebuild a bay snapshot."""
    raw = json.loads(text)
    battery = raw.pop("battery")
    return BaySnapshot(**raw, battery=BatteryObs(**battery) if battery is not None else None)


class Journal:
    """One SQLite database in WAL mode; every write method commits atomically."""

    def __init__(self, path: Path, *, max_bytes: int | None = None) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # created 0600 whatever the umask; SQLite gives -wal and -shm the database's mode
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                os.fchmod(fd, 0o600)
                os.close(fd)
            self._db, version = _connect(path, max_bytes)
        except (sqlite3.Error, OSError, JournalError) as exc:
            raise JournalError(f"cannot open the journal at {path}: {exc}") from exc
        self.path = path
        #: why the last write failed for want of storage ("database or disk is full"), or
        #: None once a write succeeds; the controller refuses riders while it is set
        self.problem: str | None = None
        self._last_probe = float("-inf")
        self._depth = 0  # transactions open: nested ones join the outermost
        self._after_commit: list[Callable[[], None]] = []
        self._after_rollback: list[Callable[[], None]] = []
        if version > SCHEMA_VERSION:
            self._db.close()
            raise JournalTooNewError(
                f"the journal at {path} has schema version {version}, newer than this cabinet "
                f"software understands ({SCHEMA_VERSION}): a newer release wrote it. Run that "
                "release again, or move the journal aside to start an empty one (its unsent "
                "events and custody ledger would then be lost)"
            )
        if version < SCHEMA_VERSION:
            self._migrate(announce=version > 0)

    def _migrate(self, *, announce: bool) -> None:
        """Run the steps this file has not had, each once, each with its version bump.

        The version is read again inside each step's transaction: another process
        opening the same file at the same moment (``cabinet events`` during a start)
        then finds the step done and skips it.
        """
        for step in MIGRATIONS:
            try:
                with self.transaction() as db:
                    if _stored_version(db) >= step.version:
                        continue
                    step.apply(db)
                    db.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                        (str(step.version),),
                    )
            except (sqlite3.Error, JournalError, ValueError, TypeError) as exc:
                self._db.close()
                raise JournalError(
                    f"cannot migrate the journal at {self.path} to schema version "
                    f"{step.version} ({step.why}): {exc}"
                ) from exc
            if announce:  # a new journal is just created, not migrated
                log.info("journal_migrated", version=step.version, why=step.why)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit: all of it is on disk, or none of it.

        A write that fails for want of storage raises ``JournalUnwritableError`` with
        SQLite's own reason (disk full), and sets ``problem`` until a write succeeds.
        """
        if self._depth:  # nested: a savepoint, committed (or not) with the enclosing unit
            name = f"nested{self._depth}"
            self._db.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield self._db
            except BaseException:
                try:
                    if self._db.in_transaction:
                        self._db.execute(f"ROLLBACK TO {name}")
                        self._db.execute(f"RELEASE {name}")
                except sqlite3.Error as exc:  # the outermost unit rolls back and says why
                    log.error("journal_rollback_failed", error=str(exc))
                raise
            else:
                self._db.execute(f"RELEASE {name}")
            finally:
                self._depth -= 1
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if _storage_failure(exc):
                raise self._unwritable(exc) from exc
            raise JournalError(f"journal unavailable: {exc}") from exc
        self._depth = 1
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as exc:
            self._rollback()
            undo, self._after_rollback, self._after_commit = self._after_rollback, [], []
            for action in reversed(undo):
                action()
            if _storage_failure(exc):
                raise self._unwritable(exc) from exc
            raise
        finally:
            self._depth = 0
        done, self._after_commit, self._after_rollback = self._after_commit, [], []
        for action in done:
            action()
        if self.problem is not None:
            log.info("journal_writable_again", was=self.problem)
            self.problem = None

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the current transaction is on disk (never if rolled back).

        Outside a transaction it runs at once. An effect outside the database (a door
        unlocked) is thereby never done for something the journal does not hold.
        """
        if self._depth:
            self._after_commit.append(action)
        else:
            action()

    def after_rollback(self, action: Callable[[], None]) -> None:
        """Run ``action`` if the current (outermost) transaction is rolled back."""
        if self._depth:
            self._after_rollback.append(action)

    @property
    def nested(self) -> bool:
        """Whether a transaction is open (a new ``transaction()`` joins it)."""
        return self._depth > 0

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR): a
        # ROLLBACK then fails with "no transaction is active" and would hide the real error
        if not self._db.in_transaction:
            return
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("journal_rollback_failed", error=str(exc))

    def _unwritable(self, exc: BaseException) -> JournalUnwritableError:
        if self.problem is None:  # once per episode: the scans and polls that follow say nothing
            log.error("journal_unwritable", error=str(exc), path=str(self.path))
        self.problem = str(exc)
        return JournalUnwritableError(f"the journal cannot be written: {exc}")

    def trouble(self, now: float) -> str | None:
        """Why a whole swap could not be journaled now (disk full, I/O error), or None.

        Cheap while all is well (a ``statvfs`` and three pragmas, no write); after a
        failed write it re-tries (``writable``) so the cabinet resumes by itself.
        """
        if not self.writable(now):
            return self.problem
        room = self.room()
        if room < LOW_WATER_BYTES:
            return f"only {room // 1024} KiB left for the journal (database or disk is full)"
        return None

    def room(self) -> int:
        """Bytes the journal can still grow by: free disk space, and ``journal_max_mb``."""
        try:
            disk = os.statvfs(self.path.parent)
            room = disk.f_bavail * disk.f_frsize
            (page,) = self._db.execute("PRAGMA page_size").fetchone()
            (count,) = self._db.execute("PRAGMA page_count").fetchone()
            (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
            (cap,) = self._db.execute("PRAGMA max_page_count").fetchone()
        except (OSError, sqlite3.Error):
            return 0
        return int(min(room + free * page, (cap - count + free) * page))

    def writable(self, now: float) -> bool:
        """Whether writes succeed; when they did not, try again (at most once a second).

        The probe claims ``PROBE_BYTES`` and gives them back, so "writable again" means
        there is room for more than one small event, not just a lucky free page.
        """
        if self.problem is None:
            return True
        if now - self._last_probe < PROBE_INTERVAL_S:
            return False
        self._last_probe = now
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('space_probe', zeroblob(?))",
                    (PROBE_BYTES,),
                )
            with self.transaction() as db:
                db.execute("DELETE FROM meta WHERE key = 'space_probe'")
        except JournalError:
            return False
        return True

    # -- writes (inside a transaction) ------------------------------------------------------

    @staticmethod
    def put_session(db: sqlite3.Connection, state: SwapState, now: float) -> None:
        """Record the active session's state (started on first sight)."""
        db.execute(
            "INSERT INTO sessions (id, rider_id, mode, state, started_at) VALUES (?,?,?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET state = excluded.state",
            (state.session_id, state.rider_id, state.mode.value, state_to_json(state), now),
        )

    @staticmethod
    def end_session(db: sqlite3.Connection, session_id: str, outcome: str, now: float) -> None:
        """Mark a session finished with its outcome (``completed`` or the failure reason)."""
        db.execute(
            "UPDATE sessions SET ended_at = ?, outcome = ? WHERE id = ? AND ended_at IS NULL",
            (now, outcome, session_id),
        )
        db.execute("DELETE FROM timers")

    @staticmethod
    def set_timer(db: sqlite3.Connection, timer: Timer, deadline: float) -> None:
        """Record a running timer's wall-clock deadline."""
        db.execute("INSERT OR REPLACE INTO timers VALUES (?, ?)", (timer.value, deadline))

    @staticmethod
    def cancel_timer(db: sqlite3.Connection, timer: Timer) -> None:
        """Forget a timer."""
        db.execute("DELETE FROM timers WHERE name = ?", (timer.value,))

    @staticmethod
    def put_custody(db: sqlite3.Connection, battery_id: str, loc: Location, now: float) -> None:
        """Record where a battery is."""
        db.execute(
            "INSERT OR REPLACE INTO custody VALUES (?,?,?,?,?,?)",
            (battery_id, loc.where.value, loc.bay, loc.rider_id, loc.session_id, now),
        )

    @staticmethod
    def put_snapshot(db: sqlite3.Connection, bay: int, snapshot: BaySnapshot) -> None:
        """Record the last bay state acted upon (the reconciliation baseline)."""
        db.execute(
            "INSERT OR REPLACE INTO bay_snapshots VALUES (?, ?)", (bay, snapshot_to_json(snapshot))
        )

    @staticmethod
    def set_service(db: sqlite3.Connection, bay: int, *, in_service: bool, reason: str) -> None:
        """Take a bay out of service or put it back."""
        db.execute(
            "INSERT OR REPLACE INTO bay_service VALUES (?,?,?)", (bay, int(in_service), reason)
        )

    @staticmethod
    def add_event(
        db: sqlite3.Connection, type_: str, payload: dict[str, Any], ts_ms: int
    ) -> dict[str, Any]:
        """Append an event to the outbox with the next ``seq`` and a fresh ``id``."""
        (last,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        stored = db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
        seq = max(int(last), int(stored[0]) if stored else 0) + 1
        event_id = str(uuid.uuid4())
        db.execute(
            "INSERT INTO events VALUES (?,?,?,?,?)",
            (seq, event_id, type_, ts_ms, json.dumps(payload)),
        )
        db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(seq),))
        return {"seq": seq, "id": event_id, "type": type_, "ts": ts_ms, **payload}

    # -- the outbox ---------------------------------------------------------------------------

    def _published_upto(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'published_upto'").fetchone()
        return int(row[0]) if row else 0

    def unpublished(self, limit: int) -> list[dict[str, Any]]:
        """Events the broker has not acknowledged yet, oldest first."""
        return self.events(after_seq=self._published_upto(), limit=limit)

    def mark_published(self, upto_seq: int) -> None:
        """The broker acknowledged every event up to ``upto_seq`` (PUBACK, in order).

        Published events are kept (``cabinet events`` shows history) up to
        ``EVENT_HISTORY`` of them; older ones are pruned. Unpublished events never are.
        """
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('published_upto', ?)", (str(upto_seq),))
            db.execute("DELETE FROM events WHERE seq <= ?", (upto_seq - EVENT_HISTORY,))

    def outbox_depth(self) -> int:
        """How many events wait for the broker."""
        (depth,) = self._db.execute(
            "SELECT COUNT(*) FROM events WHERE seq > ?", (self._published_upto(),)
        ).fetchone()
        return int(depth)

    # -- commands (idempotent by request_id) ---------------------------------------------------

    def command_reply(self, request_id: str) -> dict[str, Any] | None:
        """The reply already sent for ``request_id``, if it was handled before."""
        row = self._db.execute(
            "SELECT reply FROM commands WHERE request_id = ?", (request_id,)
        ).fetchone()
        return json.loads(row[0]) if row else None

    @staticmethod
    def put_command_reply(
        db: sqlite3.Connection, request_id: str, reply: dict[str, Any], now: float
    ) -> None:
        """Remember the reply to ``request_id`` (inside the command's transaction).

        The memory is an idempotency *window*, not a history: replies older than
        ``COMMAND_WINDOW_S`` or beyond the newest ``COMMAND_WINDOW_MAX`` are forgotten, so a
        backend polling ``state.get`` with fresh ids cannot grow the flash forever.
        """
        db.execute(
            "INSERT OR REPLACE INTO commands VALUES (?, ?, ?)", (request_id, json.dumps(reply), now)
        )
        db.execute("DELETE FROM commands WHERE at < ?", (now - COMMAND_WINDOW_S,))
        # rowids grow with every insert (a replaced id gets a new one): the oldest go first
        db.execute(
            "DELETE FROM commands WHERE rowid <= (SELECT max(rowid) FROM commands) - ?",
            (COMMAND_WINDOW_MAX,),
        )

    def command_memory(self) -> int:
        """How many command replies are remembered (bounded by the idempotency window)."""
        (count,) = self._db.execute("SELECT count(*) FROM commands").fetchone()
        return int(count)

    # -- runtime settings ----------------------------------------------------------------------

    def setting(self, key: str) -> Any:
        """A runtime setting changed by the backend, or None."""
        row = self._db.execute(
            "SELECT value FROM meta WHERE key = ?", (f"setting.{key}",)
        ).fetchone()
        return json.loads(row[0]) if row else None

    @staticmethod
    def put_setting(db: sqlite3.Connection, key: str, value: Any) -> None:
        """Persist a runtime setting."""
        db.execute(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"setting.{key}", json.dumps(value))
        )

    # -- runtime state ---------------------------------------------------------------------------

    def runtime_state(self, name: str) -> Any:
        """What the daemon kept for itself under ``name`` (RUNTIME_STATE_KEYS), or None."""
        row = self._db.execute("SELECT value FROM runtime_state WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else None

    @staticmethod
    def put_runtime_state(db: sqlite3.Connection, name: str, value: Any) -> None:
        """Keep ``value`` under ``name``, in the caller's transaction."""
        db.execute("INSERT OR REPLACE INTO runtime_state VALUES (?, ?)", (name, json.dumps(value)))

    # -- runtime state: pickups in doubt ---------------------------------------------------------

    def pending_pickups(self) -> dict[int, list[str]]:
        """Dispense bays that went silent with the door open: bay -> [battery, rider, session].

        Settled (the battery went with the rider, or it is still there) when the bay's
        board answers again; kept across restarts until then.
        """
        rows = self._db.execute(
            "SELECT bay, battery_id, rider_id, session_id FROM pending_pickups ORDER BY bay"
        )
        return {bay: [battery, rider, session] for bay, battery, rider, session in rows}

    @staticmethod
    def put_pending_pickups(
        db: sqlite3.Connection, pickups: Mapping[int, Sequence[str | None]]
    ) -> None:
        """Replace the pickups in doubt with ``pickups`` (inside the step's transaction)."""
        db.execute("DELETE FROM pending_pickups")
        db.executemany(
            "INSERT INTO pending_pickups VALUES (?, ?, ?, ?)",
            [(int(bay), *entry) for bay, entry in pickups.items()],
        )

    # -- telemetry held for the broker ------------------------------------------------------------

    def hold_telemetry(self, ts_ms: int, payload: bytes, keep: int) -> int:
        """Keep a sample until the broker acknowledges it; the newest ``keep`` at most.

        Returns how many of the oldest samples were dropped to stay within ``keep``.
        """
        with self.transaction() as db:
            db.execute(
                "INSERT INTO telemetry_backlog (ts, payload) VALUES (?, ?)", (ts_ms, payload)
            )
            dropped = db.execute(
                "DELETE FROM telemetry_backlog WHERE id <= "
                "(SELECT max(id) FROM telemetry_backlog) - ?",
                (max(1, keep),),
            ).rowcount
        return int(dropped)

    def held_telemetry(self, limit: int) -> list[HeldSample]:
        """The oldest samples the broker has not acknowledged yet, in the order taken."""
        rows = self._db.execute(
            "SELECT id, ts, payload FROM telemetry_backlog ORDER BY id LIMIT ?", (limit,)
        )
        return [HeldSample(id_, ts, bytes(payload)) for id_, ts, payload in rows]

    def release_telemetry(self, upto_id: int) -> None:
        """The broker acknowledged every held sample up to ``upto_id`` (PUBACK, in order)."""
        with self.transaction() as db:
            db.execute("DELETE FROM telemetry_backlog WHERE id <= ?", (upto_id,))

    def telemetry_backlog(self) -> int:
        """How many telemetry samples wait for the broker."""
        (count,) = self._db.execute("SELECT count(*) FROM telemetry_backlog").fetchone()
        return int(count)

    # -- token replay cache -----------------------------------------------------------------

    def token_spent(self, nonce: str) -> bool:
        """Whether a token's nonce was spent on a session (a replay)."""
        try:
            row = self._db.execute("SELECT 1 FROM used_tokens WHERE nonce = ?", (nonce,))
            return row.fetchone() is not None
        except sqlite3.Error as exc:
            raise JournalError(f"journal unavailable: {exc}") from exc

    @staticmethod
    def spend_token(db: sqlite3.Connection, nonce: str, expires: int, now: int) -> None:
        """Spend a token's nonce in ``db``'s transaction: the one that starts its session.

        A token refused before any door opens is never spent and can be scanned again.
        Nonces are kept until their expiry plus the allowed clock skew, and pruned only on
        a wall clock that has not gone back since the last prune: a token still valid by
        a clock stepped back stays a replay.
        """
        row = db.execute("SELECT value FROM meta WHERE key = 'tokens.pruned_at'").fetchone()
        if row is None or now >= int(json.loads(row[0])):
            db.execute("DELETE FROM used_tokens WHERE expires < ?", (now - CLOCK_SKEW_S,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('tokens.pruned_at', ?)", (str(now),))
        db.execute("INSERT INTO used_tokens VALUES (?, ?)", (nonce, expires))

    # -- reads ------------------------------------------------------------------------------

    def active_session(self) -> SwapState | None:
        """The session that was running when the daemon stopped, if any."""
        row = self._db.execute(
            "SELECT state FROM sessions WHERE ended_at IS NULL ORDER BY started_at DESC LIMIT 1"
        ).fetchone()
        return state_from_json(row[0]) if row else None

    def timers(self) -> dict[Timer, float]:
        """Running timers and their deadlines."""
        return {Timer(n): d for n, d in self._db.execute("SELECT name, deadline FROM timers")}

    def ledger(self, *, identity_grace_s: float = IDENTITY_GRACE_S) -> CustodyLedger:
        """The custody ledger as last committed."""
        rows = self._db.execute(
            "SELECT battery_id, location, bay, rider_id, session_id FROM custody"
        )
        return CustodyLedger(
            {
                battery_id: Location(Where(where), bay=bay, rider_id=rider, session_id=session)
                for battery_id, where, bay, rider, session in rows
            },
            identity_grace_s=identity_grace_s,
        )

    def snapshots(self) -> dict[int, BaySnapshot]:
        """The last bay states acted upon."""
        return {
            bay: snapshot_from_json(s)
            for bay, s in self._db.execute("SELECT bay, snapshot FROM bay_snapshots")
        }

    def out_of_service(self) -> dict[int, str]:
        """Bays out of service, with the reason."""
        return {
            bay: reason
            for bay, in_service, reason in self._db.execute(
                "SELECT bay, in_service, reason FROM bay_service"
            )
            if not in_service
        }

    def events(self, after_seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Events with ``seq`` greater than ``after_seq``, oldest first."""
        rows = self._db.execute(
            "SELECT seq, id, type, ts, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [
            {"seq": seq, "id": id_, "type": type_, "ts": ts, **json.loads(payload)}
            for seq, id_, type_, ts, payload in rows
        ]

    def last_event(self) -> dict[str, Any] | None:
        """The newest event, if any (the clock check compares against its ``ts``)."""
        row = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        if row[0] is None:
            return None
        found = self.events(after_seq=int(row[0]) - 1, limit=1)
        return found[0] if found else None

    def sessions(self) -> list[dict[str, Any]]:
        """Every session with its outcome (None while running)."""
        rows = self._db.execute(
            "SELECT id, rider_id, mode, started_at, ended_at, outcome FROM sessions "
            "ORDER BY started_at"
        )
        keys = ("id", "rider_id", "mode", "started_at", "ended_at", "outcome")
        return [dict(zip(keys, row, strict=True)) for row in rows]
