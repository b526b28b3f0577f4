"""A cabinet whose clock was never set (RTC at 1970): tokens refused clearly, doctor says why.

The daemon's scanner path and the doctor read the controller's injected clock
(cabinet/daemon/clock.py), so a 1970 clock is injected here instead of changing the machine's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from cabinet.daemon import controller, doctor
from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.clock import CLOCK_SET_AFTER, Clock, clock_is_set
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.journal import Journal
from cabinet.daemon.run import handle_scan
from cabinet.daemon.tokens import issue
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus
from drivers.qr_scanner import Scan


class StoppedRtc:
    """A wall clock stuck where a board without an RTC battery boots: 1970."""

    def __init__(self, wall: float) -> None:
        self.at = wall

    def monotonic(self) -> float:
        return 50.0

    def wall(self) -> float:
        return self.at


@pytest.fixture
def at_1970(tmp_path: Path) -> Iterator[CabinetController]:
    bus = ModbusBus(parse_endpoint("tcp://127.0.0.1:9"))  # never connected: nothing is polled
    journal = Journal(tmp_path / "journal.db")
    clock: Clock = StoppedRtc(12.0)
    yield CabinetController(
        cabinet_id="cab-1", journal=journal, scheduler=BusScheduler(bus), clock=clock
    )
    journal.close()


def test_unset_means_before_2025() -> None:
    assert not clock_is_set(0) and not clock_is_set(CLOCK_SET_AFTER - 1)
    assert clock_is_set(CLOCK_SET_AFTER) and clock_is_set(time.time())
    assert vars(controller)["Clock"] is Clock  # still importable from the controller


def test_a_scanned_token_is_refused_with_clock_unset_and_an_event(
    at_1970: CabinetController,
) -> None:
    key = SigningKey.generate()
    token = issue(key, "R-1", now=int(time.time()), cabinet="cab-1")  # a valid token
    handle_scan(Scan(token), [key.verify_key], "cab-1", at_1970)
    refused = [e for e in at_1970.journal.events() if e["type"] == "auth.refused"]
    assert [e["reason"] for e in refused] == ["clock_unset"]
    assert refused[0]["detail"].startswith("clock not set: it says 1970-01-01")
    assert all(e["type"] != "swap.started" for e in at_1970.journal.events())


def test_doctor_fails_the_clock_line_and_says_why(at_1970: CabinetController) -> None:
    check = doctor._clock(at_1970)
    assert check.verdict == "fail"
    assert check.detail.startswith("clock not set: it says 1970-01-01")
    assert "offline QR tokens are refused" in check.detail
    at_1970.clock = StoppedRtc(time.time())
    assert doctor._clock(at_1970).verdict == "ok"
