"""Outbox drain into a real mosquitto: backlog throughput and publish -> PUBACK latency.

Builds a journal holding a 10,000-event backlog (as after a long broker outage), then
runs the real FleetLink against a mosquitto started on a free port and times the
drain until the outbox is empty. Latency: 1,000 single QoS 1 publishes through the
same MqttLink, each awaited to its PUBACK. Goal: drain >= 2,000 events/s.

    .venv/bin/python bench/outbox.py [--events N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.fleet_link import FleetLink
from cabinet.daemon.journal import Journal
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus
from drivers.mqtt_link import MqttLink

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.mqtt_broker import Mosquitto


def fill(journal: Journal, count: int) -> None:
    with journal.transaction() as db:
        for n in range(count):
            journal.add_event(
                db, "swap.step", {"session_id": f"s{n // 6}", "n": n}, int(time.time() * 1000)
            )


async def drain(journal: Journal, url: str, count: int) -> float:
    bus = ModbusBus(parse_endpoint("tcp://127.0.0.1:9"))  # never connected: no bus needed
    controller = CabinetController(cabinet_id="bench", journal=journal, scheduler=BusScheduler(bus))
    fleet = FleetLink(controller, lambda **kw: MqttLink(url, client_id="bench", **kw))
    started = time.perf_counter()
    task = asyncio.create_task(fleet.run())
    while journal.outbox_depth() > 0:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return count / elapsed


async def latency(url: str, samples: int) -> list[float]:
    link = MqttLink(
        url, client_id="bench-latency", will_topic="bench/status", will_payload=b"offline"
    )
    link.start()
    await link.connected.wait()
    results = []
    payload = b'{"v":1,"ts":0,"cabinet_id":"bench","seq":1,"id":"x","type":"t","data":{}}'
    for _ in range(samples):
        started = time.perf_counter()
        await link.publish("cabinets/bench/events", payload)
        results.append(time.perf_counter() - started)
    link.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        broker = Mosquitto(tmp)
        broker.start()
        try:
            journal = Journal(tmp / "journal.db")
            fill(journal, args.events)
            rate = asyncio.run(drain(journal, broker.url, args.events))
            lat = sorted(asyncio.run(latency(broker.url, 1000)))
        finally:
            broker.stop()
    p99 = lat[int(0.99 * len(lat)) - 1]
    print(f"drained {args.events} events: {rate:,.0f} events/s (goal >= 2,000)")
    print(
        f"publish -> PUBACK: p50 {statistics.median(lat) * 1000:.2f} ms, "
        f"p99 {p99 * 1000:.2f} ms over {len(lat)} publishes"
    )


if __name__ == "__main__":
    main()
