"""Charging policy: which bays charge, at what current, within the cabinet's power budget.

Pure: a plan from the bays' state. Only an identified, healthy, plugged battery
behind a shut door, inside its temperature window, in an in-service bay that the
interlocks allow, charges. Current is derated linearly above ``derate_from_c``.
The budget goes ready-first: batteries just below the dispensing threshold get
current before nearly-empty ones (they become dispensable soonest), and batteries
already dispensable come last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cabinet.core.bay_tracker import BaySnapshot

CHARGER_EFFICIENCY = 0.92
NOMINAL_PACK_V = 54.6  # worst case (full pack) for budgeting: never over the budget


@dataclass(frozen=True, slots=True)
class ChargingRules:
    """Limits of the charging policy."""

    max_current_a: float = 5.0
    power_budget_w: float = 1500.0
    min_temp_c: float = 0.0
    max_temp_c: float = 45.0
    derate_from_c: float = 35.0
    ready_soc_pct: float = 90.0  # the dispensing threshold: ready-first ordering pivots on it
    full_soc_pct: float = 100.0


@dataclass(frozen=True, slots=True)
class BayChargeView:
    """What the policy needs about a bay."""

    snapshot: BaySnapshot
    in_service: bool
    allowed_by_safety: bool


def eligible(view: BayChargeView, rules: ChargingRules) -> bool:
    """Whether the bay may charge at all (DESIGN.md §5)."""
    snap = view.snapshot
    battery = snap.battery
    return (
        snap.online
        and view.in_service
        and view.allowed_by_safety
        and snap.door_closed
        and battery is not None
        and battery.battery_id is not None
        and battery.plugged
        and not battery.faulted
        and rules.min_temp_c <= battery.cell_temp_c <= rules.max_temp_c
        and battery.soc_pct < rules.full_soc_pct
    )


def derated_current(cell_temp_c: float, rules: ChargingRules) -> float:
    """Full current up to ``derate_from_c``, falling linearly to zero at ``max_temp_c``."""
    if cell_temp_c <= rules.derate_from_c:
        return rules.max_current_a
    span = rules.max_temp_c - rules.derate_from_c
    fraction = max(0.0, (rules.max_temp_c - cell_temp_c) / span)
    return round(rules.max_current_a * fraction, 2)


def plan(bays: Mapping[int, BayChargeView], rules: ChargingRules) -> dict[int, float]:
    """Current limit per bay (0.0 = charger off) for every bay given."""
    currents = dict.fromkeys(bays, 0.0)
    watts_per_amp = NOMINAL_PACK_V / CHARGER_EFFICIENCY
    queue = []
    for bay, view in bays.items():
        battery = view.snapshot.battery
        if battery is not None and eligible(view, rules):
            below = battery.soc_pct < rules.ready_soc_pct
            # ready-first: below threshold by SoC descending, then the ready ones ascending
            key = (0, -battery.soc_pct, bay) if below else (1, battery.soc_pct, bay)
            queue.append((key, bay, battery.cell_temp_c))
    remaining_w = rules.power_budget_w
    for _key, bay, temp in sorted(queue):
        wanted = derated_current(temp, rules)
        granted = min(wanted, max(0.0, remaining_w / watts_per_amp))
        granted = round(granted, 2) if granted >= 0.5 else 0.0  # chargers don't run below 0.5 A
        currents[bay] = granted
        remaining_w -= granted * watts_per_amp
    return currents
