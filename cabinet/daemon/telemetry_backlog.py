"""Telemetry samples kept in the journal until the broker acknowledges them, events first.

Theory of operation: the fleet link takes a sample every ``telemetry_interval_s`` and
``hold``s it: it is written to the journal's ``telemetry_backlog`` table first (the
newest ``keep`` samples at most, an hour's worth by default), so neither a broker
outage nor a daemon restart during one loses it. ``drain`` publishes the held samples
oldest first at QoS 1, ``TELEMETRY_WINDOW`` at a time, each exactly as taken (its
original ``ts``), and deletes them only on the broker's PUBACK — done means the other
side confirmed it. A lost connection leaves the unacknowledged ones held; they are
resent, in order, after the reconnect. Events go first: a window is sent only while
``events_clear`` says the event outbox has nothing to send, so an event raised during
an outage never queues behind an hour of telemetry — at most behind one window.
"""

from __future__ import annotations

import asyncio

import structlog

from cabinet.daemon.journal import HeldSample, Journal, JournalError
from drivers.mqtt_link import MqttLink, confirmed_prefix

log = structlog.get_logger("fleet")

#: Samples in flight at once: ~1.2 KB each with 12 bays, so an event raised meanwhile
#: waits behind ~12 KB at most (about 0.1 s on a 1 Mbit/s LTE uplink).
TELEMETRY_WINDOW = 10
RELEASE_RETRY_S = 5.0  # an unwritable journal cannot forget acknowledged samples: retry
#: After the broker refuses a sample (PUBACK >= 0x80, an ACL or quota that a person
#: fixes): retry soon, then rarely. The cap on held samples bounds what waits meanwhile.
REFUSED_RETRY_MIN_S = 1.0
REFUSED_RETRY_MAX_S = 60.0


class TelemetryBacklog:
    """Holds telemetry samples in the journal and drains them to the broker in order."""

    def __init__(
        self, journal: Journal, link: MqttLink, topic: str, *, events_clear: asyncio.Event
    ) -> None:
        self._journal = journal
        self._link = link
        self._topic = topic
        self._events_clear = events_clear
        self._due = asyncio.Event()  # a sample was held: wake the drain
        self._refused_delay_s = REFUSED_RETRY_MIN_S
        self._refused = False

    def hold(self, ts_ms: int, payload: bytes, keep: int) -> int:
        """Keep a sample (the newest ``keep`` at most); how many samples were dropped.

        A journal that cannot be written (disk full) drops this sample: telemetry is
        measurement, not record, and the journal's room is for the swaps.
        """
        try:
            dropped = self._journal.hold_telemetry(ts_ms, payload, keep)
        except JournalError:
            return 1
        self._due.set()
        return dropped

    async def drain(self) -> None:
        """Publish held samples forever, oldest first, whenever events leave room."""
        while True:
            await self._events_clear.wait()
            if not self._link.connected.is_set():
                await self._link.connected.wait()
                continue
            self._due.clear()
            window = self._journal.held_telemetry(TELEMETRY_WINDOW)
            if not window:
                await self._due.wait()
                continue
            await self._send(window)

    async def _send(self, window: list[HeldSample]) -> None:
        futures = [self._link.publish(self._topic, sample.payload, qos=1) for sample in window]
        confirmed, refused = await confirmed_prefix(futures)
        acked_upto = window[confirmed - 1].id if confirmed else 0
        if acked_upto:
            await self._release(acked_upto)
        if refused is not None:
            if not self._refused:  # once per episode, not once per retry
                log.warning("telemetry_refused", topic=refused.topic, reason=str(refused))
                self._refused = True
            await asyncio.sleep(self._refused_delay_s)
            self._refused_delay_s = min(self._refused_delay_s * 2, REFUSED_RETRY_MAX_S)
        elif acked_upto:
            self._refused, self._refused_delay_s = False, REFUSED_RETRY_MIN_S

    async def _release(self, upto_id: int) -> None:
        """Forget what the broker acknowledged; with the journal unwritable, wait for room."""
        while True:
            try:
                self._journal.release_telemetry(upto_id)
            except JournalError:
                await asyncio.sleep(RELEASE_RETRY_S)
            else:
                return
