"""How many refused scans reach the journal: a few one by one, the rest as one summary.

Theory of operation: anyone who can hold a printed code to the scanner can make the
cabinet refuse thousands of scans a minute, and a journal that records each one
fills the disk (and the outbox, and the operator's screen). Per source, the first
``per_window`` refusals of a window are recorded as they are (the rider at the
cabinet and the operator see exactly what happened); later ones in the same window
are only counted, and one summary — count, first and last timestamp, count per
reason — is due when the burst goes quiet for ``quiet_s`` or its window ends. So a
flood costs at most ``per_window + 1`` events per window, whatever its rate. A valid
token is never looked at here: only refusals are limited, never a rider's swap.

Sans-I/O: time comes in as arguments (a monotonic ``now`` for the windows, the wall
clock's milliseconds for the summary's timestamps); the caller journals.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

WINDOW_S = 60.0  # "per minute", the unit an operator thinks in
QUIET_S = 5.0  # a burst that paused this long is over: summarise it while it is news


@dataclass(frozen=True, slots=True)
class Burst:
    """Refusals that were counted, not recorded one by one (``auth.refused_burst``)."""

    source: str
    count: int
    first_ts: int
    last_ts: int
    reasons: dict[str, int]


@dataclass(slots=True)
class _Source:
    window_start: float
    recorded: int = 0
    count: int = 0
    first_ts: int = 0
    last_ts: int = 0
    last_at: float = 0.0
    ends_at: float = 0.0  # the end of the window the burst began in: due by then
    reasons: Counter[str] = field(default_factory=Counter)


class RefusalLimit:
    """Decides, per source, whether a refusal is recorded or counted into a burst."""

    def __init__(
        self, per_window: int, *, window_s: float = WINDOW_S, quiet_s: float = QUIET_S
    ) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self.quiet_s = quiet_s
        self._sources: dict[str, _Source] = {}

    def admit(self, source: str, reason: str, *, now: float, ts_ms: int) -> bool:
        """True: record this refusal as it is; False: it was counted into the burst."""
        state = self._sources.setdefault(source, _Source(window_start=now))
        if now - state.window_start >= self.window_s:  # a new window; a burst still owed stays
            state.window_start, state.recorded = now, 0
        if state.recorded < self.per_window:
            state.recorded += 1
            return True
        if not state.count:
            state.first_ts = ts_ms
            state.ends_at = state.window_start + self.window_s
        state.count += 1
        state.last_ts = ts_ms
        state.last_at = now
        state.reasons[reason] += 1
        return False

    def next_due(self) -> float | None:
        """When the earliest summary falls due (monotonic seconds), or None if none is owed."""
        owed = [self._due_at(s) for s in self._sources.values() if s.count]
        return min(owed) if owed else None

    def due(self, now: float) -> list[Burst]:
        """The summaries due at ``now``; each burst is summarised exactly once."""
        bursts = []
        for source, state in self._sources.items():
            if state.count and now >= self._due_at(state):
                bursts.append(
                    Burst(source, state.count, state.first_ts, state.last_ts, dict(state.reasons))
                )
                state.count = 0
                state.reasons = Counter()
        return bursts

    def _due_at(self, state: _Source) -> float:
        return min(state.last_at + self.quiet_s, state.ends_at)
