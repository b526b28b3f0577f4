"""The real daemon under `kill -9` at random instants during swaps; nothing may be lost.

One `cabinet sim`, one mosquitto, one backend stand-in that stays connected
throughout, and the real `cabinet run`, killed with SIGKILL at a random instant
(0.05-0.8 s after each start) and restarted, again and again, while a rider keeps
swapping: scanning when the cabinet is free, putting a fresh battery into an open
return bay, taking the battery from an open dispense bay, shutting doors — also while
the daemon is down, as a real rider would. Afterwards:

* every journaled event reached the backend: ``seq`` 1..N without a gap, the same
  ``id`` for each ``seq`` (resends after a kill are duplicates the ``id`` resolves);
* no battery unaccounted for: the custody ledger puts every battery where the
  simulator (or the rider's hand) has it, and no ``battery_missing`` alarm was raised;
* no door opened that was not asked for: every unlock the boards saw is of a bay a
  journaled session chose;
* swaps completed.

    .venv/bin/python -m tests.kill_campaign --kills 1000 --seed 7     # a long campaign
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cabinet.core.custody import Where
from cabinet.core.swap_machine import Phase
from cabinet.daemon.journal import Journal
from cabinet.demo.backend import Backend
from tests.daemon_harness import Cabinet, running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto

KILL_AFTER_S = (0.05, 0.8)
SCAN_PAUSE_S = 0.3  # a person reads the screen before scanning again


def ctl(cab: Cabinet, **request: Any) -> Any:
    """One simulator control request, straight over its socket (no CLI start-up per call)."""
    host, port = cab.sim.control.removeprefix("tcp://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = json.loads(sock.makefile().readline())
    if not reply["ok"]:
        raise RuntimeError(reply["error"])
    return reply["result"]


@dataclass
class Rider:
    """Whoever stands at the cabinet: one swap after another, whatever the daemon does."""

    cab: Cabinet
    rng: random.Random
    held: set[str] = field(default_factory=set)  # batteries taken home
    brought: int = 0
    scans: int = 0
    last_scan: float = 0.0

    def act(self, *, daemon_up: bool) -> bool:
        """Do the next thing there is to do; whether anything was done."""
        journal = Journal(self.cab.journal_path)
        try:
            session = journal.active_session()
        finally:
            journal.close()
        bays = ctl(self.cab, verb="state")["bays"]
        for bay in bays:
            if bay["door"] != "open":
                continue
            number, battery = bay["bay"], bay["battery"]
            if session is not None and number == session.return_bay and battery is None:
                if session.phase in (Phase.OPENING_RETURN, Phase.AWAITING_DEPOSIT):
                    self.brought += 1
                    # charged batteries come back, so the cabinet never runs dry mid-campaign
                    ctl(self.cab, verb="insert", bay=number, battery=f"BAT-K{self.brought:05d}",
                        soc=round(self.rng.uniform(92, 99), 1))  # fmt: skip
            elif session is not None and number == session.dispense_bay and battery is not None:
                self.held.add(ctl(self.cab, verb="take", bay=number)["battery"])
            ctl(self.cab, verb="close", bay=number)
            return True
        if session is None and daemon_up and time.monotonic() - self.last_scan > SCAN_PAUSE_S:
            self.last_scan = time.monotonic()
            token = self.cab.token(f"R-{self.rng.randrange(10_000)}")
            if ctl(self.cab, verb="scan", text=token)["delivered_to"]:
                self.scans += 1
                return True
        return False


@dataclass
class CampaignResult:
    """What happened, and every invariant broken (must be empty)."""

    kills: int
    scans: int
    swaps_completed: int
    events: int
    duplicates: int
    unlocks: int
    problems: list[str]


def _tokens_fast(cab: Cabinet) -> None:
    """Sign tokens in-process: the CLI's start-up per scan would dominate the campaign."""
    from cabinet.daemon.tokens import issue, load_private_key  # noqa: PLC0415

    key = load_private_key(cab.key)
    cab.token = lambda rider, *_extra: issue(key, rider, now=int(time.time()), cabinet="cab-test")  # type: ignore[method-assign]


def run_campaign(tmp: Path, *, kills: int, seed: int) -> CampaignResult:
    """Run it; the result lists any invariant broken."""
    rng = random.Random(seed)
    (tmp / "broker").mkdir()
    (tmp / "cab").mkdir()
    broker = Mosquitto(tmp / "broker")
    broker.start()
    backend = Backend("127.0.0.1", broker.port)
    try:
        with running_cabinet(tmp / "cab", seed=seed, extra={"mqtt": {"url": broker.url}}) as cab:
            _tokens_fast(cab)
            rider = Rider(cab, rng)
            for _ in range(kills):
                deadline = time.monotonic() + rng.uniform(*KILL_AFTER_S)
                while time.monotonic() < deadline:
                    if not rider.act(daemon_up=True):
                        time.sleep(0.02)
                cab.kill9()
                rider.act(daemon_up=False)  # the rider does not wait for the reboot
                cab.start()
            # the last session: let the rider finish it with the daemon up
            wait_until("the last session to end", lambda: _idle(rider), timeout=60)
            return _check(cab, backend, rider, kills)
    finally:
        backend.close()
        broker.stop()


def _idle(rider: Rider) -> bool:
    rider.act(daemon_up=False)
    journal = Journal(rider.cab.journal_path)
    try:
        return journal.active_session() is None
    finally:
        journal.close()


def _check(cab: Cabinet, backend: Backend, rider: Rider, kills: int) -> CampaignResult:
    problems: list[str] = []
    journal = Journal(cab.journal_path)
    try:
        events = journal.events(limit=100_000)
        ledger = journal.ledger()
    finally:
        journal.close()
    last = events[-1]["seq"]
    cabinet_id = "cab-test"
    wait_until("every event at the backend", lambda: _received(backend, cabinet_id) >= last)
    received = {e["seq"]: e for e in backend.event_list(cabinet_id)}
    if [e["seq"] for e in events] != list(range(1, last + 1)):
        problems.append("the journal's seq has a gap")
    for event in events:
        got = received.get(event["seq"])
        if got is None:
            problems.append(f"event {event['seq']} ({event['type']}) never reached the backend")
        elif got["id"] != event["id"]:
            problems.append(f"event {event['seq']} arrived with another id")
    state = ctl(cab, verb="state")
    for bay in state["bays"]:
        battery = bay["battery"]
        if battery is None:
            continue
        where = ledger.location(battery["id"])
        if where is None or where.where is not Where.BAY or where.bay != bay["bay"]:
            problems.append(f"{battery['id']} is in bay {bay['bay']}, the ledger says {where}")
    for battery_id in rider.held:
        where = ledger.location(battery_id)
        if where is None or where.where is not Where.RIDER:
            problems.append(f"{battery_id} went home with a rider, the ledger says {where}")
    missing = [e for e in events if e["type"] == "alarm.raised" and e["kind"] == "battery_missing"]
    problems += [f"battery_missing alarm: {e['detail']}" for e in missing]
    chosen = {e.get(k) for e in events if e["type"] == "swap.started"
              for k in ("return_bay", "dispense_bay")}  # fmt: skip
    unlocks = [e for e in state["timeline"] if e["what"] == "unlock"]
    problems += [f"bay {e['bay']} unlocked without a session" for e in unlocks
                 if e["bay"] not in chosen]  # fmt: skip
    completed = sum(e["type"] == "swap.completed" for e in events)
    if not completed:
        problems.append("no swap completed")
    return CampaignResult(
        kills=kills,
        scans=rider.scans,
        swaps_completed=completed,
        events=last,
        duplicates=backend.duplicates[cabinet_id],
        unlocks=len(unlocks),
        problems=problems,
    )


def _received(backend: Backend, cabinet_id: str) -> int:
    events = backend.event_list(cabinet_id)
    return events[-1]["seq"] if events else 0


def main() -> int:
    """``python -m tests.kill_campaign``: a long campaign, replayable by its seed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_campaign(Path(tmp), kills=args.kills, seed=args.seed)
    print(json.dumps({**result.__dict__, "seconds": round(time.monotonic() - started)}, indent=2))
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
