"""A QR token is spent only with the session it starts (issue 15, item 10)."""

from __future__ import annotations

import json
import os
import stat
import time
import tomllib
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from cabinet.daemon.config import AuthSection
from cabinet.daemon.journal import Journal
from cabinet.daemon.tokens import CLOCK_SKEW_S, TokenRefusedError, issue, verify
from tests.conftest import REPO, cabinet_cmd
from tests.daemon_harness import Cabinet, running_cabinet, wait_until


def test_a_token_refused_before_any_door_opens_can_be_scanned_again(tmp_path: Path) -> None:
    with running_cabinet(tmp_path, extra={"swap": {"dispense_min_soc_pct": 99.0}}) as cab:
        token = cab.token("R-40")
        cab.scan(token)
        failed = cab.wait_event("swap.failed", rider_id="R-40")
        assert failed["reason"] == "no_dispensable_battery"
        assert all(b["door_open_count"] == 0 for b in cab.state()["bays"])
        empty = [b["bay"] for b in cab.state()["bays"] if b["battery"] is None]
        opened = cabinet_cmd("bay", "open", str(empty[0]), "-c", str(cab.config))
        assert opened.returncode == 0, opened.stderr  # a technician loads a full battery
        cab.wait_door(empty[0], "open")
        cab.ctl("insert", str(empty[0]), "--battery", "BAT-FULL", "--soc", "100")
        cab.ctl("close", str(empty[0]))
        cab.wait_door(empty[0], "closed")
        # the cabinet's own view, not the simulator's: the daemon must have read the pack
        wait_until("the full battery behind a shut door", lambda: _reads(cab, empty[0]))
        cab.scan(token)  # the same token: it was not spent on the refusal
        started = cab.wait_event("swap.started", rider_id="R-40")
        assert started["dispense_bay"] == empty[0]
        assert cab.events("auth.refused") == []
        cab.scan(token)  # spent with the session it started
        cab.wait_event("auth.refused", reason="replayed")
        assert len(cab.events("swap.started")) == 1


def _reads(cab: Cabinet, bay: int) -> bool:
    result = cabinet_cmd("bays", "--json", "-c", str(cab.config))
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)[bay - 1]
    # the door too: the pack is in the daemon's view already while the door is still open,
    # and a bay with an open door is no candidate (a loaded CI run scanned in between)
    return bool(
        view["battery_id"] == "BAT-FULL" and view["soc_pct"] == 100.0 and view["door"] == "closed"
    )


def test_a_token_without_a_cabinet_claim_is_refused_by_default(tmp_path: Path) -> None:
    """Issue 15, item 5: one fleet-wide QR token must not swap at two cabinets."""
    with running_cabinet(tmp_path) as cab:
        cab.scan(cab.token("R-41", "--fleet-wide"))
        refused = cab.wait_event("auth.refused", reason="no_cabinet_claim")
        assert "cab" in refused["detail"]
        assert cab.events("swap.started") == []
        cab.scan(cab.token("R-42", "--cabinet", "cab-test"))
        cab.wait_event("swap.started", rider_id="R-42")


def test_token_issue_asks_for_a_cabinet_unless_fleet_wide(tmp_path: Path) -> None:
    assert cabinet_cmd("keys", "generate", str(tmp_path / "k")).returncode == 0
    base = ("token", "issue", "--key", str(tmp_path / "k.key"), "--rider", "R-1")
    bare = cabinet_cmd(*base)
    assert bare.returncode == 2 and "--cabinet" in bare.stderr
    pub = str(tmp_path / "k.pub")
    for extra, cab in ((("--cabinet", "cab-7"), "cab-7"), (("--fleet-wide",), None)):
        issued = cabinet_cmd(*base, *extra)
        assert issued.returncode == 0, issued.stderr
        shown = cabinet_cmd("token", "verify", issued.stdout.strip(), "--pub", pub, "--json")
        assert json.loads(shown.stdout)["claims"].get("cab") == cab


def test_the_cabinet_claim_is_required_unless_configured_off() -> None:
    example = tomllib.loads((REPO / "docs" / "cabinet.example.toml").read_text())
    assert example["auth"]["require_cabinet_claim"] is True
    assert AuthSection().require_cabinet_claim is True
    key = SigningKey.generate()
    now = int(time.time())
    fleet_wide = issue(key, "R-1", now=now)
    with pytest.raises(TokenRefusedError) as refused:
        verify(fleet_wide, [key.verify_key], now=now, cabinet_id="cab-1")
    assert refused.value.reason == "no_cabinet_claim"
    kept = verify(
        fleet_wide, [key.verify_key], now=now, cabinet_id="cab-1", require_cabinet_claim=False
    )
    assert kept.cab is None


class SteppedClock:
    """The injected clock (cabinet/daemon/clock.py), stepped by NTP or a technician."""

    def __init__(self, wall: float) -> None:
        self.now = wall

    def monotonic(self) -> float:
        return 0.0

    def wall(self) -> float:
        return self.now


def test_spent_nonces_outlive_clock_steps_forward_and_back(tmp_path: Path) -> None:
    """Issue 15, item 11: kept until expiry plus the allowed skew, whatever the clock does."""
    journal = Journal(tmp_path / "journal.db")
    key = SigningKey.generate()
    clock = SteppedClock(1_800_000_000)
    start = int(clock.wall())
    token = issue(key, "R-1", now=start, ttl_s=300, cabinet="cab-1")
    claims = verify(token, [key.verify_key], now=start, cabinet_id="cab-1")

    def spend(nonce: str, expires: int) -> None:
        with journal.transaction() as db:
            journal.spend_token(db, nonce, expires, int(clock.wall()))

    try:
        spend(claims.nonce, claims.exp)
        clock.now = claims.exp + CLOCK_SKEW_S - 1  # a step forward, within the skew
        spend("a" * 32, int(clock.wall()) + 300)  # another rider's swap prunes
        clock.now = start + 10  # ... and back: the token is valid again by this clock
        assert verify(token, [key.verify_key], now=int(clock.wall()), cabinet_id="cab-1")
        assert journal.token_spent(claims.nonce)  # still a replay
        clock.now = start - 3600  # far back: nothing pruned on a clock that went backwards
        spend("b" * 32, int(clock.wall()) + 300)
        assert journal.token_spent(claims.nonce) and journal.token_spent("a" * 32)
        clock.now = claims.exp + CLOCK_SKEW_S + 1  # past expiry plus skew: may go
        spend("c" * 32, int(clock.wall()) + 300)
        assert not journal.token_spent(claims.nonce)
        assert journal.token_spent("a" * 32) and journal.token_spent("c" * 32)
    finally:
        journal.close()


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_journal_and_keys_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """Issue 15, item 12: not 0644 (or 0666) when run outside the systemd unit."""
    old = os.umask(umask)
    try:
        journal = Journal(tmp_path / "state" / "journal.db")
        try:
            with journal.transaction() as db:  # the -wal and -shm files exist once written
                journal.spend_token(db, "d" * 32, 2_000_000_000, 1_800_000_000)
            files = ["journal.db", "journal.db-wal", "journal.db-shm"]
            modes = {name: _mode(tmp_path / "state" / name) for name in files}
        finally:
            journal.close()
        result = cabinet_cmd("keys", "generate", str(tmp_path / "backend"))
        assert result.returncode == 0, result.stderr
    finally:
        os.umask(old)
    assert modes == dict.fromkeys(files, 0o600)
    assert _mode(tmp_path / "backend.key") == 0o600
    assert _mode(tmp_path / "backend.pub") == 0o640


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
