"""`kill -9` of the daemon at several points of a swap: restart, reconcile, nothing lost."""

from __future__ import annotations

from pathlib import Path

from cabinet.core.custody import Where
from cabinet.daemon.journal import Journal
from tests.daemon_harness import Cabinet, running_cabinet
from tests.test_swap_end_to_end import SWAP_STEPS, collect, deposit


def custody(cab: Cabinet, battery_id: str) -> tuple[Where, object]:
    journal = Journal(cab.journal_path)
    try:
        location = journal.ledger().location(battery_id)
    finally:
        journal.close()
    assert location is not None, f"{battery_id} is nowhere"
    return location.where, location.bay if location.where is Where.BAY else location.rider_id


def test_killed_while_the_return_door_is_open(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        started = cab.swap_begins("R-1")
        session = started["session_id"]
        cab.wait_event("swap.door_opened", session_id=session, purpose="return")
        cab.kill9()
        cab.start()
        assert cab.events("cabinet.started")[-1]["resumed_session"] == session
        deposit(cab, started["return_bay"], "BAT-K1")
        collect(cab, started["dispense_bay"])
        cab.wait_event("swap.completed", session_id=session)
        assert cab.session_events(session) == SWAP_STEPS
        assert custody(cab, "BAT-K1") == (Where.BAY, started["return_bay"])
        assert custody(cab, started["reserved"]) == (Where.RIDER, "R-1")


def test_killed_after_the_deposit_while_the_rider_collects(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        started = cab.swap_begins("R-2")
        session, out = started["session_id"], started["dispense_bay"]
        deposit(cab, started["return_bay"], "BAT-K2")
        cab.wait_event("swap.battery_deposited", session_id=session)
        cab.wait_event("swap.door_opened", session_id=session, purpose="dispense")
        cab.kill9()
        collect(cab, out)  # the rider does not wait for the daemon
        cab.start()
        done = cab.wait_event("swap.completed", session_id=session)
        assert done["dispensed"] == started["reserved"]
        assert cab.session_events(session) == SWAP_STEPS  # each step exactly once
        assert cab.bay(out)["door_open_count"] == 1  # dispensed once, never reopened
        assert custody(cab, "BAT-K2") == (Where.BAY, started["return_bay"])
        assert custody(cab, started["reserved"]) == (Where.RIDER, "R-2")


def test_killed_right_after_the_scan(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        started = cab.swap_begins("R-3")
        cab.kill9()
        cab.start()
        session = started["session_id"]
        deposit(cab, started["return_bay"], "BAT-K3")
        collect(cab, started["dispense_bay"])
        cab.wait_event("swap.completed", session_id=session)
        opened = {b["bay"] for b in cab.state()["bays"] if b["door_open_count"]}
        assert opened == {started["return_bay"], started["dispense_bay"]}


def test_seq_is_gap_free_across_restarts(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        cab.swap_begins("R-4")
        cab.kill9()
        cab.start()
        cab.stop()
        cab.start()
        seqs = [e["seq"] for e in cab.events()]
        assert seqs == list(range(1, len(seqs) + 1))
        ids = [e["id"] for e in cab.events()]
        assert len(set(ids)) == len(ids)
