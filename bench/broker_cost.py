"""What one cabinet costs a broker: connections, messages and bytes per minute, retained bytes.

Runs ``cabinet sim fleet``'s cabinets (the daemon's own controller and fleet link over a
simulated bus) against a mosquitto started on a free port, with an observer subscribed
to ``cabinets/#`` that counts every message by kind. The simulated riders come far more
often than real ones (every 4-12 s) and telemetry every 10 s, so the rates measured here
are a stress figure; the sizes are the real ones. From the sizes and the events per swap
it also derives a busy field cabinet's cost (a swap every 3 minutes, telemetry every
60 s: DESIGN.md §1, docs/mqtt.md "Scaling out").

    .venv/bin/python bench/broker_cost.py [--cabinets N] [--duration S]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cabinet.demo.fleet_sim import run_fleet
from tests.mqtt_broker import Mosquitto

FIELD_SWAPS_PER_MIN = 1 / 3  # "a swap every few minutes at peak" (DESIGN.md §1)
FIELD_TELEMETRY_PER_MIN = 1.0  # the default telemetry_interval_s = 60
HEADER_BYTES = 6  # fixed header, packet id, properties length: what a PUBLISH adds


class Observer:
    """Counts the fleet's messages by kind; remembers each cabinet's retained sizes."""

    def __init__(self, port: int) -> None:
        self.count: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.retained: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self._client.on_message = self._message
        self._client.connect("127.0.0.1", port)
        self._client.subscribe("cabinets/#", qos=1)
        self._client.loop_start()

    def _message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        kind = parts[2] if len(parts) == 3 else "/".join(parts[2:3]) or "other"
        size = len(msg.payload) + len(msg.topic) + HEADER_BYTES
        with self._lock:
            self.count[kind] += 1
            self.bytes[kind] += size
            if kind in {"status", "state"}:
                self.retained[(parts[1], kind)] = len(msg.payload)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


async def measure(cabinets: int, duration_s: float) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        observer = Observer(broker.port)
        try:
            report = await asyncio.to_thread(run_fleet, cabinets, broker.url, duration_s)
        finally:
            observer.close()
            broker.stop()
    minutes = report.seconds / 60
    print(*report.lines(), sep="\n")
    print(f"per cabinet, simulated load ({cabinets} cabinets, {report.seconds:.0f} s):")
    print(f"  {'kind':<10} {'msgs/min':>9} {'bytes/msg':>10} {'bytes/min':>10}")
    for kind in sorted(observer.count):
        n, size = observer.count[kind], observer.bytes[kind]
        print(
            f"  {kind:<10} {n / minutes / cabinets:9.1f} {size / n:10.0f} "
            f"{size / minutes / cabinets:10.0f}"
        )
    retained = sum(observer.retained.values()) / cabinets
    print(f"  retained: {retained:.0f} bytes (status + state), 1 connection, 1 subscription")
    swaps = max(report.swaps_completed, 1)
    events_per_swap = observer.count["events"] / swaps
    event_size = observer.bytes["events"] / max(observer.count["events"], 1)
    state_per_swap = observer.count["state"] / swaps
    state_size = observer.bytes["state"] / max(observer.count["state"], 1)
    telemetry_size = observer.bytes["telemetry"] / max(observer.count["telemetry"], 1)
    field = {
        "events": FIELD_SWAPS_PER_MIN * events_per_swap,
        "state": FIELD_SWAPS_PER_MIN * state_per_swap,
        "telemetry": FIELD_TELEMETRY_PER_MIN,
    }
    field_bytes = (
        field["events"] * event_size
        + field["state"] * state_size
        + field["telemetry"] * telemetry_size
    )
    print(
        f"per swap: {events_per_swap:.1f} events of {event_size:.0f} B, "
        f"{state_per_swap:.1f} state of {state_size:.0f} B; telemetry {telemetry_size:.0f} B"
    )
    print(
        "a busy field cabinet (a swap every 3 min, telemetry every 60 s): "
        f"{sum(field.values()):.1f} msgs/min in, {field_bytes:.0f} B/min in "
        f"({field['events']:.1f} events, {field['state']:.1f} state, 1 telemetry)"
    )
    return 0 if report.gaps == 0 and report.duplicates == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cabinets", type=int, default=20)
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    return asyncio.run(measure(args.cabinets, args.duration))


if __name__ == "__main__":
    sys.exit(main())
