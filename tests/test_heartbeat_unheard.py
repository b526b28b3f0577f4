"""A board that misses the heartbeat broadcast: found, kept alive directly, and reported.

The heartbeat is a broadcast, which nobody answers; a board that hears none for 5 s cuts
its charger and keeps its door locked. A board deaf to broadcasts (a transparent gateway
without ``?baud=``, noise on its stub, a firmware quirk) used to stay in that fail-safe
for good while the daemon believed it was alive: no charging, every unlock refused. Its
own status block says so (``HEARTBEAT_OK`` cleared), and its HEARTBEAT register reads back
the last value it took: the daemon now checks both, writes that board its heartbeat
directly (an FC06 whose echo confirms it) and raises ``heartbeat_unheard`` for the bay.
Real daemon, real simulator over RTU framing, the fault injected with ``cabinet sim ctl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cabinet.daemon.bus_commands import OperatorUnlock
from cabinet.daemon.bus_scheduler import BusScheduler, Priority
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.heartbeat_keeper import HEARD_TO_CLEAR, MISSES_TO_ALARM
from cabinet.daemon.journal import Journal
from sim.bootloader import REBOOT_S
from sim.faults import FaultKind
from tests.conftest import FakeClock, cabinet_cmd, master, running_sim
from tests.daemon_harness import Cabinet, running_cabinet, wait_until

BAY = 3
#: the board's own timeout (docs/hardware.md): longer than this in fail-safe is noticed
BOARD_TIMEOUT_S = 5.0
#: a cleared alarm takes HEARD_TO_CLEAR heard broadcasts in a row, one a second
CLEARED_S = HEARD_TO_CLEAR + 20.0


def _alarms(cab: Cabinet, type_: str) -> list[dict[str, Any]]:
    return [e for e in cab.events(type_) if e["kind"] == "heartbeat_unheard"]


def _broadcasts(cab: Cabinet) -> int:
    return int(cab.state()["bus"]["broadcasts"])


def _stays_alive(cab: Cabinet, bay: int, span_s: float) -> None:
    """The board keeps its heartbeat for longer than its own timeout (sampled, not slept)."""
    until = time.monotonic() + span_s
    while time.monotonic() < until:
        assert cab.bay(bay)["heartbeat_ok"], f"bay {bay} fell into heartbeat fail-safe"


def test_a_board_deaf_to_broadcasts_is_kept_alive_and_reported(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        wait_until("the boards' heartbeat", lambda: cab.bay(BAY)["heartbeat_ok"])
        cab.ctl("fault", "broadcast_deaf", "--bay", str(BAY))
        raised = cab.wait_event("alarm.raised", kind="heartbeat_unheard")
        assert raised["bay"] == BAY
        assert "broadcast" in raised["detail"] and "?baud=" in raised["detail"]
        # from now on the daemon writes this board its heartbeat itself
        _stays_alive(cab, BAY, BOARD_TIMEOUT_S + 1.5)
        assert [a["bay"] for a in _alarms(cab, "alarm.raised")] == [BAY]  # once, no other bay
        doctor = cabinet_cmd("doctor", "-c", str(cab.config))
        line = next(x for x in doctor.stdout.splitlines() if "heartbeat" in x)
        assert line.startswith("WARN") and f"bay {BAY}" in line
        cab.ctl("heal", "broadcast_deaf", "--bay", str(BAY))
        cleared = cab.wait_event("alarm.cleared", kind="heartbeat_unheard", timeout=CLEARED_S)
        assert cleared["bay"] == BAY
        # heard again: back to the broadcast alone, and the board stays alive on it
        _stays_alive(cab, BAY, BOARD_TIMEOUT_S + 1.5)
        assert len(_alarms(cab, "alarm.raised")) == 1


def test_the_alarm_outlives_a_restart_and_clears_after_it(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        wait_until("the boards' heartbeat", lambda: cab.bay(BAY)["heartbeat_ok"])
        cab.ctl("fault", "broadcast_deaf", "--bay", str(BAY))
        cab.wait_event("alarm.raised", kind="heartbeat_unheard")
        cab.stop()
        cab.start()  # still deaf: kept alive again, the standing alarm not raised twice
        wait_until("the restarted daemon's heartbeat", lambda: cab.bay(BAY)["heartbeat_ok"])
        _stays_alive(cab, BAY, BOARD_TIMEOUT_S + 1.5)
        assert len(_alarms(cab, "alarm.raised")) == 1
        cab.stop()
        cab.ctl("heal", "broadcast_deaf", "--bay", str(BAY))
        cab.start()  # the board hears broadcasts again: the alarm left standing is cleared
        cleared = cab.wait_event("alarm.cleared", kind="heartbeat_unheard", timeout=CLEARED_S)
        assert cleared["bay"] == BAY


# -- the keeper's judgement, step by step: the daemon's poller and a real journal, in
# process, against the simulated boards over RTU framing with the boards' clock in hand


@contextlib.asynccontextmanager
async def poller_and_boards(tmp_path: Path) -> AsyncIterator[tuple[CabinetController, Any]]:
    clock = FakeClock()
    async with running_sim(clock) as sim, master(sim.url, timeout_s=1.0) as bus:
        journal = Journal(tmp_path / "journal.db")
        try:
            ctl = CabinetController(
                cabinet_id="cab-1", journal=journal, scheduler=BusScheduler(bus)
            )
            await ctl.poller.heartbeat()
            yield ctl, (sim.world, clock)
            await ctl.drain()
        finally:
            journal.close()


def _journaled(ctl: CabinetController, type_: str) -> list[dict[str, Any]]:
    events = ctl.journal.events(limit=10_000)
    return [e for e in events if e["type"] == type_ and e["kind"] == "heartbeat_unheard"]


async def _read(ctl: CabinetController, bay: int) -> None:
    await ctl.poller.read_bay(bay, Priority.ROUTINE)
    await ctl.drain()  # the direct heartbeat a suspect is written at once


def test_a_board_back_from_a_power_cut_is_no_alarm(tmp_path: Path) -> None:
    """A rebooted board is in fail-safe until the next broadcast: that is not deafness."""

    async def scenario() -> None:
        async with poller_and_boards(tmp_path) as (ctl, (world, clock)):
            world.inject(FaultKind.POWER_CUT, bay=BAY)
            world.heal(FaultKind.POWER_CUT, bay=BAY)
            clock.advance(REBOOT_S + 0.1)  # answering again, with no heartbeat yet
            assert not world.snapshot()["bays"][BAY - 1]["heartbeat_ok"]
            await _read(ctl, BAY)
            assert world.snapshot()["bays"][BAY - 1]["heartbeat_ok"]  # written directly
            for _ in range(MISSES_TO_ALARM + 1):
                await ctl.poller.heartbeat()  # heard: its register reads the broadcast back
            assert ctl.poller.heartbeats.suspects == {}
            assert _journaled(ctl, "alarm.raised") == []

    asyncio.run(scenario())


def test_deafness_is_an_alarm_only_after_read_backs_missed_twice(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with poller_and_boards(tmp_path) as (ctl, (world, clock)):
            world.inject(FaultKind.BROADCAST_DEAF, bay=BAY)
            clock.advance(BOARD_TIMEOUT_S + 0.1)
            await ctl.poller.heartbeat()  # unheard by the deaf board: it is in fail-safe
            await _read(ctl, BAY)
            assert world.snapshot()["bays"][BAY - 1]["heartbeat_ok"]  # written directly
            await ctl.poller.heartbeat()  # no verdict: written directly since the broadcast
            await ctl.poller.heartbeat()  # read-back 1 missed: one lost broadcast is noise
            assert _journaled(ctl, "alarm.raised") == []
            await ctl.poller.heartbeat()  # read-back 2 missed: deaf
            assert [a["bay"] for a in _journaled(ctl, "alarm.raised")] == [BAY]
            clock.advance(BOARD_TIMEOUT_S + 0.1)
            for _ in range(3):  # kept alive by its own heartbeat, not raised again
                await ctl.poller.heartbeat()
            assert world.snapshot()["bays"][BAY - 1]["heartbeat_ok"]
            assert len(_journaled(ctl, "alarm.raised")) == 1
            # the other boards heard every broadcast: none was ever read back
            assert set(ctl.poller.heartbeats.suspects) == {BAY}
            world.heal(FaultKind.BROADCAST_DEAF, bay=BAY)
            await ctl.poller.heartbeat()  # the first broadcast it hears...
            for _ in range(HEARD_TO_CLEAR - 1):  # ...read back at the next beat, and so on
                await ctl.poller.heartbeat()
                assert _journaled(ctl, "alarm.cleared") == []
            await ctl.poller.heartbeat()  # heard HEARD_TO_CLEAR times in a row
            assert [a["bay"] for a in _journaled(ctl, "alarm.cleared")] == [BAY]
            assert ctl.poller.heartbeats.suspects == {}

    asyncio.run(scenario())


def test_a_reading_taken_before_the_broadcast_proves_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with poller_and_boards(tmp_path) as (ctl, (_world, clock)):
            clock.advance(BOARD_TIMEOUT_S + 0.1)  # every board times out: no beat since
            keeper = ctl.poller.heartbeats
            keeper.missed(BAY, read_started=keeper.broadcast_at - 0.001)
            assert keeper.suspects == {}
            await _read(ctl, BAY)  # read after the last broadcast: a suspect now
            assert set(keeper.suspects) == {BAY}

    asyncio.run(scenario())


def test_a_technicians_open_reaches_a_board_in_fail_safe_that_hears_no_broadcast(
    tmp_path: Path,
) -> None:
    """A board in fail-safe refuses the unlock (0x06) until it gets a heartbeat: directly."""

    async def scenario() -> None:
        async with poller_and_boards(tmp_path) as (ctl, (world, clock)):
            world.inject(FaultKind.BROADCAST_DEAF, bay=BAY)
            clock.advance(BOARD_TIMEOUT_S + 0.1)
            await ctl.poller.heartbeat()  # unheard: the board stays in fail-safe
            assert not world.snapshot()["bays"][BAY - 1]["heartbeat_ok"]
            ctl.poller.carry_out([OperatorUnlock(BAY)])  # `cabinet bay open 3`
            await ctl.drain()
            assert world.snapshot()["bays"][BAY - 1]["door"] == "open"
            assert [e for e in ctl.journal.events(limit=1000) if e["type"] == "bay.fault"] == []
            assert set(ctl.poller.heartbeats.suspects) == {BAY}  # and watched from now on

    asyncio.run(scenario())


def test_a_board_that_loses_most_broadcasts_keeps_its_alarm(tmp_path: Path) -> None:
    """Noise on its stub: heard now and then is not heard again (no raise/clear flapping)."""

    async def scenario() -> None:
        async with poller_and_boards(tmp_path) as (ctl, (world, clock)):
            world.inject(FaultKind.BROADCAST_DEAF, bay=BAY)
            clock.advance(BOARD_TIMEOUT_S + 0.1)
            await ctl.poller.heartbeat()
            await _read(ctl, BAY)
            for _ in range(3):
                await ctl.poller.heartbeat()
            assert len(_journaled(ctl, "alarm.raised")) == 1
            for beat in range(3 * HEARD_TO_CLEAR):  # two broadcasts heard in every three
                if beat % 3:
                    world.heal(FaultKind.BROADCAST_DEAF, bay=BAY)
                else:
                    world.inject(FaultKind.BROADCAST_DEAF, bay=BAY)
                await ctl.poller.heartbeat()
                assert world.snapshot()["bays"][BAY - 1]["heartbeat_ok"]
            assert _journaled(ctl, "alarm.cleared") == []
            assert len(_journaled(ctl, "alarm.raised")) == 1

    asyncio.run(scenario())


def test_our_own_silence_makes_no_board_a_suspect(tmp_path: Path) -> None:
    """No broadcast for longer than the boards' timeout: every board is rightly in fail-safe."""

    async def scenario() -> None:
        async with poller_and_boards(tmp_path) as (ctl, (world, clock)):
            keeper = ctl.poller.heartbeats
            clock.advance(BOARD_TIMEOUT_S + 0.1)  # the boards time out...
            keeper.broadcast_at -= BOARD_TIMEOUT_S + 0.1  # ...as our last broadcast did
            await _read(ctl, BAY)
            assert not world.snapshot()["bays"][BAY - 1]["heartbeat_ok"]
            assert keeper.suspects == {}
            await ctl.poller.heartbeat()  # our next broadcast is what they need
            assert world.snapshot()["bays"][BAY - 1]["heartbeat_ok"]

    asyncio.run(scenario())
