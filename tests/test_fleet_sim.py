"""`cabinet sim fleet`: several cabinets with their daemon logic against one real mosquitto."""

from __future__ import annotations

import re

from tests.conftest import cabinet_cmd
from tests.mqtt_broker import Mosquitto


def test_a_small_fleet_delivers_every_event_once(broker: Mosquitto) -> None:
    result = cabinet_cmd(
        "sim", "fleet", "--cabinets", "5", "--broker", broker.url, "--duration", "12",
        timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "5 online at the broker" in out
    counts = re.search(r"events: (\d+) journaled, (\d+) received", out)
    assert counts and counts.group(1) == counts.group(2) and int(counts.group(1)) >= 5 * 10
    assert "not delivered 0, gaps 0, duplicates 0" in out
    assert "Traceback" not in result.stderr


def test_a_fleet_needs_a_sane_size(broker: Mosquitto) -> None:
    result = cabinet_cmd("sim", "fleet", "--cabinets", "0", "--broker", broker.url)
    assert result.returncode == 1 and "--cabinets is 1-1000" in result.stderr
