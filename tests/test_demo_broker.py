"""The demo's embedded broker, driven by the cabinet's own MqttLink and plain paho clients."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cabinet.demo.broker import EmbeddedBroker
from drivers.mqtt_link import MqttLink, parse_broker_url
from tests.conftest import cabinet_cmd
from tests.daemon_harness import running_cabinet
from tests.test_swap_end_to_end import SWAP_STEPS, collect, deposit

TIMEOUT_S = 10.0


class Subscriber:
    """A plain MQTT 3.1.1 paho client, as any fleet tool would connect."""

    def __init__(self, url: str, topic_filter: str, client_id: str) -> None:
        address = parse_broker_url(url)
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.subscribed = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311
        )
        self._client.on_connect = lambda c, _u, _f, _r, _p: c.subscribe(topic_filter, qos=1)
        self._client.on_subscribe = lambda *_: self.subscribed.set()
        self._client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self._client.connect_async(address.host, address.port, 30)
        self._client.loop_start()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def next(self) -> paho.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT_S)

    def next_on(self, topic: str) -> paho.MQTTMessage:
        while True:
            message = self.next()
            if message.topic == topic:
                return message


async def ready(subscriber: Subscriber) -> Subscriber:
    """Once the broker has acknowledged the subscription (waiting off the broker's loop)."""
    assert await asyncio.to_thread(subscriber.subscribed.wait, TIMEOUT_S), "no SUBACK"
    return subscriber


@asynccontextmanager
async def cabinet_link(url: str, client_id: str = "cab-demo") -> AsyncIterator[MqttLink]:
    """A connected MqttLink with a retained offline will, as the daemon builds it."""
    link = MqttLink(
        url,
        client_id=client_id,
        will_topic=f"cabinets/{client_id}/status",
        will_payload=b'{"online": false}',
    )
    link.start()
    try:
        await asyncio.wait_for(link.connected.wait(), TIMEOUT_S)
        yield link
    finally:
        link.stop()


def run(scenario: Any) -> None:
    async def with_broker() -> None:
        async with EmbeddedBroker() as broker:
            assert broker.url is not None
            await scenario(broker.url)

    asyncio.run(with_broker())


def test_it_listens_on_a_free_port_of_its_own() -> None:
    async def two_brokers() -> None:
        async with EmbeddedBroker() as first, EmbeddedBroker() as second:
            assert first.url is not None and second.url is not None
            ports = {parse_broker_url(first.url).port, parse_broker_url(second.url).port}
            assert len(ports) == 2 and 1883 not in ports
            assert first.url.startswith("mqtt://127.0.0.1:")

    asyncio.run(two_brokers())


def test_the_cabinet_link_falls_back_to_311_and_qos1_is_delivered() -> None:
    async def scenario(url: str) -> None:
        sub = await ready(Subscriber(url, "cabinets/cab-demo/events", "fleet-tool"))
        try:
            async with cabinet_link(url) as link:
                assert link.protocol == paho.MQTTv311  # refused as MQTT 5, not left hanging
                await asyncio.wait_for(link.publish("cabinets/cab-demo/events", b"e1"), TIMEOUT_S)
                message = await asyncio.to_thread(sub.next)
                assert (message.payload, message.qos) == (b"e1", 1)
        finally:
            sub.close()

    run(scenario)


def test_a_retained_message_reaches_a_late_subscriber() -> None:
    async def scenario(url: str) -> None:
        async with cabinet_link(url) as link:
            published = link.publish("cabinets/cab-demo/state", b'{"bays": []}', retain=True)
            await asyncio.wait_for(published, TIMEOUT_S)
        late = await ready(Subscriber(url, "cabinets/cab-demo/state", "late"))
        try:
            message = await asyncio.to_thread(late.next)
            assert message.payload == b'{"bays": []}' and message.retain
        finally:
            late.close()

    run(scenario)


def test_the_last_will_is_published_and_retained_when_the_connection_drops() -> None:
    async def scenario(url: str) -> None:
        status = "cabinets/cab-demo/status"
        watcher = await ready(Subscriber(url, status, "watcher"))
        try:
            async with cabinet_link(url) as link:
                link._client.loop_stop()  # paho must not notice and disconnect cleanly
                sock = link._client.socket()
                assert isinstance(sock, socket.socket)
                sock.shutdown(socket.SHUT_RDWR)  # EOF with no DISCONNECT, as a crash would
                will = await asyncio.to_thread(watcher.next)
                assert (will.topic, will.payload) == (status, b'{"online": false}')
        finally:
            watcher.close()
        late = await ready(Subscriber(url, status, "late"))
        try:
            retained = await asyncio.to_thread(late.next)
            assert retained.payload == b'{"online": false}' and retained.retain
        finally:
            late.close()

    run(scenario)


def test_a_clean_disconnect_sends_no_will() -> None:
    async def scenario(url: str) -> None:
        watcher = await ready(Subscriber(url, "cabinets/#", "watcher"))
        try:
            async with cabinet_link(url, "cab-a"):
                pass
            # a second cabinet's message arriving first proves cab-a's will never came
            async with cabinet_link(url, "cab-b") as link:
                await asyncio.wait_for(link.publish("cabinets/cab-b/events", b"b"), TIMEOUT_S)
            assert (await asyncio.to_thread(watcher.next)).topic == "cabinets/cab-b/events"
        finally:
            watcher.close()

    run(scenario)


def test_an_mqtt5_only_client_is_refused_at_once() -> None:
    # what cabinet/demo/backend.py does today: MQTT 5 and no fallback
    async def scenario(url: str) -> None:
        address = parse_broker_url(url)
        refused: queue.Queue[int] = queue.Queue()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="v5", protocol=paho.MQTTv5)
        client.will_set("x/status", b"off", qos=1, retain=True)
        client.on_connect = lambda _c, _u, _f, reason, _p: refused.put(reason.value)
        client.connect_async(address.host, address.port, 30)
        client.loop_start()
        try:
            assert await asyncio.to_thread(refused.get, timeout=TIMEOUT_S) == 132
        finally:
            client.loop_stop()

    run(scenario)


@contextmanager
def broker_thread() -> Iterator[str]:
    """The broker on its own loop in a thread, for tests that drive processes synchronously."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    broker = EmbeddedBroker()
    try:
        yield asyncio.run_coroutine_threadsafe(broker.start(), loop).result(TIMEOUT_S)
    finally:
        asyncio.run_coroutine_threadsafe(broker.stop(), loop).result(TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT_S)
        loop.close()


def test_the_daemon_fleet_link_reports_a_swap_through_it(tmp_path: Path) -> None:
    cab_id = "cab-test"
    with broker_thread() as url:
        sub = Subscriber(url, f"cabinets/{cab_id}/#", "fleet-tool")
        try:
            assert sub.subscribed.wait(TIMEOUT_S)
            with running_cabinet(tmp_path, extra={"mqtt": {"url": url}}) as cab:
                status = json.loads(sub.next_on(f"cabinets/{cab_id}/status").payload)
                assert status["online"] is True
                started = cab.swap_begins("R-1")
                deposit(cab, started["return_bay"], "BAT-D1")
                collect(cab, started["dispense_bay"])
                seen: list[str] = []
                while seen != SWAP_STEPS:
                    event = json.loads(sub.next_on(f"cabinets/{cab_id}/events").payload)
                    if event["data"].get("session_id") == started["session_id"]:
                        seen.append(event["type"])
                # an operator's `cabinet watch` (MQTT 5 first) falls back to 3.1.1 here too
                watch = cabinet_cmd("watch", "--broker", url, "--json", "--duration", "3")
                assert watch.returncode == 0, watch.stderr
                row = [json.loads(line) for line in watch.stdout.splitlines()][-1]
                assert row["cabinet"] == cab_id and row["online"] is True
                assert sum(row["bays"].values()) == 12  # from the retained state
                cab.kill9()
                will = json.loads(sub.next_on(f"cabinets/{cab_id}/status").payload)
                assert will["online"] is False
        finally:
            sub.close()
