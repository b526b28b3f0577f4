"""``cabinet sim backend --group NAME --consumers N``: the backend scaled out, from a shell.

What an operator would type to run the backend stand-in as N consumers of one MQTT 5
shared subscription. Real cabinets (daemon + simulator) publish to a real mosquitto;
the command prints each event it processed once, with the consumer that did: both
consumers get a share, and together they print every event exactly once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cabinet.demo.backend import Backend
from tests.conftest import cabinet_popen, cabinet_process
from tests.daemon_harness import wait_until
from tests.json_lines_process import JsonLinesProcess
from tests.mqtt_broker import Mosquitto
from tests.test_fleet_watch import broker_311  # noqa: F401 - a fixture: an MQTT 3.1.1 broker
from tests.test_shared_subscriptions import cabinets, journal_ids, make_events, wait_online


class BackendProcess(JsonLinesProcess):
    """``cabinet sim backend ... --json`` running; its event lines and notices as they come."""

    def __init__(self, *args: str) -> None:
        super().__init__(cabinet_popen("sim", "backend", "--json", *args))

    def ids(self) -> set[str]:
        return {row["id"] for row in list(self.rows)}


def test_two_consumers_in_one_group_share_every_event_exactly_once(
    broker: Mosquitto, tmp_path: Path
) -> None:
    group = BackendProcess(
        "--broker", broker.url, "--group", "ops", "--consumers", "2",
        "--state-dir", str(tmp_path / "backend"),
    )  # fmt: skip
    commander = Backend("127.0.0.1", broker.port, client_id="commander")
    try:
        wait_until("the group subscribed", lambda: any("subscribed" in n for n in group.notices))
        with cabinets(broker, tmp_path) as fleet:
            wait_online(commander)
            make_events(commander, "cli")
            published = journal_ids(fleet)
            wait_until("every event printed by the group", lambda: group.ids() >= published)
            assert group.stop() == 0, group.notices
            journaled = journal_ids(fleet)
    finally:
        commander.close()
        group.stop()
    printed = Counter(row["id"] for row in group.rows)
    assert set(printed) >= published
    assert set(printed) <= journaled  # nothing that no cabinet sent
    assert set(printed.values()) == {1}, "an event was printed (processed) twice"
    shares = Counter(row["consumer"] for row in group.rows)
    assert set(shares) == {"backend-ops-1", "backend-ops-2"}, "the broker did not share"
    assert all(row["cabinet_id"] in {"cab-a", "cab-b"} for row in group.rows)
    summary = group.notices[-1]
    assert f"{len(group.rows)} events processed" in summary, group.notices


def test_more_than_one_consumer_needs_a_group(broker: Mosquitto) -> None:
    result = cabinet_process("sim", "backend", "--broker", broker.url, "--consumers", "2")
    assert result.returncode == 1
    assert "--consumers N needs --group NAME" in result.stderr
    assert result.stderr.count("\n") == 1  # one line, no trace


def test_a_group_on_a_broker_without_mqtt5_is_refused(
    broker_311: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """RabbitMQ 3.10 and NATS 2.9 speak 3.1.1 only: a group there would hear nothing."""
    result = cabinet_process(
        "sim", "backend", "--broker", broker_311, "--group", "ops",
        "--state-dir", str(tmp_path / "backend"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "no shared subscriptions" in result.stderr.splitlines()[-1]
