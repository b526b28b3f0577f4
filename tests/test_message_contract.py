"""The shipped JSON Schemas, checked by an independent validator (check-jsonschema).

A real swap's MQTT traffic (simulator + daemon + mosquitto) is captured by a plain
subscriber and every payload is validated with the ``check-jsonschema`` command line
against ``protocol/schemas/``; hand-made bad payloads are rejected by the same tool.
Command arguments are strict: a boolean is not a bay number, a string is not an integer.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cabinet.demo.backend import Backend
from protocol.schema_files import SCHEMA_DIR
from tests.daemon_harness import running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto
from tests.test_fleet_link import CAB, mqtt, wait_online
from tests.test_swap_end_to_end import collect, deposit

CHECK_JSONSCHEMA = shutil.which("check-jsonschema") or str(
    Path(sys.executable).parent / "check-jsonschema"
)


def check(schema: str, payloads: list[Any], tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run check-jsonschema on every payload (one file each) against one shipped schema."""
    assert Path(CHECK_JSONSCHEMA).exists(), "check-jsonschema missing: pip install -e '.[dev]'"
    tmp.mkdir(parents=True, exist_ok=True)
    files = []
    for i, payload in enumerate(payloads):
        path = tmp / f"{schema}-{i}.json"
        path.write_text(json.dumps(payload))
        files.append(str(path))
    return subprocess.run(
        [CHECK_JSONSCHEMA, "--schemafile", str(SCHEMA_DIR / f"{schema}.schema.json"), *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Capture:
    """A plain MQTT 3.1.1 subscriber on cabinets/<id>/#: every payload, by topic suffix."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.payloads: dict[str, list[Any]] = {}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="capture")
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port, 30)
        self.client.subscribe(f"cabinets/{CAB}/#", qos=1)
        self.client.loop_start()

    def _message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        kind = msg.topic.split("/", 2)[2]
        with self.lock:
            self.payloads.setdefault(kind, []).append(json.loads(msg.payload))

    def get(self, kind: str) -> list[Any]:
        with self.lock:
            return list(self.payloads.get(kind, []))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_real_swap_s_traffic_passes_the_independent_validator(
    tmp_path: Path, broker: Mosquitto
) -> None:
    capture = Capture(broker.port)
    # MQTT 3.1.1: no response topic, so replies come on cabinets/<id>/reply, captured too
    backend = Backend("127.0.0.1", broker.port, mqtt5=False)
    try:
        with running_cabinet(
            tmp_path, extra={**mqtt(broker), "mqtt": {"url": broker.url, "telemetry_interval_s": 5}}
        ) as cab:
            wait_online(backend)
            started = cab.swap_begins("R-1")
            deposit(cab, started["return_bay"], "BAT-V1")
            collect(cab, started["dispense_bay"])
            cab.wait_event("swap.completed", session_id=started["session_id"])
            assert backend.command(CAB, "state.get", {"request_id": "g-1"})["ok"]
            refused = backend.command(CAB, "bay.open", {"request_id": "o-1", "args": {"bay": 0}})
            assert refused["error"]["code"] == "invalid_args"
            again = backend.command(CAB, "state.get", {"request_id": "g-1"})
            assert again["error"]["code"] == "duplicate_request"
            wait_until("telemetry", lambda: capture.get("telemetry"))
            wait_until(
                "swap.completed on the wire",
                lambda: any(e["type"] == "swap.completed" for e in capture.get("events")),
            )
    finally:
        backend.close()
        capture.close()
    seen = {kind: capture.get(kind) for kind in ("status", "state", "telemetry", "events", "reply")}
    assert all(seen.values()), {k: len(v) for k, v in seen.items()}
    for kind, payloads in seen.items():
        result = check("event" if kind == "events" else kind, payloads, tmp_path / "out")
        assert result.returncode == 0, f"{kind}: {result.stdout}{result.stderr}"


def _good() -> dict[str, dict[str, Any]]:
    bay = {
        "bay": 1,
        "online": True,
        "door": "closed",
        "locked": True,
        "battery_id": "B",
        "battery_present": True,
        "soc_pct": 50.0,
        "health_pct": 90.0,
        "cell_temp_c": 25.0,
        "bay_temp_c": 25.0,
        "charging": False,
        "in_service": True,
    }
    state = {
        "v": 1,
        "ts": 1,
        "cabinet_id": "c",
        "cabinet": {"smoke": False, "mains_present": True, "swaps_allowed": True},
        "bays": [{**bay, "bay": n} for n in range(1, 13)],
        "session": {
            "session_id": "s",
            "rider_id": "r",
            "mode": "swap",
            "phase": "idle",
            "return_bay": None,
            "dispense_bay": None,
        },
    }
    reply = {"v": 1, "ts": 1, "request_id": "r", "command": "bay.open", "ok": True}
    reply |= {"result": {"bay": 1}, "error": None}
    event = {"v": 1, "ts": 1, "cabinet_id": "c", "seq": 1, "id": "e", "type": "bay.opened"}
    event["data"] = {"bay": 1, "by": "operator"}
    return {"state": state, "reply": reply, "event": event, "cmd.bay.args": {"bay": 3}}


def _bad_payloads() -> list[tuple[str, str, dict[str, Any]]]:
    cases: list[tuple[str, str, dict[str, Any]]] = []

    def case(what: str, schema: str, change: Any) -> None:
        payload = copy.deepcopy(_good()[schema])
        change(payload)
        cases.append((what, schema, payload))

    case("v missing", "state", lambda p: p.pop("v"))
    case("v is 2", "state", lambda p: p.update(v=2))
    case("11 bays", "state", lambda p: p["bays"].pop())
    case("13 bays", "state", lambda p: p["bays"].append(p["bays"][0]))
    case("SoC 101", "state", lambda p: p["bays"][0].update(soc_pct=101))
    case("SoC -1", "state", lambda p: p["bays"][0].update(soc_pct=-1))
    case("unknown phase", "state", lambda p: p["session"].update(phase="dancing"))
    case("unknown mode", "state", lambda p: p["session"].update(mode="steal"))
    case("unknown door", "state", lambda p: p["bays"][0].update(door="ajar"))
    case(
        "undocumented code",
        "reply",
        lambda p: p.update(ok=False, error={"code": "oops", "message": "m"}),
    )
    both = {"result": {"bay": 1}, "error": {"code": "busy", "message": "m"}}
    case("result and error", "reply", lambda p: p.update(ok=False, **both))
    case("event data of another type", "event", lambda p: p.update(data={"nonsense": 1}))
    case("event of no known type", "event", lambda p: p.update(type="made.up"))
    case("event v missing", "event", lambda p: p.pop("v"))
    case("a boolean bay", "cmd.bay.args", lambda p: p.update(bay=True))
    case("a string bay", "cmd.bay.args", lambda p: p.update(bay="3"))
    return cases


def test_the_good_examples_pass(tmp_path: Path) -> None:
    for schema, payload in _good().items():
        result = check(schema, [payload], tmp_path)
        assert result.returncode == 0, f"{schema}: {result.stdout}"
    duplicate = _good()["reply"] | {
        "ok": False,
        "result": {"ok": True},
        "error": {"code": "duplicate_request", "message": "already handled: ok"},
    }
    assert check("reply", [duplicate], tmp_path).returncode == 0  # the documented exception


@pytest.mark.parametrize(("what", "schema", "payload"), _bad_payloads(), ids=lambda x: x)
def test_the_independent_validator_rejects(
    tmp_path: Path, what: str, schema: str, payload: dict[str, Any]
) -> None:
    result = check(schema, [payload], tmp_path)
    assert result.returncode == 1, f"{what} was accepted: {result.stdout}{result.stderr}"


def test_a_boolean_or_a_string_is_not_a_bay_number(tmp_path: Path, broker: Mosquitto) -> None:
    backend = Backend("127.0.0.1", broker.port)
    try:
        with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
            wait_online(backend)
            for i, bay in enumerate([True, "3", "1"]):
                command = {"request_id": f"strict-{i}", "args": {"bay": bay}}
                reply = backend.command(CAB, "bay.open", command)
                assert reply["error"]["code"] == "invalid_args", (bay, reply)
            fine = backend.command(CAB, "bay.open", {"request_id": "ok-1", "args": {"bay": 5}})
            assert fine["ok"] is True  # the same path opens a door when asked properly
            cab.wait_door(5, "open")
            opened = [b["bay"] for b in cab.state()["bays"] if b["door_open_count"]]
            assert opened == [5], opened  # bay 1 and bay 3 never opened
    finally:
        backend.close()
