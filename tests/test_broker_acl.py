"""docs/mosquitto.acl on a real mosquitto: a cabinet cannot publish as another, nor read
another's commands; everything a cabinet and the backend need still works."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cabinet.demo.backend import Backend
from tests.conftest import REPO
from tests.daemon_harness import running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto, client_cert_broker
from tests.tls_certs import Pki, make_pki

ACL = REPO / "docs" / "mosquitto.acl"
NOT_AUTHORIZED = 0x87
TIMEOUT_S = 10


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Pki, int]]:
    pki = make_pki(tmp_path, client_cn="cab-a", more_clients=("cab-b", "backend", "cab-test"))
    with client_cert_broker(
        tmp_path, pki.ca, pki.server_cert, pki.server_key, f"acl_file {ACL}\n"
    ) as (broker, tls_port):
        yield broker, pki, tls_port


class Client:
    """A paho MQTT 5 client with one identity (its certificate)."""

    def __init__(self, pki: Pki, port: int, cert: Path, key: Path, client_id: str) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.acks: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self.client.tls_set(ca_certs=str(pki.ca), certfile=str(cert), keyfile=str(key))
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self.acks.put(
            (f"pub{mid}", reason)
        )
        self.client.on_subscribe = lambda _c, _u, mid, reasons, _p: self.acks.put(
            (f"sub{mid}", reasons[0])
        )
        connected: queue.Queue[Any] = queue.Queue()
        self.client.on_connect = lambda _c, _u, _f, reason, _p: connected.put(reason)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert not connected.get(timeout=TIMEOUT_S).is_failure

    def _ack(self, key: str) -> Any:
        while True:
            got, reason = self.acks.get(timeout=TIMEOUT_S)
            if got == key:
                return reason

    def publish(self, topic: str, payload: bytes) -> int:
        """The PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        return int(self._ack(f"pub{info.mid}").value)

    def subscribe(self, topic: str) -> int:
        """The SUBACK reason code."""
        _rc, mid = self.client.subscribe(topic, qos=1)
        return int(self._ack(f"sub{mid}").value)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_cabinet_cannot_publish_as_another_or_read_its_commands(
    acl_broker: tuple[Mosquitto, Pki, int],
) -> None:
    _broker, pki, port = acl_broker
    cab_a = Client(pki, port, pki.client_cert, pki.client_key, "cab-a")
    cab_b = Client(pki, port, *pki.clients["cab-b"], "cab-b")
    backend = Client(pki, port, *pki.clients["backend"], "backend")
    try:
        assert backend.subscribe("cabinets/#") < NOT_AUTHORIZED
        # its own subtree: accepted and delivered
        assert cab_a.publish("cabinets/cab-a/events", b"mine") < NOT_AUTHORIZED
        assert backend.messages.get(timeout=TIMEOUT_S).topic == "cabinets/cab-a/events"
        # another cabinet's subtree: refused (MQTT 5 tells the publisher) and never delivered
        assert cab_a.publish("cabinets/cab-b/events", b"forged") == NOT_AUTHORIZED
        assert cab_a.publish("cabinets/cab-b/status", b"forged") == NOT_AUTHORIZED
        assert cab_a.publish("cabinets/cab-a/cmd/bay.open", b"self-command") == NOT_AUTHORIZED
        # another's commands never reach it (mosquitto grants the subscription and checks
        # read access on every delivery); its own are delivered
        cab_a.subscribe("cabinets/cab-b/cmd/#")
        cab_a.subscribe("cabinets/+/cmd/#")
        assert cab_b.subscribe("cabinets/cab-b/cmd/#") < NOT_AUTHORIZED
        assert backend.publish("cabinets/cab-b/cmd/bay.open", b"for b") < NOT_AUTHORIZED
        assert backend.publish("cabinets/cab-a/cmd/bay.open", b"for a") < NOT_AUTHORIZED
        assert cab_b.messages.get(timeout=TIMEOUT_S).payload == b"for b"
        assert cab_a.messages.get(timeout=TIMEOUT_S).payload == b"for a"  # after b's, in order
        assert cab_a.messages.empty()
        seen = [b""]
        while seen[-1] != b"for a":  # the backend's own last command, echoed after the rest
            seen.append(bytes(backend.messages.get(timeout=TIMEOUT_S).payload))
        assert b"forged" not in seen and b"self-command" not in seen  # nothing forged got out
    finally:
        for client in (cab_a, cab_b, backend):
            client.close()


def test_a_real_cabinet_and_backend_work_under_the_acl(
    tmp_path: Path, acl_broker: tuple[Mosquitto, Pki, int]
) -> None:
    _broker, pki, port = acl_broker
    cert, key = pki.clients["cab-test"]
    mqtt = {
        "url": f"mqtts://127.0.0.1:{port}",
        "ca_file": str(pki.ca),
        "client_cert": str(cert),
        "client_key": str(key),
    }
    b_cert, b_key = pki.clients["backend"]
    backend = Backend(
        "127.0.0.1", port, client_id="backend", tls=(str(pki.ca), str(b_cert), str(b_key))
    )
    try:
        (tmp_path / "cab").mkdir()
        with running_cabinet(tmp_path / "cab", extra={"mqtt": mqtt}):
            wait_until("status online", lambda: backend.status.get("cab-test"))
            wait_until("retained state", lambda: backend.state.get("cab-test"))
            reply = backend.command("cab-test", "state.get", {"request_id": "acl-1"})
            assert reply["ok"] is True  # command read, reply published to the response topic
            # the event travels the outbox on its own, not before the reply: waited for
            wait_until(
                "command.handled at the backend",
                lambda: any(e["type"] == "command.handled" for e in backend.event_list("cab-test")),
            )
    finally:
        backend.close()


def test_a_cabinet_answers_only_under_its_own_name_in_a_backends_replies(
    acl_broker: tuple[Mosquitto, Pki, int],
) -> None:
    _broker, pki, port = acl_broker
    cab_a = Client(pki, port, pki.client_cert, pki.client_key, "cab-a")
    backend = Client(pki, port, *pki.clients["backend"], "backend")
    try:
        assert backend.subscribe("replies/backend/#") < NOT_AUTHORIZED
        # the response topic a backend names for cab-a: cab-a may answer there
        assert cab_a.publish("replies/backend/cab-a/r1", b"answer") < NOT_AUTHORIZED
        # but never as another cabinet, nor outside a cabinet's own name
        assert cab_a.publish("replies/backend/cab-b/r1", b"forged") == NOT_AUTHORIZED
        assert cab_a.publish("replies/backend/r1", b"forged") == NOT_AUTHORIZED
        assert cab_a.publish("replies/operator/cab-b/r1", b"forged") == NOT_AUTHORIZED
        assert backend.messages.get(timeout=TIMEOUT_S).payload == b"answer"
        assert cab_a.publish("replies/backend/cab-a/r2", b"end") < NOT_AUTHORIZED
        assert backend.messages.get(timeout=TIMEOUT_S).payload == b"end"  # nothing in between
    finally:
        for client in (cab_a, backend):
            client.close()
