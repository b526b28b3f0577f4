"""`cabinet watch`: the fleet view as a pure model, and the command against a real mosquitto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from cabinet.operator.fleet_view import (
    HEADERS,
    FleetView,
    render_problems,
    render_table,
)
from tests.conftest import REPO
from tests.daemon_harness import wait_until
from tests.json_lines_process import JsonLinesProcess
from tests.mqtt_broker import Mosquitto, client_cert_broker, free_port
from tests.tls_certs import Pki, make_pki

NOW = 1_718_023_500.0  # wall-clock seconds the pure tests pretend it is
TS = int(NOW * 1000) - 5_000


# -- payloads as the daemon publishes them (docs/mqtt.md §2) ---------------------------------


def status(online: bool = True, *, ts: int = TS) -> bytes:
    return json.dumps(
        {"v": 1, "ts": ts, "online": online, "version": "0.1.0", "boot_id": "b" * 32}
    ).encode()


def bay(n: int, **changes: Any) -> dict[str, Any]:
    empty = {
        "bay": n,
        "online": True,
        "door": "closed",
        "locked": True,
        "battery_id": None,
        "battery_present": False,
        "soc_pct": None,
        "health_pct": None,
        "cell_temp_c": None,
        "bay_temp_c": 25.0,
        "charging": False,
        "in_service": True,
        "out_of_service_reason": None,
    }
    return {**empty, **changes}


def battery(n: int, soc: float, *, charging: bool = False, **changes: Any) -> dict[str, Any]:
    pack = {
        "battery_id": f"BAT-{n:04d}",
        "battery_present": True,
        "soc_pct": soc,
        "health_pct": 90.0,
        "cell_temp_c": 27.0,
        "charging": charging,
    }
    return bay(n, **(pack | changes))


def state(cabinet: str, bays: list[dict[str, Any]] | None = None, **cabinet_view: Any) -> bytes:
    listed = {b["bay"]: b for b in bays or []}
    return json.dumps(
        {
            "v": 1,
            "ts": TS,
            "cabinet_id": cabinet,
            "cabinet": {"smoke": False, "mains_present": True, "swaps_allowed": True}
            | cabinet_view,
            "bays": [listed.get(n, bay(n)) for n in range(1, 13)],
            "session": None,
        }
    ).encode()


def event(
    cabinet: str,
    seq: int,
    kind: str = "command.handled",
    data: dict[str, Any] | None = None,
    **kw: Any,
) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "ts": kw.get("ts", TS + seq),
            "cabinet_id": cabinet,
            "seq": seq,
            "id": kw.get("id", f"{cabinet}-{seq}"),
            "type": kind,
            "data": data or {},
        }
    ).encode()


def telemetry(cabinet: str, outbox_depth: int) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "ts": TS,
            "cabinet_id": cabinet,
            "cabinet_temp_c": 29.5,
            "meter": None,
            "bays": [],
            "outbox_depth": outbox_depth,
            "outbox_dropped": 0,
        }
    ).encode()


def feed_events(view: FleetView, cabinet: str, *payloads: bytes) -> None:
    for payload in payloads:
        view.feed(f"cabinets/{cabinet}/events", payload, now=NOW)


# -- the event stream: gaps, duplicates, conflicts ---------------------------------------------


def test_a_skipped_seq_is_a_gap_the_operator_sees() -> None:
    view = FleetView()
    feed_events(view, "c1", *(event("c1", s) for s in (7, 8, 11, 12)))
    row = view.row("c1", now=NOW)
    assert row.last_seq == 12
    assert row.missing == ((9, 10),) and row.missing_count == 2
    assert render_problems([row]) == ["c1: 2 event(s) never arrived: seq 9-10"]
    assert "12 MISSING:2" in render_table([row], now=NOW)


def test_the_first_event_seen_is_a_baseline_not_a_gap() -> None:
    view = FleetView()
    feed_events(view, "c1", event("c1", 4711))  # the watch started mid-stream
    assert view.row("c1", now=NOW).missing == ()


def test_a_late_event_heals_its_gap() -> None:
    view = FleetView()
    feed_events(view, "c1", *(event("c1", s) for s in (1, 2, 6, 4)))
    assert view.row("c1", now=NOW).missing == ((3, 3), (5, 5))


def test_a_resend_is_counted_and_not_applied_twice() -> None:
    view = FleetView()
    raised = event("c1", 1, "alarm.raised", {"kind": "door_left_open", "bay": 5, "detail": "x"})
    cleared = event("c1", 2, "alarm.cleared", {"kind": "door_left_open", "bay": 5, "detail": "x"})
    feed_events(view, "c1", raised, cleared, raised)  # at-least-once: seq 1 arrives again
    row = view.row("c1", now=NOW)
    assert row.duplicates == 1 and row.missing == () and row.last_seq == 2
    assert row.alarms == ()  # the resent alarm.raised did not resurrect the cleared alarm
    assert "2 dup:1" in render_table([row], now=NOW)


def test_the_same_seq_with_another_id_is_a_conflict() -> None:
    view = FleetView()
    feed_events(view, "c1", event("c1", 1), event("c1", 2), event("c1", 1, id="fresh-journal"))
    feed_events(view, "c1", event("c1", 2, id="fresh-2"))
    row = view.row("c1", now=NOW)
    assert row.seq_conflicts == 1 and row.duplicates == 0 and row.last_seq == 2
    assert "CONFLICT:1" in render_table([row], now=NOW)
    assert "journal reset" in render_problems([row])[0]


def test_a_resend_older_than_the_id_window_is_still_only_a_duplicate() -> None:
    view = FleetView()
    feed_events(view, "c1", *(event("c1", s) for s in range(1, 1202)))
    feed_events(view, "c1", event("c1", 3))
    row = view.row("c1", now=NOW)
    assert row.duplicates == 1 and row.seq_conflicts == 0 and row.last_seq == 1201


def test_events_the_watch_itself_missed_are_not_blamed_on_the_cabinet() -> None:
    view = FleetView()
    feed_events(view, "c1", event("c1", 1), event("c1", 2))
    view.forget_positions()  # the broker forgot the watch's session while it was away
    feed_events(view, "c1", event("c1", 9))
    assert view.row("c1", now=NOW).missing == ()


@given(
    st.lists(
        st.sampled_from(["deliver", "drop", "resend"]),
        min_size=1,
        max_size=60,
    )
)
def test_missing_and_duplicates_are_exactly_what_the_broker_did(actions: list[str]) -> None:
    """A gap-free stream, delivered in order with some events lost and some ranges resent."""
    view = FleetView()
    delivered: list[int] = []
    dropped: set[int] = set()
    resends = 0
    for seq, action in enumerate(actions, start=1):
        if action == "drop":
            dropped.add(seq)
            continue
        feed_events(view, "c1", event("c1", seq))
        delivered.append(seq)
        if action == "resend":  # the cabinet reconnected and repeats its unacknowledged tail
            for again in delivered[-3:]:
                feed_events(view, "c1", event("c1", again))
                resends += 1
    if not delivered:
        assert "c1" not in view.cabinets
        return
    row = view.row("c1", now=NOW)
    expected_missing = {s for s in dropped if delivered[0] < s < delivered[-1]}
    assert {s for a, b in row.missing for s in range(a, b + 1)} == expected_missing
    assert row.duplicates == resends
    assert row.last_seq == delivered[-1]


# -- alarms, swaps, backlog, status ------------------------------------------------------------


def test_alarms_are_tracked_by_kind_and_bay() -> None:
    view = FleetView()

    def alarm(seq: int, kind: str, what: str, bay_no: int | None) -> bytes:
        return event("c1", seq, f"alarm.{what}", {"kind": kind, "bay": bay_no, "detail": "d"})

    feed_events(
        view,
        "c1",
        alarm(1, "bay_overtemp", "raised", 3),
        alarm(2, "bay_overtemp", "raised", 7),
        alarm(3, "outbox_backlog", "raised", None),
        alarm(4, "bay_overtemp", "cleared", 3),
        alarm(5, "smoke", "cleared", None),  # raised before the watch started: nothing to drop
    )
    row = view.row("c1", now=NOW)
    assert [a.label for a in row.alarms] == ["bay_overtemp@7", "outbox_backlog"]
    assert "bay_overtemp@7,outbox_backlog" in render_table([row], now=NOW)


def test_standing_conditions_in_the_state_show_as_alarms() -> None:
    view = FleetView()
    view.feed(
        "cabinets/c1/state",
        state("c1", smoke=True, mains_present=False, swaps_allowed=False),
        now=NOW,
        retained=True,
    )
    labels = [a.label for a in view.row("c1", now=NOW).alarms]
    assert labels == ["mains_lost", "smoke", "swaps_blocked"]


def test_the_last_swap_is_the_latest_completed_or_failed() -> None:
    view = FleetView()
    feed_events(
        view,
        "c1",
        event("c1", 1, "swap.completed", {"session_id": "s1"}),
        event("c1", 2, "swap.failed", {"session_id": "s2", "reason": "not_collected"}),
        event("c1", 3, "swap.battery_deposited", {"bay": 2}),
    )
    last = view.row("c1", now=NOW).last_swap
    assert last is not None
    assert (last.outcome, last.reason, last.ts_ms) == ("failed", "not_collected", TS + 2)


def test_the_backlog_comes_from_telemetry() -> None:
    view = FleetView()
    view.feed("cabinets/c1/telemetry", telemetry("c1", 1234), now=NOW)
    assert view.row("c1", now=NOW).backlog == 1234


def test_status_online_false_shows_the_cabinet_offline() -> None:
    view = FleetView()
    view.feed("cabinets/c1/status", status(online=True), now=NOW)
    assert view.row("c1", now=NOW).online is True
    view.feed("cabinets/c1/status", status(online=False), now=NOW)  # the last will
    view.feed("cabinets/c1/state", state("c1", [battery(1, 99.0)]), now=NOW, retained=True)
    row = view.row("c1", now=NOW)
    assert row.online is False and row.version == "0.1.0"
    # its last retained snapshot is shown as history: in parentheses
    assert render_table([row], now=NOW).splitlines()[1].split()[1:5] == [
        "NO",
        "0.1.0",
        "(11)",
        "(1)",
    ]


def test_an_empty_retained_payload_forgets_what_it_replaced() -> None:
    view = FleetView()
    view.feed("cabinets/c1/status", status(), now=NOW, retained=True)
    view.feed("cabinets/c1/status", b"", now=NOW)  # someone deleted the retained message
    row = view.row("c1", now=NOW)
    assert row.online is None and row.malformed == 0


def test_retained_history_is_not_hearing_from_the_cabinet_now() -> None:
    view = FleetView()
    view.feed(
        "cabinets/c1/status", status(False, ts=int(NOW * 1000) - 7_200_000), now=NOW, retained=True
    )
    row = view.row("c1", now=NOW)
    assert not row.heard_live and row.heard_ago_s == pytest.approx(7200)
    view.feed("cabinets/c1/events", event("c1", 1), now=NOW + 1)
    row = view.row("c1", now=NOW + 4)
    assert row.heard_live and row.heard_ago_s == pytest.approx(3)


def test_topics_outside_the_fleet_tree_are_ignored() -> None:
    view = FleetView()
    assert view.feed("cabinets/c1/cmd/bay.open", b"{}", now=NOW) is None
    assert view.feed("elsewhere/c1/status", status(), now=NOW) is None
    assert view.cabinets == []


# -- bays ----------------------------------------------------------------------------------------


def test_every_bay_lands_in_exactly_one_column() -> None:
    bays = [
        battery(1, 96.0),  # ready
        battery(2, 95.0, charging=True),  # ready: the daemon hands out a pack still topping up
        battery(3, 60.0, charging=True),  # charging
        battery(4, 30.0, cell_temp_c=55.0),  # too hot to charge or hand out: other
        battery(5, 97.0, in_service=False, out_of_service_reason="bay_overtemp"),  # faulty
        bay(6, online=False, door=None, locked=None, battery_present=None, charging=None),
        bay(7, door="open", locked=False),  # a swap in progress: other
        # bays 8-12: empty, closed, in service: available
    ]
    view = FleetView()
    view.feed("cabinets/c1/state", state("c1", bays), now=NOW)
    counts = view.row("c1", now=NOW).bays
    assert counts is not None
    assert (counts.available, counts.ready, counts.charging) == (5, 2, 1)
    assert (counts.faulty, counts.offline, counts.other) == (1, 1, 2)


def test_the_ready_threshold_follows_the_cabinets_own_setting() -> None:
    view = FleetView(ready_soc_pct=90.0)
    view.feed("cabinets/c1/state", state("c1", [battery(1, 85.0)]), now=NOW)
    counts = view.row("c1", now=NOW).bays
    assert counts is not None and counts.ready == 0
    feed_events(view, "c1", event("c1", 1, "settings.changed", {"dispense_min_soc_pct": 80.0}))
    row = view.row("c1", now=NOW)
    assert row.bays is not None and row.bays.ready == 1 and row.ready_soc_pct == 80.0


# -- malformed payloads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "problem"),
    [
        ("events", b"{not json", "events: not JSON"),
        ("events", b"", "events: empty payload"),
        ("telemetry", b"[1, 2]", "telemetry: payload: Input should be an object"),
        ("events", event("c1", 0), "events: seq: Input should be greater than or equal to 1"),
        ("state", state("c2"), "state: cabinet_id 'c2' does not match the topic"),
        ("status", b'{"v": 2, "ts": 1, "online": true, "mood": "ok"}', "status: schema v2"),
        ("status", b'{"ts": 1}', "status: online: Field required"),
        ("events", "\udcff".encode("utf-8", "surrogatepass"), "events: not JSON"),
    ],
)
def test_a_malformed_payload_is_counted_never_fatal(
    topic: str, payload: bytes, problem: str
) -> None:
    view = FleetView()
    assert view.feed(f"cabinets/c1/{topic}", payload, now=NOW) == "c1"
    row = view.row("c1", now=NOW)
    assert row.malformed == 1
    assert row.last_malformed is not None and row.last_malformed.startswith(problem)
    assert render_problems([row])[0].startswith("c1: 1 malformed payload(s), last: ")


def test_a_bad_event_body_still_counts_its_seq() -> None:
    view = FleetView()
    feed_events(view, "c1", event("c1", 1), event("c1", 2, "alarm.raised", {"bay": 3}))
    row = view.row("c1", now=NOW)
    assert row.malformed == 1 and row.last_seq == 2 and row.missing == ()
    assert row.last_malformed == "events: data.kind: Field required"


def test_the_table_has_one_row_per_cabinet_and_the_documented_columns() -> None:
    view = FleetView()
    for cabinet in ("c2", "c1"):
        view.feed(f"cabinets/{cabinet}/status", status(), now=NOW)
        view.feed(f"cabinets/{cabinet}/state", state(cabinet, [battery(1, 99.0)]), now=NOW)
    lines = render_table(view.rows(now=NOW), now=NOW).splitlines()
    assert lines[0].split() == list(HEADERS)
    assert [line.split()[:8] for line in lines[1:]] == [
        ["c1", "yes", "0.1.0", "11", "1", "0", "0", "0"],
        ["c2", "yes", "0.1.0", "11", "1", "0", "0", "0"],
    ]


# -- the command against a real mosquitto ------------------------------------------------------


class Publisher:
    """A cabinet's side of the broker, reduced to publishing payloads."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    client = Publisher(broker.port)
    yield client
    client.close()


def watch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cabinet.console.cli", "watch", *args]


def run_watch(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        watch_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
    )


class WatchProcess(JsonLinesProcess):
    """`cabinet watch --json` running; its lines collected as they come."""

    def __init__(self, *args: str) -> None:
        super().__init__(
            subprocess.Popen(
                watch_cmd("--json", *args),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
        )

    def latest(self, cabinet: str) -> dict[str, Any]:
        mine = [row for row in list(self.rows) if row["cabinet"] == cabinet]
        return mine[-1] if mine else {}


def test_watch_streams_rows_for_two_cabinets(broker: Mosquitto, publisher: Publisher) -> None:
    publisher.publish("cabinets/cab-a/status", status(), retain=True)
    bays_a = [battery(1, 97.0), battery(2, 50.0, charging=True)]
    publisher.publish("cabinets/cab-a/state", state("cab-a", bays_a), retain=True)
    publisher.publish("cabinets/cab-b/status", status(online=False), retain=True)
    publisher.publish("cabinets/cab-b/state", state("cab-b", smoke=True), retain=True)
    watcher = WatchProcess("--broker", broker.url)
    try:
        # retained messages arrive only after the SUBACK: the watch is now subscribed
        wait_until("cab-a's retained state", lambda: watcher.latest("cab-a").get("bays"))
        wait_until("cab-b's retained state", lambda: watcher.latest("cab-b").get("bays"))
        overtemp = {"kind": "bay_overtemp", "bay": 3, "detail": "61 C"}
        for payload in (
            event("cab-a", 1, "alarm.raised", overtemp),
            event("cab-a", 2, "swap.completed", {"session_id": "s1"}),
            event("cab-a", 2, "swap.completed", {"session_id": "s1"}),  # resent after a reconnect
            event("cab-a", 4, "alarm.cleared", overtemp),  # seq 3 never arrives
        ):
            publisher.publish("cabinets/cab-a/events", payload)
        publisher.publish("cabinets/cab-a/telemetry", telemetry("cab-a", 7))
        publisher.publish("cabinets/cab-b/telemetry", b"{garbage")
        a = wait_until("cab-a's events", lambda: (r := watcher.latest("cab-a"))["backlog"] and r)
        b = wait_until(
            "cab-b's bad payload", lambda: (r := watcher.latest("cab-b"))["malformed"] and r
        )
    finally:
        code = watcher.stop()
    assert code == 0, watcher.notices
    assert a["online"] is True and a["version"] == "0.1.0"
    assert a["bays"] == {
        "available": 10,
        "ready": 1,
        "charging": 1,
        "faulty": 0,
        "offline": 0,
        "other": 0,
    }
    assert a["last_seq"] == 4 and a["missing_seqs"] == [[3, 3]] and a["duplicates"] == 1
    assert a["alarms"] == [] and a["last_swap"]["outcome"] == "completed"
    assert a["backlog"] == 7 and a["heard_live"] is True
    assert b["online"] is False and b["malformed"] == 1
    assert b["last_malformed"] == "telemetry: not JSON"
    assert [alarm["kind"] for alarm in b["alarms"]] == ["smoke"]


def test_watch_reconnects_by_itself_after_a_broker_outage(
    broker: Mosquitto, publisher: Publisher
) -> None:
    publisher.publish("cabinets/cab-a/status", status(), retain=True)
    watcher = WatchProcess("--broker", broker.url)
    try:
        wait_until("the retained status", lambda: watcher.latest("cab-a"))
        publisher.publish("cabinets/cab-a/events", event("cab-a", 1))
        wait_until("seq 1", lambda: watcher.latest("cab-a")["last_seq"] == 1)
        broker.stop()
        wait_until("the link-down notice", lambda: any("LINK DOWN" in n for n in watcher.notices))
        broker.start()  # same port; this broker kept nothing (no persistence)
        wait_until("the link-up notice", lambda: any("link up again" in n for n in watcher.notices))
        again = Publisher(broker.port)
        try:
            # the broker lost our session, so what we missed is ours to lose, not a gap
            again.publish("cabinets/cab-a/events", event("cab-a", 5))
            row = wait_until("seq 5", lambda: (r := watcher.latest("cab-a"))["last_seq"] == 5 and r)
        finally:
            again.close()
    finally:
        code = watcher.stop()
    assert code == 0
    assert row["missing_seqs"] == []
    assert any("events while away were not seen" in n for n in watcher.notices)


def test_watch_for_a_duration_prints_the_final_table(
    broker: Mosquitto, publisher: Publisher
) -> None:
    publisher.publish("cabinets/cab-a/status", status(), retain=True)
    publisher.publish("cabinets/cab-a/state", state("cab-a", [battery(1, 97.0)]), retain=True)
    publisher.publish("cabinets/cab-b/status", status(online=False), retain=True)
    started = time.monotonic()
    result = run_watch("--broker", broker.url, "--duration", "2")
    assert result.returncode == 0, result.stderr
    assert 2 <= time.monotonic() - started < 15
    assert result.stderr == ""
    last_table = result.stdout.strip().split("\n\n")[-1].splitlines()
    assert last_table[0].startswith(f"cabinet watch {broker.url}  2 cabinet(s)  link up")
    assert last_table[1].split() == list(HEADERS)
    assert last_table[2].split()[:6] == ["cab-a", "yes", "0.1.0", "11", "1", "0"]
    assert last_table[3].split()[:4] == ["cab-b", "NO", "0.1.0", "-"]


def test_an_unreachable_broker_is_one_line_and_exit_1() -> None:
    port = free_port()  # nothing listens here
    result = run_watch("--broker", f"mqtt://127.0.0.1:{port}", "--duration", "30")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"cabinet: error: cannot reach the broker at mqtt://127.0.0.1:{port}: "
        f"connection refused: is a broker listening on 127.0.0.1:{port}?\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker", "http://x"], "'http://x': use mqtt://host:port or mqtts://host:port"),
        (["--broker", "mqtt://x", "--ca-file", "ca.pem"], "need an mqtts:// broker URL"),
        (["--broker", "mqtts://x", "--client-key", "k.pem"], "--client-key needs --client-cert"),
        (["--broker", "mqtt://x", "--password", "p"], "a password needs --username"),
        (["--broker", "mqtt://x", "--duration", "0"], "--duration must be a positive number"),
        (["--broker", "mqtts://x", "--ca-file", "/nonexistent/ca.pem"], "--ca-file /nonexistent"),
    ],
)
def test_bad_options_are_one_line_and_exit_1(args: list[str], message: str) -> None:
    result = run_watch(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("cabinet: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_username_and_password(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "operator", "s3cret"], check=True
    )
    broker = Mosquitto(tmp_path, extra_config=f"password_file {passwords}\n")
    broker.conf.write_text(
        broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
    )
    broker.start()
    try:
        publisher = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        publisher.username_pw_set("operator", "s3cret")
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        publisher.publish("cabinets/cab-a/status", status(), qos=1, retain=True).wait_for_publish(
            10
        )
        publisher.disconnect()
        publisher.loop_stop()
        url = broker.url
        wrong = run_watch("--broker", url, "--username", "operator", "--password", "nope")
        assert wrong.returncode == 1
        assert wrong.stderr == (
            f"cabinet: error: the broker at {url} refused the session: Not authorized\n"
        )
        right = subprocess.run(
            watch_cmd("--broker", url, "--username", "operator", "--json", "--duration", "1"),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            env={**os.environ, "CABINET_WATCH_PASSWORD": "s3cret"},
            check=False,
        )
        assert right.returncode == 0, right.stderr
        assert json.loads(right.stdout.splitlines()[-1])["online"] is True
    finally:
        broker.stop()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Pki, int]]:
    pki = make_pki(tmp_path, client_cn="operator")
    with client_cert_broker(tmp_path, pki.ca, pki.server_cert, pki.server_key) as (
        broker,
        tls_port,
    ):
        yield broker, pki, tls_port


def test_watch_over_tls_with_a_client_certificate(tls_broker: tuple[Mosquitto, Pki, int]) -> None:
    broker, pki, tls_port = tls_broker
    publisher = Publisher(broker.port)  # the cabinet on the plain test listener
    try:
        publisher.publish("cabinets/cab-t/status", status(), retain=True)
    finally:
        publisher.close()
    result = run_watch(
        "--broker",
        f"mqtts://127.0.0.1:{tls_port}",
        "--ca-file",
        str(pki.ca),
        "--client-cert",
        str(pki.client_cert),
        "--client-key",
        str(pki.client_key),
        "--json",
        "--duration",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["cabinet"] == "cab-t"

    untrusted = run_watch("--broker", f"mqtts://127.0.0.1:{tls_port}", "--duration", "1")
    assert untrusted.returncode == 1
    assert "TLS certificate is not trusted" in untrusted.stderr
    assert untrusted.stderr.count("\n") == 1


def test_watch_shows_a_real_cabinet_and_its_swap(broker: Mosquitto, tmp_path: Path) -> None:
    from tests.daemon_harness import running_cabinet  # noqa: PLC0415

    with running_cabinet(tmp_path, extra={"mqtt": {"url": broker.url}}) as cab:
        watcher = WatchProcess("--broker", broker.url)
        try:
            row = wait_until(
                "the cabinet online with its bays",
                lambda: (r := watcher.latest("cab-test")).get("online") and r.get("bays") and r,
            )
            assert sum(row["bays"].values()) == 12
            started = cab.swap_begins("R-watch")
            ret, out = started["return_bay"], started["dispense_bay"]
            cab.wait_door(ret, "open")
            cab.ctl("insert", str(ret), "--battery", "BAT-W1", "--soc", "20")
            cab.ctl("close", str(ret))
            cab.wait_door(out, "open")
            cab.ctl("take", str(out))
            cab.ctl("close", str(out))
            row = wait_until(
                "the swap in the watch",
                lambda: (r := watcher.latest("cab-test")).get("last_swap") and r,
            )
            assert row["last_swap"]["outcome"] == "completed"
            assert row["missing_seqs"] == []
        finally:
            assert watcher.stop() == 0, watcher.notices


@pytest.fixture
def broker_311() -> Iterator[str]:
    """The demo's embedded broker (MQTT 3.1.1 only), on a loop of its own; its URL."""
    import asyncio  # noqa: PLC0415 - only this fixture runs a loop

    from cabinet.demo.broker import EmbeddedBroker  # noqa: PLC0415 - the demo's extra

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    embedded = EmbeddedBroker()
    url = asyncio.run_coroutine_threadsafe(embedded.start(), loop).result(timeout=30)
    yield url
    asyncio.run_coroutine_threadsafe(embedded.stop(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def test_watch_on_a_broker_that_speaks_only_mqtt_311(broker_311: str) -> None:
    host, port = broker_311.removeprefix("mqtt://").split(":")
    cabinet = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    cabinet.connect(host, int(port))
    cabinet.loop_start()
    try:
        cabinet.publish("cabinets/cab-3/status", status(), qos=1, retain=True).wait_for_publish(10)
    finally:
        cabinet.disconnect()
        cabinet.loop_stop()
    # the watch asks for MQTT 5 first, is refused, and falls back like the cabinets do
    result = run_watch("--broker", broker_311, "--json", "--duration", "1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    row = json.loads(result.stdout.splitlines()[-1])
    assert (row["cabinet"], row["online"]) == ("cab-3", True)
