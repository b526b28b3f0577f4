"""Physics of a battery in a bay: CC/CV charging, pack voltage and heat.

Deliberately simple, but shaped like the real thing where the daemon's decisions
depend on it: current is constant until ~80 % and then tapers, the pack warms with
I^2 R and cools towards ambient, and the injected thermal faults produce the
temperature curves the safety interlocks must recognise.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.bay_map import BmsFault

CAPACITY_AH = 20.0
CELLS_IN_SERIES = 13
V_EMPTY = 3.0 * CELLS_IN_SERIES  # 39.0 V
V_FULL = 4.2 * CELLS_IN_SERIES  # 54.6 V
INTERNAL_RESISTANCE_OHM = 0.1
CV_START_SOC = 80.0  # where the charger leaves constant current for constant voltage
CHARGE_TERMINATION_FRACTION = 0.05  # CV ends when current falls to 5 % of the limit
HEAT_CAPACITY_J_PER_K = 2700.0  # ~3 kg of cells
THERMAL_RESISTANCE_K_PER_W = 2.0  # pack to bay air
OVERHEAT_TARGET_C = 65.0
OVERHEAT_RATE_C_PER_S = 0.5
RUNAWAY_RATE_C_PER_S = 3.0  # well above the daemon's 1 degC/s rise alarm
RUNAWAY_MAX_C = 250.0


@dataclass(slots=True)
class Battery:
    """A battery pack with its BMS; mutable because the simulation evolves it."""

    battery_id: str
    soc_pct: float
    health_pct: float = 95.0
    cycle_count: int = 100
    cell_temp_c: float = 25.0
    faults: BmsFault = BmsFault(0)  # noqa: RUF009 - an IntFlag value is immutable
    plugged: bool = True  # the BMS connector is mated, so the bay can read and charge it
    identified: bool = True  # the BMS reports its serial id
    overheating: bool = False
    runaway: bool = False
    _counted_cycle: bool = False

    def open_circuit_voltage(self) -> float:
        """Pack voltage at rest: linear in SoC, good enough for a charger model."""
        return V_EMPTY + (V_FULL - V_EMPTY) * self.soc_pct / 100.0

    def charge_current(self, limit_a: float) -> float:
        """Current the charger delivers at this SoC under a given limit (CC, then CV taper)."""
        if limit_a <= 0.0 or self.soc_pct >= 100.0:
            return 0.0
        if self.soc_pct < CV_START_SOC:
            return limit_a
        taper = limit_a * (100.0 - self.soc_pct) / (100.0 - CV_START_SOC)
        return taper if taper >= CHARGE_TERMINATION_FRACTION * limit_a else 0.0

    def pack_voltage(self, current_a: float) -> float:
        """Terminal voltage while ``current_a`` flows into the pack."""
        return self.open_circuit_voltage() + current_a * INTERNAL_RESISTANCE_OHM

    def step(
        self, dt: float, current_a: float, ambient_c: float, charge_speedup: float = 1.0
    ) -> None:
        """Advance the pack by ``dt`` seconds with ``current_a`` flowing in.

        ``charge_speedup`` fills the pack that many times faster than the current
        would (heat is unchanged): a demo cannot wait four hours for a full battery.
        """
        if current_a > 0.0:
            gained = charge_speedup * current_a * dt / (CAPACITY_AH * 3600.0) * 100.0
            self.soc_pct = min(100.0, self.soc_pct + gained)
            if self.soc_pct >= 100.0 and not self._counted_cycle:
                self.cycle_count += 1
                self._counted_cycle = True
        heat_w = current_a * current_a * INTERNAL_RESISTANCE_OHM
        cooling_w = (self.cell_temp_c - ambient_c) / THERMAL_RESISTANCE_K_PER_W
        self.cell_temp_c += (heat_w - cooling_w) * dt / HEAT_CAPACITY_J_PER_K
        if self.overheating and self.cell_temp_c < OVERHEAT_TARGET_C:
            self.cell_temp_c = min(OVERHEAT_TARGET_C, self.cell_temp_c + OVERHEAT_RATE_C_PER_S * dt)
        if self.runaway:
            self.cell_temp_c = min(RUNAWAY_MAX_C, self.cell_temp_c + RUNAWAY_RATE_C_PER_S * dt)
