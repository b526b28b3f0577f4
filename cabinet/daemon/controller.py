"""The cabinet controller: decides, journals first, and hands the bus work to the poller.

Theory of operation: the controller holds the cabinet's picture (session, bay
snapshots, custody, interlocks, which units answer) and never touches the bus.
The bay poller (``bay_poller``) reads the boards and hands each reading to
``observe_bay``: ``bay_tracker.diff`` turns snapshot changes into events for the
swap machine; the machine's commands are committed to the journal in one
transaction *with* the new snapshot baseline, custody moves and events, and only
then carried out — bus commands (``bus_commands``: doors, safety writes) go back
to the poller, timers are armed here. Safety interlocks and the charging policy
see every reading too. Everything else that writes the journal (the fleet link,
the control server, the firmware service) goes through one door, ``record``.

The class is built in layers, one module each: ``journal_first`` (memory, the
step, the one door), ``board_observations`` (readings through tracker, machine,
ledger and interlocks), ``session_requests`` (riders', operators' and
technicians' requests); this module adds recovery after a restart and the timers.
Bookkeeping that decides nothing lives beside it: ``bus_truth`` (who answers, is
the bus there), ``journal_alarm`` (``journal_unwritable``) and
``pickups_in_doubt``.

A bay whose unit the bus isolated is reported offline (``bay.offline``/
``unit.offline`` once, an alarm after ``offline_alarm_s``, see
``bus_truth``). A charger-off or contactor-open is carried out even when the
journal cannot record it (``safety_writes``: done once a read-back confirms it).
After a restart, ``recover`` diffs the journaled baseline against fresh readings
before any door is opened, keeps the session's journaled deadlines but gives the
rider at least ``RECOVERY_GRACE_S`` (they waited for the reboot too) — never a
full new timeout, or a daemon restarting in a loop would keep an abandoned
session, and the cabinet, busy forever — and re-sends an unlock whose door was
never seen to open.
"""

from __future__ import annotations

import asyncio

from cabinet import __version__
from cabinet.core.swap_machine import Command, Phase, Timer, TimerExpired, Unlock
from cabinet.core.unit_presence import UnitPresence
from cabinet.daemon.bay_poller import BayPoller
from cabinet.daemon.bus_commands import SafetyTarget
from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.bus_truth import BusOutage, BusTruth
from cabinet.daemon.clock import Clock  # one clock for the daemon (cabinet/daemon/clock.py)
from cabinet.daemon.journal import Journal
from cabinet.daemon.journal_first import ControllerSettings
from cabinet.daemon.safety_writes import SafetyWrite
from cabinet.daemon.session_requests import SessionRequests

__all__ = ["CabinetController", "ControllerSettings"]  # the daemon builds both from here

#: After a restart a running timer gets at least this long: the rider waited for the
#: reboot. Found by the virtual fault campaign (seed 2): full re-arming on every restart
#: let a crash-looping daemon keep a walked-away session open forever.
RECOVERY_GRACE_S = 15.0


class CabinetController(SessionRequests):
    """Owns the swap session, the bay picture, custody, interlocks and charging."""

    def __init__(
        self,
        *,
        cabinet_id: str,
        journal: Journal,
        scheduler: BusScheduler,
        settings: ControllerSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(
            cabinet_id=cabinet_id,
            journal=journal,
            scheduler=scheduler,
            settings=settings,
            clock=clock,
        )
        # bus truth: who answers, is the bus there (the poller reports, this journals)
        self.bus_truth = BusTruth(
            journal=journal,
            clock=self.clock,
            record=self.record,
            offline_alarm_s=self.settings.offline_alarm_s,
        )
        # the hands and eyes: reads the boards into observe_bay and carries out bus
        # commands; its background I/O is spawned here (late-bound: tests replace _spawn)
        self.poller = BayPoller(self, scheduler, spawn=lambda coro: self._spawn(coro))  # noqa: PLW0108

    @property
    def safety_writes(self) -> dict[SafetyTarget, SafetyWrite]:
        """The safety writes not yet confirmed by a read-back (the poller re-tries them)."""
        return self.poller.safety.writes

    @property
    def presence(self) -> UnitPresence:
        """Which units answer (``bus_truth``): outages in progress, by unit."""
        return self.bus_truth.presence

    @property
    def bus_lost(self) -> BusOutage | None:
        """The adapter or gateway outage in progress (``bus_truth``), or None."""
        return self.bus_truth.bus_lost

    # -- start-up and the timers --------------------------------------------------------------

    async def recover(self) -> None:
        """Rebuild the picture from the boards before any door opens (DESIGN.md §5)."""
        await self.poller.read_everything()
        resumed = self.state.session_id if self.state.phase is not Phase.IDLE else None
        io: list[Command] = []
        with self._committing() as db:
            if self.state.phase is not Phase.IDLE:
                machine = self.settings.machine
                now = self.clock.monotonic()
                for timer, deadline in list(self.timers.items()):
                    grace = min(machine.timeouts.of(timer), RECOVERY_GRACE_S)
                    self._arm(db, timer, max(deadline - now, grace))
                door_bay = self.hot_bays()
                if (
                    self.state.phase
                    in (
                        Phase.OPENING_RETURN,
                        Phase.OPENING_DISPENSE,
                        Phase.REJECTING,
                        Phase.GIVING_BACK,
                    )
                    and door_bay
                ):
                    snap = self.snapshots.get(door_bay[0])
                    if snap is not None and snap.door_closed:
                        io.append(Unlock(door_bay[0]))
                        self._arm(db, Timer.UNLOCK, machine.timeouts.unlock)
            self.emit(
                db,
                "cabinet.started",
                {"version": __version__, "boot_id": self.boot_id, "resumed_session": resumed},
            )
        self._carry_out(io)
        self.ready = True
        self._timer_wakeup.set()

    async def timers_forever(self) -> None:
        """Turn deadlines into ``TimerExpired`` events."""
        while True:
            self._timer_wakeup.clear()
            if self.timers and self.ready:
                delay = max(0.0, min(self.timers.values()) - self.clock.monotonic())
            else:
                delay = None
            try:  # asyncio.timeout: wait_for can swallow a racing cancellation on 3.11
                async with asyncio.timeout(delay):
                    await self._timer_wakeup.wait()
            except TimeoutError:
                now = self.clock.monotonic()
                due = [t for t, deadline in self.timers.items() if deadline <= now]
                self.feed([TimerExpired(t) for t in due])
