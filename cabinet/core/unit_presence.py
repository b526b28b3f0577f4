"""Which units on the bus answer, and the news when one stops or starts again.

Sans-I/O: the controller reports each unit's outcome (answered, or silent — the bus
isolated it after ``bus.isolate_after`` failures in a row) with the time; this
answers with the events to journal. A unit going silent is news once
(``bay.offline`` / ``unit.offline``), an alarm once it stayed silent for
``offline_alarm_s`` (``board_silent`` with the bay, ``cabinet_board_silent``,
``meter_silent``), and its recovery is news once (``bay.online`` / ``unit.online``
with the outage's length; the alarm cleared). Nothing is repeated per poll.

The offline picture is kept as plain data (unit -> wall-clock since, alarmed) so
the controller can journal it and a restarted daemon neither repeats an offline
event nor loses the length of an outage that spanned the restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.units import CABINET_BOARD_UNIT, ENERGY_METER_UNIT

DEFAULT_OFFLINE_ALARM_S = 60.0  # a board rebooting or a brief wiring glitch is not an alarm

#: The role of each non-bay unit, as events and alarms name it.
ROLES = {CABINET_BOARD_UNIT: "cabinet_board", ENERGY_METER_UNIT: "meter"}


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """An event to journal: ``type`` and its ``data``."""

    type: str
    data: dict[str, Any]


@dataclass(slots=True)
class Outage:
    """A unit that is not answering."""

    since_wall: float  # for people and for the outage's length across restarts
    since: float  # monotonic, for the alarm delay
    alarmed: bool = False


def alarm_kind(unit: int) -> str:
    """The alarm raised for a unit silent too long."""
    role = ROLES.get(unit)
    return "board_silent" if role is None else f"{role}_silent"


def _who(unit: int) -> dict[str, Any]:
    role = ROLES.get(unit)
    return {"bay": unit} if role is None else {"unit": unit, "role": role}


def _kind_prefix(unit: int) -> str:
    return "bay" if unit not in ROLES else "unit"


@dataclass
class UnitPresence:
    """The outages in progress, by unit id."""

    offline_alarm_s: float = DEFAULT_OFFLINE_ALARM_S
    outages: dict[int, Outage] = field(default_factory=dict)

    def answered(self, unit: int, *, now: float, wall: float) -> list[PresenceEvent]:
        """``unit`` answered: news if it had been offline."""
        outage = self.outages.pop(unit, None)
        if outage is None:
            return []
        offline_s = round(max(0.0, wall - outage.since_wall), 1)
        events = [
            PresenceEvent(f"{_kind_prefix(unit)}.online", {**_who(unit), "offline_s": offline_s})
        ]
        if outage.alarmed:
            events.append(self._alarm(unit, active=False, detail=f"answering after {offline_s} s"))
        return events

    def silent(self, unit: int, *, now: float, wall: float) -> list[PresenceEvent]:
        """``unit`` was isolated by the bus: news the first time."""
        if unit in self.outages:
            return self.due(now)
        self.outages[unit] = Outage(since_wall=wall, since=now)
        return [PresenceEvent(f"{_kind_prefix(unit)}.offline", _who(unit)), *self.due(now)]

    def due(self, now: float) -> list[PresenceEvent]:
        """Alarms for outages that lasted ``offline_alarm_s``."""
        events = []
        for unit, outage in sorted(self.outages.items()):
            if not outage.alarmed and now - outage.since >= self.offline_alarm_s:
                outage.alarmed = True
                events.append(
                    self._alarm(unit, active=True, detail=f"silent for {now - outage.since:.0f} s")
                )
        return events

    def offline_since(self, unit: int) -> float | None:
        """Wall-clock time ``unit`` went silent, or None if it answers."""
        outage = self.outages.get(unit)
        return None if outage is None else outage.since_wall

    def _alarm(self, unit: int, *, active: bool, detail: str) -> PresenceEvent:
        role = ROLES.get(unit)
        return PresenceEvent(
            "alarm.raised" if active else "alarm.cleared",
            {"kind": alarm_kind(unit), "bay": None if role else unit, "detail": detail},
        )

    # -- what the journal keeps ---------------------------------------------------------------

    def as_json(self) -> dict[str, Any]:
        """The outages as journal-able data (wall-clock times only)."""
        return {
            str(unit): {"since": o.since_wall, "alarmed": o.alarmed}
            for unit, o in self.outages.items()
        }

    @classmethod
    def from_json(
        cls, data: Any, *, offline_alarm_s: float, now: float, wall: float
    ) -> UnitPresence:
        """The outages a previous run journaled, re-based on this run's monotonic clock."""
        presence = cls(offline_alarm_s=offline_alarm_s)
        if isinstance(data, dict):
            for unit, item in data.items():
                since_wall = float(item["since"])
                since = now - max(0.0, wall - since_wall)
                presence.outages[int(unit)] = Outage(since_wall, since, bool(item["alarmed"]))
        return presence
