"""The one injected clock (DESIGN.md §3.6), and what "the clock is not set" means.

Everything in the daemon that reads time takes it from a :class:`Clock`: the
controller's timers, token expiry, the control server's uptime, the doctor. Tests and
the simulator pass their own; production passes :class:`SystemClock`.

**Unset clock.** A cabinet board without an RTC battery boots at 1970 until NTP syncs.
Wall time before :data:`CLOCK_SET_AFTER` (2025-01-01 00:00 UTC, earlier than any build
of this software) is taken as *unset*: an offline QR token's expiry cannot be judged
then, so it is refused with reason ``clock_unset`` (and an ``auth.refused`` event)
rather than accepted or refused by accident, and ``cabinet doctor`` fails the clock
line. Online swaps (``cmd/swap.start``) need no wall clock and keep working.
"""

from __future__ import annotations

import time
from typing import Protocol

#: 2025-01-01T00:00:00Z. Any wall time before it is a clock that was never set.
CLOCK_SET_AFTER = 1_735_689_600


class Clock(Protocol):
    """Where the daemon gets time from (DESIGN.md §3.6)."""

    def monotonic(self) -> float:
        """Seconds for intervals."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch, for deadlines that survive a reboot and for timestamps."""
        ...


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        """``time.monotonic``."""
        return time.monotonic()

    def wall(self) -> float:
        """``time.time``."""
        return time.time()


def clock_is_set(wall: float) -> bool:
    """Whether ``wall`` (epoch seconds) can be trusted for token expiry and timestamps."""
    return wall >= CLOCK_SET_AFTER


def unset_clock_detail(wall: float) -> str:
    """One line for a technician: what the clock says and what to do."""
    stamp = time.strftime("%Y-%m-%d", time.gmtime(max(wall, 0.0)))
    return (
        f"clock not set: it says {stamp} (before 2025-01-01); offline QR tokens are refused "
        "until NTP or `timedatectl set-time` sets it (app swaps still work)"
    )
