"""A battery swapped for an unreadable pack while its board was silent is reported missing.

Real ``cabinet run`` against a real ``cabinet sim``, as the operator sees it (the
journal's event stream, what the fleet link publishes). Found by the stateful swap
story (tests/test_swap_stateful.py): the ledger kept the old battery in the bay for as
long as the new pack's BMS id stayed unreadable, so a stolen battery was never
reported. The grace is the site's ``swap.identity_grace_s`` (3 s here, 30 s shipped).
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import cabinet_cmd
from tests.daemon_harness import WAIT_S, Cabinet, running_cabinet, wait_until

GRACE_S = 3.0


def operator_opens(cab: Cabinet, bay: int) -> None:
    opened = cabinet_cmd("bay", "open", str(bay), "-c", str(cab.config))
    assert opened.returncode == 0, opened.stderr
    cab.wait_door(bay, "open")


def test_a_battery_swapped_for_an_unreadable_pack_behind_a_silent_board_goes_missing(
    tmp_path: Path,
) -> None:
    with running_cabinet(tmp_path, extra={"swap": {"identity_grace_s": GRACE_S}}) as cab:
        bay, battery = next(
            (b["bay"], b["battery"]["id"]) for b in cab.state()["bays"] if b["battery"]
        )
        operator_opens(cab, bay)
        cab.ctl("fault", "silent", "--bay", str(bay))
        cab.wait_event("bay.offline", bay=bay)
        # while the board is silent, the battery is taken and a pack whose BMS gives no id
        # is plugged in its place
        cab.ctl("take", str(bay))
        cab.ctl("insert", str(bay), "--battery", "NO-ID", "--soc", "50", "--unidentified")
        cab.ctl("close", str(bay))
        cab.ctl("heal", "silent")
        back = cab.wait_event("bay.online", bay=bay)

        alarm = cab.wait_event(
            "alarm.raised", timeout=GRACE_S + WAIT_S, kind="battery_missing", bay=bay
        )
        assert alarm["detail"] == (
            f"bay {bay} holds a pack whose id cannot be read; {battery} was last seen there"
        )
        # the pack had its grace to say who it is (a lower bound: a slow machine only adds)
        assert alarm["ts"] - back["ts"] >= (GRACE_S - 1.0) * 1000
        moved = cab.wait_event("custody.changed", battery_id=battery, to="missing")
        assert moved["from"] == f"bay {bay}"
        assert moved["seq"] < alarm["seq"]

        # the battery comes back: the ledger finds it and the operator's alarm clears
        operator_opens(cab, bay)
        cab.ctl("take", str(bay))
        cab.ctl("insert", str(bay), "--battery", battery, "--soc", "50")
        cab.ctl("close", str(bay))
        found = wait_until(
            "the battery found again",
            lambda: [
                e
                for e in cab.events("custody.changed")
                if e["battery_id"] == battery and e["from"] == "missing"
            ],
        )[0]
        assert found["to"] == f"bay {bay}"
        cleared = cab.wait_event("alarm.cleared", kind="battery_missing", bay=bay)
        assert cleared["detail"] == f"{battery} seen again in bay {bay}"
        missing = [e for e in cab.events("alarm.raised") if e["kind"] == "battery_missing"]
        assert len(missing) == 1  # once, not once per poll
