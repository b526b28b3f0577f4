"""Which batteries the cabinet accepts from riders and which it may hand out (DESIGN.md §5).

Pure functions over what the bays report. The dispense rule is the safety rule
riders depend on most: never hand out a battery below the SoC threshold, faulted,
outside its temperature window or unidentified; among the rest prefer the best
health, then the coolest, then the fewest cycles.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatteryObs:
    """A battery as a bay sees it. ``battery_id`` is None when the BMS does not identify it."""

    battery_id: str | None
    plugged: bool
    soc_pct: float = 0.0
    health_pct: float = 0.0
    cell_temp_c: float = 25.0
    faulted: bool = False
    cycle_count: int = 0


@dataclass(frozen=True, slots=True)
class DepositRules:
    """What a returned battery must be for the cabinet to take it."""

    id_pattern: str = r"^BAT-[A-Z0-9-]{1,12}$"  # the fleet's serial format; others are foreign
    max_temp_c: float = 50.0  # a pack this hot must not be locked in with the others
    min_temp_c: float = -10.0


@dataclass(frozen=True, slots=True)
class DispenseRules:
    """What a battery must be to be handed to a rider."""

    min_soc_pct: float = 90.0
    min_health_pct: float = 70.0
    min_temp_c: float = 0.0
    max_temp_c: float = 45.0


def judge_deposit(battery: BatteryObs, rules: DepositRules) -> str | None:
    """Return why ``battery`` is refused, or None if the cabinet accepts it."""
    if not battery.plugged:
        return "not_plugged"
    if battery.battery_id is None:
        return "unidentified"
    if not re.fullmatch(rules.id_pattern, battery.battery_id):
        return "foreign"
    if battery.faulted:
        return "faulted"
    if battery.cell_temp_c > rules.max_temp_c:
        return "too_hot"
    if battery.cell_temp_c < rules.min_temp_c:
        return "too_cold"
    return None


def dispensable(battery: BatteryObs, rules: DispenseRules) -> bool:
    """Whether ``battery`` may be handed to a rider."""
    return (
        battery.battery_id is not None
        and battery.plugged
        and not battery.faulted
        and battery.soc_pct >= rules.min_soc_pct
        and battery.health_pct >= rules.min_health_pct
        and rules.min_temp_c <= battery.cell_temp_c <= rules.max_temp_c
    )


def rank_dispensable(
    candidates: Iterable[tuple[int, BatteryObs]], rules: DispenseRules
) -> list[tuple[int, BatteryObs]]:
    """Dispensable (bay, battery) pairs, best first: health, then coolest, then fewest cycles."""
    eligible = [(bay, b) for bay, b in candidates if dispensable(b, rules)]
    return sorted(
        eligible, key=lambda c: (-c[1].health_pct, c[1].cell_temp_c, c[1].cycle_count, c[0])
    )
