"""Turning successive bay reports into the events the swap machine understands.

Polling sees states, the machine wants changes. ``diff`` compares the previous
and the current snapshot of a bay and emits events in one canonical order (door
opened, battery removed, battery inserted, door closed), inferring a door
opening that happened between two polls when the battery changed behind a door
that reads shut both times. The same function reconciles after a restart: the
journaled snapshot against the first fresh one covers whatever happened while
the daemon was down.
"""

from __future__ import annotations

from dataclasses import dataclass

from cabinet.core.battery_rules import BatteryObs
from cabinet.core.swap_machine import (
    BatteryInserted,
    BatteryRemoved,
    BayOffline,
    DoorClosed,
    DoorOpened,
    Event,
    LockJammed,
)
from protocol import bay_map


@dataclass(frozen=True, slots=True)
class BaySnapshot:
    """What the daemon last knew about a bay; ``online`` False means its board is silent."""

    online: bool
    door_closed: bool = True
    locked: bool = True
    battery_present: bool = False
    battery: BatteryObs | None = None
    lock_jammed: bool = False
    charging: bool = False
    bay_temp_c: float = 25.0

    @property
    def battery_id(self) -> str | None:
        """The identified battery's id, if any."""
        return self.battery.battery_id if self.battery is not None else None


OFFLINE = BaySnapshot(online=False)


def snapshot_from_status(status: bay_map.BayStatus) -> BaySnapshot:
    """Reduce a decoded status block to what the swap logic and ledger need."""
    info = status.battery
    battery: BatteryObs | None = None
    if info is not None:
        battery = BatteryObs(
            battery_id=info.battery_id,
            plugged=True,
            soc_pct=info.soc_pct,
            health_pct=info.health_pct,
            cell_temp_c=info.cell_temp_c,
            faulted=bool(info.faults),
            cycle_count=info.cycle_count,
        )
    elif status.battery_present:
        plugged = bay_map.IoFlag.BMS_LINK in status.io
        battery = BatteryObs(battery_id=None, plugged=plugged)
    return BaySnapshot(
        online=True,
        door_closed=status.door_closed,
        locked=status.locked,
        battery_present=status.battery_present,
        battery=battery,
        lock_jammed=bay_map.BoardFault.LOCK_JAMMED in status.board_faults,
        charging=status.charging,
        bay_temp_c=status.bay_temp_c,
    )


def diff(bay: int, prev: BaySnapshot | None, cur: BaySnapshot) -> list[Event]:
    """Events that take a bay from ``prev`` to ``cur``, in canonical order."""
    if not cur.online:
        return [BayOffline(bay)] if prev is None or prev.online else []
    if prev is None or not prev.online:
        prev = None
    if prev is None:
        return []
    events: list[Event] = []
    removed = prev.battery_present and (
        not cur.battery_present
        or (prev.battery_id is not None and cur.battery_id not in (None, prev.battery_id))
    )
    inserted = cur.battery_present and (removed or not prev.battery_present)
    # The same battery now reads differently in any field a rule reads (identity, plug,
    # fault bits, temperature, SoC, health, cycles): the machine judges a deposit, and
    # re-judges it while the door is open, on the latest reading, so it must hear of
    # every change -- a pack that faults or heats up after its first reading but before
    # the door shuts must not be accepted on that first reading.
    reads_differently = (
        not removed
        and not inserted
        and cur.battery is not None
        and prev.battery is not None
        and cur.battery != prev.battery
    )
    opened = not prev.door_closed or not cur.door_closed or removed or inserted
    if prev.door_closed and opened:
        events.append(DoorOpened(bay))
    if removed:
        events.append(BatteryRemoved(bay, prev.battery_id))
    if (inserted or reads_differently) and cur.battery is not None:
        events.append(BatteryInserted(bay, cur.battery))
    if cur.door_closed and (not prev.door_closed or (opened and prev.door_closed)):
        events.append(DoorClosed(bay))
    if cur.lock_jammed and not prev.lock_jammed:
        events.append(LockJammed(bay))
    return events
