"""The controller judges a bay whose identity grace runs on every reading, even unchanged ones.

A reading equal to the last skips the tracker (``BoardObservations._nothing_to_judge``),
and only a material one is journaled; an unreadable pack reads the same poll after poll,
so without this the grace would never end -- and after a restart, whose baseline already
holds the unreadable pack, it would never start. The controller is driven in process
with a clock the test moves (the daemon's one injected clock); the journal is real.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cabinet.core.battery_rules import BatteryObs
from cabinet.core.bay_tracker import OFFLINE, BaySnapshot
from cabinet.core.custody import BOARD_WAKE_S, IDENTITY_GRACE_S, Location, Where
from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.journal import Journal, JournalUnwritableError
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus
from tests.virtual_campaign import VirtualTime  # the daemon's clock, moved by the test

BAY = 10
OLD = "BAT-0827"
KNOWN = BaySnapshot(
    online=True,
    battery_present=True,
    battery=BatteryObs(OLD, plugged=True, soc_pct=95.0, health_pct=95.0),
)
UNREADABLE = BaySnapshot(online=True, battery_present=True, battery=BatteryObs(None, plugged=True))
UNPLUGGED = BaySnapshot(online=True, battery_present=True, battery=BatteryObs(None, plugged=False))


@contextmanager
def controller(path: Path, clock: VirtualTime) -> Iterator[CabinetController]:
    bus = ModbusBus(parse_endpoint("tcp://127.0.0.1:9"))  # never connected: nothing polls
    journal = Journal(path)
    try:
        yield CabinetController(
            cabinet_id="cab-1", journal=journal, scheduler=BusScheduler(bus), clock=clock
        )
    finally:
        journal.close()


def missing_alarms(ctl: CabinetController) -> list[dict[str, Any]]:
    return [
        e
        for e in ctl.journal.events(limit=10_000)
        if e["type"] == "alarm.raised" and e["kind"] == "battery_missing"
    ]


def missing_exactly_after(ctl: CabinetController, clock: VirtualTime, seconds: float) -> None:
    """The unreadable pack in BAY: no alarm a second before ``seconds`` from now, one at it."""
    clock.t += seconds - 1
    ctl.observe_bay(BAY, UNREADABLE)
    assert missing_alarms(ctl) == []
    clock.t += 1
    ctl.observe_bay(BAY, UNREADABLE)
    assert len(missing_alarms(ctl)) == 1


def run(scenario: Any) -> None:
    async def main() -> None:
        await scenario()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()

    asyncio.run(main())


@pytest.mark.parametrize("pack", [UNREADABLE, UNPLUGGED], ids=["bms_silent", "unplugged"])
def test_an_unchanged_unreadable_reading_ends_the_grace(tmp_path: Path, pack: BaySnapshot) -> None:
    async def scenario() -> None:
        clock = VirtualTime()
        with controller(tmp_path / "journal.db", clock) as ctl:
            ctl.observe_bay(BAY, KNOWN)
            ctl.observe_bay(BAY, pack)  # material: journaled, the grace starts
            for _ in range(5):  # the same reading, poll after poll
                clock.t += (IDENTITY_GRACE_S - 0.5) / 5
                ctl.observe_bay(BAY, pack)
            assert missing_alarms(ctl) == []
            assert ctl.ledger.location(OLD) == Location(Where.BAY, bay=BAY)
            clock.t += 0.5
            ctl.observe_bay(BAY, pack)
            (alarm,) = missing_alarms(ctl)
            assert alarm["bay"] == BAY
            assert alarm["detail"] == (
                f"bay {BAY} holds a pack whose id cannot be read; {OLD} was last seen there"
            )
            # journaled with the reading: a restart finds the battery missing
            assert ctl.journal.ledger().location(OLD) == Location(Where.MISSING, bay=BAY)
            clock.t += IDENTITY_GRACE_S
            ctl.observe_bay(BAY, pack)
            assert len(missing_alarms(ctl)) == 1  # news once

    run(scenario)


def test_after_a_restart_the_grace_starts_again_from_the_first_reading(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = VirtualTime()
        with controller(tmp_path / "journal.db", clock) as ctl:
            ctl.observe_bay(BAY, KNOWN)
            ctl.observe_bay(BAY, UNREADABLE)
            clock.t += IDENTITY_GRACE_S - 1
        clock.t += 120.0  # the daemon was down a while
        with controller(tmp_path / "journal.db", clock) as ctl:
            ctl.observe_bay(BAY, UNREADABLE)  # equal to the journaled baseline
            # conservative: the grace is counted again
            missing_exactly_after(ctl, clock, IDENTITY_GRACE_S)

    run(scenario)


def test_a_board_silent_meanwhile_gives_the_pack_a_wake_window(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = VirtualTime()
        with controller(tmp_path / "journal.db", clock) as ctl:
            ctl.observe_bay(BAY, KNOWN)
            ctl.observe_bay(BAY, UNREADABLE)
            clock.t += 20.0
            ctl.observe_bay(BAY, OFFLINE)
            clock.t += 20.0
            ctl.observe_bay(BAY, UNREADABLE)  # back: its BMS link may be waking up too
            missing_exactly_after(ctl, clock, BOARD_WAKE_S)

    run(scenario)


def test_a_grace_whose_end_cannot_be_journaled_ends_on_a_later_reading(tmp_path: Path) -> None:
    """Journal first: memory is not told the battery is missing before the disk is."""

    async def scenario() -> None:
        clock = VirtualTime()
        with controller(tmp_path / "journal.db", clock) as ctl:
            ctl.observe_bay(BAY, KNOWN)
            ctl.observe_bay(BAY, UNREADABLE)
            clock.t += IDENTITY_GRACE_S
            ctl.journal._db.execute("PRAGMA query_only = 1")  # every write fails now
            with pytest.raises(JournalUnwritableError):
                ctl.observe_bay(BAY, UNREADABLE)
            assert ctl.ledger.location(OLD) == Location(Where.BAY, bay=BAY)
            ctl.journal._db.execute("PRAGMA query_only = 0")
            clock.t += 1.0
            ctl.observe_bay(BAY, UNREADABLE)
            assert len(missing_alarms(ctl)) == 1
            assert ctl.journal.ledger().location(OLD) == Location(Where.MISSING, bay=BAY)

    run(scenario)


def test_the_battery_read_again_clears_its_alarm(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = VirtualTime()
        with controller(tmp_path / "journal.db", clock) as ctl:
            ctl.observe_bay(BAY, KNOWN)
            ctl.observe_bay(BAY, UNREADABLE)
            clock.t += IDENTITY_GRACE_S
            ctl.observe_bay(BAY, UNREADABLE)
            assert len(missing_alarms(ctl)) == 1
            clock.t += 5.0
            ctl.observe_bay(BAY, KNOWN)  # the BMS answers at last: it was the same battery
            events = ctl.journal.events(limit=10_000)
            found = [e for e in events if e["type"] == "custody.changed"][-1]
            assert (found["battery_id"], found["from"], found["to"]) == (OLD, "missing", "bay 10")
            (cleared,) = [e for e in events if e["type"] == "alarm.cleared"]
            assert cleared["kind"] == "battery_missing" and cleared["bay"] == BAY
            assert cleared["detail"] == f"{OLD} seen again in bay {BAY}"

    run(scenario)


def test_a_pickup_in_doubt_behind_an_unreadable_pack_still_goes_with_the_rider(
    tmp_path: Path,
) -> None:
    """docs/swap.md §5: the grace tells the operator, the pickup rule still settles custody.

    The dispense bay went silent with its door open for rider R-7 (a pickup in doubt); it
    answers with a pack nobody can name. After the grace the battery is reported missing
    (nobody can tell); once the bay shows it gone, it went with the rider, as before.
    """

    async def scenario() -> None:
        clock = VirtualTime()
        with controller(tmp_path / "journal.db", clock) as ctl:
            ctl.observe_bay(BAY, KNOWN)
            ctl.observe_bay(BAY, OFFLINE)
            with ctl.journal.transaction() as db:  # as PickupsInDoubt.note journals it
                ctl.pickups.bays[BAY] = [OLD, "R-7", "s-7"]
                ctl.journal.put_pending_pickups(db, ctl.pickups.bays)
            ctl.observe_bay(BAY, UNREADABLE)
            assert BAY in ctl.pickups.bays  # the BMS has not said which pack sits there
            clock.t += IDENTITY_GRACE_S
            ctl.observe_bay(BAY, UNREADABLE)
            (alarm,) = missing_alarms(ctl)
            assert "cannot be read" in alarm["detail"]
            assert BAY in ctl.pickups.bays
            clock.t += 5.0
            ctl.observe_bay(BAY, BaySnapshot(online=True))  # the pack is taken out
            assert ctl.ledger.location(OLD) == Location(
                Where.RIDER, rider_id="R-7", session_id="s-7"
            )
            assert BAY not in ctl.pickups.bays
            events = ctl.journal.events(limit=10_000)
            taken = [e for e in events if e["type"] == "custody.changed"]
            assert taken[-1]["detail"] == "taken while the bay's board was silent"
            # accounted for: the operator's battery_missing for the bay is over
            (cleared,) = [e for e in events if e["type"] == "alarm.cleared"]
            assert (cleared["kind"], cleared["bay"]) == ("battery_missing", BAY)
            assert cleared["detail"] == f"{OLD} with rider R-7 (session s-7)"

    run(scenario)


def test_the_settled_pickup_says_it_comes_from_missing(tmp_path: Path) -> None:
    """Settled after the grace: the trail reads bay -> missing -> rider, the clear after it."""

    async def scenario() -> None:
        clock = VirtualTime()
        with controller(tmp_path / "journal.db", clock) as ctl:
            ctl.observe_bay(BAY, KNOWN)
            ctl.observe_bay(BAY, OFFLINE)
            with ctl.journal.transaction() as db:
                ctl.pickups.bays[BAY] = [OLD, "R-7", "s-7"]
                ctl.journal.put_pending_pickups(db, ctl.pickups.bays)
            ctl.observe_bay(BAY, UNREADABLE)
            clock.t += IDENTITY_GRACE_S
            ctl.observe_bay(BAY, UNREADABLE)
            clock.t += 5.0
            ctl.observe_bay(BAY, BaySnapshot(online=True))
            events = ctl.journal.events(limit=1000)
            trail = [(e["from"], e["to"]) for e in events if e["type"] == "custody.changed"]
            assert trail == [
                (None, "bay 10"),
                ("bay 10", "missing"),
                ("missing", "rider R-7 (session s-7)"),
            ]
            order = [e["type"] for e in events if e["type"] in ("custody.changed", "alarm.cleared")]
            assert order[-2:] == ["custody.changed", "alarm.cleared"]

    run(scenario)


UPGRADED_BAY = 3


def test_a_battery_missing_before_the_upgrade_clears_its_alarm_when_found(tmp_path: Path) -> None:
    """Schema 4 kept no bay for a missing battery; migration 5 takes it from its alarm."""

    path = tmp_path / "j.db"

    async def before() -> None:  # what the previous release (schema 4) left in the journal
        clock = VirtualTime()
        with controller(path, clock) as ctl, ctl.journal.transaction() as db:
            ctl.journal.put_custody(db, OLD, Location(Where.MISSING), clock.wall())
            ctl.emit(
                db,
                "alarm.raised",
                {
                    "kind": "battery_missing",
                    "bay": UPGRADED_BAY,
                    "detail": f"{OLD} left its bay without a session",
                },
            )

    run(before)
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    db.close()

    async def after() -> None:  # the upgraded daemon: the battery turns up in bay 3
        clock = VirtualTime()
        with controller(path, clock) as ctl:
            ctl.observe_bay(UPGRADED_BAY, KNOWN)
            cleared = [e for e in ctl.journal.events(limit=100) if e["type"] == "alarm.cleared"]
            assert [(e["kind"], e["bay"]) for e in cleared] == [("battery_missing", UPGRADED_BAY)]

    run(after)
