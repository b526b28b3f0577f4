"""Hostile input at the cabinet's edges: a scanner flood, a journal that cannot be written.

Everything runs against the real daemon and simulator, seen as a rider (the
scanner), a technician (``cabinet status``) and an operator (MQTT) would see it.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cabinet.core.refusal_limit import QUIET_S, WINDOW_S, RefusalLimit
from cabinet.demo.backend import Backend
from sim.endpoints import parse_listen
from tests.conftest import cabinet_cmd
from tests.daemon_harness import Cabinet, running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto

PER_MINUTE = 10  # scanner.refused_scans_per_minute's default


def scan_lines(cab: Cabinet, lines: list[str]) -> None:
    """Many scans in one go through the simulator's scanner (one control connection)."""
    spec = parse_listen(cab.sim.control, allow_pty=False)
    requests = b"".join(json.dumps({"verb": "scan", "text": t}).encode() + b"\n" for t in lines)
    with socket.create_connection((spec.host, spec.port), timeout=30) as sock:
        sock.sendall(requests)
        replies = sock.makefile("rb")
        for _ in lines:
            assert json.loads(replies.readline())["ok"] is True


def status(cab: Cabinet) -> dict[str, Any]:
    result = cabinet_cmd("status", "--json", "-c", str(cab.config), timeout=20)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_a_few_refusals_are_recorded_the_rest_summarised_once() -> None:
    limit = RefusalLimit(3)
    admitted = [limit.admit("qr", "malformed", now=t * 0.01, ts_ms=t) for t in range(10)]
    assert admitted == [True] * 3 + [False] * 7
    assert limit.due(now=0.09 + QUIET_S - 0.01) == []  # still going: not over yet
    (burst,) = limit.due(now=0.09 + QUIET_S)
    assert (burst.count, burst.first_ts, burst.last_ts, burst.reasons) == (
        7,
        3,
        9,
        {"malformed": 7},
    )
    assert limit.due(now=100.0) == [] and limit.next_due() is None  # summarised once
    assert limit.admit("qr", "expired", now=10.0, ts_ms=0) is False  # same minute: counted
    assert limit.admit("qr", "expired", now=WINDOW_S + 1, ts_ms=0) is True  # a new minute


@given(
    per_window=st.integers(1, 5),
    gaps=st.lists(st.floats(0.0, 30.0, allow_nan=False), min_size=1, max_size=200),
)
def test_every_refusal_is_either_recorded_or_counted_and_records_are_bounded(
    per_window: int, gaps: list[float]
) -> None:
    limit = RefusalLimit(per_window)
    now, recorded, summarised, times = 0.0, 0, 0, []
    for gap in gaps:
        now += gap
        summarised += sum(b.count for b in limit.due(now))
        if limit.admit("qr", "malformed", now=now, ts_ms=int(now * 1000)):
            recorded += 1
            times.append(now)
    summarised += sum(b.count for b in limit.due(now + WINDOW_S))
    assert recorded + summarised == len(gaps)
    for t in times:  # never more than per_window recorded within any window's span
        assert sum(t <= u < t + WINDOW_S for u in times) <= 2 * per_window


def test_a_flood_of_garbage_scans_is_summarised_and_a_rider_still_swaps(tmp_path: Path) -> None:
    with running_cabinet(tmp_path, seed=21) as cab:
        cab.scan("FORGED-0")  # the reader is connected: nothing of the flood is lost
        cab.wait_event("auth.refused")  # and its refusal journaled before the flood
        refused_before = len(cab.events("auth.refused"))
        token = cab.token("R-after-flood")
        forged = [f"FORGED-{n}" for n in range(1, 1001)]
        mangled = ["\u00ff\u00fe not a code"] * 1000
        sent = time.monotonic()
        scan_lines(cab, [*forged, *mangled, token])
        started = cab.wait_event("swap.started", rider_id="R-after-flood")
        latency = time.monotonic() - sent
        burst = cab.wait_event("auth.refused_burst", timeout=20)
        print(f"2,000 garbage scans then a valid token: swap.started after {latency:.2f} s")
        refused = cab.events("auth.refused")
        assert len(refused) == PER_MINUTE  # the first ten, one by one, as before
        assert len(refused) - refused_before == PER_MINUTE - 1
        assert burst["source"] == "qr"
        assert burst["count"] == 2000 - (PER_MINUTE - 1)  # every other one is counted
        assert burst["reasons"] == {"malformed": 1000 - (PER_MINUTE - 1), "garbage": 1000}
        assert burst["first_ts"] <= burst["last_ts"]
        assert len(cab.events("auth.refused_burst")) == 1  # one summary for the burst
        assert started["return_bay"] is not None


def fill(journal: Path, leave_bytes: int, cap_bytes: int) -> None:
    """Fill the journal's budget as a log file filling the disk would, from outside."""
    db = sqlite3.connect(journal, isolation_level=None)
    try:
        page = db.execute("PRAGMA page_size").fetchone()[0]
        used = (
            db.execute("PRAGMA page_count").fetchone()[0]
            - db.execute("PRAGMA freelist_count").fetchone()[0]
        ) * page
        db.execute("CREATE TABLE filler (b BLOB)")
        db.execute("INSERT INTO filler VALUES (zeroblob(?))", (cap_bytes - used - leave_bytes,))
    finally:
        db.close()


def free(journal: Path) -> None:
    db = sqlite3.connect(journal, isolation_level=None)
    try:
        db.execute("DROP TABLE filler")
    finally:
        db.close()


def test_a_full_journal_refuses_riders_visibly_and_resumes_by_itself(
    tmp_path: Path, broker: Mosquitto
) -> None:
    cap_mb = 1.0
    extra: dict[str, dict[str, Any]] = {
        "cabinet": {"journal_max_mb": cap_mb},
        "mqtt": {"url": broker.url},
    }
    backend = Backend("127.0.0.1", broker.port)
    try:
        with running_cabinet(tmp_path, seed=22, extra=extra) as cab:
            assert status(cab)["refusal"] is None
            fill(cab.journal_path, leave_bytes=16 * 1024, cap_bytes=int(cap_mb * 1024 * 1024))
            cab.scan(cab.token("R-full"))
            # the rider is turned away, and everyone can see why
            shown = wait_until(
                "status to say why",
                lambda: (s := status(cab))["refusal"] == "journal_unwritable" and s,
            )
            assert shown["cabinet"]["swaps_allowed"] is False
            assert shown["tasks_failing"] == []  # the scanner and the fleet link carry on
            state = wait_until(
                "the retained state to say so",
                lambda: (
                    (s := backend.state.get("cab-test"))
                    and s["cabinet"]["refusal"] == "journal_unwritable"
                    and s
                ),
            )
            assert state["cabinet"]["swaps_allowed"] is False
            assert not cab.events("swap.started")
            assert all(cab.bay(n)["door"] == "closed" for n in range(1, 13))
            alarm = cab.wait_event("alarm.raised", kind="journal_unwritable")
            assert "database or disk is full" in alarm["detail"]
            cab.wait_event("swap.refused", rider_id="R-full", reason="journal_unwritable")
            wait_until(
                "the operator to get the alarm",
                lambda: any(
                    e["type"] == "alarm.raised" and e["data"]["kind"] == "journal_unwritable"
                    for e in backend.event_list("cab-test")
                ),
            )
            free(cab.journal_path)
            wait_until("the cabinet to resume", lambda: status(cab)["refusal"] is None)
            cab.wait_event("alarm.cleared", kind="journal_unwritable")
            started = cab.swap_begins("R-after-space")
            assert started["rider_id"] == "R-after-space"
            assert status(cab)["tasks_failing"] == []
            log = (tmp_path / "daemon.log").read_text()
            assert "cannot rollback" not in log and "Traceback" not in log
    finally:
        backend.close()
