"""The group's seen-id store is bounded by age and still de-duplicates within its window.

A consumer of the backend stand-in records every event id before acknowledging it
(``cabinet/demo/seen_events.py``); without a bound that file grows with every event the
fleet ever sent. These tests move the store's clock instead of waiting a week.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cabinet.demo.seen_events import PRUNE_EVERY, SeenEvents, store_path

WEEK_S = 7 * 24 * 3600.0


class Clock:
    """Wall time that a test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_restarted_consumer_recognises_an_event_within_the_window(tmp_path: Path) -> None:
    clock = Clock()
    path = store_path(tmp_path, "ops")
    first_run = SeenEvents(path, window_s=WEEK_S, clock=clock)
    assert first_run.first_time("e-1", "cab-a", 1, "consumer-0") is True
    first_run.close()  # the consumer stops; the cabinet resends e-1 six days later
    clock.now += WEEK_S - 24 * 3600
    second_run = SeenEvents(path, window_s=WEEK_S, clock=clock)
    try:
        assert second_run.first_time("e-1", "cab-a", 1, "consumer-1") is False
        assert second_run.processed_by() == {"e-1": "consumer-0"}
    finally:
        second_run.close()


def test_ids_older_than_the_window_are_forgotten_when_the_store_opens(tmp_path: Path) -> None:
    clock = Clock()
    path = store_path(tmp_path, "ops")
    store = SeenEvents(path, window_s=WEEK_S, clock=clock)
    for seq in range(1, 11):
        store.first_time(f"old-{seq}", "cab-a", seq, "consumer-0")
    clock.now += WEEK_S / 2
    store.first_time("recent", "cab-a", 11, "consumer-0")
    store.close()
    clock.now += WEEK_S / 2 + 1  # the old ones are now more than a week old
    reopened = SeenEvents(path, window_s=WEEK_S, clock=clock)
    try:
        assert set(reopened.processed_by()) == {"recent"}
        assert reopened.first_time("recent", "cab-a", 11, "consumer-1") is False
    finally:
        reopened.close()


def test_a_running_consumer_prunes_as_it_goes(tmp_path: Path) -> None:
    clock = Clock()
    store = SeenEvents(store_path(tmp_path, "ops"), window_s=60.0, clock=clock)
    try:
        for n in range(3 * PRUNE_EVERY):
            store.first_time(f"e-{n}", "cab-a", n, "consumer-0")
            clock.now += 1.0  # one event a second, a minute's window
        assert len(store) <= 60 + PRUNE_EVERY  # bounded by the window, not the history
    finally:
        store.close()


def test_an_id_past_the_window_but_not_yet_pruned_counts_as_new(tmp_path: Path) -> None:
    clock = Clock()
    store = SeenEvents(store_path(tmp_path, "ops"), window_s=60.0, clock=clock)
    try:
        assert store.first_time("e-1", "cab-a", 1, "consumer-0") is True
        clock.now += 61.0
        # the same answer whether or not a prune ran in between: the window decides
        assert store.first_time("e-1", "cab-a", 1, "consumer-1") is True
        assert store.first_time("e-1", "cab-a", 1, "consumer-0") is False
    finally:
        store.close()


def test_a_store_from_before_the_bound_keeps_its_ids(tmp_path: Path) -> None:
    """A file written without ``seen_at``: its ids count from the upgrade on, none lost."""
    path = store_path(tmp_path, "ops")
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE seen (id TEXT PRIMARY KEY, cabinet_id TEXT NOT NULL,"
        " seq INTEGER NOT NULL, consumer TEXT NOT NULL)"
    )
    old.execute("INSERT INTO seen VALUES ('e-1', 'cab-a', 1, 'consumer-0')")
    old.commit()
    old.close()
    clock = Clock()
    store = SeenEvents(path, window_s=60.0, clock=clock)
    try:
        assert store.first_time("e-1", "cab-a", 1, "consumer-1") is False
        clock.now += 61.0
        store.prune()
        assert len(store) == 0
    finally:
        store.close()


def test_a_window_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="window"):
        SeenEvents(store_path(tmp_path, "ops"), window_s=0)
