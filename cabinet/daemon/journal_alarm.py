"""The ``journal_unwritable`` alarm: raised while the journal refuses writes, cleared after.

Nothing is decided without the journal, so while it cannot be written no rider is
accepted (``CabinetController.refusal``) and the alarm stands: in ``status`` and
``state`` at once, in the event stream as soon as an event can be stored again —
a full disk usually refuses the alarm's own event too, so its ``alarm.raised`` is
stored late, together with its ``alarm.cleared``, rather than lost.
"""

from __future__ import annotations

import structlog

from cabinet.daemon.clock import Clock
from cabinet.daemon.journal import Journal, JournalError
from cabinet.daemon.journal_door import EventRecord, Record

log = structlog.get_logger("controller")


class JournalAlarm:
    """Whether the journal takes writes, and the alarm that says it does not."""

    def __init__(self, *, journal: Journal, clock: Clock, record: Record) -> None:
        self.journal = journal
        self.clock = clock
        self._record = record
        self.reason: str | None = None  # why the journal cannot be written (an alarm)
        self._stored = False  # its alarm.raised made it into the journal

    def writable(self) -> bool:
        """Whether the journal takes writes (re-tried while it does not)."""
        trouble = self.journal.trouble(self.clock.monotonic())
        if trouble is not None and self.reason is None:
            log.error("journal_unwritable_refusing_riders", reason=trouble)
            self.reason = trouble
            self._stored = self._store(raised=True, cleared=False)
        elif trouble is None and self.reason is not None:
            raised = not self._stored
            if self._store(raised=raised, cleared=True):
                log.info("journal_writable_accepting_riders")
                self.reason = None
        return trouble is None

    def _store(self, *, raised: bool, cleared: bool) -> bool:
        detail = f"the journal cannot be written: {self.reason}"
        events: list[EventRecord] = []
        if raised:
            events.append(
                ("alarm.raised", {"kind": "journal_unwritable", "bay": None, "detail": detail})
            )
        if cleared:
            events.append(
                (
                    "alarm.cleared",
                    {"kind": "journal_unwritable", "bay": None, "detail": "writable again"},
                )
            )
        try:
            self._record(*events)
        except JournalError:
            return False  # a full disk usually takes this too: stored once there is room
        return True
