"""The battery custody ledger: every battery the cabinet has known is somewhere.

A battery is in a bay, with a rider (named by the session that handed it over),
or flagged missing (it left a bay without a session handing it out) — never
nowhere. The swap machine moves batteries between bays and riders with custody
commands; the bays' reports then confirm or contradict the ledger, and a
contradiction is a change the operator hears about, not a silent overwrite.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Where(enum.StrEnum):
    """The kinds of place a battery can be."""

    BAY = "bay"
    RIDER = "rider"
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class Location:
    """Where one battery is."""

    where: Where
    bay: int | None = None
    rider_id: str | None = None
    session_id: str | None = None

    def describe(self) -> str:
        """Say it as an operator would read it."""
        if self.where is Where.BAY:
            return f"bay {self.bay}"
        if self.where is Where.RIDER:
            return f"rider {self.rider_id} (session {self.session_id})"
        return "missing"


@dataclass(frozen=True, slots=True)
class CustodyChange:
    """A move the ledger recorded; ``surprise`` marks one no session explains."""

    battery_id: str
    before: Location | None
    after: Location
    surprise: bool


class CustodyLedger:
    """Battery id -> location, with the rules for confirmed moves and observed ones."""

    def __init__(self, locations: dict[str, Location] | None = None) -> None:
        self._locations: dict[str, Location] = dict(locations or {})

    def __contains__(self, battery_id: str) -> bool:
        return battery_id in self._locations

    def location(self, battery_id: str) -> Location | None:
        """Where ``battery_id`` is, or None for a battery never seen."""
        return self._locations.get(battery_id)

    def items(self) -> Iterable[tuple[str, Location]]:
        """Every battery with its location."""
        return self._locations.items()

    def in_bay(self, bay: int) -> list[str]:
        """Batteries the ledger places in ``bay`` (normally zero or one)."""
        return [
            b for b, loc in self._locations.items() if loc.where is Where.BAY and loc.bay == bay
        ]

    def _move(self, battery_id: str, after: Location, *, surprise: bool) -> CustodyChange | None:
        before = self._locations.get(battery_id)
        if before == after:
            return None
        self._locations[battery_id] = after
        return CustodyChange(battery_id, before, after, surprise)

    def to_bay(self, battery_id: str, bay: int) -> CustodyChange | None:
        """A confirmed deposit: the battery is now in ``bay``."""
        return self._move(battery_id, Location(Where.BAY, bay=bay), surprise=False)

    def to_rider(self, battery_id: str, rider_id: str, session_id: str) -> CustodyChange | None:
        """A confirmed hand-over to a rider."""
        return self._move(
            battery_id,
            Location(Where.RIDER, rider_id=rider_id, session_id=session_id),
            surprise=False,
        )

    def observe_bay(
        self, bay: int, battery_id: str | None, *, present: bool, expected: bool = False
    ) -> list[CustodyChange]:
        """Reconcile the ledger with what ``bay`` reports now.

        An identified battery in the bay is recorded there (a surprise unless the
        ledger already said so). A battery the ledger placed here that is gone, with
        no session having handed it over, becomes missing. An unidentified battery
        (``present`` without an id) leaves recorded batteries where they are: the
        BMS may simply not have answered yet. ``expected`` marks a bay a session has
        open for a battery (the return bay): an arrival there is no surprise.
        """
        changes: list[CustodyChange] = []
        if battery_id is not None:
            change = self._move(battery_id, Location(Where.BAY, bay=bay), surprise=not expected)
            if change is not None:
                changes.append(change)
        for other in self.in_bay(bay):
            if other != battery_id and not (present and battery_id is None):
                change = self._move(other, Location(Where.MISSING), surprise=True)
                if change is not None:
                    changes.append(change)
        return changes
