"""Talking to systemd: READY, STATUS, WATCHDOG and STOPPING over ``$NOTIFY_SOCKET``.

The protocol is one datagram of ``KEY=value`` lines to a Unix socket (an abstract
one when the path starts with ``@``); ``sd_notify(3)`` documents it as stable. The
Python bindings (``systemd-python``) need libsystemd headers to build, which a
cabinet's image should not carry for ten lines of socket code.

The watchdog is fed only while the daemon is healthy: every supervised task
running (none in a crash loop), the poll cycle completing, and some unit on the bus
answering within ``bus.silence_unhealthy_s`` — a loop that runs against a dead line
is not healthy, so such a daemon is restarted and reported. A hung event loop
feeds nothing either, because the feeding is a task on that same loop. systemd then
restarts the daemon, which recovers from its journal.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("systemd")


class Notifier:
    """Sends state changes to systemd; does nothing when not started by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + path[1:] if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        #: seconds between two WATCHDOG=1 (half the timeout, as sd_watchdog_enabled advises)
        self.watchdog_interval_s = int(usec) / 2_000_000 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        """Whether systemd listens (``Type=notify``)."""
        return bool(self._address)

    def notify(self, **fields: str) -> None:
        """Send ``KEY=value`` lines (``ready="1"`` becomes ``READY=1``)."""
        if not self._address:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError as exc:  # systemd gone (shutdown): nothing to tell
            log.warning("notify_failed", error=str(exc))

    async def feed_watchdog(self, healthy: Callable[[], str | None]) -> None:
        """Feed the watchdog while ``healthy()`` returns None (else the reason it is not)."""
        if self.watchdog_interval_s is None:
            return
        complaint: str | None = None
        while True:
            reason = healthy()
            if reason is None:
                self.notify(watchdog="1")
            if reason != complaint:  # once per change, not every interval
                if reason is not None:
                    log.error("watchdog_starved", reason=reason)
                    self.notify(status=f"unhealthy: {reason}")
                else:
                    self.notify(status="running")
                complaint = reason
            await asyncio.sleep(self.watchdog_interval_s)
