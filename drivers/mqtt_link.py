"""The MQTT link to the fleet broker: paho-mqtt behind a small asyncio surface.

Theory of operation (after aiomqtt): paho runs its network loop in its own thread;
every callback hops to the asyncio loop with ``call_soon_threadsafe`` and paho's
types are converted to ours at that edge. ``publish`` returns a future that
resolves on the broker's PUBACK, which is what lets the outbox delete an event only
once the broker has it. MQTT 5 first, falling back to 3.1.1 if the broker refuses
the protocol version; last will ``status`` offline (retained); reconnect with
jittered backoff is paho's own (``reconnect_delay_set``), TCP_NODELAY on the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = structlog.get_logger("mqtt")

KEEPALIVE_S = 30  # the broker declares us dead (last will) within 1.5x this
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
UNSUPPORTED_PROTOCOL_VERSION = 132
REASON_FAILURE = 0x80  # MQTT 5: a PUBACK/PUBREC reason code from here up is a refusal


class MqttUrlError(ValueError):
    """An ``mqtt.url`` that cannot name a broker."""


class PublishRefusedError(Exception):
    """The broker answered a QoS 1 publish with a failure reason code (MQTT 5, >= 0x80).

    Not a delivery: the broker did not take the message (ACL, quota, payload format).
    MQTT 3.1.1 has no reason code in PUBACK, so a 3.1.1 broker that refuses a publish
    acknowledges it anyway (or drops the connection) and this is never raised.
    """

    def __init__(self, topic: str, code: int, name: str) -> None:
        super().__init__(f"{topic}: 0x{code:02X} {name}")
        self.topic = topic
        self.code = code
        self.name = name


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker is and whether to speak TLS."""

    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
        raise MqttUrlError(f"{url!r}: use mqtt://host:port or mqtts://host:port")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise MqttUrlError(f"{url!r}: the port is not a number") from exc
    return BrokerAddress(parts.hostname, port, tls)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """CA bundle and optional client certificate and key for mqtts://."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """An incoming message, in our own types."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None


class MqttLink:
    """One connection to the broker, reconnecting by itself."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        will_topic: str,
        will_payload: bytes | Callable[[], bytes],
        username: str | None = None,
        password: str | None = None,
        tls: TlsFiles | None = None,
        on_connected: Callable[[], None] | None = None,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        self.address = parse_broker_url(url)
        self._client_id = client_id
        self._will = (will_topic, will_payload)
        self._credentials = (username, password)
        self._tls = tls or TlsFiles()
        self._on_connected = on_connected
        self._on_message = on_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, tuple[str, asyncio.Future[None]]] = {}
        self._subscriptions: list[str] = []
        self.connected = asyncio.Event()
        self.protocol = paho.MQTTv5
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=self.protocol
        )
        username, password = self._credentials
        if username is not None:
            client.username_pw_set(username, password)
        if self.address.tls:
            context = ssl.create_default_context(
                cafile=str(self._tls.ca_file) if self._tls.ca_file else None
            )
            if self._tls.cert_file is not None:
                context.load_cert_chain(
                    str(self._tls.cert_file),
                    str(self._tls.key_file) if self._tls.key_file else None,
                )
            client.tls_set_context(context)
        self._set_will(client)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.max_inflight_messages_set(1000)  # the outbox drains a backlog at full speed
        client.max_queued_messages_set(0)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_publish = self._paho_publish
        client.on_message = self._paho_message
        client.on_socket_open = self._paho_socket_open
        client.on_pre_connect = self._paho_pre_connect
        return client

    def _set_will(self, client: paho.Client) -> None:
        topic, payload = self._will
        client.will_set(topic, payload() if callable(payload) else payload, qos=1, retain=True)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho reconnects on its own after any loss."""
        self._loop = asyncio.get_running_loop()
        # jitter: a fleet of cabinets rebooting together must not reconnect in lockstep
        self._client.reconnect_delay_set(RECONNECT_MIN_S + random.randint(0, 2), RECONNECT_MAX_S)  # noqa: S311
        props = None
        if self.protocol == paho.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
        self._client.connect_async(
            self.address.host, self.address.port, KEEPALIVE_S, clean_start=True, properties=props
        )
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly (the broker then does not send the last will)."""
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()
        for _topic, future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("link stopped before PUBACK"))
        self._pending.clear()

    # -- publishing -----------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> asyncio.Future[None]:
        """Send; the future resolves on PUBACK (QoS 1) or once written (QoS 0)."""
        assert self._loop is not None, "start() first"
        future: asyncio.Future[None] = self._loop.create_future()
        # fire-and-forget publishes (status, state, replies) never await their future:
        # retrieve its exception so a disconnect is not logged as "never retrieved"
        future.add_done_callback(_retrieve)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            future.set_exception(ConnectionError(paho.error_string(info.rc)))
            return future
        if qos == 0:
            future.set_result(None)
        else:
            self._pending[info.mid] = (topic, future)
        return future

    def subscribe(self, topic_filter: str) -> None:
        """Subscribe now and after every reconnect."""
        self._subscriptions.append(topic_filter)
        if self.connected.is_set():
            self._client.subscribe(topic_filter, qos=1)

    # -- paho's thread -> our loop ----------------------------------------------------------

    def _hop(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _paho_pre_connect(self, client: paho.Client, _userdata: Any) -> None:
        # before every (re)connection attempt, in paho's thread: a will built now carries a
        # ts later than anything this connection publishes (docs/mqtt.md §6)
        self._set_will(client)

    def _paho_socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _paho_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self._hop(self._connected, int(getattr(reason, "value", reason)), str(reason))

    def _paho_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self._hop(self._disconnected, str(reason))

    def _paho_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        # MQTT 5: the PUBACK's reason code; 3.1.1 has none and paho reports success
        self._hop(self._acked, mid, int(getattr(reason, "value", 0)), str(reason))

    def _paho_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        message = Message(
            topic=msg.topic,
            payload=bytes(msg.payload),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
        )
        self._hop(self._message, message)

    # -- on our loop -----------------------------------------------------------------------

    def _connected(self, code: int, text: str) -> None:
        if code != 0:
            if code == UNSUPPORTED_PROTOCOL_VERSION and self.protocol == paho.MQTTv5:
                log.warning("mqtt5_refused_falling_back_to_311")
                self._client.loop_stop()
                self.protocol = paho.MQTTv311
                self._client = self._make_client()
                self._client.connect_async(self.address.host, self.address.port, KEEPALIVE_S)
                self._client.loop_start()
                return
            log.warning("mqtt_connect_refused", reason=text)
            return
        log.info(
            "mqtt_connected",
            broker=f"{self.address.host}:{self.address.port}",
            protocol="5" if self.protocol == paho.MQTTv5 else "3.1.1",
        )
        for topic_filter in self._subscriptions:
            self._client.subscribe(topic_filter, qos=1)
        self.connected.set()
        if self._on_connected is not None:
            self._on_connected()

    def _disconnected(self, reason: str) -> None:
        if self.connected.is_set():
            log.warning("mqtt_disconnected", reason=reason)
        self.connected.clear()
        # paho forgets in-flight messages with a clean session: the outbox resends them
        for _topic, future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("disconnected before PUBACK"))
        self._pending.clear()

    def _acked(self, mid: int, code: int, name: str) -> None:
        # publish() registers its mid before paho's thread can hop an ack here, so an
        # unknown mid is a QoS 0 message or one already failed by a disconnect: ignore it
        pending = self._pending.pop(mid, None)
        if pending is None or pending[1].done():
            return
        topic, future = pending
        if code >= REASON_FAILURE:
            future.set_exception(PublishRefusedError(topic, code, name))
        else:
            future.set_result(None)

    def _message(self, message: Message) -> None:
        if self._on_message is not None:
            self._on_message(message)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
