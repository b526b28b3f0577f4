"""A stand-in for the fleet backend: records every cabinet's events and sends commands.

Used by the tests and the demo the way a real backend would use the broker: it
subscribes to ``cabinets/+/#``, keeps every event (de-duplicated by ``id``, with
gap detection by ``seq``), remembers retained status/state, and sends commands
with an MQTT 5 response topic and correlation data.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol import topics


class Backend:
    """Subscribes to the whole fleet; thread-safe accessors for what it has seen."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str = "backend",
        persistent: bool = False,
        mqtt5: bool = True,
        tls: tuple[str, str, str] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._mqtt5 = mqtt5
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)  # in arrival order
        self.duplicates: dict[str, int] = defaultdict(int)
        self.state_publishes: dict[str, int] = defaultdict(int)  # deadbands are tested on it
        self._seen_ids: set[str] = set()
        self.status: dict[str, dict[str, Any]] = {}
        self.state: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, dict[str, Any]] = {}
        # under replies/<client id>/: what the broker ACL (docs/mosquitto.acl) lets it read
        # one per cabinet: replies/<client id>/<cabinet id>/<random> (the cabinet's name in
        # it is what the ACL lets that cabinet, and only it, answer on)
        self._reply_root = f"replies/{client_id}"
        self._reply_nonce = uuid.uuid4().hex
        self._reply_topic = f"{self._reply_root}/+/{self._reply_nonce}"
        # the demo's broker speaks 3.1.1 only: replies then come on cabinets/<id>/reply
        if mqtt5:
            self._client = paho.Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
            )
        else:
            self._client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=paho.MQTTv311,
                clean_session=not persistent,
            )
        if tls is not None:  # (CA, client certificate, client key), as a fleet backend connects
            ca, cert, key = tls
            self._client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        self._client.on_connect = self._connected
        self._client.on_message = self._message
        self._connected_event = threading.Event()
        props = None
        if persistent:  # like a real backend: the broker queues what we miss while away
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
        if mqtt5:
            self._client.connect(host, port, 30, clean_start=not persistent, properties=props)
        else:
            self._client.connect(host, port, 30)
        self._client.loop_start()
        if not self._connected_event.wait(10):
            raise ConnectionError(f"backend could not connect to {host}:{port}")

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def _connected(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return  # refused: the constructor's wait times out with a clear error
        client.subscribe(f"{topics.ROOT}/+/#", qos=1)
        client.subscribe(self._reply_topic, qos=1)
        self._connected_event.set()

    def _message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
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
                if payload["id"] in self._seen_ids:
                    self.duplicates[cabinet] += 1
                    return
                self._seen_ids.add(payload["id"])
                self.events[cabinet].append(payload)
            elif kind == "status":
                self.status[cabinet] = payload
            elif kind == "state":
                self.state[cabinet] = payload
                self.state_publishes[cabinet] += 1

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
        self._client.publish(
            topics.command(cabinet_id, name), body, qos=1, properties=props if self._mqtt5 else None
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
