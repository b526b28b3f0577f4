"""The backend scaled out: N consumers in one MQTT 5 shared-subscription group.

Real cabinets (daemon + simulator) publish their events to a real mosquitto; the backend
stand-in runs as several consumers of ``$share/<group>/cabinets/+/events``. Every event
must reach exactly one consumer, and a consumer that restarts mid-stream must cost the
group nothing: no event lost, none processed twice (de-duplicated by id in the group's
``SeenEvents`` file, which outlives the consumer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from cabinet.demo.backend import Backend, shared_events_filter
from cabinet.demo.seen_events import SeenEvents, store_path
from drivers.mqtt_link import Message
from tests.daemon_harness import Cabinet, running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto

GROUP = "ops"
CABINET_IDS = ("cab-a", "cab-b")
ROUNDS = 6  # commands per cabinet per phase; each one journals a command.handled event
#: The group's de-duplication window (the store forgets older ids): ten minutes, far longer
#: than a test, so a consumer's restart falls within it (tests/test_seen_events_window.py
#: moves the clock past it)
WINDOW_S = 600.0


def consumer(broker: Mosquitto, state_dir: Path, n: int) -> Backend:
    return Backend(
        "127.0.0.1",
        broker.port,
        client_id=f"consumer-{n}",
        group=GROUP,
        state_dir=state_dir,
        seen_window_s=WINDOW_S,
    )


@contextmanager
def cabinets(broker: Mosquitto, tmp_path: Path) -> Iterator[list[Cabinet]]:
    """The fleet, started after the group subscribed: the group hears every event."""
    with ExitStack() as stack:
        fleet = []
        for seed, cabinet_id in enumerate(CABINET_IDS, start=1):
            (tmp_path / cabinet_id).mkdir()
            extra = {"cabinet": {"id": cabinet_id}, "mqtt": {"url": broker.url}}
            fleet.append(
                stack.enter_context(running_cabinet(tmp_path / cabinet_id, seed=seed, extra=extra))
            )
        yield fleet


def wait_online(commander: Backend) -> None:
    for cabinet_id in CABINET_IDS:
        wait_until(f"{cabinet_id} online", lambda: commander.status.get(cabinet_id))  # noqa: B023


def make_events(commander: Backend, phase: str) -> None:
    """Each cabinet journals and publishes a ``command.handled`` per command."""
    for n in range(ROUNDS):
        for cabinet_id in CABINET_IDS:
            reply = commander.command(
                cabinet_id, "state.get", {"request_id": f"{phase}-{cabinet_id}-{n}"}
            )
            assert reply["ok"] is True


def journal_ids(fleet: list[Cabinet]) -> set[str]:
    return {event["id"] for cab in fleet for event in cab.events()}


def processed(backend: Backend) -> list[str]:
    return [e["id"] for cabinet_id in CABINET_IDS for e in backend.event_list(cabinet_id)]


def test_each_event_reaches_exactly_one_consumer_of_the_group(
    broker: Mosquitto, tmp_path: Path
) -> None:
    group = [consumer(broker, tmp_path / "backend", n) for n in range(3)]
    commander = Backend("127.0.0.1", broker.port, client_id="commander")
    try:
        with cabinets(broker, tmp_path) as fleet:
            wait_online(commander)
            make_events(commander, "one")
            published = journal_ids(fleet)
            wait_until(
                "every event at the group",
                lambda: {i for b in group for i in b.received_ids} >= published,
            )
    finally:
        commander.close()
        for member in group:
            member.close()
    deliveries = Counter(i for member in group for i in member.received_ids)
    assert set(deliveries) == published
    assert set(deliveries.values()) == {1}, "an event reached more than one consumer"
    assert all(member.received_ids for member in group), "the broker did not share the load"
    # the commander subscribes to the whole tree without a group: it sees every event
    assert {e["id"] for c in CABINET_IDS for e in commander.event_list(c)} == published


class CrashesBeforeAcking(Backend):
    """A consumer killed after recording each event but before its PUBACK left.

    The window at-least-once delivery leaves open: the broker resends those events to the
    consumer's next run, which must recognise them as already processed.
    """

    def _message(self, message: Message) -> None:
        self._handle(message)  # recorded in the group's store; never acknowledged


def test_a_consumer_restarted_mid_stream_loses_nothing_and_processes_nothing_twice(
    broker: Mosquitto, tmp_path: Path
) -> None:
    state_dir = tmp_path / "backend"
    steady = [consumer(broker, state_dir, n) for n in (0, 1)]
    first_run = CrashesBeforeAcking(
        "127.0.0.1",
        broker.port,
        client_id="consumer-2",
        group=GROUP,
        state_dir=state_dir,
        seen_window_s=WINDOW_S,
    )
    second_run: Backend | None = None
    commander = Backend("127.0.0.1", broker.port, client_id="commander")
    try:
        with cabinets(broker, tmp_path) as fleet:
            wait_online(commander)
            make_events(commander, "before")
            wait_until("consumer-2 has a share", lambda: first_run.received_ids)
            first_run.close()  # its session stays: the broker queues its share meanwhile
            before = journal_ids(fleet)
            make_events(commander, "while-away")
            while_away = journal_ids(fleet) - before
            second_run = consumer(broker, state_dir, 2)
            make_events(commander, "after")
            published = journal_ids(fleet)
            store = SeenEvents(store_path(state_dir, GROUP))
            try:
                wait_until("every event processed", lambda: set(store.processed_by()) >= published)
                by = store.processed_by()
            finally:
                store.close()
    finally:
        commander.close()
        for member in [*steady, first_run, second_run]:
            if member is not None:
                member.close()
    assert set(by) == published  # nothing lost
    runs = [*steady, first_run, second_run]
    work = Counter(i for run in runs for i in processed(run))
    assert set(work) == published and set(work.values()) == {1}  # nothing processed twice
    # what the first run had recorded came back to the second run, which knew it already
    resent = Counter(second_run.received_ids) - Counter(processed(second_run))
    assert set(resent) == set(first_run.received_ids)
    assert sum(second_run.duplicates.values()) == len(first_run.received_ids)
    # mosquitto kept sharing with the absent member: its share waited in its session
    assert while_away & set(second_run.received_ids)


def test_the_seen_store_outlives_the_consumer(tmp_path: Path) -> None:
    path = store_path(tmp_path, GROUP)
    store = SeenEvents(path)
    assert store.first_time("e-1", "cab-a", 1, "consumer-0") is True
    assert store.first_time("e-1", "cab-a", 1, "consumer-1") is False
    store.close()
    again = SeenEvents(path)
    try:
        assert again.first_time("e-1", "cab-a", 1, "consumer-0") is False
        assert again.processed_by() == {"e-1": "consumer-0"}
    finally:
        again.close()


@pytest.mark.parametrize("group", ["", "a/b", "ops+", "#"])
def test_a_group_name_is_one_topic_level(group: str) -> None:
    with pytest.raises(ValueError, match="one topic level"):
        shared_events_filter(group)
    assert shared_events_filter("ops") == "$share/ops/cabinets/+/events"
