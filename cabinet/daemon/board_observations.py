"""How the controller takes a board reading: tracker, machine, ledger and interlocks.

The bay poller hands every reading in (``observe_bay``, ``observe_cabinet``,
``board_unreadable``) and asks what to write back (``charging_plan``, whether a
safety write is ``still wanted``). ``bay_tracker.diff`` turns a bay's snapshot
change into events for the swap machine; the session's reserved battery is
re-judged on every reading until its door opens; the safety interlocks see every
reading. A reading worth a journal write (it moves the machine, changes a material
part of the bay, trips an interlock, brings a silent board back, or starts or ends
the custody ledger's grace for an unreadable pack) is committed with the new
baseline in one transaction (``journal_first``); a reading that is not changes
memory only. Making a bay safe needs no record: a charger-off is carried out even
when the journal could not be written.

A bay that reads a pack without an id while the ledger places a battery there is
judged on every reading, the unchanged ones too (``CustodyLedger.wants_reading``):
the ledger's identity grace counts such readings, and the one that ends it
journals the battery missing. Only bays in that rare state pay for it.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from cabinet.core.battery_rules import rank_dispensable
from cabinet.core.bay_tracker import BaySnapshot, diff
from cabinet.core.charging_policy import BayChargeView, plan
from cabinet.core.safety import (
    AbortSession,
    Alarm,
    AllChargersOff,
    ChargerOff,
    IsolateBay,
    OpenContactor,
    SafetyAction,
)
from cabinet.core.swap_machine import (
    BOARD_SILENT,
    Abort,
    Candidate,
    Command,
    DispensableNow,
    Event,
    Phase,
)
from cabinet.daemon.bus_commands import MakeSafe, SafetyTarget
from cabinet.daemon.journal_first import JournalFirst
from protocol.cabinet_map import CabinetStatus
from protocol.units import BAY_UNITS


def _material(snapshot: BaySnapshot) -> tuple[Any, ...]:
    """The parts of a snapshot whose change is worth a journal write."""
    return (
        snapshot.online,
        snapshot.door_closed,
        snapshot.locked,
        snapshot.battery_present,
        snapshot.battery_id,
        snapshot.battery.plugged if snapshot.battery else None,
        snapshot.lock_jammed,
    )


#: Phases in which the session's reserved battery (or its fall-backs) may still change.
RESERVATION_PHASES = frozenset(
    {Phase.OPENING_RETURN, Phase.AWAITING_DEPOSIT, Phase.OPENING_DISPENSE}
)


class BoardObservations(JournalFirst):
    """Readings of the boards, judged and journaled first (a layer of ``CabinetController``)."""

    def _usable_bays(self, latest: dict[int, BaySnapshot]) -> dict[int, BaySnapshot]:
        """Bays a session may use now: answering, shut, in service, not tripped."""
        return {
            bay: snap
            for bay, snap in {**self.snapshots, **latest}.items()
            if snap.online
            and snap.door_closed
            and bay not in self.out_of_service
            and bay not in self.safety.tripped
        }

    def _dispensable_now(self, latest: dict[int, BaySnapshot]) -> tuple[Candidate, ...]:
        """Batteries that may be handed out by their latest readings, best first.

        The session's own return bay is never a candidate: after a deposit it holds the
        rider's battery, which goes back to them as such, not as a "fresh" one.
        """
        usable = self._usable_bays(latest)
        ranked = rank_dispensable(
            (
                (bay, snap.battery)
                for bay, snap in usable.items()
                if snap.battery is not None and bay != self.state.return_bay
            ),
            self.settings.dispense,
        )
        return tuple(Candidate(bay, b.battery_id) for bay, b in ranked if b.battery_id is not None)

    def _moves_machine(self, events: list[Event]) -> bool:
        """Whether ``events`` would change the session or make it act (a pure dry run)."""
        state = self.state
        for event in events:
            result = self.settings.machine.step(state, event)
            if result.commands or result.state != state:
                return True
            state = result.state
        return False

    def observe_bay(self, bay: int, snapshot: BaySnapshot) -> None:
        """Take a fresh reading of ``bay`` through tracker, machine, ledger and interlocks."""
        prev = self.baseline.get(bay)
        safety: list[SafetyAction] = []
        if snapshot.online:  # the interlocks see every reading, the unchanged ones too
            cell = snapshot.battery.cell_temp_c if snapshot.battery else None
            safety = self.safety.observe_bay(bay, self.clock.monotonic(), cell, snapshot.bay_temp_c)
        identity = snapshot.online and self._identity_to_judge(bay, snapshot)
        if (
            not safety
            and not identity
            and (prev is snapshot or prev == snapshot)
            and self._nothing_to_judge(bay)
        ):
            self.baseline[bay] = self.snapshots[bay] = snapshot  # the same object next time
            return
        events: list[Event] = diff(bay, prev, snapshot)
        io: list[Command] = []
        material = prev is None or _material(prev) != _material(snapshot)
        if self.ready and self.state.phase in RESERVATION_PHASES:
            # the reserved battery is re-judged on every reading until its door opens
            # (after this reading's safety trips, before this reading's door-shut); not
            # during recovery, while some bays are not yet re-read and would look absent
            events.insert(0, DispensableNow(self._dispensable_now({bay: snapshot})))
        back = snapshot.online and self.out_of_service.get(bay) == BOARD_SILENT
        try:
            # the tracker reports every changed reading (a charging pack's SoC each poll); only
            # those that move the machine are worth a journal write
            if self._moves_machine(events) or material or safety or back or identity:
                self._commit_reading(bay, snapshot, events, safety, io, back=back)
        except BaseException:
            # making a bay safe needs no record: a charger-off is carried out even when the
            # journal could not be written (a full disk must not keep a hot pack charging)
            self._safety_io([a for a in safety if not isinstance(a, AbortSession)])
            raise
        self.baseline[bay] = snapshot
        self.snapshots[bay] = snapshot
        self._carry_out(io)
        self._safety_io(safety)

    def _nothing_to_judge(self, bay: int) -> bool:
        """Whether a reading equal to the baseline may skip the tracker and the dry run.

        Most readings of a 12-bay cabinet equal the last (a full pack resting): ``diff`` of
        equal snapshots is empty and nothing material changed, so there is nothing to
        journal and nothing for the machine -- unless the session's reserved battery is
        being re-judged (every reading counts then) or a board marked silent answers again
        (its baseline may predate the outage). The interlocks have already seen the reading,
        and the custody ledger's identity grace has been asked (``_identity_to_judge``).
        """
        if self.ready and self.state.phase in RESERVATION_PHASES:
            return False
        return self.out_of_service.get(bay) != BOARD_SILENT

    def _attended(self, bay: int) -> bool:
        """Whether the session's open door settles ``bay``'s battery (no identity grace runs).

        The rider at that door may unplug a pack (its id hidden) and take it, or put it
        back: the swap machine hands it over or keeps it, and calling it missing meanwhile
        would be a false alarm. A pickup in doubt is not attended: its bay answered with a
        pack nobody can name, and the operator hears so after the grace (the pickup rule
        still hands the battery to the rider once the bay shows it gone, docs/swap.md §5).
        """
        return bay in self.hot_bays()

    def _identity_to_judge(self, bay: int, snapshot: BaySnapshot) -> bool:
        """Whether this reading starts, ends or drops the ledger's identity grace for ``bay``."""
        battery_id, present = snapshot.battery_id, snapshot.battery_present
        if not self.ledger.may_want_reading(bay, battery_id, present=present):
            return False  # every reading of every bay passes here: the common case is cheap
        return self.ledger.wants_reading(
            bay,
            battery_id,
            present=present,
            now=self.clock.monotonic(),
            attended=self._attended(bay),
        )

    def _commit_reading(
        self,
        bay: int,
        snapshot: BaySnapshot,
        events: list[Event],
        safety: list[SafetyAction],
        io: list[Command],
        *,
        back: bool,
    ) -> None:
        """Journal what one reading changed, memory and disk together (see ``_committing``)."""
        with self._committing() as db:
            for event in events:
                self._step(db, event, io)
            if snapshot.online:
                self._settle_pickup(db, bay, snapshot)
                expected = bay == self.state.return_bay and self.state.phase in (
                    Phase.AWAITING_DEPOSIT,
                    Phase.REJECTING,
                    Phase.GIVING_BACK,
                )
                for change in self.ledger.observe_bay(
                    bay,
                    snapshot.battery_id,
                    present=snapshot.battery_present,
                    now=self.clock.monotonic(),
                    expected=expected,
                    attended=self._attended(bay),
                ):
                    self._custody(db, change)
            else:
                self.ledger.bay_silent(bay)  # unseen meanwhile: a wake window when it answers
            self.journal.put_snapshot(db, bay, snapshot)
            self._safety_journal(db, safety)
            if back:
                del self.out_of_service[bay]
                self.journal.set_service(db, bay, in_service=True, reason="")
                self.emit(
                    db,
                    "bay.enabled",
                    {"bay": bay, "by": "controller", "reason": "board answering again"},
                )

    def _safety_journal(self, db: sqlite3.Connection, actions: list[SafetyAction]) -> None:
        for action in actions:
            if isinstance(action, IsolateBay):
                self._take_out_of_service(db, action.bay, action.reason)
            elif isinstance(action, Alarm):
                self.emit(
                    db,
                    "alarm.raised" if action.active else "alarm.cleared",
                    {"kind": action.kind, "bay": action.bay, "detail": action.detail},
                )

    def _safety_io(self, actions: list[SafetyAction]) -> None:
        for action in actions:
            if isinstance(action, ChargerOff):
                self._carry_out([MakeSafe(("charger", action.bay))])
            elif isinstance(action, AllChargersOff):
                self._carry_out([MakeSafe(("charger", bay)) for bay in BAY_UNITS])
            elif isinstance(action, OpenContactor):
                self._carry_out([MakeSafe(("contactor", None))])
            elif isinstance(action, AbortSession) and self.state.phase is not Phase.IDLE:
                self.feed([Abort(action.reason)])

    def observe_cabinet(self, status: CabinetStatus) -> bool:
        """Take a cabinet board reading through the interlocks.

        Returns whether the contactor should be closed now (the poller writes it; the
        next reading checks it). One that should be open but reads closed is this
        reading's read-back: its confirmed opening is started here.
        """
        self.cabinet_status = status
        actions = self.safety.observe_cabinet(
            smoke=status.smoke, mains_present=status.mains_present
        )
        if actions:
            with self._committing() as db:
                self._safety_journal(db, actions)
            self._safety_io(actions)
        want_closed = not self.safety.smoke and not self.safety.mains_lost
        if status.contactor_closed == want_closed:
            return False
        if not want_closed:
            self._carry_out([MakeSafe(("contactor", None))])
        return want_closed

    def board_unreadable(self, bay: int, reason: str) -> None:
        """A bay board answers with a register map this daemon cannot read: out of service."""
        with self._committing() as db:
            self._take_out_of_service(db, bay, reason)

    def charging_plan(self) -> dict[int, float]:
        """The charging current for every answering bay (the poller writes it)."""
        views = {
            bay: BayChargeView(
                snap, bay not in self.out_of_service, self.safety.charging_allowed(bay)
            )
            for bay, snap in self.snapshots.items()
            if snap.online
        }
        return plan(views, self.settings.charging)

    def safety_still_wanted(self, target: SafetyTarget) -> bool:
        """Whether a charger-off or contactor-open is still required by the interlocks."""
        kind, bay = target
        if kind == "contactor":
            return self.safety.smoke or self.safety.mains_lost
        assert bay is not None
        return not self.safety.charging_allowed(bay)
