"""The heartbeat: a broadcast to every board, confirmed where a board says it missed it.

A broadcast is answered by nobody, so sending it proves nothing; a board that hears no
heartbeat for 5 s cuts its charger and keeps its door locked (docs/hardware.md). Two
things read it back: every bay reading carries the board's ``HEARTBEAT_OK`` flag, and
its HEARTBEAT register holds the last value it took. A reading with the flag cleared,
taken after a broadcast the board should have heard, makes the bay a suspect: it is
written its heartbeat directly at once (an FC06 whose echo confirms it, with the top
bit set, a value no broadcast carries). Before each later broadcast its register is read
back: holding the previous broadcast's value, it heard that one (a board that rebooted
is in fail-safe until the next broadcast: that is no deafness); holding anything else
in two read-backs in a row, it does not hear broadcasts -- a transparent gateway without
``?baud=``, noise on its stub, a firmware quirk -- and ``heartbeat_unheard`` is raised
for the bay, which keeps getting its heartbeat directly (one read and one write a
second) until a read-back shows it heard one. The read-back comes a second after the
broadcast it checks, never straight after it, where a gateway that does not keep the
broadcast's quiet would garble it. The bays under the alarm are kept in the journal, so
a restarted daemon checks them first and clears an alarm that no longer holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from cabinet.daemon.bus_scheduler import BusScheduler, Priority
from cabinet.daemon.clock import Clock
from cabinet.daemon.journal import Journal, JournalError
from cabinet.daemon.journal_door import Record
from drivers.boards import BayBoard
from drivers.modbus_bus import BusError
from protocol import bay_map
from protocol.errors import ProtocolError

log = structlog.get_logger("controller")

#: The journal's runtime state: the bays under ``heartbeat_unheard``, sorted.
UNHEARD = "heartbeat_unheard"
#: Read-backs in a row that missed the broadcast before the alarm: one lost broadcast
#: (a burst of noise) is not deafness.
MISSES_TO_ALARM = 2
#: Read-backs in a row that heard the broadcast before the alarm clears: a board that
#: loses most broadcasts (noise on its stub) keeps its alarm rather than raising and
#: clearing it every few seconds (10 s without a lost broadcast).
HEARD_TO_CLEAR = 10
#: Broadcast values count 1..0x7FFF (never 0, the register's power-up value: a board that
#: restarted must not read as one that heard); a value written to one board directly has
#: the top bit set, so a read-back tells the two apart ("any value", docs/hardware.md).
COUNTER_MASK = 0x7FFF
DIRECT = 0x8000


@dataclass(slots=True)
class Suspect:
    """A board that was seen in fail-safe after a broadcast, until it hears them again."""

    misses: int = 0  # read-backs in a row that missed the broadcast
    heard: int = 0  # read-backs in a row that heard it
    written: int | None = None  # ``sent`` when last written directly: no verdict before
    checked: int | None = None  # ``sent`` at its last verdict: one verdict per broadcast


class HeartbeatKeeper:
    """Sends the heartbeat, and makes sure every board took it."""

    def __init__(
        self,
        *,
        scheduler: BusScheduler,
        clock: Clock,
        journal: Journal,
        record: Record,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.scheduler = scheduler
        self.clock = clock
        self.journal = journal
        self._record = record
        self._spawn = spawn
        self.counter = 0  # the value of the latest broadcast on the line (0: none yet)
        self.sent = 0  # broadcasts on the line so far
        self._failing = False
        #: when the latest broadcast was on the line (its quiet kept): a reading that
        #: started later, within a board's timeout, comes from a board that should have
        #: heard it
        self.broadcast_at = float("inf")
        self.suspects: dict[int, Suspect] = {}
        stored = journal.runtime_state(UNHEARD) or []
        self.unheard: set[int] = {bay for bay in stored if isinstance(bay, int)}
        for bay in self.unheard:  # written and checked from the first beat
            self.suspects[bay] = Suspect(misses=MISSES_TO_ALARM)

    async def beat(self, priority: Priority = Priority.ACTIVE) -> None:
        """The read-back of every suspect bay, then one broadcast."""
        for bay in sorted(self.suspects):
            await self._check(bay, priority)
        counter = self.counter % COUNTER_MASK + 1
        try:
            await self.scheduler.submit(
                priority,
                lambda bus: bus.broadcast_register(bay_map.CommandReg.HEARTBEAT, counter),
            )
        except BusError as exc:
            if not self._failing:  # once per episode, not once a second
                log.warning("heartbeat_failed", error=str(exc))
            self._failing = True
            return
        self.counter = counter
        self.sent += 1
        self.broadcast_at = self.clock.monotonic()
        if self._failing:
            log.info("heartbeat_sent_again")
        self._failing = False

    def missed(self, bay: int, read_started: float) -> None:
        """A reading of ``bay`` shows its board in heartbeat fail-safe.

        Only a reading that started after a broadcast, within a board's timeout of it,
        counts: before it the board may not have had it yet, and after our own gap (an
        adapter lost, broadcasts failing) every board is in fail-safe through no fault of
        its own. A new suspect is written its heartbeat at once, not a beat later.
        """
        since = read_started - self.broadcast_at
        if not 0.0 < since < bay_map.HEARTBEAT_TIMEOUT_S or bay in self.suspects:
            return
        self.suspects[bay] = Suspect()
        log.warning("heartbeat_missed", bay=bay)
        self._spawn(self._write_direct(bay, Priority.ACTIVE))

    async def revive(self, bay: int, priority: Priority) -> None:
        """``bay``'s board refused an unlock in fail-safe: its heartbeat, straight to it.

        Directly rather than one more broadcast: the echo confirms the board took it, and
        a board deaf to broadcasts hears only this. A broadcast should have reached it by
        now, so it is a suspect too (read back from the next beat on).
        """
        if self.clock.monotonic() > self.broadcast_at and bay not in self.suspects:
            self.suspects[bay] = Suspect()
            log.warning("heartbeat_missed", bay=bay)
        await self._write_direct(bay, priority)

    async def _check(self, bay: int, priority: Priority) -> None:
        """Did ``bay`` take the latest broadcast? If not, write it its heartbeat directly."""
        suspect = self.suspects.get(bay)
        if suspect is None or self.sent in (suspect.written, suspect.checked):
            return  # written directly since the latest broadcast, or judged on it already
        suspect.checked = self.sent
        held = None
        if self.sent:
            with contextlib.suppress(BusError, ProtocolError, ValueError):
                # lost or garbled: no verdict, and the board is written directly all the same
                (held,) = await self.scheduler.submit(
                    priority, lambda bus: bus.read_holding(bay, bay_map.CommandReg.HEARTBEAT, 1)
                )
        if held == self.counter:
            suspect.misses, suspect.heard = 0, suspect.heard + 1
            if bay not in self.unheard or suspect.heard >= HEARD_TO_CLEAR:
                self._heard(bay)
            return
        await self._write_direct(bay, priority)
        if held is None:
            return
        suspect.misses, suspect.heard = suspect.misses + 1, 0
        if suspect.misses >= MISSES_TO_ALARM and bay not in self.unheard:
            self._alarm(bay, raised=True)

    async def _write_direct(self, bay: int, priority: Priority) -> None:
        value = self.counter | DIRECT
        try:
            await self.scheduler.submit(priority, lambda bus: BayBoard(bus, bay).heartbeat(value))
        except BusError as exc:
            log.debug("heartbeat_direct_failed", bay=bay, error=str(exc))  # a silent board
            return
        if (suspect := self.suspects.get(bay)) is not None:
            suspect.written = self.sent

    def _heard(self, bay: int) -> None:
        if bay in self.unheard and not self._alarm(bay, raised=False):
            return  # not journaled: still a suspect, cleared at the next read-back
        self.suspects.pop(bay, None)

    def _alarm(self, bay: int, *, raised: bool) -> bool:
        """Journal the alarm with the bays under it; False if the journal refused."""
        unheard = self.unheard | {bay} if raised else self.unheard - {bay}
        detail = (
            f"bay {bay}'s board misses the heartbeat broadcast: the daemon writes it its "
            "heartbeat directly (check the wiring and, through a transparent gateway, "
            "the bus URL's ?baud=)"
            if raised
            else f"bay {bay}'s board hears the heartbeat broadcast again"
        )
        try:
            self._record(
                (
                    "alarm.raised" if raised else "alarm.cleared",
                    {"kind": "heartbeat_unheard", "bay": bay, "detail": detail},
                ),
                change=lambda db: self.journal.put_runtime_state(db, UNHEARD, sorted(unheard)),
            )
        except JournalError:
            return False  # journal_unwritable is its own alarm; tried again at the next beat
        self.unheard = unheard
        (log.warning if raised else log.info)("heartbeat_unheard", bay=bay, active=raised)
        return True
