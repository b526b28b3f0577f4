"""The demo's MQTT broker: amqtt in this process, on a free port, no system package.

``cabinet demo`` has to run after a plain ``pip install``, so it cannot lean on a
mosquitto from the distribution the way the tests do. amqtt is pure Python and runs
on the demo's own event loop.

There is no authentication and no TLS: the broker listens on 127.0.0.1 only and
lives as long as the demo. It is a stand-in for the fleet broker, never a
replacement — the daemon must not import this module.

Why a doorman in front of amqtt: amqtt speaks MQTT 3.1.1 only, and it reads an
MQTT 5 CONNECT as if it were 3.1.1. The v5 properties shift the payload, so rather
than answering CONNACK 0x01 (unacceptable protocol version) it waits for bytes that
never come, and the client hangs until its keepalive gives up (paho: 30 s), then
tries MQTT 5 again, forever. ``MqttLink`` falls back to 3.1.1 only on that CONNACK,
so this module reads each CONNECT itself, refuses other protocol levels the way a
3.1.1 broker must, and hands 3.1.1 connections to amqtt with the bytes it read
replayed in front of the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker

CONNECT_PACKET = 0x1
MQTT_311_LEVEL = 4
# CONNACK, remaining length 2, no session present, 0x01 unacceptable protocol version
REFUSE_PROTOCOL = bytes([0x20, 0x02, 0x00, 0x01])
MAX_REMAINING_LENGTH_BYTES = 4  # the MQTT variable-length integer is at most four bytes
CONNECT_TIMEOUT_S = 10.0  # a socket that never sends CONNECT must not hold a task forever
QUIET_LOGGERS = ("amqtt", "transitions")  # amqtt logs every connection at INFO


class DemoBrokerError(RuntimeError):
    """The embedded broker could not listen, so the demo has no MQTT."""


class _UndeliverableWillsFilter(logging.Filter):
    """Drops amqtt's shutdown warning about the wills it queues while shutting down.

    amqtt ends the sessions still connected at shutdown as if they had dropped, queues
    their last wills, then warns that nobody got them: at the end of a demo that is
    every client still connected, which is normal, not worth a warning.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith("messages not broadcasted")


_QUIET_SHUTDOWN = _UndeliverableWillsFilter()


class _ReplayReader(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no type information
    """The stream as amqtt expects it: the CONNECT we already consumed, then the socket."""

    def __init__(self, head: bytes, reader: asyncio.StreamReader) -> None:
        self._head = head
        self._reader = reader

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            rest = await self._reader.read()
            head, self._head = self._head, b""
            return head + rest
        head, self._head = self._head[:n], self._head[n:]
        if len(head) < n:
            head += await self._reader.readexactly(n - len(head))
        return head

    def feed_eof(self) -> None:
        self._reader.feed_eof()


async def _read_connect(reader: asyncio.StreamReader) -> tuple[bytes, int]:
    """The whole first packet as read, and its protocol level (0 if it is no CONNECT)."""
    first = await reader.readexactly(1)
    if first[0] >> 4 != CONNECT_PACKET:
        return first, 0
    length_bytes = b""
    length, multiplier = 0, 1
    for _ in range(MAX_REMAINING_LENGTH_BYTES):
        byte = await reader.readexactly(1)
        length_bytes += byte
        length += (byte[0] & 0x7F) * multiplier
        multiplier *= 128
        if not byte[0] & 0x80:
            break
    else:
        return first + length_bytes, 0
    body = await reader.readexactly(length)
    name_length = int.from_bytes(body[:2], "big")
    level = body[2 + name_length] if len(body) > 2 + name_length else 0
    return first + length_bytes + body, level


class EmbeddedBroker:
    """An MQTT 3.1.1 broker on 127.0.0.1 for the demo: QoS 0/1/2, retained, last will."""

    def __init__(self) -> None:
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.url: str | None = None

    async def start(self, host: str = "127.0.0.1") -> str:
        """Listen on a port the OS picks (1883 may be taken); the ``mqtt://`` URL to use."""
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("amqtt.broker").addFilter(_QUIET_SHUTDOWN)  # idempotent: one object
        broker = Broker(
            {
                # amqtt gets no socket of its own: connections reach it through _accept
                "listeners": {"default": {"type": "external", "bind": f"{host}:0"}},
                # only the anonymous-auth plugin: amqtt refuses everyone without an auth
                # plugin, and its defaults add $SYS chatter and per-packet logging
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        await broker.start()
        self._broker = broker
        try:
            self._server = await asyncio.start_server(self._accept, host, 0)
        except OSError as exc:
            await broker.shutdown()
            self._broker = None
            raise DemoBrokerError(f"the demo broker cannot listen on {host}: {exc}") from exc
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"mqtt://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        """Close the listener, end every session, and wait for their tasks."""
        if self._server is not None:
            self._server.close()
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self.url = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head, level = await asyncio.wait_for(_read_connect(reader), CONNECT_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return
        if level != MQTT_311_LEVEL:
            if level:  # a CONNECT of another MQTT version: say so, the client can retry 3.1.1
                writer.write(REFUSE_PROTOCOL)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
            return
        if self._broker is None:
            return
        await self._broker.external_connected(
            _ReplayReader(head, reader), StreamWriterAdapter(writer), "default"
        )
