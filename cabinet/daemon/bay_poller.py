"""The bay poller: observes the boards for the controller and carries out its bus commands.

Theory of operation: the controller decides and never touches the bus; this is
its hands and eyes. The poll cycle reads one bay at a time through the bus
scheduler and hands each reading to ``CabinetController.observe_bay`` (the
cabinet board's to ``observe_cabinet``, who answers to ``bus_truth``);
the session's bays are re-read every ``HOT_BAY_INTERVAL_S`` and the cabinet board
every ``cabinet_board_interval_s`` (both checked between bay reads, so neither waits
for the end of a long 9600-baud cycle, and a fast line does not spend a read on the
cabinet board every cycle); the charging plan
the controller draws is written to the boards (re-sent when a board may have
forgotten it); the heartbeat broadcast keeps the boards out of fail-safe.
Bus commands the controller journaled (``bus_commands``) are carried out here:
a session's unlock (dropped if the session no longer wants that door when the
frame is about to go), a person's unlock, and the safety writes
(``safety_writes``, confirmed by read-back).

A reading that fails is stale, not news: the last snapshot stands until the bus
isolates the unit, and only then is the bay reported offline. A lost adapter or
gateway is reported once and reopened with back-off before the next cycle; a
cycle starts at most every ``MIN_POLL_CYCLE_S``, so calls that fail at once
never make a busy loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from cabinet.core.bay_tracker import OFFLINE, BaySnapshot, snapshot_from_status
from cabinet.core.swap_machine import LockJammed, Unlock
from cabinet.daemon.bus_commands import BusCommand, MakeSafe, OperatorUnlock
from cabinet.daemon.bus_scheduler import BusScheduler, Priority
from cabinet.daemon.heartbeat_keeper import HeartbeatKeeper
from cabinet.daemon.journal import JournalError
from cabinet.daemon.safety_writes import SafetyWriter
from drivers.boards import BayBoard, CabinetBoard, EnergyMeter
from drivers.modbus_bus import (
    HEARTBEAT_FAILSAFE_EXCEPTION,
    BusError,
    BusUnavailableError,
    ExceptionReplyError,
    ModbusBus,
    UnitIsolatedError,
)
from protocol import bay_map
from protocol.errors import ProtocolError, UnknownMapVersionError
from protocol.units import BAY_UNITS, CABINET_BOARD_UNIT, ENERGY_METER_UNIT

if TYPE_CHECKING:
    from cabinet.daemon.controller import CabinetController

log = structlog.get_logger("controller")
_T = TypeVar("_T")

# A bay board in heartbeat fail-safe refuses an unlock with 0x06 (busy: retry after a
# heartbeat); 0x04 (device failure) is a failing board. Rule in docs/hardware.md.
HEARTBEAT_FAILSAFE_CODE = HEARTBEAT_FAILSAFE_EXCEPTION
HOT_BAY_INTERVAL_S = 0.1  # a session's bay is re-read this often: a door seen open within ~0.1 s
HEARTBEAT_INTERVAL_S = 1.0  # five per board timeout: one lost broadcast never trips a board
CHARGER_REFRESH_S = 60.0  # re-send unchanged charger settings: a rebooted board forgets them
METER_INTERVAL_S = 10.0
#: A poll cycle never starts sooner than this after the previous one started. A healthy
#: cycle takes longer anyway (12 bays + heartbeat: ~0.11 s of wire at
#: 115200 baud, ~0.97 s at 9600); this only bites when every call fails at once (adapter
#: gone, every unit isolated), where it caps the poller at 10 cycles a second instead of a
#: busy loop. (It was 0.25 s, which set the cycle itself at 115200: 2.29 x the wire minimum,
#: bench/daemon_cycle.py.)
MIN_POLL_CYCLE_S = 0.1
#: While a firmware transfer waits (``Priority.BULK``), a cycle starts about this often
#: (every bay read once a second, DESIGN.md) and the line is lent to the transfer until
#: the next cycle is due, so no chunk is on the wire when it starts. A bay's read still
#: moves within its cycle by a few reads (the cabinet board, the heartbeat, a session's
#: bays), so the cycle is shortened by that slack: this share of the cycle's own length
#: (0.1 s at 19200 baud), at least ``BULK_SLACK_MIN_S`` (docs/firmware.md).
BULK_POLL_CYCLE_S = 1.0
BULK_SLACK_SHARE = 0.2
BULK_SLACK_MIN_S = 0.05
#: Pauses between attempts to reopen a lost adapter or gateway.
BUS_REOPEN_S = (0.5, 1.0, 2.0, 5.0, 10.0)


class BayPoller:
    """Reads the boards into the controller and carries out the bus commands it decides."""

    def __init__(
        self,
        controller: CabinetController,
        scheduler: BusScheduler,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.controller = controller
        self.scheduler = scheduler
        self.clock = controller.clock
        self._spawn = spawn
        self.safety = SafetyWriter(
            scheduler=scheduler,
            clock=controller.clock,
            spawn=spawn,
            still_wanted=controller.safety_still_wanted,
            record=lambda type_, payload: controller.record((type_, payload)),
            charger_off=self._charger_confirmed_off,
        )
        self.on_unlock_sent: Callable[[int], None] | None = None  # for latency measurement
        self._last_read: dict[int, float] = {}
        #: each bay's status read as a scheduler job, made once: a read is made per
        #: transaction, and a new job and board object each time showed in its cost
        self._status_reads = {bay: _status_read(scheduler.bus, bay) for bay in BAY_UNITS}
        self._cabinet_read_at = float("-inf")  # when the cabinet board was last asked
        #: the last status block each bay returned, its snapshot and whether the board has
        #: its heartbeat: the board driver hands back the same (frozen) object for an
        #: unchanged block, so it is reduced only once
        self._reduced: dict[int, tuple[bay_map.BayStatus, BaySnapshot, bool]] = {}
        self._commanded: dict[int, tuple[bool, float, float]] = {}
        self.heartbeats = HeartbeatKeeper(
            scheduler=scheduler,
            clock=controller.clock,
            journal=controller.journal,
            record=controller.record,
            spawn=spawn,
        )
        self._last_meter = float("-inf")
        self.last_answer_at = self.clock.monotonic()  # a unit answered (any unit, any call)
        self._answers_seen = 0

    # -- carrying out what the controller decided ------------------------------------------

    def carry_out(self, commands: list[BusCommand]) -> None:
        """Start the bus I/O for journaled decisions (in the background: never blocks)."""
        for command in commands:
            if isinstance(command, Unlock):
                self._spawn(self._unlock(command.bay))
            elif isinstance(command, OperatorUnlock):
                self._spawn(self._operator_unlock(command.bay))
            elif isinstance(command, MakeSafe):
                self.safety.make_safe(command.target)

    async def _unlock(self, bay: int) -> None:
        c = self.controller
        session_id = c.state.session_id

        async def unlock_if_still_wanted(bus: ModbusBus) -> bool:
            # Checked when the frame is about to go out, not when it was queued: a session
            # aborted meanwhile (smoke) must not have a door open after the fact.
            if c.state.session_id != session_id or bay not in c.hot_bays():
                return False
            await BayBoard(bus, bay).unlock()
            return True

        try:
            sent = await self._through_failsafe(bay, unlock_if_still_wanted)
        except ExceptionReplyError as exc:
            failsafe = exc.code == HEARTBEAT_FAILSAFE_CODE
            log.warning(
                "unlock_refused",
                bay=bay,
                error=str(exc),
                cause="heartbeat fail-safe" if failsafe else "board failure",
            )
            if not failsafe:
                c.feed([LockJammed(bay)])
            return
        except BusError as exc:
            log.warning("unlock_failed", bay=bay, error=str(exc))
            return  # the unlock timer will notice the door never opened
        if not sent:
            log.info("unlock_dropped", bay=bay, reason="session no longer wants this door")
            return
        if self.on_unlock_sent is not None:
            self.on_unlock_sent(bay)
        await self.read_bay(bay, Priority.ACTIVE)

    async def _through_failsafe(self, bay: int, unlock: Callable[[ModbusBus], Awaitable[_T]]) -> _T:
        """Unlock ``bay``; refused in heartbeat fail-safe (0x06), revive the board, once more.

        The board is not jammed then, it wants a heartbeat (docs/hardware.md): written to
        it directly, so a board deaf to the broadcast gets it too (heartbeat_keeper).
        """
        try:
            return await self.scheduler.submit(Priority.UNLOCK, unlock)
        except ExceptionReplyError as exc:
            if exc.code != HEARTBEAT_FAILSAFE_CODE:
                raise
        await self.heartbeats.revive(bay, Priority.UNLOCK)
        return await self.scheduler.submit(Priority.UNLOCK, unlock)

    async def _operator_unlock(self, bay: int) -> None:
        try:
            await self._through_failsafe(bay, lambda bus: BayBoard(bus, bay).unlock())
        except BusError as exc:
            self.controller.record(
                ("bay.fault", {"bay": bay, "reason": f"remote open failed: {exc}"})
            )

    # -- the forever-loops -------------------------------------------------------------------

    async def poll_forever(self) -> None:
        """The poll cycle: every bay once, the session's bays and the cabinet board when due.

        Paced: a cycle starts at most every ``MIN_POLL_CYCLE_S`` (the session's bays are
        still read every ``HOT_BAY_INTERVAL_S`` meanwhile), and a lost adapter is reopened
        with back-off before the next cycle — so calls that fail at once never make a
        busy loop.
        """
        c = self.controller
        while True:
            started = self.clock.monotonic()
            if c.bus_lost is not None:
                await self._reopen_bus()
            for bay in BAY_UNITS:
                await self.read_bay(bay, Priority.ROUTINE)
                # the hot bays and the cabinet board are checked between bay reads, here
                # rather than in coroutines of their own: most reads have neither due
                if c.hot_bays():
                    await self._read_hot_bays()
                if self.clock.monotonic() >= self._cabinet_due():
                    await self.read_cabinet()
            await self.apply_charging()
            await self._read_meter_if_due()
            c.bus_truth.alarms_due()
            c.last_cycle_at = self.clock.monotonic()
            c.poll_cycles += 1
            await self._pace(started)

    async def _pace(self, started: float) -> None:
        """Wait out the rest of the cycle, keeping the session's bays fresh; lend the rest.

        Without bulk work a cycle follows the last one after ``MIN_POLL_CYCLE_S``. With a
        firmware transfer waiting, the cycle is stretched to once a second less its slack,
        the cabinet board is read once in it, and the line is lent to the transfer until
        the next cycle is due (``BusScheduler.lend_to_bulk``), or until its next chunk
        would not fit before then: then the next cycle starts at once.
        """
        if self.scheduler.waiting(Priority.BULK):
            if self._cabinet_read_at < started:  # its 1 s interval would let it slip a cycle
                await self.read_cabinet()
            spent = self.clock.monotonic() - started
            period = BULK_POLL_CYCLE_S - max(BULK_SLACK_MIN_S, BULK_SLACK_SHARE * spent)
        else:
            period = MIN_POLL_CYCLE_S
        self.scheduler.lend_to_bulk(started + period - self.clock.monotonic())
        while (left := started + period - self.clock.monotonic()) > 0:
            if await self.scheduler.lend_given_back(min(left, HOT_BAY_INTERVAL_S)):
                break  # the transfer cannot use the rest: no idle line, the next cycle now
            await self._read_hot_bays()

    async def heartbeat_forever(self) -> None:
        """Tell the boards we are alive, in a task of its own so a poller crash cannot stop it."""
        while True:
            await self.heartbeat()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def safety_writes_forever(self) -> None:
        """Re-try every unconfirmed safety write when its back-off is over."""
        await self.safety.forever()

    async def read_everything(self) -> None:
        """Heartbeat, then every board once at ACTIVE priority: the picture for recovery."""
        await self.heartbeat()
        await self.read_cabinet()
        for bay in BAY_UNITS:
            await self.read_bay(bay, Priority.ACTIVE)

    # -- observations --------------------------------------------------------------------------

    async def refresh_bay(self, bay: int) -> BaySnapshot | None:
        """Read ``bay`` now (ahead of routine polling); its snapshot, or None if unknown."""
        await self.read_bay(bay, Priority.ACTIVE)
        return self.controller.snapshots.get(bay)

    async def read_bay(self, bay: int, priority: Priority) -> None:
        """Read one bay board and hand the reading (or its silence) to the controller."""
        c = self.controller
        self._last_read[bay] = started = self.clock.monotonic()
        read = self._status_reads.get(bay) or _status_read(self.scheduler.bus, bay)
        try:
            status = await self.scheduler.submit(priority, read)
        except BusUnavailableError as exc:
            c.bus_truth.bus_unavailable(exc)
            return  # nobody was asked: the bay's picture is stale, not news
        except UnitIsolatedError:
            c.bus_truth.unit_silent(bay)
            c.observe_bay(bay, OFFLINE)
            return
        except UnknownMapVersionError as exc:
            c.bus_truth.unit_answered(bay)
            c.board_unreadable(bay, str(exc))
            return
        except (BusError, ProtocolError):
            if self.scheduler.bus.is_isolated(bay):
                c.bus_truth.unit_silent(bay)
                c.observe_bay(bay, OFFLINE)
            return  # stale: the last snapshot stands until the unit is isolated
        c.bus_truth.unit_answered(bay)
        last = self._reduced.get(bay)
        if last is None or last[0] is not status:
            heard = bay_map.IoFlag.HEARTBEAT_OK in status.io
            last = self._reduced[bay] = (status, snapshot_from_status(status), heard)
        if not last[2]:
            self.heartbeats.missed(bay, started)  # in fail-safe: did it miss a broadcast?
        try:
            c.observe_bay(bay, last[1])
        except JournalError:
            return  # not recorded, so not acted on: the next reading retries (journal.py logs it)

    def _cabinet_due(self) -> float:
        """When the cabinet board is next read: ``cabinet_board_interval_s`` after the last ask."""
        return self._cabinet_read_at + self.controller.settings.cabinet_board_interval_s

    async def read_cabinet(self) -> None:
        """Read the cabinet board; close the contactor if the controller wants it closed."""
        self._cabinet_read_at = self.clock.monotonic()
        status = await self._read_unit(
            CABINET_BOARD_UNIT, lambda bus: CabinetBoard(bus).read_status()
        )
        if status is not None and self.controller.observe_cabinet(status):
            await self._close_contactor()

    async def _read_unit(self, unit: int, read: Callable[[ModbusBus], Awaitable[_T]]) -> _T | None:
        """A routine read of a board that is not a bay: its answer, or None with the silence noted.

        A failed read leaves the last picture standing until the bus isolates the unit
        (then it is news: ``unit.offline``); a lost adapter is the bus's news, not the unit's.
        """
        c = self.controller
        try:
            result = await self.scheduler.submit(Priority.ROUTINE, read)
        except BusUnavailableError as exc:
            c.bus_truth.bus_unavailable(exc)
            return None
        except (BusError, ProtocolError):
            if self.scheduler.bus.is_isolated(unit):
                c.bus_truth.unit_silent(unit)
            return None
        c.bus_truth.unit_answered(unit)
        return result

    async def _close_contactor(self) -> None:
        """Close the contactor; the cabinet board is read back at the next bay boundary.

        Routine, not a safety write: a close that did not land is seen by that read-back
        and written again. A failed write waits for the next due reading (a dead board is
        not asked twice per bay).
        """
        try:
            await self.scheduler.submit(
                Priority.ROUTINE, lambda bus: CabinetBoard(bus).set_contactor(closed=True)
            )
        except BusError as exc:
            log.info("contactor_write_failed", closed=True, error=str(exc))
            return
        self._cabinet_read_at = float("-inf")  # read back now, not an interval from now

    async def _read_hot_bays(self) -> None:
        for bay in self.controller.hot_bays():
            if self.clock.monotonic() - self._last_read.get(bay, 0.0) >= HOT_BAY_INTERVAL_S:
                await self.read_bay(bay, Priority.ACTIVE)

    async def _read_meter_if_due(self) -> None:
        now = self.clock.monotonic()
        if now - self._last_meter < METER_INTERVAL_S:
            return
        self._last_meter = now
        reading = await self._read_unit(ENERGY_METER_UNIT, lambda bus: EnergyMeter(bus).read())
        if reading is not None:
            self.controller.meter = reading

    # -- charging and heartbeat --------------------------------------------------------------

    async def apply_charging(self) -> None:
        """Write the controller's charging plan, re-sending what a board may have forgotten."""
        now = self.clock.monotonic()
        for bay, amps in self.controller.charging_plan().items():
            last = self._commanded.get(bay)
            if (
                last is None
                or (last[0], last[1]) != (amps > 0, amps)
                or (now - last[2] > CHARGER_REFRESH_S)
            ):
                await self._charger(bay, amps, Priority.ROUTINE)

    async def _charger(self, bay: int, amps: float, priority: Priority) -> None:
        enabled = amps > 0.0
        try:
            await self.scheduler.submit(
                priority,
                lambda bus: BayBoard(bus, bay).set_charger(enabled=enabled, current_limit_a=amps),
            )
        except BusError as exc:
            log.debug("charger_write_failed", bay=bay, error=str(exc))
            self._commanded.pop(bay, None)
            return
        self._commanded[bay] = (enabled, amps, self.clock.monotonic())

    def _charger_confirmed_off(self, bay: int) -> None:
        self._commanded[bay] = (False, 0.0, self.clock.monotonic())

    def forget_charger_command(self, bay: int) -> None:
        """Someone else drove this bay's charger: the policy re-sends its setting next cycle."""
        self._commanded.pop(bay, None)

    async def heartbeat(self, priority: Priority = Priority.ACTIVE) -> None:
        """One heartbeat broadcast, confirmed for the boards that missed one (heartbeat_keeper)."""
        await self.heartbeats.beat(priority)

    # -- is the bus there at all ---------------------------------------------------------------

    def unit_silence_s(self) -> float:
        """Seconds since any unit last answered anything (a read, a write, an exception)."""
        answers = sum(stats.ok for stats in self.scheduler.bus.stats.values())
        if answers != self._answers_seen:
            self._answers_seen = answers
            self.last_answer_at = self.clock.monotonic()
        return self.clock.monotonic() - self.last_answer_at

    async def _reopen_bus(self) -> None:
        """Reopen the adapter with back-off until it opens; the controller records the outage."""
        tries = 0
        while True:
            await asyncio.sleep(BUS_REOPEN_S[min(tries, len(BUS_REOPEN_S) - 1)])
            tries += 1
            try:
                await self.scheduler.submit(Priority.SAFETY, _reopen)
            except BusUnavailableError as exc:
                if tries == 1:
                    log.warning("bus_reopen_failing", error=str(exc))
                continue
            break
        self.controller.bus_truth.bus_restored(tries)


def _status_read(
    board_bus: ModbusBus, bay: int
) -> Callable[[ModbusBus], Awaitable[bay_map.BayStatus]]:
    """The scheduler job reading ``bay``'s status block, with its board made once.

    The job is handed the scheduler's bus, the one the board was made for; another bus
    gets a board of its own.
    """
    board = BayBoard(board_bus, bay)
    return lambda bus: (board if bus is board_bus else BayBoard(bus, bay)).read_status()


async def _reopen(bus: ModbusBus) -> None:
    """Close and reopen the port (a job on the bus master: no transaction is in flight)."""
    bus.close()
    await bus.connect()
