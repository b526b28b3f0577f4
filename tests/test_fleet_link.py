"""The fleet link against a real mosquitto: events, retained status/state, commands, outages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.config import ConfigError, validate
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.fleet_link import FleetLink
from cabinet.daemon.journal import Journal
from cabinet.demo.backend import Backend
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus
from drivers.mqtt_link import MqttLink
from tests.daemon_harness import running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto
from tests.test_swap_end_to_end import SWAP_STEPS, collect, deposit

CAB = "cab-test"


@pytest.fixture
def backend(broker: Mosquitto) -> Iterator[Backend]:
    client = Backend("127.0.0.1", broker.port)
    yield client
    client.close()


def wait_online(backend: Backend) -> None:
    wait_until("status online", lambda: backend.status.get(CAB, {}).get("online"))


def mqtt(broker: Mosquitto) -> dict[str, dict[str, str]]:
    return {"mqtt": {"url": broker.url}}


def session_types(backend: Backend, session_id: str) -> list[str]:
    return [e["type"] for e in backend.event_list(CAB) if e["data"].get("session_id") == session_id]


def test_a_swap_reaches_the_backend_as_the_documented_events(
    tmp_path: Path, broker: Mosquitto, backend: Backend
) -> None:
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        started = cab.swap_begins("R-1")
        deposit(cab, started["return_bay"], "BAT-M1")
        collect(cab, started["dispense_bay"])
        wait_until(
            "swap.completed on MQTT",
            lambda: session_types(backend, started["session_id"]) == SWAP_STEPS,
        )
        events = backend.event_list(CAB)
        assert backend.gaps(CAB) == [] and events[0]["seq"] == 1
        assert all(e["v"] == 1 and e["cabinet_id"] == CAB and e["ts"] > 0 for e in events)
        state = wait_until("a retained state", lambda: backend.state.get(CAB))
        assert len(state["bays"]) == 12
    # a clean stop says offline itself (no last will is sent for a clean disconnect)
    wait_until("status offline", lambda: backend.status.get(CAB, {}).get("online") is False)


def test_the_last_will_says_offline_when_the_daemon_dies(
    tmp_path: Path, broker: Mosquitto, backend: Backend
) -> None:
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        cab.kill9()
        # the broker notices the dead TCP connection at once (RST) and publishes the will
        wait_until("the last will", lambda: backend.status.get(CAB, {}).get("online") is False)


def test_the_last_will_orders_after_the_online_it_ends(
    tmp_path: Path, broker: Mosquitto, backend: Backend
) -> None:
    """A backend keeping "the latest status by ts" must not keep a dead cabinet online."""
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        online = dict(backend.status[CAB])
        cab.kill9()
        will = wait_until(
            "the last will",
            lambda: backend.status.get(CAB, {}).get("online") is False and backend.status[CAB],
        )
        assert will["boot_id"] == online["boot_id"]
        assert will["ts"] > online["ts"]  # docs/mqtt.md §6: latest by ts is the will


def test_a_broker_outage_loses_nothing_and_leaves_no_gap(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, persistent=True)  # a real broker keeps sessions over restarts
    broker.start()
    backend = Backend("127.0.0.1", broker.port, client_id="backend-p", persistent=True)
    try:
        with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
            wait_online(backend)
            broker.stop()
            started = cab.swap_begins("R-2")  # swaps go on without the cloud
            deposit(cab, started["return_bay"], "BAT-M2")
            collect(cab, started["dispense_bay"])
            cab.wait_event("swap.completed", session_id=started["session_id"])
            broker.start()
            wait_until(
                "the backlog to drain",
                lambda: session_types(backend, started["session_id"]) == SWAP_STEPS,
                timeout=40,
            )
            journal_seqs = [e["seq"] for e in cab.events()]
            wait_until(
                "every journaled event",
                lambda: [e["seq"] for e in backend.event_list(CAB)] == journal_seqs,
            )
            assert backend.gaps(CAB) == []
        # the outage is logged as a disconnect, not as asyncio/paho noise
        log = (tmp_path / "daemon.log").read_text()
        assert "mqtt_disconnected" in log
        for noise in ("never retrieved", "Traceback", "Exception in callback"):
            assert noise not in log, noise
    finally:
        backend.close()
        broker.stop()


def test_kill9_with_a_backlog_then_restart_delivers_everything(
    tmp_path: Path, broker: Mosquitto, backend: Backend
) -> None:
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        broker.stop()
        started = cab.swap_begins("R-3")
        deposit(cab, started["return_bay"], "BAT-M3")
        cab.wait_event("swap.battery_deposited", session_id=started["session_id"])
        cab.kill9()
        broker.start()
        fresh = Backend("127.0.0.1", broker.port, client_id="backend-3")
        try:
            cab.start()
            collect(cab, started["dispense_bay"])
            wait_until(
                "every step on MQTT",
                lambda: session_types(fresh, started["session_id"]) == SWAP_STEPS,
                timeout=40,
            )
            # the daemon may journal on after swap.completed (the event the wait above saw
            # need not be the last): everything journaled by now must arrive, the outbox
            # draining it in its own time
            journaled = cab.events()[-1]["seq"]
            wait_until(
                "every journaled event",
                lambda: [e["seq"] for e in fresh.event_list(CAB)][-1] >= journaled,
            )
            assert fresh.gaps(CAB) == []
        finally:
            fresh.close()


def test_the_backend_starts_a_swap_online(
    tmp_path: Path, broker: Mosquitto, backend: Backend
) -> None:
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        reply = backend.authorise_swap(CAB, "R-online")
        assert reply["ok"] is True, reply
        session = reply["result"]["session_id"]
        cab.wait_event("swap.door_opened", session_id=session)
        busy = backend.authorise_swap(CAB, "R-other")
        assert busy["ok"] is False and busy["error"]["code"] == "busy"


@pytest.mark.parametrize(
    ("name", "payload", "code"),
    [
        ("state.get", b"{not json", "malformed_json"),
        ("launch.rockets", {"request_id": "r1"}, "unknown_command"),
        ("swap.start", {"request_id": "r2", "args": {"rider_id": 42}}, "invalid_args"),
        ("swap.start", {"request_id": "r3", "args": {"rider_id": "R", "x": 1}}, "invalid_args"),
        ("bay.disable", {"request_id": "r4", "args": {"bay": 13, "reason": "x"}}, "invalid_args"),
        ("bay.disable", {"request_id": "r5", "args": {"bay": 3}}, "invalid_args"),
        ("state.get", {"request_id": "r6", "cabinet_id": "cab-other"}, "wrong_cabinet"),
        ("state.get", {"requestid": "r7"}, "invalid_command"),
    ],
)
def test_every_malformed_command_gets_a_precise_error_reply(
    tmp_path: Path,
    broker: Mosquitto,
    backend: Backend,
    name: str,
    payload: bytes | dict[str, object],
    code: str,
) -> None:
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        reply = backend.command(CAB, name, payload)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
        handled = cab.wait_event("command.handled", command=name)
        assert handled["error"] == code


def test_commands_are_idempotent_by_request_id(
    tmp_path: Path, broker: Mosquitto, backend: Backend
) -> None:
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        command = {"request_id": "dis-1", "args": {"bay": 4, "reason": "cleaning"}}
        first = backend.command(CAB, "bay.disable", command)
        assert first["ok"] is True
        again = backend.command(CAB, "bay.disable", command)
        assert again["ok"] is False and again["error"]["code"] == "duplicate_request"
        assert again["result"]["result"] == first["result"]  # the original answer, repeated
        assert len(cab.events("bay.disabled")) == 1
        state = backend.command(CAB, "state.get", {"request_id": "st-1"})["result"]
        assert state["bays"][3]["in_service"] is False
        assert state["bays"][3]["out_of_service_reason"] == "cleaning"
        enabled = backend.command(CAB, "bay.enable", {"request_id": "en-1", "args": {"bay": 4}})
        assert enabled["ok"] is True
        assert json.dumps(enabled["result"]) == '{"bay": 4, "in_service": true}'


def test_operators_open_a_bay_and_change_runtime_settings(
    tmp_path: Path, broker: Mosquitto, backend: Backend
) -> None:
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        opened = backend.command(CAB, "bay.open", {"request_id": "o-1", "args": {"bay": 7}})
        assert opened["ok"] is True
        cab.wait_door(7, "open")
        settings = backend.command(
            CAB,
            "settings.set",
            {
                "request_id": "s-1",
                "args": {"telemetry_interval_s": 5, "dispense_min_soc_pct": 99.5},
            },
        )
        assert settings["ok"] and settings["result"]["dispense_min_soc_pct"] == 99.5
        cab.wait_event("settings.changed", dispense_min_soc_pct=99.5)
        assert backend.authorise_swap(CAB, "R-9")["error"]["code"] == "refused"
        failed = cab.wait_event("swap.failed", rider_id="R-9")
        assert failed["reason"] == "no_dispensable_battery"  # 99.5 % is stricter than stock
        bad = backend.command(
            CAB, "settings.set", {"request_id": "s-2", "args": {"telemetry_interval_s": 1}}
        )
        assert bad["error"]["code"] == "invalid_args"


def test_telemetry_reports_measurements_and_the_outbox(tmp_path: Path, broker: Mosquitto) -> None:
    got: list[dict[str, object]] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="telemetry-reader")
    client.on_message = lambda _c, _u, msg: got.append(json.loads(msg.payload))
    client.connect("127.0.0.1", broker.port)
    client.subscribe(f"cabinets/{CAB}/telemetry")
    client.loop_start()
    try:
        extra = {"mqtt": {"url": broker.url, "telemetry_interval_s": 5}}
        with running_cabinet(tmp_path, extra=extra):
            wait_until("a telemetry message", lambda: got, timeout=20)
        sample = got[0]
        assert sample["cabinet_id"] == CAB and len(sample["bays"]) == 12  # type: ignore[arg-type]
        assert isinstance(sample["outbox_depth"], int) and sample["outbox_dropped"] == 0
        assert sample["meter"] is not None
    finally:
        client.loop_stop()
        client.disconnect()


def _unreachable_fleet_link(
    journal: Journal, *, interval_s: float, backlog_s: float = 3600.0
) -> FleetLink:
    """A fleet link whose broker is never there: what it holds is all there is to see."""
    controller = CabinetController(
        cabinet_id=CAB,
        journal=journal,
        scheduler=BusScheduler(ModbusBus(parse_endpoint("tcp://127.0.0.1:9"))),
    )
    return FleetLink(
        controller,
        lambda **kw: MqttLink("mqtt://127.0.0.1:9", client_id="t", **kw),
        telemetry_interval_s=interval_s,
        telemetry_backlog_s=backlog_s,
    )


def test_the_telemetry_backlog_is_an_hour_at_the_interval_by_default(tmp_path: Path) -> None:
    fleet = _unreachable_fleet_link(Journal(tmp_path / "j.db"), interval_s=60.0)
    assert fleet.telemetry_keep() == 60
    fleet.telemetry_interval_s = 5.0  # a backend's settings.set: the cap follows
    assert fleet.telemetry_keep() == 720
    with pytest.raises(ConfigError) as refused:
        validate(
            {
                "cabinet": {"id": "c"},
                "bus": {"url": "tcp://h:1"},
                "scanner": {"url": "tcp://h:2"},
                "mqtt": {"url": "mqtt://h", "telemetry_backlog_s": 90_000},
            }
        )
    assert [key for key, _ in refused.value.problems] == ["mqtt.telemetry_backlog_s"]


def test_samples_over_the_cap_are_dropped_oldest_first_and_counted(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    fleet = _unreachable_fleet_link(journal, interval_s=60.0, backlog_s=180.0)
    fleet.telemetry_interval_s = 0.01  # sample quickly; the cap is then 180 s / 0.01 s ...
    fleet.telemetry_backlog_s = 0.03  # ... so bring it back to 3 samples

    async def sample_until_dropped() -> None:
        fleet.link.start()
        task = asyncio.create_task(fleet._publish_telemetry())
        try:
            while fleet.telemetry_dropped < 2:
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            fleet.link.stop()

    asyncio.run(asyncio.wait_for(sample_until_dropped(), 10))
    held = journal.held_telemetry(10)
    assert len(held) == 3 and [s.ts for s in held] == sorted(s.ts for s in held)
    newest = json.loads(held[-1].payload)
    assert newest["ts"] == held[-1].ts and newest["cabinet_id"] == CAB  # the sample as taken
    assert newest["outbox_dropped"] >= 1  # the payload reports what the cap dropped before it


def test_retained_state_is_not_republished_for_events_alone(
    tmp_path: Path, broker: Mosquitto, backend: Backend
) -> None:
    """A burst of events (command outcomes) with nothing significant changed: no new state."""
    with running_cabinet(tmp_path, extra=mqtt(broker)):
        wait_online(backend)
        wait_until("a retained state", lambda: backend.state.get(CAB))
        before = backend.state_publishes[CAB]
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < 3.5:  # several of the 1 s state intervals
            sent += 1
            assert backend.command(CAB, "state.get", {"request_id": f"burst-{sent}"})["ok"]
        wait_until(
            "every command.handled on MQTT",
            lambda: sum(e["type"] == "command.handled" for e in backend.event_list(CAB)) >= sent,
        )
        # at most one for a genuinely significant change (a charging SoC ticking over)
        assert backend.state_publishes[CAB] - before <= 1, (sent, backend.state_publishes[CAB])


def test_an_oversized_command_is_refused_unparsed(
    tmp_path: Path, broker: Mosquitto, backend: Backend
) -> None:
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        huge = b'{"request_id": "huge", "args": {"x": "' + b"A" * 20_000_000 + b'"}}'
        reply = backend.command(CAB, "state.get", huge, timeout_s=30)
        assert reply["ok"] is False and reply["error"]["code"] == "payload_too_large"
        assert reply["request_id"] is None  # not parsed, so not even its request_id
        cab.wait_event("command.handled", error="payload_too_large")
        assert backend.command(CAB, "state.get", {"request_id": "after-huge"})["ok"]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b'{"request_id": ' + b"7" * 5_000 + b', "args": {}}', "malformed_json"),
        (b'{"request_id": "\\ud800", "args": {}}', "malformed_json"),
        (b'{"request_id": "r", "args": {"x": "\\udfff"}}', "malformed_json"),
        (b"[" * 30_000 + b"]" * 30_000, "malformed_json"),  # under the size cap
        (b"[" * 100_000 + b"]" * 100_000, "payload_too_large"),
    ],
    ids=["5000-digit-id", "lone-surrogate-id", "lone-surrogate-arg", "deep-30k", "deep-100k"],
)
def test_payloads_that_break_the_parser_get_an_error_reply_not_a_traceback(
    tmp_path: Path, broker: Mosquitto, backend: Backend, payload: bytes, code: str
) -> None:
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        reply = backend.command(CAB, "state.get", payload)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        assert reply["request_id"] is None  # no readable request_id
        cab.wait_event("command.handled", error=code)
        assert backend.command(CAB, "state.get", {"request_id": "after"})["ok"]
    log = (tmp_path / "daemon.log").read_text()
    for noise in ("Traceback", "Exception in callback"):
        assert noise not in log, noise


def test_a_command_flood_from_one_source_is_refused_and_summarised_once(
    tmp_path: Path, broker: Mosquitto, backend: Backend
) -> None:
    from cabinet.daemon.fleet_link import COMMANDS_PER_WINDOW  # noqa: PLC0415

    flood = COMMANDS_PER_WINDOW + 30
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        codes = [
            backend.command(CAB, "state.get", {"request_id": f"poll-{n}"})["error"]
            for n in range(flood)
        ]
        assert codes[:COMMANDS_PER_WINDOW] == [None] * COMMANDS_PER_WINDOW
        assert [c["code"] for c in codes[COMMANDS_PER_WINDOW:]] == ["rate_limited"] * 30
        other = Backend("127.0.0.1", broker.port, client_id="backend-2")  # another source
        try:
            assert other.command(CAB, "state.get", {"request_id": "other-1"})["ok"]
        finally:
            other.close()
        burst = cab.wait_event("command.rate_limited")
        assert burst["count"] == 30 and burst["commands"] == {"state.get": 30}
        assert burst["first_ts"] <= burst["last_ts"]
        events = cab.events()
        assert sum(e["type"] == "command.rate_limited" for e in events) == 1
        # refused commands are not journaled one by one
        assert sum(e["type"] == "command.handled" for e in events) == COMMANDS_PER_WINDOW + 1


def test_a_nan_setting_is_refused_as_not_a_number(
    tmp_path: Path, broker: Mosquitto, backend: Backend
) -> None:
    with running_cabinet(tmp_path, extra=mqtt(broker)) as cab:
        wait_online(backend)
        nan = {"request_id": "nan-1", "args": {"dispense_min_soc_pct": float("nan")}}
        reply = backend.command(CAB, "settings.set", nan)  # json.dumps writes NaN
        assert reply["error"]["code"] == "invalid_args", reply
        assert reply["error"]["message"] == "dispense_min_soc_pct: NaN is not a number"
        inf = {"request_id": "inf-1", "args": {"telemetry_interval_s": float("inf")}}
        reply = backend.command(CAB, "settings.set", inf)
        assert "not a finite number" in reply["error"]["message"], reply
        cab.wait_event("command.handled", request_id="inf-1")
