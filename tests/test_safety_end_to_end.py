"""Charging and the safety interlocks, end to end: `cabinet run` against `cabinet sim`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon_harness import running_cabinet, wait_until


def charging_bays(state: dict) -> set[int]:  # type: ignore[type-arg]
    return {b["bay"] for b in state["bays"] if b["charger"]["on"]}


def test_the_daemon_closes_the_contactor_and_charges_within_the_budget(tmp_path: Path) -> None:
    with running_cabinet(tmp_path, extra={"charging": {"power_budget_w": 700.0}}) as cab:
        on = wait_until("chargers to run", lambda: charging_bays(cab.state()))
        state = cab.state()
        assert state["cabinet"]["contactor_closed"]
        for bay in on:
            battery = cab.bay(bay)["battery"]
            assert battery is not None and battery["soc_pct"] < 100
        assert state["meter"]["power_w"] <= 700.0 + 12.0 + 15.0  # budget + base and fan load


def test_thermal_runaway_cuts_the_charger_isolates_the_bay_and_alarms(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        bay = wait_until("a charging bay", lambda: sorted(charging_bays(cab.state())))[0]
        cab.ctl("fault", "thermal_runaway", "--bay", str(bay))
        alarm = cab.wait_event("alarm.raised", kind="bay_overtemp", bay=bay)
        assert "rising" in alarm["detail"] or "degC" in alarm["detail"]
        cab.wait_event("bay.disabled", bay=bay)
        wait_until("the charger to stop", lambda: not cab.bay(bay)["charger"]["enabled"])
        # the isolated bay is never offered to a rider
        started = cab.swap_begins("R-1")
        assert bay not in (started["return_bay"], started["dispense_bay"])


@pytest.mark.parametrize(
    "cabinet_board_interval_s", [None, 2.0], ids=["default_period", "cabinet_board_every_2s"]
)
def test_smoke_stops_charging_aborts_the_session_and_refuses_swaps(
    tmp_path: Path, cabinet_board_interval_s: float | None
) -> None:
    """Also with the cabinet board read only every 2 s (``bus.cabinet_board_interval_s``)."""
    extra = (
        {"bus": {"cabinet_board_interval_s": cabinet_board_interval_s}}
        if cabinet_board_interval_s
        else None
    )
    with running_cabinet(tmp_path, extra=extra) as cab:
        started = cab.swap_begins("R-2")
        cab.ctl("fault", "smoke")
        cab.wait_event("alarm.raised", kind="smoke")
        failed = cab.wait_event("swap.failed", session_id=started["session_id"])
        assert failed["reason"] == "smoke"
        wait_until("the contactor to open", lambda: not cab.state()["cabinet"]["contactor_closed"])
        wait_until("every charger off", lambda: not charging_bays(cab.state()))
        cab.scan(cab.token("R-3"))
        refused = cab.wait_event("swap.refused", rider_id="R-3")
        assert refused["reason"] == "safety_lockout"
        cab.ctl("heal", "smoke")
        cab.wait_event("alarm.cleared", kind="smoke")
        wait_until("the contactor to close", lambda: cab.state()["cabinet"]["contactor_closed"])


def test_boards_fail_safe_when_the_daemon_dies(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        wait_until("chargers to run", lambda: charging_bays(cab.state()))
        assert all(b["heartbeat_ok"] for b in cab.state()["bays"])
        cab.kill9()
        wait_until(
            "boards to stop charging without a heartbeat",
            lambda: not charging_bays(cab.state()),
            timeout=15,
        )
        assert not any(b["heartbeat_ok"] for b in cab.state()["bays"])
        cab.start()
        wait_until("charging to resume", lambda: charging_bays(cab.state()))


def test_an_ignored_charger_off_is_retried_alarmed_until_read_back_confirms_it(
    tmp_path: Path,
) -> None:
    with running_cabinet(tmp_path) as cab:
        bay = wait_until("a charging bay", lambda: sorted(charging_bays(cab.state())))[0]
        cab.ctl("fault", "charger_stuck", "--bay", str(bay))  # acknowledges, ignores "off"
        cab.ctl("fault", "thermal_runaway", "--bay", str(bay))
        cab.wait_event("alarm.raised", kind="bay_overtemp", bay=bay)
        alarm = cab.wait_event("alarm.raised", kind="safety_write_failed", bay=bay)
        assert "charger off not confirmed" in alarm["detail"]
        assert cab.bay(bay)["charger"]["enabled"]  # the board really ignored it
        assert not cab.events("alarm.cleared")  # no confirmation was faked meanwhile
        cab.ctl("heal", "charger_stuck", "--bay", str(bay))
        cleared = cab.wait_event("alarm.cleared", kind="safety_write_failed", bay=bay)
        assert "read-back" in cleared["detail"]
        assert not cab.bay(bay)["charger"]["enabled"]
        raised = cab.events("alarm.raised")
        assert [e["kind"] for e in raised].count("safety_write_failed") == 1  # raised once


def test_a_contactor_that_stays_closed_on_smoke_is_alarmed_until_it_opens(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        wait_until("the contactor to close", lambda: cab.state()["cabinet"]["contactor_closed"])
        cab.ctl("fault", "contactor_stuck")
        cab.ctl("fault", "smoke")
        alarm = cab.wait_event("alarm.raised", kind="safety_write_failed", bay=None)
        assert "main contactor open not confirmed" in alarm["detail"]
        assert cab.state()["cabinet"]["contactor_closed"]
        cab.ctl("heal", "contactor_stuck")
        cab.wait_event("alarm.cleared", kind="safety_write_failed", bay=None)
        assert not cab.state()["cabinet"]["contactor_closed"]
