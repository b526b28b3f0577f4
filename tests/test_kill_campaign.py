"""`kill -9` campaign in CI: 100 kills of the real daemon at random instants during swaps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.kill_campaign import run_campaign

KILLS = int(os.environ.get("CABINET_KILL_CAMPAIGN", "100"))


@pytest.mark.timeout(900)
def test_a_hundred_kills_lose_no_event_no_battery_and_open_no_stray_door(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_campaign(tmp_path, kills=KILLS, seed=20261125)
    with capsys.disabled():
        print(f"\nkill campaign: {result}")
    assert result.problems == []
    assert result.kills == KILLS
    assert result.swaps_completed >= KILLS // 4  # the riders kept swapping through it all
