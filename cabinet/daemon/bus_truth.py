"""Bus truth: which units answer and whether the bus is there at all, journaled once.

The bay poller reports each unit's outcome here (answered, or isolated by the bus
after repeated silence) and a lost or reopened adapter. ``UnitPresence`` (pure,
``cabinet.core.unit_presence``) turns outcomes into news; this keeps that news and
the outages in progress in the journal (the outages outlive a restart, so a
restarted daemon neither repeats an offline event nor forgets how long an outage
lasted). Nothing here decides a session: a silent bay reaches the swap machine as
an ``OFFLINE`` reading through ``CabinetController.observe_bay``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from cabinet.core.unit_presence import PresenceEvent, UnitPresence
from cabinet.daemon.clock import Clock
from cabinet.daemon.journal import Journal, JournalError
from cabinet.daemon.journal_door import Record
from drivers.modbus_bus import BusUnavailableError

log = structlog.get_logger("controller")

#: The journal setting holding the outages in progress (``UnitPresence.as_json``).
UNITS_OFFLINE = "units_offline"


@dataclass(frozen=True, slots=True)
class BusOutage:
    """The adapter or gateway cannot be reached."""

    error: str
    since: float  # monotonic
    since_wall: float


class BusTruth:
    """Who answers and whether the bus is there: news once, journaled through ``record``."""

    def __init__(
        self, *, journal: Journal, clock: Clock, record: Record, offline_alarm_s: float
    ) -> None:
        self.journal = journal
        self.clock = clock
        self._record = record
        self.presence = UnitPresence.from_json(
            journal.runtime_state(UNITS_OFFLINE),
            offline_alarm_s=offline_alarm_s,
            now=clock.monotonic(),
            wall=clock.wall(),
        )
        self.bus_lost: BusOutage | None = None

    def unit_answered(self, unit: int) -> None:
        """``unit`` answered the poller: back online if it was not."""
        if unit not in self.presence.outages:
            return  # the common case, every reading: no copy of the presence record
        now, wall = self.clock.monotonic(), self.clock.wall()
        self._journal_presence(lambda p: p.answered(unit, now=now, wall=wall))

    def unit_silent(self, unit: int) -> None:
        """The bus isolated ``unit`` after repeated silence."""
        now, wall = self.clock.monotonic(), self.clock.wall()
        self._journal_presence(lambda p: p.silent(unit, now=now, wall=wall))

    def alarms_due(self) -> None:
        """Raise the alarms of units silent for ``offline_alarm_s`` (once a poll cycle)."""
        if not self.presence.outages:
            return  # the common case, every cycle: no copy of the presence record
        now = self.clock.monotonic()
        self._journal_presence(lambda p: p.due(now))

    def _journal_presence(self, change: Callable[[UnitPresence], list[PresenceEvent]]) -> None:
        """Journal a unit going silent, its alarm or its recovery, with the outages kept.

        The change is made on a copy, kept only once journaled: news the journal did not
        take is news again on the next reading, not lost.
        """
        presence = copy.deepcopy(self.presence)
        events = change(presence)
        if not events:
            self.presence = presence
            return
        try:
            self._record(
                *((event.type, event.data) for event in events),
                change=lambda db: self.journal.put_runtime_state(
                    db, UNITS_OFFLINE, presence.as_json()
                ),
            )
        except JournalError:
            return  # journal_unwritable is its own alarm; the log has the event lines
        self.presence = presence
        for event in events:
            level = log.info if event.type.endswith("online") else log.warning
            level("unit_presence", type=event.type, **event.data)

    def bus_unavailable(self, exc: BusUnavailableError) -> None:
        """The adapter or gateway is gone: news once; the poller reopens it."""
        if self.bus_lost is not None:
            return
        self.bus_lost = BusOutage(str(exc), self.clock.monotonic(), self.clock.wall())
        log.error("bus_lost", error=str(exc))
        with contextlib.suppress(JournalError):
            self._record(("bus.lost", {"error": str(exc)}))

    def bus_restored(self, tries: int) -> None:
        """The poller reopened the adapter: say how long it was gone."""
        lost, self.bus_lost = self.bus_lost, None
        assert lost is not None
        outage_s = round(self.clock.wall() - lost.since_wall, 1)
        log.info("bus_restored", outage_s=outage_s, tries=tries)
        with contextlib.suppress(JournalError):
            self._record(("bus.restored", {"outage_s": outage_s}))
