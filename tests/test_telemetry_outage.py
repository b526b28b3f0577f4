"""Telemetry through a broker outage, as a backend sees it (docs/mqtt.md, "telemetry").

A real `cabinet run` with a mosquitto of the test's own, stopped and restarted; the
backend is a subscriber with a persistent session (what the docs ask of a backend
that must lose nothing). The samples the cabinet took while the broker was away are
read from its journal while they wait; each must then reach the backend once, in
the order taken, with the ``ts`` it was taken at — and an event raised during the
outage must not queue behind that backlog.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cabinet.daemon.journal import Journal
from tests.conftest import cabinet_cmd
from tests.daemon_harness import Cabinet, running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto

CAB = "cab-test"
INTERVAL_S = 5  # the shortest telemetry interval the configuration accepts
OUTAGE_SAMPLES = 3  # the broker stays away until the cabinet holds this many samples
#: the cabinet's reconnect backoff doubles up to 30 s during an outage: room for one
BACKLOG_WAIT_S = 60.0


class PersistentSubscriber:
    """A backend's subscriber: MQTT 5, no clean start, QoS 1 — the broker queues for it."""

    def __init__(self, port: int, client_id: str) -> None:
        self.arrivals: list[tuple[str, dict[str, Any]]] = []  # (kind, payload) as they came
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self._client.on_connect = self._connected
        self._client.on_message = self._message
        self._client.reconnect_delay_set(1, 2)  # back soon after the broker restarts
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self._client.connect("127.0.0.1", port, 30, clean_start=False, properties=props)
        self._client.loop_start()
        if not self._ready.wait(10):
            raise ConnectionError("the subscriber could not connect")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _connected(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(f"cabinets/{CAB}/telemetry", qos=1)
            client.subscribe(f"cabinets/{CAB}/events", qos=1)
            self._ready.set()

    def _message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.arrivals.append((msg.topic.rsplit("/", 1)[1], json.loads(msg.payload)))

    def seen(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self.arrivals)

    def telemetry_ts(self) -> list[int]:
        return [p["ts"] for kind, p in self.seen() if kind == "telemetry"]


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker that keeps sessions across its own restart, as a production broker does."""
    broker = Mosquitto(tmp_path, persistent=True)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def backend(persistent_broker: Mosquitto) -> Iterator[PersistentSubscriber]:
    subscriber = PersistentSubscriber(persistent_broker.port, "backend-telemetry")
    yield subscriber
    subscriber.close()


def held_ts(cab: Cabinet) -> list[int]:
    """The ``ts`` of the samples the cabinet holds for the broker, oldest first."""
    journal: Journal = wait_until("the journal to open", cab._open_journal)
    try:
        return [sample.ts for sample in journal.held_telemetry(10_000)]
    finally:
        journal.close()


def holds_at_least(cab: Cabinet, count: int) -> list[int] | None:
    held = held_ts(cab)
    return held if len(held) >= count else None


def config(broker: Mosquitto) -> dict[str, dict[str, Any]]:
    return {"mqtt": {"url": broker.url, "telemetry_interval_s": INTERVAL_S}}


def assert_delivered_once_in_order(backend: PersistentSubscriber, held: list[int]) -> None:
    """Each held sample once, in the order taken; nothing after them out of order."""
    wait_until(
        "every held sample at the backend",
        lambda: set(held) <= set(backend.telemetry_ts()),
        timeout=BACKLOG_WAIT_S,
    )
    received = backend.telemetry_ts()
    assert [ts for ts in received if ts in set(held)] == held  # once each, in order
    from_backlog = received[received.index(held[0]) :]
    assert all(a < b for a, b in pairwise(from_backlog)), from_backlog


def test_samples_taken_during_an_outage_arrive_once_in_order_after_the_event(
    tmp_path: Path, persistent_broker: Mosquitto, backend: PersistentSubscriber
) -> None:
    with running_cabinet(tmp_path, extra=config(persistent_broker)) as cab:
        wait_until("a live sample", backend.telemetry_ts, timeout=3 * INTERVAL_S)
        persistent_broker.stop()
        stopped_ms = int(time.time() * 1000)
        wait_until("a sample held", lambda: holds_at_least(cab, 1), timeout=3 * INTERVAL_S)
        disabled = cabinet_cmd("bay", "disable", "7", "--reason", "outage", "-c", str(cab.config))
        assert disabled.returncode == 0, disabled.stderr
        held = wait_until(
            f"{OUTAGE_SAMPLES} samples held",
            lambda: holds_at_least(cab, OUTAGE_SAMPLES),
            timeout=(OUTAGE_SAMPLES + 2) * INTERVAL_S,
        )
        restarted_ms = int(time.time() * 1000)
        persistent_broker.start()

        assert_delivered_once_in_order(backend, held)
        # with the time they were taken at, during the outage, not when they were sent
        assert all(ts < restarted_ms for ts in held)
        assert len([ts for ts in held if ts > stopped_ms]) >= OUTAGE_SAMPLES - 1
        # the event raised mid-outage went ahead of every held sample
        arrivals = backend.seen()
        kinds = [
            "event" if kind == "events" and p["type"] == "bay.disabled" else kind
            for kind, p in arrivals
        ]
        first_held = next(
            i for i, (kind, p) in enumerate(arrivals) if kind == "telemetry" and p["ts"] in held
        )
        assert "event" in kinds[:first_held], kinds
        # delivered means acknowledged: the journal lets go of them
        wait_until("the backlog released", lambda: not held_ts(cab) or held_ts(cab)[0] > held[-1])


def test_a_daemon_killed_during_the_outage_loses_no_held_sample(
    tmp_path: Path, persistent_broker: Mosquitto, backend: PersistentSubscriber
) -> None:
    with running_cabinet(tmp_path, extra=config(persistent_broker)) as cab:
        wait_until("a live sample", backend.telemetry_ts, timeout=3 * INTERVAL_S)
        persistent_broker.stop()
        before_kill = wait_until(
            "2 samples held", lambda: holds_at_least(cab, 2), timeout=4 * INTERVAL_S
        )
        cab.kill9()
        cab.start()
        held = wait_until(
            "a sample held by the new daemon",
            lambda: holds_at_least(cab, len(before_kill) + 1),
            timeout=3 * INTERVAL_S,
        )
        assert held[: len(before_kill)] == before_kill
        persistent_broker.start()
        assert_delivered_once_in_order(backend, held)
