"""A new image the board never confirms or rolls back: what the technician and the bay see.

Real daemon, simulator over RTU framing, the CLI and the journal. The simulator's
``firmware_hangs`` fault makes the activated image hang when told to CONFIRM or
ROLLBACK: no reply, the board silent until its watchdog resets it and the bootloader
boots the previous image (docs/firmware.md, step 5). Before, the bus error escaped the
updater: the CLI said "internal", no ``firmware.failed`` was journaled and the bay was
left out of service with nothing saying why.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import Cabinet, running_cabinet
from tests.test_firmware_update import EXIT_PROBLEM, board, fw_cmd, signed, vendor

__all__ = ["vendor"]  # the fixture, shared with tests/test_firmware_update.py

#: The board's silence (sim/bootloader.py: watchdog 4 s + reboot 1.5 s), then the bus's
#: re-probe of an isolated unit (5 s), then a poll cycle
BACK_S = 30.0


@pytest.fixture(scope="module")
def cab(tmp_path_factory: pytest.TempPathFactory, vendor: Path) -> Iterator[Cabinet]:
    extra = {"firmware": {"public_keys": [f"{vendor}.pub"]}}
    with running_cabinet(tmp_path_factory.mktemp("fw-unconfirmed"), seed=5, extra=extra) as c:
        yield c


def update_with_faults(cab: Cabinet, bay: int, image: Path, *faults: str) -> tuple[int, str]:
    for fault in faults:
        cab.ctl("fault", fault, "--bay", str(bay))
    try:
        result = fw_cmd(cab, "update", str(image), "--bay", str(bay))
    finally:
        for fault in faults:
            cab.ctl("heal", fault, "--bay", str(bay))
    return result.returncode, result.stdout + result.stderr


def test_a_confirm_never_answered_ends_with_bus_and_says_what_the_board_runs(
    cab: Cabinet, vendor: Path, tmp_path: Path
) -> None:
    code, out = update_with_faults(cab, 9, signed(vendor, tmp_path, "1.4", 4096), "firmware_hangs")
    assert code == EXIT_PROBLEM, out
    assert "internal" not in out
    assert "bay 9: failed (bus: new image 1.4 activated but not confirmed" in out
    assert "the board rolls back to 1.3 by itself" in out
    failed = cab.wait_event("firmware.failed", bay=9, reason="bus")
    assert failed["detail"].startswith("new image 1.4 activated but not confirmed")
    # out of service as a silent board, back with its next answered reading: not for ever
    cab.wait_event("bay.disabled", bay=9, reason="board stopped answering", by="firmware")
    cab.wait_event("bay.enabled", bay=9, reason="board answering again", timeout=BACK_S)
    assert board(cab, 9)["version"] == "1.3"
    assert board(cab, 9)["bootloader"] == "rolled_back"


def test_a_rollback_never_answered_ends_rolled_back_with_the_bay_in_service(
    cab: Cabinet, vendor: Path, tmp_path: Path
) -> None:
    """The image reports the version it replaced: ROLLBACK, which it hangs on."""
    code, out = update_with_faults(
        cab, 11, signed(vendor, tmp_path, "1.5", 4096), "firmware_mislabelled", "firmware_hangs"
    )
    assert code == EXIT_PROBLEM, out
    assert "internal" not in out
    assert "bay 11: failed (rolled_back: the board came back with an unexpected version" in out
    cab.wait_event("firmware.failed", bay=11, reason="rolled_back")
    cab.wait_event("bay.enabled", bay=11, reason="firmware unchanged")
    assert board(cab, 11)["version"] == "1.3"
