"""Reconnection back-off: how long an MQTT client waits before each new attempt.

One policy for every client we run (the cabinet's fleet link, ``cabinet watch``, the
backend stand-in), instead of a loop of its own in each. The waiting itself is paho's
reconnect loop, which already does what we want: the first wait after a loss is
``first_s``, each failed attempt doubles it up to ``max_s``, and a successful CONNACK
starts over. What paho lacks is jitter, so ``first_s`` is drawn once per connection
from ``[first_s, first_s + jitter_s]``: a fleet of cabinets that lost the broker
together then does not come back in lockstep. ``delays`` spells the schedule out, for
the docs and the tests.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


class ReconnectingClient(Protocol):
    """The one paho call a back-off needs (``paho.mqtt.client.Client`` has it)."""

    def reconnect_delay_set(self, min_delay: int = 1, max_delay: int = 120) -> None:
        """Wait ``min_delay`` after a loss, doubling per failed attempt up to ``max_delay``."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits before reconnecting: from ``first_s`` (plus jitter), doubling, capped at ``max_s``."""

    first_s: int = 1  # a broker restart takes about a second: don't hammer it before that
    max_s: int = 30  # a long outage is noticed within half a minute of its end
    jitter_s: int = 2  # spreads a fleet's reconnects over a few seconds

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s or self.jitter_s < 0:
            raise ValueError(f"back-off needs 0 < first_s <= max_s and jitter_s >= 0: {self}")

    def first_wait(self, rng: random.Random | None = None) -> int:
        """The first wait after a loss, jitter included (whole seconds: paho's unit)."""
        draw = (rng or _RNG).randint(0, self.jitter_s)
        return min(self.first_s + draw, self.max_s)

    def delays(self, first: int) -> Iterator[int]:
        """The waits before attempts 1, 2, 3, ... after a loss, given the drawn first wait."""
        wait = first
        while True:
            yield wait
            wait = min(wait * 2, self.max_s)

    def apply(self, client: ReconnectingClient, rng: random.Random | None = None) -> int:
        """Make ``client``'s own reconnect loop follow this back-off; the first wait drawn."""
        first = self.first_wait(rng)
        client.reconnect_delay_set(first, self.max_s)
        return first


#: jitter only spreads reconnects out; it protects nothing, so no secure randomness
_RNG = random.Random()  # noqa: S311

#: What every client of ours uses unless told otherwise.
DEFAULT_BACKOFF = Backoff()
