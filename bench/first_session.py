"""Time from ``MqttLink.start`` to the first session, per broker of the matrix.

What a cabinet (or ``cabinet watch``) waits at start-up before it can publish. On
RabbitMQ 3.10 this includes the fall-back from MQTT 5 to 3.1.1 (it closes an MQTT 5
CONNECT without a CONNACK), which is what this bench was written for (issue 14). The
broker is started by ``tests/brokers.py`` on free ports; each run uses a fresh link with
the default back-off (jitter included), as the daemon does.

    .venv/bin/python bench/first_session.py [--broker rabbitmq] [--runs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from drivers.mqtt_link import MqttLink
from tests.brokers import BROKER_KINDS, make_broker

GOAL_S = 1.0  # a person waiting on `cabinet watch` should not notice the fall-back


async def first_session(url: str, run: int) -> tuple[float, str]:
    """Seconds from start to CONNACK, and the protocol the link ended on."""
    link = MqttLink(url, client_id=f"bench-first-{run}", will_topic="bench/status")
    began = time.perf_counter()
    link.start()
    try:
        async with asyncio.timeout(60):
            await link.connected.wait()
        return time.perf_counter() - began, "5" if link.protocol == 5 else "3.1.1"
    finally:
        link.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=list(BROKER_KINDS), default="rabbitmq")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = make_broker(args.broker, Path(tmp))
        broker.start()
        try:
            times = []
            for run in range(args.runs):
                seconds, protocol = asyncio.run(first_session(broker.url, run))
                times.append(seconds)
                print(f"run {run + 1}: {seconds:.3f} s (MQTT {protocol})")
        finally:
            broker.close()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{args.broker}: first session median {statistics.median(times):.3f} s, "
        f"max {max(times):.3f} s over {args.runs} runs (goal <= {GOAL_S:g} s); "
        f"load average {load} (2 cores, shared: wall clock is noisy)"
    )


if __name__ == "__main__":
    main()
