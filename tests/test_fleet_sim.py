"""`cabinet sim fleet`: several cabinets with their daemon logic against one real mosquitto."""

from __future__ import annotations

import re

from cabinet.demo.fleet_sim import CABINETS_PER_PROCESS, split
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


def test_a_fleet_split_over_processes_delivers_every_event_once(broker: Mosquitto) -> None:
    """2 worker processes x 3 cabinets: the parent sums their journals against one backend."""
    result = cabinet_cmd(
        "sim", "fleet", "--cabinets", "6", "--processes", "2", "--broker", broker.url,
        "--duration", "6", "--pace", "2",
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "fleet of 6 cabinets in 2 processes" in out
    assert "6 online at the broker" in out
    counts = re.search(r"events: (\d+) journaled, (\d+) received", out)
    # every cabinet journals its start-up events: the sum covers both workers' cabinets
    assert counts and counts.group(1) == counts.group(2) and int(counts.group(1)) >= 6 * 5
    assert "not delivered 0, gaps 0, duplicates 0" in out
    assert "Traceback" not in result.stderr


def test_a_fleet_needs_a_sane_size(broker: Mosquitto) -> None:
    result = cabinet_cmd("sim", "fleet", "--cabinets", "0", "--broker", broker.url)
    assert result.returncode == 1 and "--cabinets is 1-5000" in result.stderr
    result = cabinet_cmd("sim", "fleet", "--processes", "0", "--broker", broker.url)
    assert result.returncode == 1 and "--processes is 1-64" in result.stderr


def test_a_large_fleet_gets_a_worker_per_150_cabinets() -> None:
    """paho's select() takes fds < 1024 only: no worker may hold more than 150 cabinets."""
    shares = split(1000, 2)
    assert len(shares) == 7 and max(len(s) for s in shares) <= CABINETS_PER_PROCESS
    assert sorted(i for s in shares for i in s) == list(range(1000))
    assert split(3, 8) == [[0], [1], [2]]  # never a worker without cabinets
