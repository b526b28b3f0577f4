"""Pickups in doubt: a dispense bay went silent while its door was open for the rider.

Whether the rider took the battery is unknown until the bay's board answers again;
the door was opened for them, so if the battery is gone then, it went with them
(custody to the rider, not "missing" — found by the virtual fault campaign, seed
105). The doubt is runtime state in the journal's own table
(``Journal.pending_pickups``), written in the step's transaction and kept across
restarts until the bay answers.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from cabinet.core.bay_tracker import BaySnapshot
from cabinet.core.swap_machine import BayOffline, Event, Phase, SwapState
from cabinet.daemon.journal import Journal


@dataclass(frozen=True, slots=True)
class TakenWhileSilent:
    """A battery that left its bay with the rider while the bay's board was silent."""

    bay: int
    battery_id: str
    rider_id: str
    session_id: str


class PickupsInDoubt:
    """Dispense bays that went silent with the door open: bay -> [battery, rider, session]."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.bays: dict[int, list[str]] = journal.pending_pickups()

    def note(
        self, db: sqlite3.Connection, before: SwapState, after: SwapState, event: Event
    ) -> None:
        """Keep the pickup in doubt if ``event`` ended the session for a silent dispense bay."""
        if (
            isinstance(event, BayOffline)
            and before.phase is Phase.AWAITING_PICKUP
            and event.bay == before.dispense_bay
            and before.reserved is not None
            and after.phase is Phase.IDLE
        ):
            self.bays[event.bay] = [before.reserved, before.rider_id, before.session_id]
            self.journal.put_pending_pickups(db, self.bays)

    def settle(
        self, db: sqlite3.Connection, bay: int, snapshot: BaySnapshot
    ) -> TakenWhileSilent | None:
        """The bay answers again: the battery that went with the rider, if it is gone."""
        pending = self.bays.get(bay)
        if pending is None or (snapshot.battery_present and snapshot.battery_id is None):
            return None  # nothing in doubt, or the BMS has not said which battery sits there yet
        battery_id, rider_id, session_id = self.bays.pop(bay)
        self.journal.put_pending_pickups(db, self.bays)
        if snapshot.battery_id == battery_id:
            return None
        return TakenWhileSilent(bay, battery_id, rider_id, session_id)
