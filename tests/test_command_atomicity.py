"""A command's effect and its request_id record are one journal transaction (mqtt.md §3.1).

The crash point is simulated in-process: the record's write kills the "process" (a
``BaseException`` nothing catches) right after the effect was journaled. A restarted
cabinet on the same journal then receives the backend's retry of the same request_id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.fleet_link import FleetLink
from cabinet.daemon.journal import Journal
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus

OPEN_BAY_4 = b'{"request_id": "open-4-once", "args": {"bay": 4}}'


class Crash(BaseException):
    """The daemon dies here (power cut, kill -9): nothing after this point happens."""


class Recorder:
    """Stands in for the MQTT connection."""

    def __init__(self, **_callbacks: Any) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def subscribe(self, _topic: str) -> None:
        return None

    def publish(self, topic: str, payload: bytes, **_options: Any) -> None:
        self.sent.append((topic, payload))


def cabinet(path: Path, unlocks: list[int]) -> tuple[Journal, FleetLink]:
    journal = Journal(path)
    controller = CabinetController(
        cabinet_id="cab-atomic",
        journal=journal,
        scheduler=BusScheduler(ModbusBus(parse_endpoint("tcp://127.0.0.1:9"))),
    )
    controller.ready = True

    def spawn(coro: Any) -> None:  # the unlock: counted, not sent to a bus
        unlocks.append(1)
        coro.close()

    controller._spawn = spawn  # type: ignore[method-assign]
    return journal, FleetLink(controller, Recorder)  # type: ignore[arg-type]


def test_a_crash_before_the_record_cannot_open_the_door_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.db"
    unlocks: list[int] = []
    journal, fleet = cabinet(path, unlocks)

    def die(*_args: Any) -> None:
        raise Crash

    monkeypatch.setattr(journal, "put_command_reply", die)
    with pytest.raises(Crash):
        fleet._handle("bay.open", OPEN_BAY_4)
    journal.close()  # the process is gone; its open transaction with it

    journal, fleet = cabinet(path, unlocks)  # restarted; the backend retries
    reply = fleet._handle("bay.open", OPEN_BAY_4)
    assert reply["ok"] is True, reply
    retry = fleet._handle("bay.open", OPEN_BAY_4)  # and a retry of that is a duplicate
    assert retry["error"]["code"] == "duplicate_request"
    opened = [e for e in journal.events() if e["type"] == "bay.opened"]
    assert len(opened) == 1, opened
    assert len(unlocks) == 1  # the door was unlocked once
    journal.close()
