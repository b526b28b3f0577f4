"""Safety interlocks: the daemon's second layer behind the BMS and the boards' own cut-offs.

Pure and stateful: feed it every bay and cabinet observation with the time it was
made; it answers with the actions to take at once. Rules (DESIGN.md §5):

* a bay whose battery or air is over temperature, or whose temperature rises at
  ``rise_c_per_s`` or more sustained over ``rise_window_s`` (the thermal-runaway
  signature), is tripped: charger off, bay isolated, alarm. The trip is latched
  until a technician clears it — a cooling bay is not a healed one;
* smoke: every charger and the main contactor off, alarm, the session aborted and
  no new swap until the detector clears;
* mains loss: alarm (and the chargers are commanded off, since they are unpowered).

Each condition raises its alarm once and clears it once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SafetyLimits:
    """Thresholds; the BMS and board cut-offs sit above these (board: 70 degC)."""

    cell_max_c: float = 60.0
    bay_max_c: float = 60.0
    rise_c_per_s: float = 1.0
    rise_window_s: float = 2.0  # long enough to ignore one noisy sample, short for runaway


@dataclass(frozen=True, slots=True)
class ChargerOff:
    """Switch this bay's charger off now (safety priority on the bus)."""

    bay: int


@dataclass(frozen=True, slots=True)
class IsolateBay:
    """Take this bay out of service until a technician clears it."""

    bay: int
    reason: str


@dataclass(frozen=True, slots=True)
class AllChargersOff:
    """Every charger off."""


@dataclass(frozen=True, slots=True)
class OpenContactor:
    """Cut the power to every charger at the main contactor."""


@dataclass(frozen=True, slots=True)
class AbortSession:
    """End the running swap session without opening another door."""

    reason: str


@dataclass(frozen=True, slots=True)
class Alarm:
    """Raise (``active``) or clear an alarm an operator must see."""

    kind: str
    bay: int | None
    active: bool
    detail: str = ""


SafetyAction = ChargerOff | IsolateBay | AllChargersOff | OpenContactor | AbortSession | Alarm


@dataclass
class SafetyMonitor:
    """Remembers recent temperatures, latched trips and cabinet-wide conditions."""

    limits: SafetyLimits = field(default_factory=SafetyLimits)
    tripped: dict[int, str] = field(default_factory=dict)
    smoke: bool = False
    mains_lost: bool = False
    _history: dict[tuple[int, str], deque[tuple[float, float]]] = field(default_factory=dict)

    @property
    def swaps_allowed(self) -> bool:
        """No new session while smoke is detected or mains is lost.

        Without mains the cabinet runs on the boards' backup supply: a session already
        running may finish its doors while the boards answer (docs/swap.md §4), but a new
        rider is not promised a battery the cabinet may not be able to release.
        """
        return not self.smoke and not self.mains_lost

    def charging_allowed(self, bay: int) -> bool:
        """Whether the interlocks let ``bay`` charge at all."""
        return not self.smoke and not self.mains_lost and bay not in self.tripped

    def observe_bay(
        self, bay: int, now: float, cell_temp_c: float | None, bay_temp_c: float
    ) -> list[SafetyAction]:
        """Judge one bay reading; returns the actions for a new trip (none if latched)."""
        rises = [self._rise((bay, "air"), now, bay_temp_c)]
        if cell_temp_c is not None:
            rises.append(self._rise((bay, "cell"), now, cell_temp_c))
        else:
            self._history.pop((bay, "cell"), None)  # a new battery starts a new history
        if bay in self.tripped:
            return []
        reason = None
        rate = max(r for r in rises)
        if cell_temp_c is not None and cell_temp_c >= self.limits.cell_max_c:
            reason = f"battery at {cell_temp_c:.1f} degC"
        elif bay_temp_c >= self.limits.bay_max_c:
            reason = f"bay air at {bay_temp_c:.1f} degC"
        elif rate >= self.limits.rise_c_per_s:
            reason = f"temperature rising {rate:.1f} degC/s"
        if reason is None:
            return []
        self.tripped[bay] = reason
        return [ChargerOff(bay), IsolateBay(bay, reason), Alarm("bay_overtemp", bay, True, reason)]

    def _rise(self, key: tuple[int, str], now: float, temp: float) -> float:
        """Mean rise rate over the last ``rise_window_s`` (0.0 until the window is full)."""
        history = self._history.setdefault(key, deque())
        history.append((now, temp))
        while len(history) > 2 and now - history[1][0] >= self.limits.rise_window_s:
            history.popleft()
        t0, temp0 = history[0]
        span = now - t0
        return (temp - temp0) / span if span >= self.limits.rise_window_s else 0.0

    def clear_bay(self, bay: int) -> list[SafetyAction]:
        """A technician has checked the bay: lift the trip."""
        if self.tripped.pop(bay, None) is None:
            return []
        self._history.pop((bay, "air"), None)
        self._history.pop((bay, "cell"), None)
        return [Alarm("bay_overtemp", bay, False, "cleared by technician")]

    def observe_cabinet(self, *, smoke: bool, mains_present: bool) -> list[SafetyAction]:
        """Judge the cabinet board's reading."""
        actions: list[SafetyAction] = []
        if smoke and not self.smoke:
            actions += [
                AllChargersOff(),
                OpenContactor(),
                AbortSession("smoke"),
                Alarm("smoke", None, True, "smoke detected: charging cut, swaps refused"),
            ]
        elif not smoke and self.smoke:
            actions.append(Alarm("smoke", None, False, "smoke cleared"))
        self.smoke = smoke
        if not mains_present and not self.mains_lost:
            actions += [AllChargersOff(), Alarm("mains_lost", None, True, "no mains power")]
        elif mains_present and self.mains_lost:
            actions.append(Alarm("mains_lost", None, False, "mains power back"))
        self.mains_lost = not mains_present
        return actions
