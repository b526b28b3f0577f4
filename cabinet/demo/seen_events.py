"""Which events a consumer group has processed: the de-duplication that survives restarts.

Delivery from the cabinets is at-least-once (DESIGN.md §3.5): an event may arrive again
after a cabinet's reconnect, or after a consumer's own restart (the broker resends what
it had not seen acknowledged). Every consumer of a group records an event's ``id`` here
*before* acknowledging it, in one SQLite file per group (WAL, shared by the group's
consumers on one machine; a real backend would use its own database the same way): an
id already recorded is a duplicate, whoever received it first.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    id TEXT PRIMARY KEY,
    cabinet_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    consumer TEXT NOT NULL
)
"""
BUSY_TIMEOUT_S = 10.0  # the group's consumers take turns writing; none waits longer


def store_path(state_dir: Path, group: str) -> Path:
    """The group's file in a state directory."""
    return state_dir / f"seen-{group}.sqlite"


class SeenEvents:
    """The ids a group has processed, persisted; one instance per consumer (connection)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit: each INSERT is its own durable transaction before the PUBACK
        self._db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)

    def first_time(self, event_id: str, cabinet_id: str, seq: int, consumer: str) -> bool:
        """Record the event; False if the group had processed it already."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO seen (id, cabinet_id, seq, consumer) VALUES (?, ?, ?, ?)",
            (event_id, cabinet_id, seq, consumer),
        )
        return cursor.rowcount == 1

    def processed_by(self) -> dict[str, str]:
        """Every recorded id and the consumer that processed it."""
        return dict(self._db.execute("SELECT id, consumer FROM seen").fetchall())

    def close(self) -> None:
        """Release the file."""
        self._db.close()
