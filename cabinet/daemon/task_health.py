"""What the supervisor knows about the daemon's long-running tasks.

The supervisor restarts a dying task quietly (one log line per episode); this is
where that episode stays visible afterwards — to ``cabinet doctor`` now, and to
the systemd watchdog, which must only be fed while every loop is healthy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

#: A task that failed more than once within this window is in a crash loop.
CRASH_LOOP_WINDOW_S = 60.0


@dataclass(slots=True)
class TaskState:
    """One supervised task."""

    running: bool = False
    failures: int = 0  # consecutive: reset once the task runs healthily again
    restarts: int = 0  # since the daemon started
    last_error: str | None = None
    last_failure_at: float | None = None  # wall clock, for people


@dataclass(slots=True)
class TaskHealth:
    """Every supervised task by name."""

    tasks: dict[str, TaskState] = field(default_factory=dict)

    def started(self, name: str) -> None:
        """The task is (re)starting."""
        self.tasks.setdefault(name, TaskState()).running = True

    def failed(self, name: str, error: str, *, recovered_before: bool) -> int:
        """The task died; returns its count of consecutive failures."""
        state = self.tasks.setdefault(name, TaskState())
        if recovered_before:
            state.failures = 0
        state.running = False
        state.failures += 1
        state.restarts += 1
        state.last_error = error
        state.last_failure_at = time.time()
        return state.failures

    def failing(self, now: float | None = None) -> dict[str, TaskState]:
        """Tasks that are down, or failed repeatedly within the last minute."""
        now = time.time() if now is None else now

        def looping(s: TaskState) -> bool:
            recent = s.last_failure_at is not None and now - s.last_failure_at < CRASH_LOOP_WINDOW_S
            return s.failures > 1 and recent

        return {n: s for n, s in self.tasks.items() if not s.running or looping(s)}
