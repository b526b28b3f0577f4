"""Swaps end to end: `cabinet sim` + `cabinet run`, a rider driven through `cabinet sim ctl`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import cabinet_cmd
from tests.daemon_harness import Cabinet, running_cabinet, wait_until

SWAP_STEPS = [
    "swap.started",
    "swap.door_opened",
    "swap.battery_deposited",
    "swap.door_opened",
    "swap.battery_dispensed",
    "swap.completed",
]


def deposit(cab: Cabinet, bay: int, battery: str, *extra: str) -> None:
    cab.wait_door(bay, "open")
    cab.ctl("insert", str(bay), "--battery", battery, "--soc", "15", *extra)
    cab.ctl("close", str(bay))


def collect(cab: Cabinet, bay: int) -> None:
    cab.wait_door(bay, "open")
    cab.ctl("take", str(bay))
    cab.ctl("close", str(bay))


def test_a_rider_swaps_with_a_scanned_token(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        started = cab.swap_begins("R-1")
        session, ret, out = started["session_id"], started["return_bay"], started["dispense_bay"]
        reserved = started["reserved"]
        assert cab.bay(out)["battery"]["soc_pct"] >= 90.0
        deposit(cab, ret, "BAT-R1")
        collect(cab, out)
        done = cab.wait_event("swap.completed", session_id=session)
        assert done["deposited"] == "BAT-R1" and done["dispensed"] == reserved
        assert cab.session_events(session) == SWAP_STEPS
        assert cab.bay(ret)["battery"]["id"] == "BAT-R1"
        assert cab.bay(out)["battery"] is None
        opened = [b["bay"] for b in cab.state()["bays"] if b["door_open_count"]]
        assert sorted(opened) == sorted({ret, out})  # no other door ever opened


def test_refused_tokens_open_no_door_and_say_why(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        cab.scan("not a token at all")
        cab.wait_event("auth.refused", reason="malformed")
        cab.scan(cab.token("R-2", "--ttl", "1").replace("CT1.", "CT1.x", 1))
        cab.wait_event("auth.refused", reason="malformed")
        expired = cab.token("R-3", "--ttl", "1")
        wait_until("the token to expire", lambda: _expired(cab, expired))
        cab.scan(expired)
        cab.wait_event("auth.refused", reason="expired")
        other = tmp_path / "forger"
        assert _keys(other)
        forged = Cabinet(cab.sim, tmp_path, cab.config, other.with_suffix(".key")).token("R-4")
        cab.scan(forged)
        cab.wait_event("auth.refused", reason="bad_signature")
        wrong = cab.token("R-5", "--cabinet", "cab-elsewhere")
        cab.scan(wrong)
        cab.wait_event("auth.refused", reason="wrong_cabinet")
        assert all(b["door_open_count"] == 0 for b in cab.state()["bays"])
        assert cab.events("swap.started") == []


def _expired(cab: Cabinet, token: str) -> bool:
    result = cabinet_cmd("token", "verify", token, "--pub", str(cab.tmp / "backend.pub"))
    return "expired" in result.stdout


def _keys(prefix: Path) -> bool:
    return cabinet_cmd("keys", "generate", str(prefix)).returncode == 0


def test_a_replayed_token_is_refused_even_after_a_restart(tmp_path: Path) -> None:
    with running_cabinet(tmp_path, extra={"swap": {"deposit_timeout_s": 1.0}}) as cab:
        token = cab.token("R-6")
        cab.scan(token)
        started = cab.wait_event("swap.started", rider_id="R-6")
        cab.wait_event("swap.failed", session_id=started["session_id"], reason="deposit_timeout")
        cab.ctl("close", str(started["return_bay"]))
        cab.stop()
        cab.start()
        cab.scan(token)
        cab.wait_event("auth.refused", reason="replayed")
        assert len(cab.events("swap.started")) == 1


def test_no_dispensable_battery_is_refused_before_any_door_opens(tmp_path: Path) -> None:
    with running_cabinet(tmp_path, extra={"swap": {"dispense_min_soc_pct": 100.0}}) as cab:
        cab.scan(cab.token("R-7"))
        failed = cab.wait_event("swap.failed", rider_id="R-7")
        assert failed["reason"] == "no_dispensable_battery"
        assert all(b["door_open_count"] == 0 for b in cab.state()["bays"])


def test_a_door_that_will_not_open_is_reported_and_another_bay_used(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        empty = [b["bay"] for b in cab.state()["bays"] if b["battery"] is None]
        cab.ctl("fault", "lock_stuck", "--bay", str(min(empty)))
        started = cab.swap_begins("R-8")
        assert started["return_bay"] == min(empty)
        disabled = cab.wait_event("bay.disabled", bay=min(empty))
        assert "lock jammed" in disabled["reason"]
        opened = cab.wait_event("swap.door_opened", session_id=started["session_id"])
        assert opened["bay"] != min(empty)
        deposit(cab, opened["bay"], "BAT-R8")
        collect(cab, started["dispense_bay"])
        cab.wait_event("swap.completed", session_id=started["session_id"])


def test_a_refused_battery_is_handed_back_and_nothing_is_dispensed(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        started = cab.swap_begins("R-9")
        ret, out = started["return_bay"], started["dispense_bay"]
        deposit(cab, ret, "BAT-HOT", "--temp", "58")
        rejected = cab.wait_event("swap.deposit_rejected", session_id=started["session_id"])
        assert rejected["reason"] == "too_hot" and rejected["bay"] == ret
        cab.wait_door(ret, "open")  # the same door reopens
        cab.ctl("take", str(ret))
        cab.ctl("close", str(ret))
        failed = cab.wait_event("swap.failed", session_id=started["session_id"])
        assert failed["reason"] == "deposit_rejected"
        assert cab.bay(out)["door_open_count"] == 0
        assert cab.bay(out)["battery"]["id"] == started["reserved"]


def test_a_rider_who_never_collects_raises_door_left_open(tmp_path: Path) -> None:
    with running_cabinet(tmp_path, extra={"swap": {"pickup_timeout_s": 1.0}}) as cab:
        started = cab.swap_begins("R-10")
        deposit(cab, started["return_bay"], "BAT-R10")
        failed = cab.wait_event("swap.failed", session_id=started["session_id"])
        assert failed["reason"] == "not_collected"
        alarm = cab.wait_event("alarm.raised", kind="door_left_open")
        assert alarm["bay"] == started["dispense_bay"]
        # the battery stays in custody of its bay: nothing is lost
        assert cab.bay(started["dispense_bay"])["battery"]["id"] == started["reserved"]


def test_a_bay_that_goes_silent_mid_session_ends_it_cleanly(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        started = cab.swap_begins("R-11")
        ret = started["return_bay"]
        # mid-session: the daemon itself saw the return door open (a board silenced before
        # that read leaves the door unseen, and the session rightly tries another bay)
        cab.wait_event("swap.door_opened", session_id=started["session_id"], purpose="return")
        cab.ctl("fault", "silent", "--bay", str(ret))
        failed = cab.wait_event("swap.failed", session_id=started["session_id"])
        assert failed["reason"] == "bay_offline"
        cab.wait_event("bay.disabled", bay=ret)
        cab.ctl("heal")
        cab.wait_event("bay.enabled", bay=ret)  # back in service once its board answers
        # a door left open is shut by the next person passing; the bay serves riders again
        cab.ctl("close", str(ret))
        assert cab.swap_begins("R-12")["return_bay"] is not None


def test_a_battery_that_faults_before_the_door_shuts_is_refused(tmp_path: Path) -> None:
    """Judged on the reading at door-shut, not on the first one after insertion."""
    with running_cabinet(tmp_path) as cab:
        started = cab.swap_begins("R-13")
        ret, out = started["return_bay"], started["dispense_bay"]
        cab.wait_door(ret, "open")
        cab.ctl("insert", str(ret), "--battery", "BAT-R13", "--soc", "15")
        # the daemon has read the battery healthy: a first-reading judge would accept it
        wait_until("the daemon to read the deposit", lambda: _reads(cab, ret, "BAT-R13"))
        cab.ctl("fault", "bms_fault", "--bay", str(ret))
        cab.ctl("close", str(ret))
        rejected = cab.wait_event("swap.deposit_rejected", session_id=started["session_id"])
        assert rejected["reason"] == "faulted" and rejected["battery_id"] == "BAT-R13"
        cab.wait_door(ret, "open")  # the rider's battery is handed back
        cab.ctl("take", str(ret))
        cab.ctl("close", str(ret))
        failed = cab.wait_event("swap.failed", session_id=started["session_id"])
        assert failed["reason"] == "deposit_rejected"
        assert cab.events("swap.battery_deposited") == []
        assert cab.bay(out)["door_open_count"] == 0
        assert cab.bay(out)["battery"]["id"] == started["reserved"]


def _reads(cab: Cabinet, bay: int, battery_id: str) -> bool:
    """Whether the daemon itself (not the simulator) reports ``battery_id`` in ``bay``."""
    result = cabinet_cmd("bays", "--json", "-c", str(cab.config))
    return result.returncode == 0 and json.loads(result.stdout)[bay - 1]["battery_id"] == battery_id


def test_a_reserved_battery_that_faults_is_replaced_before_its_door_opens(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        started = cab.swap_begins("R-14")
        session, ret, reserved_bay = (
            started["session_id"],
            started["return_bay"],
            started["dispense_bay"],
        )
        cab.ctl("fault", "bms_fault", "--bay", str(reserved_bay))
        moved = cab.wait_event("swap.dispense_reassigned", session_id=session)
        assert moved["from_bay"] == reserved_bay and moved["to_bay"] not in (None, reserved_bay)
        deposit(cab, ret, "BAT-R14")
        collect(cab, moved["to_bay"])
        done = cab.wait_event("swap.completed", session_id=session)
        assert done["dispensed"] == moved["reserved"] != started["reserved"]
        assert cab.bay(reserved_bay)["door_open_count"] == 0  # the faulted pack stayed locked in


def test_with_no_battery_left_to_hand_out_the_rider_gets_their_own_back(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        started = cab.swap_begins("R-15")
        session, ret = started["session_id"], started["return_bay"]
        full = [b["bay"] for b in cab.state()["bays"] if b["battery"] and b["bay"] != ret]
        for bay in full:  # every pack that could be handed out now reports a BMS fault
            cab.ctl("fault", "bms_fault", "--bay", str(bay))
        moved = cab.wait_event("swap.dispense_reassigned", session_id=session, to_bay=None)
        assert moved["from_bay"] == started["dispense_bay"]
        deposit(cab, ret, "BAT-R15")
        cab.wait_door(ret, "open")  # the rider's own door reopens, no other
        cab.ctl("take", str(ret))
        cab.ctl("close", str(ret))
        failed = cab.wait_event("swap.failed", session_id=session)
        assert failed["reason"] == "dispense_failed"
        assert cab.events("swap.battery_dispensed") == []
        assert [b["bay"] for b in cab.state()["bays"] if b["door_open_count"]] == [ret]
