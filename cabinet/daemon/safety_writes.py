"""Safety writes confirmed by reading the board back, re-tried until they are.

A charger-off or contactor-open is done only once reading the board back
confirms it; until then it is re-sent at safety priority with back-off and
``safety_write_failed`` stands (raised once, cleared once it is confirmed or no
longer required). A lost reply is not a failed write: every try reads back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from cabinet.daemon.bus_commands import SafetyTarget
from cabinet.daemon.bus_scheduler import BusScheduler, Priority
from cabinet.daemon.clock import Clock
from cabinet.daemon.journal import JournalError
from drivers.boards import BayBoard, CabinetBoard
from drivers.modbus_bus import BusError
from protocol import bay_map
from protocol.errors import ProtocolError

log = structlog.get_logger("controller")

#: Pauses between tries of an unconfirmed safety write: quick at first (one lost frame),
#: then once a second for as long as it takes — never a busy loop on a dead board.
SAFETY_RETRY_S = (0.2, 0.4, 0.8, 1.0)


@dataclass(slots=True)
class SafetyWrite:
    """A charger-off or contactor-open not yet confirmed by reading the board back."""

    target: SafetyTarget
    due: float  # monotonic: the next try
    tries: int = 0
    busy: bool = False  # a try is on the bus now
    alarmed: bool = False  # its ``safety_write_failed`` alarm is journaled
    error: str = ""


class SafetyWriter:
    """The unconfirmed safety writes and their re-tries.

    What is still required is the controller's to say (``still_wanted``); the alarm
    goes through its one journal door (``record``, raising ``JournalError`` when the
    journal cannot take it); ``charger_off`` tells the charging side a bay's charger
    is known to be off.
    """

    def __init__(
        self,
        *,
        scheduler: BusScheduler,
        clock: Clock,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        still_wanted: Callable[[SafetyTarget], bool],
        record: Callable[[str, dict[str, Any]], None],
        charger_off: Callable[[int], None],
    ) -> None:
        self.scheduler = scheduler
        self.clock = clock
        self._spawn = spawn
        self._still_wanted = still_wanted
        self._record = record
        self._charger_off = charger_off
        self.writes: dict[SafetyTarget, SafetyWrite] = {}
        self._wakeup = asyncio.Event()

    def make_safe(self, target: SafetyTarget) -> None:
        """Charger off / contactor open, now, and again until a read-back confirms it."""
        write = self.writes.get(target)
        if write is None:
            write = self.writes[target] = SafetyWrite(target, due=self.clock.monotonic())
        if write.due <= self.clock.monotonic():  # else its back-off is running
            self._spawn(self._try(target))

    async def forever(self) -> None:
        """Re-try every unconfirmed safety write when its back-off is over."""
        while True:
            self._wakeup.clear()
            now = self.clock.monotonic()
            for target, write in list(self.writes.items()):
                if write.due <= now and not write.busy:
                    await self._try(target)
            pending = [w.due for w in self.writes.values() if not w.busy]
            delay = max(0.0, min(pending) - self.clock.monotonic()) if pending else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wakeup.wait()

    async def _try(self, target: SafetyTarget) -> None:
        """One try: the write at SAFETY priority, then the read-back that confirms it."""
        write = self.writes.get(target)
        if write is None or write.busy:
            return
        write.busy = True
        try:
            if not self._still_wanted(target):
                self._settled(write, "no longer required")
                return
            error = await self._attempt(target)
        finally:
            write.busy = False
        if error is None:
            self._settled(write, "confirmed by read-back")
            return
        write.tries += 1
        write.error = error
        pause = SAFETY_RETRY_S[min(write.tries - 1, len(SAFETY_RETRY_S) - 1)]
        write.due = self.clock.monotonic() + pause
        self._wakeup.set()
        if not write.alarmed:
            what = "charger off" if target[0] == "charger" else "main contactor open"
            log.error("safety_write_failed", target=target[0], bay=target[1], error=error)
            write.alarmed = self._alarm(write, active=True, detail=f"{what} not confirmed: {error}")

    async def _attempt(self, target: SafetyTarget) -> str | None:
        """Write and read back; None if confirmed, else why not."""
        kind, bay = target
        problem: str | None = None
        try:
            if kind == "charger":
                assert bay is not None
                await self.scheduler.submit(
                    Priority.SAFETY,
                    lambda bus: BayBoard(bus, bay).set_charger(enabled=False, current_limit_a=0.0),
                )
            else:
                await self.scheduler.submit(
                    Priority.SAFETY, lambda bus: CabinetBoard(bus).set_contactor(closed=False)
                )
        except BusError as exc:  # the reply may be lost while the write landed: read back
            problem = f"write failed: {exc}"
        try:
            if kind == "charger":
                assert bay is not None
                regs = await self.scheduler.submit(
                    Priority.SAFETY,
                    lambda bus: bus.read_holding(bay, bay_map.CommandReg.CHARGER_ENABLE, 1),
                )
                still_on = bool(regs[0])
            else:
                status = await self.scheduler.submit(
                    Priority.SAFETY, lambda bus: CabinetBoard(bus).read_status()
                )
                still_on = status.contactor_closed
        except (BusError, ProtocolError) as exc:
            return f"{problem}; read-back failed: {exc}" if problem else f"read-back failed: {exc}"
        if still_on:
            board = "the board" if kind == "charger" else "the cabinet board"
            return f"{board} still reads {'charger enabled' if kind == 'charger' else 'closed'}"
        if kind == "charger":
            assert bay is not None
            self._charger_off(bay)
        return None

    def _settled(self, write: SafetyWrite, how: str) -> None:
        if write.alarmed and not self._alarm(write, active=False, detail=how):
            write.due = self.clock.monotonic() + SAFETY_RETRY_S[-1]  # cleared on a later try
            return
        self.writes.pop(write.target, None)
        if write.tries:
            log.info("safety_write_settled", target=write.target[0], bay=write.target[1], how=how)

    def _alarm(self, write: SafetyWrite, *, active: bool, detail: str) -> bool:
        try:
            self._record(
                "alarm.raised" if active else "alarm.cleared",
                {"kind": "safety_write_failed", "bay": write.target[1], "detail": detail},
            )
        except JournalError:
            return False  # not journaled: raised or cleared on the next try
        return True
