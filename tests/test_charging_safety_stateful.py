"""Hypothesis stateful tests of the charging policy and the safety interlocks together.

Rules model what bays, batteries and the cabinet can do (doors, plugging, faults,
heat, smoke, mains); invariants are the charging rules of DESIGN.md §5 and the
interlock guarantees: no current outside the rules, never over the budget, a hot or
fast-heating bay tripped within one observation and kept off until cleared, smoke
stops all charging and all swaps.
"""

from __future__ import annotations

import os
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cabinet.core.battery_rules import BatteryObs
from cabinet.core.bay_tracker import BaySnapshot
from cabinet.core.charging_policy import (
    CHARGER_EFFICIENCY,
    NOMINAL_PACK_V,
    BayChargeView,
    ChargingRules,
    derated_current,
    plan,
)
from cabinet.core.safety import AbortSession, Alarm, ChargerOff, OpenContactor, SafetyMonitor

BAYS = range(1, 13)
RULES = ChargingRules()

batteries = st.builds(
    BatteryObs,
    battery_id=st.none() | st.from_regex(r"BAT-[0-9]{3}", fullmatch=True),
    plugged=st.booleans(),
    soc_pct=st.floats(0, 100),
    health_pct=st.floats(50, 100),
    cell_temp_c=st.floats(-10, 55),
    faulted=st.booleans(),
)


class ChargingCabinet(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.safety = SafetyMonitor()
        self.snaps = {n: BaySnapshot(online=True) for n in BAYS}
        self.in_service = dict.fromkeys(BAYS, True)
        self.currents: dict[int, float] = dict.fromkeys(BAYS, 0.0)
        self.runaway_since: dict[int, float] = {}
        self.alarms: dict[tuple[str, int | None], bool] = {}
        self.aborted = False

    def observe(self) -> None:
        for bay, snap in self.snaps.items():
            if snap.online:
                cell = snap.battery.cell_temp_c if snap.battery else None
                for action in self.safety.observe_bay(bay, self.now, cell, snap.bay_temp_c):
                    self.apply(action)
        views = {
            bay: BayChargeView(snap, self.in_service[bay], self.safety.charging_allowed(bay))
            for bay, snap in self.snaps.items()
        }
        self.currents = plan(views, RULES)

    def apply(self, action: object) -> None:
        if isinstance(action, Alarm):
            key = (action.kind, action.bay)
            assert self.alarms.get(key, False) != action.active, f"alarm {key} repeated"
            self.alarms[key] = action.active
        elif isinstance(action, AbortSession):
            self.aborted = True

    @rule(
        bay=st.sampled_from(list(BAYS)),
        battery=st.none() | batteries,
        door_closed=st.booleans(),
        online=st.booleans(),
    )
    def bay_changes(
        self, bay: int, battery: BatteryObs | None, door_closed: bool, online: bool
    ) -> None:
        self.snaps[bay] = BaySnapshot(
            online=online,
            door_closed=door_closed,
            battery_present=battery is not None,
            battery=battery,
            bay_temp_c=25.0,
        )
        self.runaway_since.pop(bay, None)
        self.observe()

    @rule(seconds=st.floats(0.1, 3.0))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.observe()

    @rule(bay=st.sampled_from(list(BAYS)), rate=st.floats(0.0, 4.0), steps=st.integers(1, 12))
    def battery_heats(self, bay: int, rate: float, steps: int) -> None:
        """The battery warms at ``rate`` degC/s, observed every 0.5 s (a poll cycle)."""
        snap = self.snaps[bay]
        if snap.battery is None or not snap.online:
            return
        for _ in range(steps):
            self.now += 0.5
            battery = snap.battery
            assert battery is not None
            snap = replace(
                snap, battery=replace(battery, cell_temp_c=battery.cell_temp_c + rate * 0.5)
            )
            self.snaps[bay] = snap
            self.observe()
        if rate >= 1.2 and steps * 0.5 >= self.safety.limits.rise_window_s + 0.5:
            assert bay in self.safety.tripped, "sustained runaway rise not tripped"

    @rule(smoke=st.booleans(), mains=st.booleans())
    def cabinet_changes(self, smoke: bool, mains: bool) -> None:
        was_smoke = self.safety.smoke
        actions = self.safety.observe_cabinet(smoke=smoke, mains_present=mains)
        for action in actions:
            self.apply(action)
        if smoke and not was_smoke:
            assert any(isinstance(a, OpenContactor) for a in actions)
            assert self.aborted
        self.observe()

    @precondition(lambda self: bool(self.safety.tripped))
    @rule(data=st.data())
    def technician_clears(self, data: st.DataObject) -> None:
        bay = data.draw(st.sampled_from(sorted(self.safety.tripped)))
        for action in self.safety.clear_bay(bay):
            self.apply(action)
        self.observe()

    @rule(bay=st.sampled_from(list(BAYS)), in_service=st.booleans())
    def operator_sets_service(self, bay: int, in_service: bool) -> None:
        self.in_service[bay] = in_service
        self.observe()

    @invariant()
    def no_charging_outside_the_rules(self) -> None:
        for bay, amps in self.currents.items():
            if amps == 0.0:
                continue
            snap = self.snaps[bay]
            battery = snap.battery
            assert snap.online and snap.door_closed and self.in_service[bay]
            assert battery is not None and battery.battery_id and battery.plugged
            assert not battery.faulted
            assert RULES.min_temp_c <= battery.cell_temp_c <= RULES.max_temp_c
            assert bay not in self.safety.tripped
            assert not self.safety.smoke and not self.safety.mains_lost
            assert amps <= derated_current(battery.cell_temp_c, RULES) + 1e-9

    @invariant()
    def never_over_budget(self) -> None:
        watts = sum(self.currents.values()) * NOMINAL_PACK_V / CHARGER_EFFICIENCY
        assert watts <= RULES.power_budget_w + 1e-6

    @invariant()
    def smoke_refuses_swaps(self) -> None:
        # smoke or mains loss refuses new swaps (docs/swap.md §4, mains loss)
        assert self.safety.swaps_allowed == (not self.safety.smoke and not self.safety.mains_lost)

    @invariant()
    def hot_bays_are_tripped(self) -> None:
        for bay, snap in self.snaps.items():
            battery = snap.battery
            if (
                snap.online
                and battery is not None
                and (battery.cell_temp_c >= self.safety.limits.cell_max_c)
            ):
                assert bay in self.safety.tripped


EXAMPLES = int(os.environ.get("CABINET_CAMPAIGN_EXAMPLES", "150"))  # long campaign: 20000
ChargingCabinet.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=50, deadline=None
)
TestChargingCabinet = ChargingCabinet.TestCase


def test_ready_first_gives_current_to_the_battery_nearest_dispensable() -> None:
    def view(soc: float) -> BayChargeView:
        battery = BatteryObs("BAT-1", plugged=True, soc_pct=soc, health_pct=95, cell_temp_c=25)
        return BayChargeView(
            BaySnapshot(online=True, battery_present=True, battery=battery), True, True
        )

    tight = ChargingRules(power_budget_w=NOMINAL_PACK_V / CHARGER_EFFICIENCY * 5.0)  # one bay
    currents = plan({1: view(20.0), 2: view(85.0), 3: view(95.0)}, tight)
    assert currents == {1: 0.0, 2: 5.0, 3: 0.0}


@given(temp=st.floats(-20, 80))
def test_derating_is_monotone_and_bounded(temp: float) -> None:
    amps = derated_current(temp, RULES)
    assert 0.0 <= amps <= RULES.max_current_a
    assert derated_current(temp + 1.0, RULES) <= amps


def test_a_tripped_bay_raises_one_alarm_and_chargers_off_first() -> None:
    monitor = SafetyMonitor()
    assert monitor.observe_bay(3, 0.0, 30.0, 27.0) == []
    actions = monitor.observe_bay(3, 0.5, 61.0, 40.0)
    assert isinstance(actions[0], ChargerOff) and actions[0].bay == 3
    assert monitor.observe_bay(3, 1.0, 62.0, 41.0) == []  # latched: no repeat
    assert not monitor.charging_allowed(3)
