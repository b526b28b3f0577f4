"""Reading the controller into the view model's ``Facts`` (and remembering the last session).

Kept apart from the pure ``view`` so the mapping from controller internals to what a
rider is shown is in one place, and apart from ``server`` so it needs no HTTP server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cabinet.core.battery_rules import dispensable
from cabinet.core.swap_machine import Phase, Timer
from cabinet.daemon.display.view import Facts

if TYPE_CHECKING:
    from cabinet.daemon.controller import CabinetController

#: the timers a rider races against (the unlock timer is the latch's, not theirs)
RIDER_TIMERS = frozenset(Timer) - {Timer.UNLOCK}


class FactsReader:
    """Turns the controller's live state into ``Facts``; remembers the last session's bays.

    A failure's sentence names the bay ("take your battery back from bay 5") after the
    machine is already idle again, so the bays and session id outlive the session here.
    """

    def __init__(self, controller: CabinetController, language: str) -> None:
        self.controller = controller
        self.language = language
        self._bays: tuple[int | None, int | None] = (None, None)
        self._session: str | None = None
        self._prompt: tuple[str, str] = ("", "")
        self._prompt_at = controller.clock.monotonic()

    def read(self, qr_svg: str, *, app_online: bool = True) -> Facts:
        """The facts now."""
        c = self.controller
        now = c.clock.monotonic()
        state = c.state
        active = state.phase is not Phase.IDLE
        if active:
            self._bays = (state.return_bay, state.dispense_bay)
            self._session = state.session_id
        prompt = (c.prompt_code, c.prompt)
        if prompt != self._prompt:
            self._prompt, self._prompt_at = prompt, now
        deadlines = [d for t, d in c.timers.items() if t in RIDER_TIMERS]
        rules = c.settings.dispense
        ready, charging = 0, []
        for bay, snap in c.snapshots.items():
            battery = snap.battery
            if not snap.online or bay in c.out_of_service or battery is None:
                continue
            if dispensable(battery, rules):
                ready += 1
            elif battery.soc_pct < rules.min_soc_pct and not battery.faulted:
                charging.append(battery.soc_pct)
        language = self.language
        if c.rider_language is not None and c.rider_language[0] == self._session:
            language = c.rider_language[1]
        safety = c.safety
        return Facts(
            cabinet_id=c.cabinet_id,
            language=language,
            active=active,
            prompt_code=c.prompt_code,
            prompt_age_s=now - self._prompt_at,
            return_bay=self._bays[0],
            dispense_bay=self._bays[1],
            session_id=self._session,
            timer_left_s=(min(deadlines) - now) if active and deadlines else None,
            ready_count=ready,
            charging_socs=tuple(charging),
            ready_soc_pct=rules.min_soc_pct,
            smoke=safety.smoke,
            mains_lost=safety.mains_lost,
            lockout=not safety.swaps_allowed and not safety.smoke,
            out_of_service=(
                not c.ready
                or c.maintenance is not None
                or c.journal_alarm is not None
                or c.bus_lost is not None
            ),
            qr_svg=qr_svg,
            app_online=app_online,
        )
