"""The demo's simulated riders: people at the cabinet, some of whom misbehave.

A rider queues for the cabinet (one screen, one session at a time), authorises
the swap — a scanned QR token, the app (the backend's ``swap.start``), or a
forged token — then acts on the simulator the way a person does: waits for a door
to pop open, puts a battery in, shuts the door, takes the full one. What each
rider *expects* is known in advance, so the demo can tell an explained failure (a
rider who walked away) from one that would be a bug (a good rider who got no
battery).
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from cabinet.daemon.control_client import request
from cabinet.daemon.tokens import issue
from sim.control import call

STEP_S = (0.4, 1.2)  # how long a person takes between two actions
QUEUE_TIMEOUT_S = 120.0
ANSWER_TIMEOUT_S = 10.0
EVENT_POLL_S = 0.2


class Behaviour(enum.StrEnum):
    """What kind of rider this is."""

    NORMAL = "normal"  # scans, deposits, collects
    APP = "app"  # authorises through the app (the backend's swap.start), then as NORMAL
    FORGED = "forged"  # shows a QR code signed by someone else
    BAD_BATTERY = "bad_battery"  # brings a battery whose BMS gives no id; takes it back
    WALKS_AWAY = "walks_away"  # the door opens, nobody comes


#: The arrival pattern: mostly good riders, a misbehaving one now and then.
PATTERN = (
    Behaviour.NORMAL,
    Behaviour.APP,
    Behaviour.NORMAL,
    Behaviour.FORGED,
    Behaviour.NORMAL,
    Behaviour.BAD_BATTERY,
    Behaviour.APP,
    Behaviour.NORMAL,
    Behaviour.WALKS_AWAY,
)

#: The outcome each behaviour should meet; anything else needs explaining.
EXPECTED = {
    Behaviour.NORMAL: "completed",
    Behaviour.APP: "completed",
    Behaviour.FORGED: "refused:bad_signature",
    Behaviour.BAD_BATTERY: "failed:deposit_rejected",
    Behaviour.WALKS_AWAY: "failed:deposit_timeout",
}
#: Outcomes that are the cabinet being honest, not broken (it has no full battery yet).
EXPLAINED = {"failed:no_dispensable_battery", "failed:no_empty_bay", "interrupted"}


@dataclass(frozen=True, slots=True)
class Rider:
    """One person at the cabinet."""

    rider_id: str
    behaviour: Behaviour
    number: int


@dataclass(frozen=True, slots=True)
class RiderResult:
    """How it went for them."""

    rider: Rider
    outcome: str

    @property
    def explained(self) -> bool:
        """Whether the outcome is what this rider's behaviour (or the cabinet's stock) explains."""
        return self.outcome == EXPECTED[self.rider.behaviour] or self.outcome in EXPLAINED


@dataclass(slots=True)
class Surroundings:
    """What riders act on: the simulator, the cabinet's screen, the backend and the keys."""

    sim_control: tuple[str, int]
    control_socket: Path
    cabinet_id: str
    backend_key: SigningKey
    forger_key: SigningKey
    app_swap: Callable[[str], dict[str, Any]]  # blocking: the backend's swap.start
    rng: random.Random
    say: Callable[[str], None]


class RiderGaveUpError(Exception):
    """Something the rider waited for never happened."""


async def _sim(world: Surroundings, verb: str, **args: Any) -> Any:
    host, port = world.sim_control
    return await call(host, port, {"verb": verb, **args})


async def _pause(world: Surroundings) -> None:
    await asyncio.sleep(world.rng.uniform(*STEP_S))


async def _door(world: Surroundings, bay: int, want: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = await _sim(world, "state")
        if state["bays"][bay - 1]["door"] == want:
            return
        await asyncio.sleep(EVENT_POLL_S)
    raise RiderGaveUpError(f"door of bay {bay} never {want}")


async def _event(
    world: Surroundings, after: int, match: Callable[[dict[str, Any]], bool], timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in await request(world.control_socket, "events", {"after": after}):
            after = event["seq"]
            if match(event):
                return event  # type: ignore[no-any-return]
        await asyncio.sleep(EVENT_POLL_S)
    raise RiderGaveUpError("the cabinet never answered")


async def _wait_for_turn(world: Surroundings) -> int:
    """Wait until the cabinet can take a session; the seq of its last event by then."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while time.monotonic() < deadline:
        status = await request(world.control_socket, "status")
        if status["session"] is None and status["refusal"] is None:
            return int(status["last_event_seq"])
        await asyncio.sleep(EVENT_POLL_S)
    raise RiderGaveUpError("the cabinet stayed busy")


def _token(world: Surroundings, rider: Rider, key: SigningKey) -> str:
    return issue(key, rider.rider_id, now=int(time.time()), ttl_s=120, cabinet=world.cabinet_id)


async def _authorise(world: Surroundings, rider: Rider, after: int) -> dict[str, Any]:
    """Scan or use the app; the cabinet's first answer about this rider."""
    if rider.behaviour is Behaviour.APP:
        await asyncio.to_thread(world.app_swap, rider.rider_id)
    else:
        key = world.forger_key if rider.behaviour is Behaviour.FORGED else world.backend_key
        await _sim(world, "scan", text=_token(world, rider, key))

    def about_me(event: dict[str, Any]) -> bool:
        if event["type"] == "auth.refused":
            return True  # a forged token names no rider the cabinet can trust
        mine = event.get("rider_id") == rider.rider_id
        return mine and event["type"] in {"swap.started", "swap.refused", "swap.failed"}

    return await _event(world, after, about_me, ANSWER_TIMEOUT_S)


async def _swap(world: Surroundings, rider: Rider, started: dict[str, Any], after: int) -> str:
    session = started["session_id"]
    ret, out = started["return_bay"], started["dispense_bay"]

    def ended(event: dict[str, Any]) -> bool:
        return event.get("session_id") == session and event["type"] in {
            "swap.completed",
            "swap.failed",
        }

    if rider.behaviour is Behaviour.WALKS_AWAY:
        end = await _event(world, after, ended, 600.0)
        await _pause(world)
        await _sim(world, "close", bay=ret)  # a passer-by shuts the door left open
        return _outcome(end)
    await _door(world, ret, "open", ANSWER_TIMEOUT_S)
    await _pause(world)
    battery = f"BAT-D{rider.number:04d}"
    soc = round(world.rng.uniform(5.0, 35.0), 1)
    if rider.behaviour is Behaviour.BAD_BATTERY:
        await _sim(world, "insert", bay=ret, battery=battery, soc=soc, unidentified=True)
        await _pause(world)
        await _sim(world, "close", bay=ret)
        await _door(world, ret, "open", ANSWER_TIMEOUT_S)  # the cabinet hands it back
        await _pause(world)
        await _sim(world, "take", bay=ret)
        await _sim(world, "close", bay=ret)
        return _outcome(await _event(world, after, ended, ANSWER_TIMEOUT_S))
    await _sim(world, "insert", bay=ret, battery=battery, soc=soc)
    await _pause(world)
    await _sim(world, "close", bay=ret)
    await _door(world, out, "open", ANSWER_TIMEOUT_S)
    await _pause(world)
    await _sim(world, "take", bay=out)
    await _pause(world)
    await _sim(world, "close", bay=out)
    return _outcome(await _event(world, after, ended, ANSWER_TIMEOUT_S))


def _outcome(event: dict[str, Any]) -> str:
    if event["type"] == "swap.completed":
        return "completed"
    if event["type"] == "auth.refused":
        return f"refused:{event['reason']}"
    return f"{event['type'].split('.')[1]}:{event['reason']}"


async def ride(world: Surroundings, rider: Rider, queue: asyncio.Lock) -> RiderResult:
    """One rider's visit, from joining the queue to walking off."""
    try:
        async with queue:
            after = await _wait_for_turn(world)
            world.say(f"rider {rider.rider_id} ({rider.behaviour}) steps up")
            answer = await _authorise(world, rider, after)
            if answer["type"] != "swap.started":
                return RiderResult(rider, _outcome(answer))
            return RiderResult(rider, await _swap(world, rider, answer, after))
    except asyncio.CancelledError:
        return RiderResult(rider, "interrupted")
    except RiderGaveUpError as exc:
        return RiderResult(rider, f"gave_up:{exc}")


def rider_stream() -> Callable[[], Rider]:
    """Riders in the arrival pattern, numbered, with ids a backend would issue."""
    count = 0

    def next_rider() -> Rider:
        nonlocal count
        count += 1
        behaviour = PATTERN[(count - 1) % len(PATTERN)]
        return Rider(f"R-{count:04d}", behaviour, count)

    return next_rider
