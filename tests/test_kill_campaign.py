"""`kill -9` campaign in CI: 100 kills of the real daemon at random instants during swaps.

The hundred kills are four independent campaigns of 25 (each its own simulator, broker,
backend and daemon, each with its own seed), so that parallel test workers run them side by
side: the same number of kills and the same invariants checked after each campaign, in a
quarter of the wall time. A long campaign is one command (README, "Long campaigns"):

    .venv/bin/python -m tests.kill_campaign --kills 1000 --seed 7
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.kill_campaign import run_campaign

KILLS = int(os.environ.get("CABINET_KILL_CAMPAIGN", "100"))
CHUNKS = 4
SEED = 20261125


@pytest.mark.timeout(900)
@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_a_hundred_kills_lose_no_event_no_battery_and_open_no_stray_door(
    chunk: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kills = KILLS // CHUNKS + (chunk < KILLS % CHUNKS)  # the chunks add up to KILLS
    result = run_campaign(tmp_path, kills=kills, seed=SEED + chunk)
    with capsys.disabled():
        print(f"\nkill campaign {chunk + 1}/{CHUNKS}: {result}")
    assert result.problems == []
    assert result.kills == kills
    assert result.swaps_completed >= kills // 4  # the riders kept swapping through it all
