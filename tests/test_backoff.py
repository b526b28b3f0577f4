"""The one reconnection back-off every MQTT client of ours follows (drivers/backoff.py)."""

from __future__ import annotations

import random
from itertools import islice, pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.backoff import DEFAULT_BACKOFF, Backoff


class RecordingClient:
    """What paho's ``reconnect_delay_set`` was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def reconnect_delay_set(self, min_delay: int = 1, max_delay: int = 120) -> None:
        self.calls.append((min_delay, max_delay))


def test_the_default_doubles_from_about_a_second_to_half_a_minute() -> None:
    assert list(islice(DEFAULT_BACKOFF.delays(1), 7)) == [1, 2, 4, 8, 16, 30, 30]


@given(st.integers(1, 10), st.integers(0, 60), st.integers(0, 5), st.integers(0, 2**32))
def test_the_first_wait_is_jittered_within_bounds(
    first_s: int, extra_max: int, jitter_s: int, seed: int
) -> None:
    backoff = Backoff(first_s=first_s, max_s=first_s + extra_max, jitter_s=jitter_s)
    client = RecordingClient()
    first = backoff.apply(client, random.Random(seed))
    assert first_s <= first <= min(first_s + jitter_s, backoff.max_s)
    assert client.calls == [(first, backoff.max_s)]
    waits = list(islice(backoff.delays(first), 12))
    assert all(a <= b <= backoff.max_s for a, b in pairwise(waits))


def test_a_fleet_does_not_reconnect_in_lockstep() -> None:
    rng = random.Random(7)
    firsts = {DEFAULT_BACKOFF.first_wait(rng) for _ in range(100)}
    assert firsts == {1, 2, 3}


@pytest.mark.parametrize("kwargs", [{"first_s": 0}, {"first_s": 5, "max_s": 4}, {"jitter_s": -1}])
def test_a_backoff_that_could_spin_or_never_start_is_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="back-off needs"):
        Backoff(**kwargs)
