"""Which events a consumer group has processed: the de-duplication that survives restarts.

Delivery from the cabinets is at-least-once (DESIGN.md §3.5): an event may arrive again
after a cabinet's reconnect, or after a consumer's own restart (the broker resends what
it had not seen acknowledged). Every consumer of a group records an event's ``id`` here
*before* acknowledging it, in one SQLite file per group (WAL, shared by the group's
consumers on one machine; a real backend would use its own database the same way): an
id already recorded is a duplicate, whoever received it first.

Bounded by age: an id is kept ``window_s`` after it was first recorded (default a week)
and forgotten after that, so the file holds about one window of events (~150 bytes
each) instead of growing for ever. A duplicate comes back within the time its sender
was away: a consumer's restart (its broker session lasts an hour) or a cabinet's outage
(its outbox resends what had no PUBACK when it comes back). The window must be longer
than the longest of those a fleet tolerates; a duplicate arriving later than that is
processed again. Forgotten ids are pruned when the store opens and every
``PRUNE_EVERY`` new ids.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    id TEXT PRIMARY KEY,
    cabinet_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    consumer TEXT NOT NULL,
    seen_at REAL NOT NULL
)
"""
BUSY_TIMEOUT_S = 10.0  # the group's consumers take turns writing; none waits longer
#: How long an id is remembered: a cabinet away for up to a week still has its resent
#: events recognised. ~150 bytes an event (measured): a busy cabinet (2.7 events a minute,
#: docs/mqtt.md "Scaling out") keeps ~4 MB in the file, a quiet one next to nothing
DEFAULT_WINDOW_S = 7 * 24 * 3600.0
#: New ids between two prunes: one DELETE on the ``seen_at`` index per this many inserts
PRUNE_EVERY = 1000


def store_path(state_dir: Path, group: str) -> Path:
    """The group's file in a state directory."""
    return state_dir / f"seen-{group}.sqlite"


class SeenEvents:
    """The ids a group has processed, persisted; one instance per consumer (connection)."""

    def __init__(
        self,
        path: Path,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``window_s``: how long an id is remembered; ``clock``: wall time (tests move it)."""
        if window_s <= 0:
            raise ValueError(f"the de-duplication window must be positive, not {window_s:g} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.window_s = window_s
        self._clock = clock
        # autocommit: each INSERT is its own durable transaction before the PUBACK
        self._db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)
        self._add_seen_at()
        self._db.execute("CREATE INDEX IF NOT EXISTS seen_by_age ON seen (seen_at)")
        self._inserts = 0
        self.prune()

    def _add_seen_at(self) -> None:
        """A file from before the bound has no ``seen_at``: its ids count as seen now."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(seen)")}
        if "seen_at" not in columns:
            self._db.execute(
                f"ALTER TABLE seen ADD COLUMN seen_at REAL NOT NULL DEFAULT {self._clock()!r}"
            )

    def first_time(self, event_id: str, cabinet_id: str, seq: int, consumer: str) -> bool:
        """Record the event; False if the group had processed it within the window."""
        now = self._clock()
        cursor = self._db.execute(
            "INSERT INTO seen (id, cabinet_id, seq, consumer, seen_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET cabinet_id = excluded.cabinet_id,"
            " seq = excluded.seq, consumer = excluded.consumer, seen_at = excluded.seen_at"
            " WHERE seen.seen_at < ?",
            (event_id, cabinet_id, seq, consumer, now, now - self.window_s),
        )
        if cursor.rowcount != 1:
            return False
        self._inserts += 1
        if self._inserts % PRUNE_EVERY == 0:
            self.prune()
        return True

    def prune(self) -> int:
        """Forget the ids recorded longer than the window ago; how many were forgotten."""
        cutoff = self._clock() - self.window_s
        return self._db.execute("DELETE FROM seen WHERE seen_at < ?", (cutoff,)).rowcount

    def processed_by(self) -> dict[str, str]:
        """Every remembered id and the consumer that processed it."""
        return dict(self._db.execute("SELECT id, consumer FROM seen").fetchall())

    def __len__(self) -> int:
        """Ids remembered now: what the file's size follows."""
        return int(self._db.execute("SELECT count(*) FROM seen").fetchone()[0])

    def close(self) -> None:
        """Release the file."""
        self._db.close()
