"""What riders, operators and technicians ask of the controller, and its answers.

A rider's session (``request_session``, by scanner, QR token or fleet command) is
started only when nothing stands against it (``refusal``: not ready, journal
unwritable, busy, a technician's self-test, a safety lockout); a refused rider, a
refused token and a refused command are journaled as such. Operators and
technicians open a bay, take it out of service or put it back, and change the
dispensing threshold at runtime. Every answer is journaled first (``journal_first``);
a door opens only once its record is on disk.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import structlog

from cabinet.core.swap_machine import Command, Mode, Phase, Start
from cabinet.daemon.board_observations import BoardObservations
from cabinet.daemon.bus_commands import OperatorUnlock

log = structlog.get_logger("controller")


class SessionRequests(BoardObservations):
    """People's requests, answered journal first (a layer of ``CabinetController``)."""

    @property
    def journal_alarm(self) -> str | None:
        """Why the journal cannot be written (the ``journal_unwritable`` alarm), or None."""
        return self.journal_unwritable.reason

    def _start_event(self, rider_id: str, mode: Mode) -> Start:
        usable = self._usable_bays({})
        empty = tuple(sorted(bay for bay, snap in usable.items() if not snap.battery_present))
        dispensable = self._dispensable_now({})
        return Start(uuid.uuid4().hex[:12], rider_id, mode, empty, dispensable)

    def set_bay_service(self, bay: int, *, in_service: bool, reason: str, by: str) -> None:
        """An operator or technician takes a bay out of service or puts it back.

        Putting a bay back also lifts a latched over-temperature trip: a person has
        looked at it.
        """
        with self._committing() as db:
            if in_service:
                self.out_of_service.pop(bay, None)
                self.journal.set_service(db, bay, in_service=True, reason="")
                self._safety_journal(db, self.safety.clear_bay(bay))
                self.emit(db, "bay.enabled", {"bay": bay, "by": by, "reason": reason})
            else:
                self.out_of_service[bay] = reason
                self.journal.set_service(db, bay, in_service=False, reason=reason)
                self.emit(db, "bay.disabled", {"bay": bay, "reason": reason, "by": by})

    def open_bay(self, bay: int, by: str) -> str | None:
        """Open a bay for an operator or technician, outside any session; or say why not."""
        refusal = self.refusal()
        if refusal is not None:
            return refusal
        with self._committing() as db:
            self.emit(db, "bay.opened", {"bay": bay, "by": by})
            # unlocked once the record is on disk: inside a fleet command's transaction
            # that is with its request_id (docs/mqtt.md §3.1), never for a rolled-back one
            self.journal.after_commit(lambda: self._carry_out([OperatorUnlock(bay)]))
        return None

    def set_dispense_threshold(self, min_soc_pct: float, by: str) -> None:
        """Change the dispensing SoC threshold at runtime (persisted in the journal)."""
        dispense = replace(self.settings.dispense, min_soc_pct=min_soc_pct)
        charging = replace(self.settings.charging, ready_soc_pct=min_soc_pct)
        self.settings = replace(self.settings, dispense=dispense, charging=charging)
        with self._committing() as db:
            self.journal.put_setting(db, "dispense_min_soc_pct", min_soc_pct)
            self.emit(db, "settings.changed", {"dispense_min_soc_pct": min_soc_pct, "by": by})

    def refusal(self) -> str | None:
        """Why no session can start now, or None."""
        if not self.ready:
            return "not_ready"
        if not self.journal_writable():
            return "journal_unwritable"
        if self.state.phase is not Phase.IDLE:
            return "busy"
        if self.maintenance is not None:
            return "maintenance"
        if not self.safety.swaps_allowed:
            return "safety_lockout"
        return None

    def journal_writable(self) -> bool:
        """Whether the journal takes writes (re-tried while it does not; see ``journal_alarm``).

        Nothing is decided without the journal, so while it cannot be written no rider is
        accepted and the ``journal_unwritable`` alarm stands.
        """
        return self.journal_unwritable.writable()

    def refuse_session(self, rider_id: str, reason: str, source: str) -> None:
        """Record that a rider was turned away before any door opened."""
        with self._committing() as db:
            self.emit(
                db, "swap.refused", {"rider_id": rider_id, "reason": reason, "source": source}
            )

    def request_session(
        self, rider_id: str, mode: Mode, source: str, *, token: tuple[str, int] | None = None
    ) -> str | None:
        """Start a session for an authorised rider; returns why not, or None if started.

        ``token`` is a QR token's (nonce, expiry): ``replayed`` if it was spent already,
        else spent in the very transaction that starts the session. A session refused
        before any door opens (no battery to hand out, no free bay) leaves it usable.
        """
        refusal = self.refusal()
        if refusal is not None:
            self.refuse_session(rider_id, refusal, source)
            return refusal
        start = self._start_event(rider_id, mode)
        io: list[Command] = []
        with self._committing() as db:
            if token is not None and self.journal.token_spent(token[0]):
                return "replayed"
            log.info("session_requested", rider_id=rider_id, mode=mode.value, source=source)
            self._step(db, start, io)
            if token is not None and self.state.phase is not Phase.IDLE:
                self.journal.spend_token(db, token[0], token[1], int(self.clock.wall()))
        self._carry_out(io)
        return None

    def refuse_authorisation(self, reason: str, detail: str, rider_id: str | None) -> None:
        """Record a refused token or command (forged, expired, replayed, malformed)."""
        with self._committing() as db:
            self.emit(
                db, "auth.refused", {"reason": reason, "detail": detail, "rider_id": rider_id}
            )
