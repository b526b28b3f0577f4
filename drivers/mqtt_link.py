"""The MQTT link to the fleet broker: paho-mqtt behind a small asyncio surface.

Theory of operation (after aiomqtt): paho runs its network loop in its own thread;
every callback hops to the asyncio loop with ``call_soon_threadsafe`` and paho's
types are converted to ours at that edge. ``publish`` returns a future that
resolves on the broker's PUBACK, which is what lets the outbox delete an event only
once the broker has it. MQTT 5 first, falling back to 3.1.1 if the broker refuses
the protocol version (CONNACK 0x84, or 3.1.1's 0x01 as NATS sends it) or closes the
connection before any CONNACK twice in a row (RabbitMQ 3.10 does that to an MQTT 5
CONNECT; docs/mqtt.md "Brokers"); last will ``status`` offline (retained); reconnect with
jittered backoff is paho's own (``reconnect_delay_set``), TCP_NODELAY on the socket.

Closes before CONNACK at start-up (no session yet on this link) are the broker's answer
to a protocol version, not a failure: the link tries again at once, and switches at
once, so a cabinet or ``cabinet watch`` on RabbitMQ has its first session in
milliseconds instead of after paho's reconnect wait of 1-3 s. Every later close waits
out the back-off as any lost connection does, and a broker that closes both versions
(flapping between them) gets a wait that doubles per switch, so it is never hammered.

The same link serves ``cabinet watch`` and the backend stand-in (no will, a session kept
across reconnects, ``open`` to hear at once why a first connection fails, a shared
subscription): one TLS set-up (``tls_context``) and one back-off (``drivers.backoff``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from drivers import paho_without_openssl, paho_without_proxy_support
from drivers.backoff import DEFAULT_BACKOFF, Backoff

with paho_without_proxy_support.importing_paho():  # urllib.request, http.client: unread
    import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

if TYPE_CHECKING:
    import ssl

log = structlog.get_logger("mqtt")
#: a daemon on mqtt:// runs without OpenSSL, and paho's plain socket reads need this
PAHO_SSL = paho_without_openssl.fit(paho)

KEEPALIVE_S = 30  # the broker declares us dead (last will) within 1.5x this
UNSUPPORTED_PROTOCOL_VERSION = 132
#: Connections closed before any CONNACK, in a row, after which the other protocol
#: version is tried: one close may be a broker restarting, two are its answer.
CLOSES_BEFORE_CONNACK_TO_SWITCH = 2
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


async def confirmed_prefix(
    publishes: Sequence[Awaitable[object]],
) -> tuple[int, PublishRefusedError | None]:
    """How many of ``publishes`` (sent in order) the broker confirmed, from the first on.

    The count stops at the first that is not confirmed: a lost connection (what follows
    is resent in order) or a refusal, which is returned because it is not a delivery and
    the caller backs off. Only a confirmed prefix may be forgotten by the sender.
    """
    confirmed = 0
    for publish in publishes:
        try:
            await publish
        except ConnectionError:
            break
        except PublishRefusedError as exc:
            return confirmed, exc
        confirmed += 1
    return confirmed, None


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


class TlsSetupError(ValueError):
    """A CA bundle, client certificate or key that cannot be loaded; ``part`` says which."""

    def __init__(self, part: str, files: str, detail: str) -> None:
        what = "CA bundle" if part == "ca" else "client certificate / key"
        super().__init__(f"{what} {files}: {detail}")
        self.part = part  # "ca" or "cert": a command line names its own options after it
        self.detail = detail


def tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """The one TLS set-up of every client of ours: verify the broker, maybe show our cert.

    ``ssl`` is imported here, not with the module: a daemon on mqtt:// leaves OpenSSL out
    (cabinet/console/cli.py), one configured for mqtts:// lets it in before it gets here.
    """
    import ssl  # noqa: PLC0415 - OpenSSL only for TLS (drivers/paho_without_openssl.py)

    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError("ca", str(tls.ca_file), str(exc.strerror or exc)) from exc
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            files = f"{tls.cert_file} / {tls.key_file or '(in the certificate)'}"
            raise TlsSetupError("cert", files, str(exc.strerror or exc)) from exc
    return context


class BrokerRefusedError(ConnectionError):
    """The broker answered CONNECT with a refusal (bad credentials, not authorised, ...)."""


class SessionTimeoutError(TimeoutError):
    """The broker took the connection but answered no CONNECT in time."""


@dataclass(frozen=True, slots=True)
class Message:
    """An incoming message, in our own types."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    retain: bool = False  # a retained message replayed on subscribe: history, not news
    mid: int = 0  # with ``manual_ack``: what ``MqttLink.ack`` acknowledges
    qos: int = 0


class MqttLink:
    """One connection to the broker, reconnecting by itself."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        will_topic: str | None = None,
        will_payload: bytes | Callable[[], bytes] = b"",
        username: str | None = None,
        password: str | None = None,
        tls: TlsFiles | None = None,
        on_connected: Callable[[], None] | None = None,
        on_message: Callable[[Message], None] | None = None,
        on_disconnected: Callable[[str], None] | None = None,
        session_expiry_s: int = 0,
        resume_session: bool = False,
        mqtt5: bool = True,
        manual_ack: bool = False,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        """Options beyond the cabinet's own (whose defaults they keep) serve the others.

        ``session_expiry_s`` > 0 keeps the broker session (subscriptions, queued QoS 1
        messages) across our reconnects; ``resume_session`` also takes it up again on the
        first connection (a consumer coming back after a restart). ``manual_ack``: a QoS 1
        message is acknowledged only by ``ack``, after the caller has kept it.
        """
        self.address = parse_broker_url(url)
        self._on_disconnected = on_disconnected
        self._session_expiry_s = session_expiry_s
        self._resume_session = resume_session
        self._manual_ack = manual_ack
        self._backoff = backoff
        self._connack_waiters: list[asyncio.Future[tuple[int, str]]] = []
        self._unclaimed_connack: tuple[int, str] | None = None  # no open() waited for it
        self.session_present = False  # the last CONNACK's: did the broker keep our session?
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
        self.protocol = paho.MQTTv5 if mqtt5 else paho.MQTTv311
        self._connack_seen = False  # on the current connection attempt (paho's thread)
        self._closed_before_connack = 0  # consecutive attempts, across switches (our loop)
        self._switches = 0  # protocol switches since the last CONNACK (our loop)
        self._had_session = False  # a CONNACK "accepted" ever: start-up is over
        self._restart_timer: asyncio.TimerHandle | None = None
        #: ``stop`` was called: the disconnect that follows is ours, not news to warn about
        self._stopping = False
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        # 3.1.1 has no session expiry: a kept session is clean_session=False
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=self.protocol,
            # paho wants None with MQTT 5 (clean_start is given at connect instead)
            clean_session=None if self.protocol == paho.MQTTv5 else not self._resume_session,
            manual_ack=self._manual_ack,
        )
        username, password = self._credentials
        if username is not None:
            client.username_pw_set(username, password)
        if self.address.tls:
            client.tls_set_context(tls_context(self._tls))
        self._set_will(client)
        self._backoff.apply(client)
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
        if topic is None:
            return  # a watcher or a backend: nobody needs to hear that it went away
        client.will_set(topic, payload() if callable(payload) else payload, qos=1, retain=True)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho reconnects on its own after any loss."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._connect()

    def _connect(self) -> None:
        # jitter: a fleet of cabinets rebooting together must not reconnect in lockstep
        self._backoff.apply(self._client)
        self._client.connect_async(
            self.address.host, self.address.port, KEEPALIVE_S, **self._connect_options()
        )
        self._client.loop_start()

    def _connect_options(self) -> dict[str, Any]:
        if self.protocol != paho.MQTTv5:
            return {}  # 3.1.1: the session choice was made with the client (clean_session)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry_s
        clean_start: bool | int = True
        if self._session_expiry_s > 0:
            # resume: take up the session a previous run left; otherwise start clean once
            # and keep the session across our own reconnects only
            clean_start = False if self._resume_session else paho.MQTT_CLEAN_START_FIRST_ONLY
        return {"clean_start": clean_start, "properties": props}

    async def open(self, timeout_s: float) -> None:
        """Connect now and raise what stands in the way, where ``start`` retries quietly.

        For a tool a person is waiting on (``cabinet watch``): ``OSError`` for a broker not
        reachable (refused, unknown host, TLS not trusted, ``TimeoutError``: no answer),
        ``BrokerRefusedError`` for a CONNACK refusal, ``SessionTimeoutError`` for no CONNACK
        within ``timeout_s``. An MQTT 5 refusal still falls back to 3.1.1 on the way.
        Afterwards the link is as after ``start``: paho reconnects with the back-off.
        """
        self._loop = loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        client = self._client
        self._backoff.apply(client)
        # paho's blocking connect raises the real reason; its background one only retries
        await asyncio.wait_for(
            asyncio.to_thread(
                client.connect,
                self.address.host,
                self.address.port,
                KEEPALIVE_S,
                **self._connect_options(),
            ),
            timeout_s,
        )
        self._unclaimed_connack = None
        client.loop_start()
        while True:
            if (early := self._take_unclaimed_connack()) is not None:
                code, text = early  # it came before we asked again
            else:
                answer: asyncio.Future[tuple[int, str]] = loop.create_future()
                self._connack_waiters.append(answer)
                try:
                    code, text = await asyncio.wait_for(answer, max(0.1, deadline - loop.time()))
                except TimeoutError:
                    raise SessionTimeoutError(f"no CONNACK within {timeout_s:g} s") from None
            if code == 0:
                return
            if self._client is client:  # no protocol fallback under way: the final answer
                raise BrokerRefusedError(text)
            client = self._client

    def _take_unclaimed_connack(self) -> tuple[int, str] | None:
        """A CONNACK that arrived while ``open`` was not waiting (then forgotten)."""
        early, self._unclaimed_connack = self._unclaimed_connack, None
        return early

    def ack(self, message: Message) -> None:
        """With ``manual_ack``: the caller has kept ``message``; the broker may forget it."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    def stop(self, *, forget_session: bool = False) -> None:
        """Disconnect cleanly (the broker then does not send the last will).

        ``forget_session``: end a kept session too (MQTT 5), leaving nothing on the broker.
        """
        self._stopping = True
        if self._restart_timer is not None:
            self._restart_timer.cancel()
            self._restart_timer = None
        props = None
        if forget_session and self.protocol == paho.MQTTv5:
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
        with contextlib.suppress(Exception):
            self._client.disconnect(properties=props)
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
        self._connack_seen = False

    def _paho_socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _paho_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self._connack_seen = True
        present = bool(getattr(flags, "session_present", False))
        self._hop(self._connected, int(getattr(reason, "value", reason)), str(reason), present)

    def _paho_disconnect(self, client: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        # a refused TCP connect is paho's on_connect_fail, not this: here the broker took
        # the connection and our CONNECT, then closed it (without a CONNACK if not seen)
        self._hop(self._disconnected, str(reason), not self._connack_seen, client)

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
            retain=bool(msg.retain),
            mid=msg.mid,
            qos=msg.qos,
        )
        self._hop(self._message, message)

    # -- on our loop -----------------------------------------------------------------------

    def _connected(self, code: int, text: str, session_present: bool = False) -> None:
        self._closed_before_connack = 0
        self._switches = 0
        self.session_present = session_present
        if self._connack_waiters:  # open() waits for an answer
            for waiter in self._connack_waiters:
                if not waiter.done():
                    waiter.set_result((code, text))
            self._connack_waiters.clear()
        else:
            # open() has not come back for it yet: after a switch to 3.1.1 the new client's
            # CONNACK can arrive before open() has woken up from the refusal (a loaded CI
            # run waited out its 10 s for an answer that had come)
            self._unclaimed_connack = (code, text)
        if code != 0:
            if code == UNSUPPORTED_PROTOCOL_VERSION and self.protocol == paho.MQTTv5:
                log.warning("mqtt5_refused_falling_back_to_311")
                self._restart(paho.MQTTv311)
                return
            log.warning("mqtt_connect_refused", reason=text)
            return
        self._had_session = True
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

    def _restart(self, protocol: MQTTProtocolVersion, delay_s: float = 0.0) -> None:
        """Start over with a new paho client speaking ``protocol`` (paho cannot change).

        Also the way to reconnect without paho's reconnect wait: its thread sleeps that
        wait out before it looks at anything, so it is retired rather than woken.
        """
        # the old client's thread may sit in its 1 s select or its reconnect wait: it is
        # told to disconnect and retired off this loop, which the field bus shares
        old = self._client
        with contextlib.suppress(Exception):
            old.disconnect()
        threading.Thread(target=old.loop_stop, name="mqtt-retired", daemon=True).start()
        self.protocol = protocol
        self._client = self._make_client()
        if delay_s <= 0 or self._loop is None:
            self._connect()
        else:
            self._restart_timer = self._loop.call_later(delay_s, self._connect_later)

    def _connect_later(self) -> None:
        self._restart_timer = None
        self._connect()

    def _closed_without_connack(self) -> None:
        """After a close before CONNACK: the same version again or the other, now or later.

        Every ``CLOSES_BEFORE_CONNACK_TO_SWITCH``-th close in a row switches: a
        3.1.1-only broker that closes on MQTT 5 (RabbitMQ 3.10), or back to 5 if 3.1.1
        fares no better (the cause was elsewhere). Before the first session up to the
        first switch this happens at once; otherwise the close that does not switch
        waits out paho's back-off, and every switch after the first one waits a back-off
        that doubles, so a broker closing every CONNECT sees a few a minute at most.
        """
        closes = self._closed_before_connack
        switch = closes % CLOSES_BEFORE_CONNACK_TO_SWITCH == 0
        at_once = not self._had_session and closes <= CLOSES_BEFORE_CONNACK_TO_SWITCH
        if not (switch or at_once):
            return  # paho reconnects after its back-off, with the same version
        protocol = self.protocol
        if switch:
            protocol = paho.MQTTv311 if self.protocol == paho.MQTTv5 else paho.MQTTv5
            self._switches += 1
            log.warning(
                "mqtt_closed_before_connack_switching_protocol",
                to="3.1.1" if protocol == paho.MQTTv311 else "5",
            )
        delay_s = 0
        if not at_once and self._switches > 1:
            waits = self._backoff.delays(self._backoff.first_wait())
            delay_s = next(itertools.islice(waits, self._switches - 2, None))
        self._restart(protocol, delay_s)

    def _disconnected(self, reason: str, before_connack: bool, client: Any = None) -> None:
        if client is not None and client is not self._client:
            return  # a client retired by a restart: its news is not the link's
        if before_connack:
            self._closed_before_connack += 1
            self._closed_without_connack()
        if self._stopping:
            log.info("mqtt_disconnected", reason=reason, by="us")
        elif self.connected.is_set():
            log.warning("mqtt_disconnected", reason=reason)
        self.connected.clear()
        if self._on_disconnected is not None:
            self._on_disconnected(reason)
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
