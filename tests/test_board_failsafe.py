"""A bay board's heartbeat fail-safe refusal is told apart from a board that is failing.

The rule (docs/hardware.md, "Modbus exception codes"): a board in heartbeat fail-safe
refuses an unlock with 0x06 SLAVE DEVICE BUSY (try again after a heartbeat); 0x04 SLAVE
DEVICE FAILURE always means the board is failing.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SimProcess, cabinet_cmd
from tests.daemon_harness import running_cabinet


def test_a_technician_sees_the_fail_safe_named_when_an_unlock_is_refused(
    sim_process: SimProcess,
) -> None:
    bay = next(b["bay"] for b in sim_process.state()["bays"] if b["battery"] is None)
    unlock = cabinet_cmd("bus", "write", str(bay), "101", "0x55AA", "--bus", sim_process.bus)
    assert unlock.returncode == 1
    assert unlock.stderr.strip() == (
        f"cabinet: error: bay {bay} refused the request: device busy "
        "(heartbeat fail-safe: write the heartbeat register first)"
    )
    assert sim_process.state()["bays"][bay - 1]["door"] == "closed"


def test_a_board_failing_an_unlock_is_taken_out_of_service(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        empty = [b["bay"] for b in cab.state()["bays"] if b["battery"] is None]
        cab.ctl("fault", "lock_failure", "--bay", str(min(empty)))
        started = cab.swap_begins("R-F")
        assert started["return_bay"] == min(empty)
        disabled = cab.wait_event("bay.disabled", bay=min(empty))
        assert "lock jammed" in disabled["reason"]
        opened = cab.wait_event("swap.door_opened", session_id=started["session_id"])
        assert opened["bay"] != min(empty)
