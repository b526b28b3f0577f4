"""A stand-in for the fleet backend: records every cabinet's events and sends commands.

Used by the tests and the demo the way a real backend would use the broker: it
subscribes to ``cabinets/+/#``, keeps every event (de-duplicated by ``id``, with
gap detection by ``seq``), remembers retained status/state, and sends commands
with an MQTT 5 response topic and correlation data.

It speaks MQTT through the cabinets' own ``drivers.mqtt_link.MqttLink`` (its TLS set-up
and reconnection back-off), on an asyncio loop in a thread of its own, so that tests and
the demo can call it from plain code. With ``group`` it is one of N consumers of an MQTT 5
shared subscription (``$share/<group>/cabinets/+/events``): the broker hands each event to
one consumer of the group, and the group de-duplicates by id in a ``SeenEvents`` store
that outlives a consumer's restart (docs/mqtt.md "Scaling out"). ``run_consumers`` is
``cabinet sim backend``: N such consumers in one process, each event printed once.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cabinet.demo.seen_events import DEFAULT_WINDOW_S, SeenEvents, store_path
from drivers.mqtt_link import Message, MqttLink, TlsFiles
from protocol import topics

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
#: A consumer's broker session (its subscription and the events queued for it) outlives
#: a restart of the consumer by this much.
SESSION_EXPIRY_S = 3600


def shared_events_filter(group: str) -> str:
    """The events of every cabinet, shared among the consumers of ``group`` (MQTT 5)."""
    if not group or any(c in group for c in "/+#"):
        raise ValueError(f"{group!r}: a share group is one topic level, without / + #")
    return f"$share/{group}/{topics.events('+')}"


class Backend:
    """Subscribes to the whole fleet; thread-safe accessors for what it has seen.

    ``group``: one consumer of a shared subscription; ``event_list`` and ``gaps`` then
    cover this consumer's share only. ``state_dir``: de-duplicate by id across restarts
    in the group's (or this client's) ``SeenEvents`` file there; events are acknowledged
    to the broker only once recorded, so a consumer that dies loses none of them.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str = "backend",
        persistent: bool = False,
        mqtt5: bool = True,
        tls: tuple[str, str, str] | None = None,
        group: str | None = None,
        state_dir: Path | None = None,
        seen_window_s: float = DEFAULT_WINDOW_S,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        """``seen_window_s``: how long the ``state_dir`` store remembers an id.

        ``on_event(cabinet_id, event)`` is called, on the backend's own thread, for each
        event the first time it is processed (a duplicate is not): what a real backend
        would act on.
        """
        self._lock = threading.Lock()
        self._on_event = on_event
        self._mqtt5 = mqtt5
        self.client_id = client_id
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)  # in arrival order
        self.duplicates: dict[str, int] = defaultdict(int)
        self.state_publishes: dict[str, int] = defaultdict(int)  # deadbands are tested on it
        self.received_ids: list[str] = []  # every event delivery, duplicates included
        self._seen_ids: set[str] = set()
        self._seen = (
            SeenEvents(store_path(state_dir, group or client_id), window_s=seen_window_s)
            if state_dir is not None
            else None
        )
        self.status: dict[str, dict[str, Any]] = {}
        self.state: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, dict[str, Any]] = {}
        # under replies/<client id>/: what the broker ACL (docs/mosquitto.acl) lets it read
        # one per cabinet: replies/<client id>/<cabinet id>/<random> (the cabinet's name in
        # it is what the ACL lets that cabinet, and only it, answer on)
        self._reply_root = f"replies/{client_id}"
        self._reply_nonce = uuid.uuid4().hex
        self._reply_topic = f"{self._reply_root}/+/{self._reply_nonce}"
        # a group member keeps its session: what the broker queued for it while it was
        # away is its share, which no other member receives
        keep = persistent or group is not None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"backend-{client_id}", daemon=True
        )
        self._thread.start()
        try:
            self._link = self._on_loop(lambda: self._new_link(host, port, tls, keep))
        except ValueError:  # a TLS file that cannot be loaded
            self._stop_loop()
            raise
        if group is None:
            self._link.subscribe(f"{topics.ROOT}/+/#")
        else:
            for kind in (topics.status, topics.state, topics.reply):
                self._link.subscribe(kind("+"))
            self._link.subscribe(shared_events_filter(group))
        self._link.subscribe(self._reply_topic)
        try:
            asyncio.run_coroutine_threadsafe(
                self._link.open(CONNECT_TIMEOUT_S), self._loop
            ).result()
        except (OSError, ValueError) as exc:
            self.close()  # paho would otherwise go on retrying in its thread
            raise ConnectionError(f"backend could not connect to {host}:{port}: {exc}") from exc

    def _new_link(
        self, host: str, port: int, tls: tuple[str, str, str] | None, keep: bool
    ) -> MqttLink:
        scheme = "mqtts" if tls is not None else "mqtt"
        return MqttLink(
            f"{scheme}://{host}:{port}",
            client_id=self.client_id,
            tls=TlsFiles(*(Path(f) for f in tls)) if tls is not None else None,
            on_message=self._message,
            session_expiry_s=SESSION_EXPIRY_S if keep else 0,
            resume_session=keep,
            # the demo's broker speaks 3.1.1 only: replies then come on cabinets/<id>/reply
            mqtt5=self._mqtt5,
            manual_ack=self._seen is not None,
        )

    @property
    def protocol(self) -> str:
        """The MQTT version the broker took: "5", or "3.1.1" (no shared subscriptions)."""
        return "5" if self._link.protocol == paho.MQTTv5 else "3.1.1"

    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the backend's loop (the link is not thread-safe) and return its value."""

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def close(self) -> None:
        """Disconnect (a consumer's session stays on the broker for its restart)."""
        if self._loop.is_closed():
            return  # closed already
        self._on_loop(self._link.stop)
        self._stop_loop()
        if self._seen is not None:
            self._seen.close()

    def _stop_loop(self) -> None:
        # what paho handed over before it stopped is handled first: stop is queued after it
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _message(self, message: Message) -> None:
        try:
            self._handle(message)
        finally:
            if self._seen is not None:
                self._link.ack(message)  # kept (or not ours to keep): the broker may forget it

    def _handle(self, msg: Message) -> None:
        try:
            payload = json.loads(msg.payload)
        except (ValueError, RecursionError):  # bad JSON, a 5,000-digit number, deep nesting
            return
        parts = msg.topic.split("/")
        with self._lock:
            mine = msg.topic.startswith(self._reply_root + "/") and parts[-1] == self._reply_nonce
            if mine or (len(parts) == 3 and parts[2] == "reply"):
                self.replies[str(payload.get("request_id"))] = payload
                return
            if len(parts) != 3 or parts[0] != topics.ROOT:
                return
            cabinet, kind = parts[1], parts[2]
            if kind == "events":
                self.received_ids.append(payload["id"])
                if not self._first_time(payload, cabinet):
                    self.duplicates[cabinet] += 1
                    return
                self.events[cabinet].append(payload)
                if self._on_event is not None:
                    self._on_event(cabinet, payload)
            elif kind == "status":
                self.status[cabinet] = payload
            elif kind == "state":
                self.state[cabinet] = payload
                self.state_publishes[cabinet] += 1

    def _first_time(self, event: dict[str, Any], cabinet: str) -> bool:
        if self._seen is not None:
            return self._seen.first_time(event["id"], cabinet, int(event["seq"]), self.client_id)
        if event["id"] in self._seen_ids:
            return False
        self._seen_ids.add(event["id"])
        return True

    def event_list(self, cabinet_id: str) -> list[dict[str, Any]]:
        """Unique events of one cabinet, sorted by seq."""
        with self._lock:
            return sorted(self.events[cabinet_id], key=lambda e: e["seq"])

    def gaps(self, cabinet_id: str) -> list[int]:
        """Missing seq numbers between the first and the last seen."""
        seqs = [e["seq"] for e in self.event_list(cabinet_id)]
        return sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs)) if seqs else []

    def command(
        self,
        cabinet_id: str,
        name: str,
        payload: bytes | dict[str, Any],
        *,
        timeout_s: float = 10.0,
    ) -> dict[str, Any]:
        """Send a command and wait for its reply (matched by request_id or correlation)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        request_id = payload.get("request_id") if isinstance(payload, dict) else None
        key = str(request_id) if request_id is not None else "None"
        with self._lock:
            self.replies.pop(key, None)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = f"{self._reply_root}/{cabinet_id}/{self._reply_nonce}"
        props.CorrelationData = key.encode()
        topic = topics.command(cabinet_id, name)
        self._on_loop(
            lambda: self._link.publish(topic, body, properties=props if self._mqtt5 else None)
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if key in self.replies:
                    return self.replies.pop(key)
            time.sleep(0.02)
        raise TimeoutError(f"no reply to {name} ({key})")

    def authorise_swap(
        self,
        cabinet_id: str,
        rider_id: str,
        mode: str = "swap",
        *,
        challenge: str | None = None,
        lang: str | None = None,
    ) -> dict[str, Any]:
        """The online path: the rider scanned the cabinet's QR with the app."""
        args: dict[str, Any] = {"rider_id": rider_id, "mode": mode}
        if challenge is not None:
            args["challenge"] = challenge
        if lang is not None:
            args["lang"] = lang
        return self.command(
            cabinet_id, "swap.start", {"request_id": uuid.uuid4().hex, "args": args}
        )

    def app_swap(
        self, screen_url: str, rider_id: str, mode: str = "swap", *, lang: str | None = None
    ) -> dict[str, Any]:
        """Play the rider's app: scan the cabinet screen's QR code, then authorise the swap.

        The code is read from the screen's ``/challenge`` endpoint (what the QR encodes:
        ``swapcab:1:<cabinet id>:<challenge>``, docs/mqtt.md).
        """
        cabinet_id, challenge = scan_screen(screen_url)
        return self.authorise_swap(cabinet_id, rider_id, mode, challenge=challenge, lang=lang)


def scan_screen(screen_url: str, timeout_s: float = 5.0) -> tuple[str, str]:
    """(cabinet id, challenge) from the QR payload the cabinet's screen shows now."""
    url = screen_url.rstrip("/") + "/challenge"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not a screen URL: {screen_url}")
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - checked
        payload = str(json.load(response)["payload"])
    prefix, version, cabinet_id, challenge = payload.split(":")
    if (prefix, version) != ("swapcab", "1"):
        raise ValueError(f"not a cabinet QR code: {payload}")
    return cabinet_id, challenge


# -- ``cabinet sim backend``: N consumers of one group, from the command line ----------------


@dataclass
class GroupReport:
    """What the consumers of one run processed, for the closing line."""

    group: str | None
    processed: Counter[str] = field(default_factory=Counter)  # events per consumer
    duplicates: int = 0  # deliveries dropped as already processed (by anyone in the group)

    @property
    def who(self) -> str:
        """The group, or the lone consumer, as the notices name it."""
        return f"group {self.group}" if self.group else "one consumer"

    def summary(self) -> str:
        """One line: events per consumer and duplicates dropped."""
        shares = " + ".join(f"{n} {name}" for name, n in sorted(self.processed.items()))
        total = sum(self.processed.values())
        return (
            f"{self.who}: {total} events processed ({shares or 'none'}), "
            f"{self.duplicates} duplicates dropped"
        )


def run_consumers(
    host: str,
    port: int,
    *,
    group: str | None,
    consumers: int,
    client_id: str,
    state_dir: Path,
    seen_window_s: float,
    duration_s: float | None,
    as_json: bool,
    out: TextIO = sys.stdout,
    notices: TextIO = sys.stderr,
) -> GroupReport:
    """Run ``consumers`` backend consumers until ``duration_s`` (or Ctrl-C); one line per event.

    Each first-time event is printed once, with the consumer that processed it: the
    group's work, de-duplicated across its members and across restarts (same client ids,
    same ``state_dir``: the broker resumes each member's session). Consumer ``i`` is
    ``<client_id>-<i>``. A group needs MQTT 5 shared subscriptions: a broker that speaks
    3.1.1 only (RabbitMQ 3.10, NATS 2.9) would silently deliver nothing, so it is refused.
    """
    if consumers < 1:
        raise ValueError("--consumers must be at least 1")
    if group is None and consumers > 1:
        raise ValueError("more than one consumer needs --group: without it each gets every event")
    report = GroupReport(group)
    lines: queue.Queue[tuple[str, str, dict[str, Any]]] = queue.Queue()
    members: list[Backend] = []
    subscribed = False  # a refused start has nothing to sum up
    try:
        for n in range(1, consumers + 1):
            name = f"{client_id}-{n}" if group is not None else client_id
            members.append(
                Backend(
                    host,
                    port,
                    client_id=name,
                    group=group,
                    persistent=True,
                    state_dir=state_dir,
                    seen_window_s=seen_window_s,
                    on_event=_forward_to(lines, name),
                )
            )
        if group is not None and members[0].protocol != "5":
            raise ValueError(
                f"the broker at {host}:{port} speaks MQTT 3.1.1 only: it has no shared "
                'subscriptions, and a group would receive nothing (docs/mqtt.md "Brokers")'
            )
        print(f"{report.who}: {consumers} consumer(s) subscribed", file=notices)
        notices.flush()
        subscribed = True
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while deadline is None or time.monotonic() < deadline:
            try:
                name, cabinet, event = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            report.processed[name] += 1
            _print_event(out, name, cabinet, event, as_json=as_json)
    finally:
        for member in members:
            member.close()
        while not lines.empty():  # handed over before the consumers stopped
            name, cabinet, event = lines.get_nowait()
            report.processed[name] += 1
            _print_event(out, name, cabinet, event, as_json=as_json)
        report.duplicates = sum(sum(m.duplicates.values()) for m in members)
        if subscribed:
            print(report.summary(), file=notices)
    return report


def _forward_to(
    lines: queue.Queue[tuple[str, str, dict[str, Any]]], consumer: str
) -> Callable[[str, dict[str, Any]], None]:
    """A consumer's ``on_event``: hand the event to the printing thread, named."""

    def forward(cabinet: str, event: dict[str, Any]) -> None:
        lines.put((consumer, cabinet, event))

    return forward


def _print_event(
    out: TextIO, consumer: str, cabinet: str, event: dict[str, Any], *, as_json: bool
) -> None:
    if as_json:
        row: dict[str, Any] = {"consumer": consumer, "cabinet_id": cabinet}
        row.update({k: event.get(k) for k in ("seq", "id", "type", "ts")})
        out.write(json.dumps(row) + "\n")
    else:
        out.write(f"{consumer}  {cabinet}  #{event.get('seq')}  {event.get('type')}\n")
    out.flush()
