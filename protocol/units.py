"""Modbus unit ids on the cabinet's RS-485 bus.

Bays take 1-12 so that a bay's number is its unit id (a technician reading a bus
trace needs no table); the cabinet board and the meter sit above the bay range.
"""

from __future__ import annotations

BAY_COUNT = 12
BAY_UNITS: tuple[int, ...] = tuple(range(1, BAY_COUNT + 1))
CABINET_BOARD_UNIT = 20
ENERGY_METER_UNIT = 21
ALL_UNITS: tuple[int, ...] = (*BAY_UNITS, CABINET_BOARD_UNIT, ENERGY_METER_UNIT)


def unit_name(unit: int) -> str:
    """Name a unit the way a technician would say it."""
    if unit in BAY_UNITS:
        return f"bay {unit}"
    if unit == CABINET_BOARD_UNIT:
        return "cabinet board"
    if unit == ENERGY_METER_UNIT:
        return "energy meter"
    return f"unit {unit}"
