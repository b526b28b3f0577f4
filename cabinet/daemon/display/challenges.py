"""The dynamic QR code's challenge: short-lived, rotating, single-use, journaled.

A photo of yesterday's code must open nothing (DESIGN.md §4.4). The daemon draws a
random challenge every ``rotate_s``; ``cmd/swap.start`` may carry the one the rider's
app scanned, and it is accepted once, within ``2 * rotate_s`` of being issued (the
period it was on screen plus one, so a scan just before a rotation still works).
Issued and used challenges are journaled, so a restart neither forgets a used one nor
re-accepts one the screen showed before the restart (those count as stale).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from cabinet.daemon.journal import Journal, JournalError

log = structlog.get_logger(__name__)

JOURNAL_KEY = "display_challenges"
PAYLOAD_PREFIX = "swapcab:1"
#: issued challenges are remembered this long, so an old one is "stale", not "unknown"
HISTORY_S = 3600.0


class WallClock(Protocol):
    """The controller's clock, as far as challenges need it."""

    def wall(self) -> float:
        """Seconds since the epoch."""
        ...


def payload(cabinet_id: str, challenge: str) -> str:
    """What the QR code encodes (docs/mqtt.md, "The dynamic QR code")."""
    return f"{PAYLOAD_PREFIX}:{cabinet_id}:{challenge}"


def judge(
    challenge: str,
    *,
    issued: Mapping[str, float],
    used: Mapping[str, float],
    now: float,
    window_s: float,
    boot_wall: float,
) -> str | None:
    """Why ``challenge`` is refused, or None if it may open a session now.

    Reasons: ``unknown_challenge``, ``challenge_used``, ``stale_challenge``.

    Pure: the book below feeds it the journal's memory and the clock.
    """
    issued_at = issued.get(challenge)
    if issued_at is None:
        return "unknown_challenge"
    if challenge in used:
        return "challenge_used"
    if issued_at < boot_wall or now - issued_at > window_s or issued_at > now + 1.0:
        return "stale_challenge"
    return None


@dataclass(frozen=True, slots=True)
class Shown:
    """The challenge on screen now and until when it stays there."""

    challenge: str
    payload: str
    issued_at: float
    rotates_at: float


class ChallengeBook:
    """The challenges this cabinet showed and which were used, kept in the journal."""

    def __init__(
        self,
        journal: Journal,
        cabinet_id: str,
        clock: WallClock,
        *,
        rotate_s: float = 30.0,
        required: bool = False,
        draw: Callable[[], str] = lambda: secrets.token_urlsafe(12),
    ) -> None:
        self.journal = journal
        self.cabinet_id = cabinet_id
        self.clock = clock
        self.rotate_s = rotate_s
        self.required = required
        self._draw = draw
        self.boot_wall = clock.wall()
        stored: Any = journal.runtime_state(JOURNAL_KEY) or {}
        self.issued: dict[str, float] = {
            str(k): float(v) for k, v in stored.get("issued", {}).items()
        }
        self.used: dict[str, float] = {str(k): float(v) for k, v in stored.get("used", {}).items()}
        self._current: str | None = None

    @property
    def window_s(self) -> float:
        """How long after issue a challenge is still accepted."""
        return 2.0 * self.rotate_s

    def _save(self) -> bool:
        now = self.clock.wall()
        self.issued = {k: v for k, v in self.issued.items() if now - v <= HISTORY_S}
        self.used = {k: v for k, v in self.used.items() if k in self.issued}
        try:
            with self.journal.transaction() as db:
                Journal.put_runtime_state(
                    db, JOURNAL_KEY, {"issued": self.issued, "used": self.used}
                )
        except JournalError:
            return False
        return True

    def shown(self) -> Shown:
        """The challenge to display now, drawing (and journaling) a new one when due."""
        now = self.clock.wall()
        current = self._current
        if current is None or now >= self.issued[current] + self.rotate_s or current in self.used:
            fresh = self._draw()
            self.issued[fresh] = now
            if self._save():  # never show a challenge the journal does not know
                self._current = current = fresh
            else:
                del self.issued[fresh]
                if current is None:
                    current = fresh  # shown but refused as unknown: no worse than no code
        issued_at = self.issued.get(current, now)
        return Shown(
            current, payload(self.cabinet_id, current), issued_at, issued_at + self.rotate_s
        )

    def check(self, challenge: str | None) -> str | None:
        """Refusal reason for a ``swap.start``'s challenge, or None (nothing is used up).

        Without ``required`` a swap.start without a challenge passes (the backend vouches
        for the rider); one that carries a challenge is always checked. ``use`` it once
        the session has started, so a rider turned away as ``busy`` can try again.
        """
        if challenge is None:
            return "unknown_challenge" if self.required else None
        return judge(
            challenge,
            issued=self.issued,
            used=self.used,
            now=self.clock.wall(),
            window_s=self.window_s,
            boot_wall=self.boot_wall,
        )

    def use(self, challenge: str | None) -> None:
        """Record ``challenge`` as used (journaled: a restart does not forget it)."""
        if challenge is None:
            return
        self.used[challenge] = self.clock.wall()
        if not self._save():
            log.warning("challenge_use_not_journaled", challenge=challenge)
