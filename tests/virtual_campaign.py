"""A deterministic fault campaign in virtual time: the daemon's logic, many riders, fate.

The real ``CabinetController`` (with the real ``ModbusBus`` bookkeeping, scheduler,
journal, swap machine, custody ledger, safety interlocks and charging policy) drives
the simulated cabinet with no sockets and no sleeps: a fake pymodbus client hands each
request to the simulated world, and one virtual clock moves both. Each step advances
time by 500 ms (a poll cycle) and does what the daemon's loops would do in it (heartbeat, a poll of
every bay, the cabinet board, charging, due timers). Riders arrive and behave well or
badly; fate injects bus silence and CRC errors, stuck locks and door sensors,
overheating, smoke, mains loss, broker outages (the real outbox drain against a
broker stand-in that acknowledges or drops), and power cuts of the daemon itself (the controller
is thrown away mid-flight and rebuilt from its journal). After every step:

* custody: every battery the boards report is where the ledger says; every battery a
  rider carried off is with that rider in the ledger;
* doors: every unlock the boards saw was of a bay a session chose;
* charging: within a second of the daemon knowing, no charger is left enabled on a
  bay the interlocks tripped, on a battery over the cell limit, or during smoke or
  mains loss (a board the daemon cannot reach stops by its own heartbeat fail-safe);
* events: ``seq`` gap-free and ids unique, across every crash, and every one at the
  broker with its id once the broker is back (resends are counted duplicates).

Any failure names its seed and step; ``--seed N`` replays it exactly.

    .venv/bin/python -m tests.virtual_campaign --swaps 100000 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from cabinet.core.custody import Where
from cabinet.core.swap_machine import Mode, Phase, TimerExpired
from cabinet.daemon.bus_scheduler import BusScheduler, Priority
from cabinet.daemon.clock import Clock
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.fleet_link import FleetLink
from cabinet.daemon.journal import Journal
from drivers import modbus_bus
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus
from protocol.units import BAY_UNITS
from sim.cabinet_model import SimulatedCabinet
from sim.direct_bus import DirectClient
from sim.faults import FaultKind, SimCommandError

STEP_S = 0.5  # about one full poll cycle of 12 bays at 19200 baud
CHARGE_SPEEDUP = 240.0
STUCK_S = 300.0  # the longest timeout is 90 s; restarts may add 15 s each, not more
CHARGING_GRACE_S = 1.0  # a charger-off write lost to a CRC error is re-sent next cycle


class VirtualTime(Clock):
    """One clock for the world, the bus and the controller."""

    def __init__(self) -> None:
        self.t = 1_000.0

    def monotonic(self) -> float:
        """Virtual seconds."""
        return self.t

    def wall(self) -> float:
        """Virtual epoch seconds (a fixed offset: journaled deadlines stay meaningful)."""
        return 1_764_000_000.0 + self.t

    def __call__(self) -> float:
        return self.t


class VirtualBroker:
    """The fleet broker, reduced to what the outbox needs: up or down, and what arrived."""

    def __init__(self) -> None:
        self.up = True
        self.received: dict[int, str] = {}  # seq -> id of every event acknowledged
        self.duplicates = 0
        self.links: list[VirtualLink] = []

    def link(self, **_callbacks: Any) -> VirtualLink:
        """What ``FleetLink`` gets instead of an ``MqttLink``."""
        link = VirtualLink(self)
        self.links.append(link)
        return link

    def set_up(self, up: bool) -> None:
        """An outage begins or ends."""
        self.up = up
        for link in self.links:
            (link.connected.set if up else link.connected.clear)()


class VirtualLink:
    """One connection: PUBACK at once while the broker is up, a lost connection otherwise."""

    def __init__(self, broker: VirtualBroker) -> None:
        self.broker = broker
        self.connected = asyncio.Event()
        if broker.up:
            self.connected.set()

    def subscribe(self, _topic: str) -> None:
        """Commands are not part of the campaign."""

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""

    def publish(self, _topic: str, payload: bytes, **_options: Any) -> asyncio.Future[None]:
        """Deliver and acknowledge, or fail as a dropped connection does."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.broker.up:
            future.set_exception(ConnectionError("broker unreachable"))
            return future
        event = json.loads(payload)
        if "seq" in event:
            if event["seq"] in self.broker.received:
                self.broker.duplicates += 1
            elif self.broker.received.get(event["seq"], event["id"]) != event["id"]:
                raise InvariantBrokenError("a seq arrived with two ids")
            self.broker.received[event["seq"]] = event["id"]
        future.set_result(None)
        return future


class InvariantBrokenError(AssertionError):
    """An invariant failed; the message names the seed and the step."""


@dataclass
class Tally:
    """What the campaign did."""

    steps: int = 0
    sessions: int = 0
    completed: int = 0
    crashes: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)


RIDER_KINDS = ("good", "good", "good", "good", "slow", "walks_away", "hot_battery", "keeps")
FAULTS = (
    FaultKind.SILENT,
    FaultKind.CRC,
    FaultKind.LOCK_STUCK,
    FaultKind.DOOR_SENSOR_STUCK,
    FaultKind.OVERHEAT,
    FaultKind.SMOKE,
    FaultKind.MAINS_LOSS,
)


class VirtualCabinet:
    """The controller and the simulated world, stepped together."""

    def __init__(self, tmp: Path, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = VirtualTime()
        # batteries fill in about a virtual minute: riders keep coming without running dry
        self.world = SimulatedCabinet(clock=self.clock, seed=seed, charge_speedup=CHARGE_SPEEDUP)
        self.journal_path = tmp / f"journal-{seed}.db"
        self.tally = Tally()
        self.controller = self._controller()
        self.rider: dict[str, Any] | None = None
        # battery id -> (rider who carried it off, the bay it came from)
        self.held: dict[str, tuple[str, int]] = {}
        self.brought = 0
        self.collected: dict[str, int] = {}  # batteries staff took out of a full cabinet: bay
        self.operator: dict[str, Any] | None = None
        self.faults: dict[tuple[FaultKind, int | None], float] = {}  # -> heal at
        self._timeline_seen = 0
        self.broker = VirtualBroker()
        self._outage_until: float | None = None
        # a stream of its own: adding outages left every other fault of a seed where it was
        self._outage_rng = random.Random(seed * 7919 + 1)
        self._chosen_bays: set[int] = set()
        self._events_seen = 0
        self._charging_since: dict[tuple[int, str], float] = {}
        self._phase_since: tuple[str, Phase, float] = ("", Phase.IDLE, 0.0)

    def _controller(self) -> CabinetController:
        bus = ModbusBus(
            parse_endpoint("tcp://127.0.0.1:9"),  # never opened: the simulated world answers
            clock=self.clock,
            client=DirectClient(self.world, self.rng),
        )
        return CabinetController(
            cabinet_id="cab-virtual",
            journal=Journal(self.journal_path),
            scheduler=BusScheduler(bus),
            clock=self.clock,
        )

    # -- the daemon's loops, one step at a time ---------------------------------------------------

    async def start(self) -> None:
        """Boot (or reboot after a crash): recover from the journal and the boards."""
        self._bus_task = asyncio.ensure_future(self.controller.scheduler.run())
        fleet = FleetLink(self.controller, self.broker.link)
        self._drain_task = asyncio.ensure_future(fleet._drain_outbox())
        await self.controller.recover()

    async def daemon_step(self) -> None:
        """What the daemon's tasks do within one step of virtual time."""
        c = self.controller
        await c.poller.heartbeat()
        for bay in BAY_UNITS:
            await c.poller.read_bay(bay, Priority.ROUTINE)
        await c.poller.read_cabinet()
        await c.poller.apply_charging()
        due = [t for t, deadline in c.timers.items() if deadline <= self.clock.t]
        if due:
            c.feed([TimerExpired(t) for t in due])
        await c.drain()

    async def crash(self) -> None:
        """Power cut: the controller's memory is gone; the journal and the boards remain."""
        self.tally.crashes += 1
        await self._stop_tasks()
        self.controller.journal.close()
        self.clock.t += self.rng.uniform(1.0, 8.0)  # the reboot takes a while
        self.controller = self._controller()
        await self.start()

    async def _stop_tasks(self) -> None:
        """Cancel the daemon's tasks and let them finish before the journal closes."""
        tasks = [self._bus_task, self._drain_task, *self.controller._pending]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.broker.links.clear()  # a dead daemon's connection is gone with it

    # -- riders -----------------------------------------------------------------------------

    def _seen(self, bay: int) -> bool:
        """Whether the daemon's picture of ``bay`` is this step's reading."""
        snap = self.controller.snapshots.get(bay)
        stats = self.controller.scheduler.bus.unit_stats(bay)
        return snap is not None and snap.online and stats.consecutive_failures == 0

    def rider_step(self) -> None:
        """The person at the cabinet does the next thing, if it is time."""
        c = self.controller
        if self.operator is not None or (self.rider is None and self._cabinet_full()):
            self._operator_step()
            return
        if self.rider is None:
            if c.state.phase is Phase.IDLE and self.rng.random() < 0.2:
                kind = self.rng.choice(RIDER_KINDS)
                rider_id = f"R-{self.tally.sessions}"
                started = c.request_session(rider_id, Mode.SWAP, "qr") is None
                if started and c.state.phase is not Phase.IDLE:
                    self.tally.sessions += 1
                    self.rider = {"id": rider_id, "kind": kind, "next": self.clock.t,
                                  "session": c.state.session_id}  # fmt: skip
            return
        rider = self.rider
        state = c.state
        if state.session_id != rider["session"] or state.phase is Phase.IDLE:
            self._rider_leaves()
            return
        if self.clock.t < rider["next"]:
            return
        pause = {"slow": (20.0, 40.0)}.get(rider["kind"], (0.5, 3.0))
        rider["next"] = self.clock.t + self.rng.uniform(*pause)
        if rider["kind"] == "walks_away":
            return
        self._rider_acts(rider, state.phase, state.return_bay, state.dispense_bay)

    def _rider_acts(
        self, rider: dict[str, Any], phase: Phase, ret: int | None, out: int | None
    ) -> None:
        world = self.world
        try:
            if phase is Phase.AWAITING_DEPOSIT and ret is not None:
                bay = world.bays[ret]
                if bay.battery is None and not bay.door_closed:
                    self.brought += 1
                    hot = rider["kind"] == "hot_battery"
                    world.insert(ret, f"BAT-V{self.brought:05d}", self.rng.uniform(5, 40),
                                 temp_c=58.0 if hot else 25.0)  # fmt: skip
                elif not bay.door_closed:
                    world.close(ret)
            elif phase in (Phase.REJECTING, Phase.GIVING_BACK) and ret is not None:
                bay = world.bays[ret]
                if not bay.door_closed and bay.battery is not None:
                    self.held[world.take(ret).battery_id] = (rider["id"], ret)
                elif not bay.door_closed:
                    world.close(ret)
            elif phase is Phase.AWAITING_PICKUP and out is not None:
                bay = world.bays[out]
                if not bay.door_closed and bay.battery is not None and rider["kind"] != "keeps":
                    self.held[world.take(out).battery_id] = (rider["id"], out)
                elif not bay.door_closed:
                    world.close(out)
        except SimCommandError:
            pass  # the door shut or the battery moved between looking and acting

    def _cabinet_full(self) -> bool:
        """No bay a rider's flat battery could go into: staff come and make room."""
        return not any(
            bay.battery is None and bay.door_closed and n not in self.controller.out_of_service
            for n, bay in self.world.bays.items()
        )

    def _operator_step(self) -> None:
        """Staff empty a bay of a full cabinet: a remote open, then they take the battery."""
        c = self.controller
        if self.operator is None:
            if c.state.phase is not Phase.IDLE or self.rng.random() > 0.2:
                return
            for number, sim_bay in self.world.bays.items():
                if sim_bay.battery is None and not sim_bay.door_closed:
                    self.world.close(number)  # an empty bay left open: just shut it
                    return
            bay = self.rng.choice(BAY_UNITS)
            if c.open_bay(bay, "operator") is None:
                self._chosen_bays.add(bay)
                self.operator = {"bay": bay, "until": self.clock.t + 10.0}
            return
        bay = self.operator["bay"]
        sim_bay = self.world.bays[bay]
        if not sim_bay.door_closed:
            if sim_bay.battery is not None:
                self.collected[self.world.take(bay).battery_id] = bay
            self.world.close(bay)
            self.operator = None
        elif self.clock.t > self.operator["until"]:
            self.operator = None  # the door never opened (stuck lock, silent board): give up

    def _rider_leaves(self) -> None:
        """The session is over: a rider who left a door open walks off; a passer-by shuts it."""
        for number, bay in self.world.bays.items():
            if not bay.door_closed and self.rng.random() < 0.5:
                self.world.close(number)
        self.rider = None

    # -- fate -----------------------------------------------------------------------------------

    def fate_step(self) -> None:
        """Inject a fault now and then; heal each one after a while."""
        now = self.clock.t
        if self._outage_until is not None and now >= self._outage_until:
            self.broker.set_up(True)
            self._outage_until = None
        elif self._outage_until is None and self._outage_rng.random() < 0.003:
            self.broker.set_up(False)  # a broker outage: the outbox must keep everything
            self._outage_until = now + self._outage_rng.uniform(5.0, 120.0)
            self.tally.faults["broker_outage"] += 1
        for (kind, bay), heal_at in list(self.faults.items()):
            if now >= heal_at:
                self.world.heal(kind, bay=bay)
                del self.faults[(kind, bay)]
        if self.rng.random() < 0.01:
            kind = self.rng.choice(FAULTS)
            bay = (
                None
                if kind in (FaultKind.SMOKE, FaultKind.MAINS_LOSS)
                else self.rng.choice(BAY_UNITS)
            )
            try:
                self.world.inject(kind, bay=bay, rate=0.3)
            except SimCommandError:
                return  # e.g. overheat on an empty bay
            self.tally.faults[kind.value] += 1
            self.faults[(kind, bay)] = now + self.rng.uniform(2.0, 60.0)

    # -- invariants -----------------------------------------------------------------------------

    def check(self, step: int) -> None:
        """Every invariant of DESIGN.md §6, now."""
        where = f"seed {self.seed}, step {step}"
        c = self.controller
        ledger = c.ledger
        for number, bay in self.world.bays.items():
            seen = self._seen(number)
            battery = bay.battery
            if seen and battery is not None and battery.identified and battery.plugged:
                loc = ledger.location(battery.battery_id)
                if loc is None or loc.where is not Where.BAY or loc.bay != number:
                    raise InvariantBrokenError(
                        f"{where}: {battery.battery_id} in bay {number}, ledger {loc}"
                    )
            self._charging_rule(where, number, seen)
        for battery_id, from_bay in self.collected.items():
            if not self._seen(from_bay):
                continue  # the daemon cannot know yet: it will when the bay answers again
            loc = ledger.location(battery_id)
            if loc is None or loc.where is Where.BAY:
                raise InvariantBrokenError(f"{where}: {battery_id} collected, ledger {loc}")
        for battery_id, (rider, bay) in self.held.items():
            if not self._seen(bay):
                continue  # the daemon cannot know yet: it will when the bay answers again
            loc = ledger.location(battery_id)
            if loc is None or loc.where is not Where.RIDER or loc.rider_id != rider:
                raise InvariantBrokenError(f"{where}: {battery_id} went with {rider}, ledger {loc}")
        for event in c.journal.events(after_seq=self._events_seen, limit=100_000):
            self._events_seen = event["seq"]
            if event["type"] == "swap.started":  # the bays a session chose, as journaled
                self._chosen_bays |= {b for b in (event["return_bay"], event["dispense_bay"]) if b}
            elif event["type"] == "swap.door_opened":  # a bay chosen again (a door failed)
                self._chosen_bays.add(event["bay"])
        state = c.state  # the session's bays are journaled before any unlock is sent
        self._chosen_bays |= {b for b in (state.return_bay, state.dispense_bay) if b}
        self._no_stuck_session(where)
        timeline = list(self.world.timeline)
        for entry in timeline[self._timeline_seen :]:
            if entry["what"] == "unlock" and entry["bay"] not in self._chosen_bays:
                raise InvariantBrokenError(f"{where}: bay {entry['bay']} unlocked unasked")
        self._timeline_seen = len(timeline)

    def _no_stuck_session(self, where: str) -> None:
        """Every phase ends: a timeout, however often the daemon restarts, ends it."""
        state = self.controller.state
        session, phase, since = self._phase_since
        if (state.session_id, state.phase) != (session, phase):
            self._phase_since = (state.session_id, state.phase, self.clock.t)
        elif phase is not Phase.IDLE and self.clock.t - since > STUCK_S:
            raise InvariantBrokenError(f"{where}: session stuck in {phase.value} for {STUCK_S} s")

    def _charging_rule(self, where: str, number: int, seen: bool) -> None:
        c, bay = self.controller, self.world.bays[number]
        battery = bay.battery
        reasons = []
        if bay.charger_enabled and seen:
            if number in c.safety.tripped:
                reasons.append("tripped")
            if battery is not None and battery.cell_temp_c >= c.settings.safety.cell_max_c:
                reasons.append("battery over the cell limit")
            if c.safety.smoke or c.safety.mains_lost:
                reasons.append("smoke or mains loss")
        for reason in ("tripped", "battery over the cell limit", "smoke or mains loss"):
            key = (number, reason)
            if reason not in reasons:
                self._charging_since.pop(key, None)
                continue
            since = self._charging_since.setdefault(key, self.clock.t)
            if self.clock.t - since > CHARGING_GRACE_S:
                raise InvariantBrokenError(f"{where}: bay {number} charger on: {reason}")

    def check_events(self) -> None:
        """Seq gap-free from 1, ids unique, across every crash; all at the broker, once each."""
        events = self.controller.journal.events(limit=1_000_000)
        for event in events:
            if self.broker.received.get(event["seq"]) != event["id"]:
                raise InvariantBrokenError(
                    f"seed {self.seed}: event {event['seq']} never reached the broker"
                )
        seqs = [e["seq"] for e in events]
        if seqs != list(range(1, len(seqs) + 1)):
            raise InvariantBrokenError(f"seed {self.seed}: event seq has a gap")
        if len({e["id"] for e in events}) != len(events):
            raise InvariantBrokenError(f"seed {self.seed}: an event id repeats")
        for event in events:
            if event["type"] == "swap.completed":
                self.tally.completed += 1
            if event["type"] == "swap.failed":
                self.tally.outcomes[event["reason"]] += 1

    async def run(self, steps: int, crash_rate: float) -> Tally:
        """Step until ``steps``; the tally."""
        await self.start()
        for step in range(steps):
            self.tally.steps += 1
            self.clock.t += STEP_S
            self.fate_step()
            self.rider_step()
            if self.rng.random() < crash_rate:
                await self.crash()
            await self.daemon_step()
            self.check(step)
        self.broker.set_up(True)
        for _ in range(50):  # the broker is back: let the outbox drain
            await asyncio.sleep(0)
            await self.daemon_step()
            if self.controller.journal.outbox_depth() == 0:
                break
        self.check_events()
        await self._stop_tasks()
        self.controller.journal.close()
        return self.tally


def run_seed(tmp: Path, seed: int, steps: int, crash_rate: float = 0.005) -> Tally:
    """One campaign, replayable by its seed."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    # the broadcast's real 10 ms turnaround is wire time, which virtual time does not spend
    modbus_bus.BROADCAST_TURNAROUND_S = 0.0
    return asyncio.run(VirtualCabinet(tmp, seed).run(steps, crash_rate))


def main() -> int:
    """``python -m tests.virtual_campaign``: keep running seeds until ``--swaps`` completed."""
    import tempfile  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    parser.add_argument("--swaps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1, help="first seed (each run: next seed)")
    parser.add_argument("--steps", type=int, default=20_000, help="steps (of 500 ms) per seed")
    args = parser.parse_args()
    total = Tally()
    started = time.monotonic()
    seed = args.seed
    with tempfile.TemporaryDirectory() as tmp:
        while total.completed < args.swaps:
            tally = run_seed(Path(tmp), seed, args.steps)
            total.completed += tally.completed
            total.sessions += tally.sessions
            total.crashes += tally.crashes
            total.steps += tally.steps
            total.faults.update(tally.faults)
            total.outcomes.update(tally.outcomes)
            seed += 1
    print(
        f"seeds {args.seed}..{seed - 1}: {total.sessions} sessions, {total.completed} swaps "
        f"completed, {total.crashes} crashes survived, faults {dict(total.faults)}, "
        f"failed by reason {dict(total.outcomes)}, {total.steps * STEP_S / 3600:.1f} h "
        f"virtual in {time.monotonic() - started:.0f} s, invariant violations: 0"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
