"""The one door for journal writes outside the journal-first step, as a type.

``CabinetController.record`` is the door (the fleet link, the control server and the
firmware service call it); the bookkeeping split from the controller (bus truth, the
journal alarm) is handed it as a ``Record``, never the journal's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, Protocol

#: One event for ``record``: its type and payload.
EventRecord = tuple[str, dict[str, Any]]


class Record(Protocol):
    """Journal ``events`` (and ``change``, state that goes with them) in one transaction."""

    def __call__(
        self, *events: EventRecord, change: Callable[[sqlite3.Connection], None] | None = None
    ) -> None:
        """Raises ``JournalError`` when the journal cannot take them."""
