"""Mains loss and swaps (docs/swap.md §4): no new session starts while mains is lost."""

from __future__ import annotations

from pathlib import Path

from tests.daemon_harness import running_cabinet


def test_no_swap_starts_while_mains_is_lost_and_swaps_resume_after(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        cab.ctl("fault", "mains_loss")
        cab.wait_event("alarm.raised", kind="mains_lost")
        cab.scan(cab.token("R-20"))
        refused = cab.wait_event("swap.refused", rider_id="R-20")
        assert refused["reason"] == "safety_lockout"
        assert all(b["door_open_count"] == 0 for b in cab.state()["bays"])
        cab.ctl("heal", "mains_loss")
        cab.wait_event("alarm.cleared", kind="mains_lost")
        assert cab.swap_begins("R-21")["rider_id"] == "R-21"
