"""`cabinet events` without `--after` shows the newest events, as a technician expects."""

from __future__ import annotations

import json
from pathlib import Path

from tests.daemon_harness import running_cabinet
from tests.test_technician_cli import tech


def test_events_without_after_are_the_newest_and_after_pages_from_a_seq(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        for _ in range(3):  # some history beyond the start-up events
            assert tech(cab, "bay", "disable", "7", "--reason", "test").returncode == 0
            assert tech(cab, "bay", "enable", "7").returncode == 0
        journaled = [e["seq"] for e in cab.events()]
        newest = tech(cab, "events", "--json", "--limit", "3")
        assert newest.returncode == 0, newest.stderr
        shown = [json.loads(line)["seq"] for line in newest.stdout.splitlines()]
        assert shown == journaled[-3:]  # the newest three, oldest first
        paged = tech(cab, "events", "--json", "--after", "0", "--limit", "3")
        assert [json.loads(line)["seq"] for line in paged.stdout.splitlines()] == journaled[:3]
        cab.stop()
        offline = tech(cab, "events", "--json", "--limit", "2")  # read from the journal
        assert [json.loads(line)["seq"] for line in offline.stdout.splitlines()] == [
            e["seq"] for e in cab.events()
        ][-2:]
