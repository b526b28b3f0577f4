"""``cabinet sim fleet``: N simulated cabinets, each with its daemon logic, against one broker.

One process, one event loop: every cabinet is a real ``CabinetController`` (poller,
heartbeat, timers, journal) with a real ``FleetLink`` and its own MQTT connection,
driving its own simulated cabinet through ``sim.direct_bus.DirectClient`` (each bus
transaction costs the modelled wire time of a 23-register read at 19200 baud, so
the pollers run at a real cabinet's pace without sockets to a simulator). A rider
per cabinet swaps every few seconds. A backend stand-in subscribed to the whole
fleet counts what arrives; the report compares it with every cabinet's journal:
events journaled vs received, gaps and duplicates per cabinet, message rates, and
this process's CPU time, which is what limits N.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from cabinet.core.swap_machine import Mode, Phase
from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.fleet_link import FleetLink
from cabinet.daemon.journal import Journal
from cabinet.demo.backend import Backend
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus
from drivers.mqtt_link import MqttLink, parse_broker_url
from protocol import bay_map, rtu_timing
from sim.cabinet_model import SimulatedCabinet
from sim.direct_bus import DirectClient
from sim.faults import SimCommandError

WIRE_S = rtu_timing.read_transaction_time(bay_map.STATUS_COUNT, 19200, 0.002)
RIDER_EVERY_S = (4.0, 12.0)
DRAIN_S = 15.0


@dataclass(frozen=True, slots=True)
class FleetReport:
    """What the fleet run showed."""

    cabinets: int
    seconds: float
    online: int
    swaps_completed: int
    journaled: int
    received: int
    gaps: int
    duplicates: int
    cpu_percent: float

    def lines(self) -> list[str]:
        """The report, for people."""
        return [
            f"fleet of {self.cabinets} cabinets for {self.seconds:.0f} s: "
            f"{self.online} online at the broker, {self.swaps_completed} swaps completed",
            f"events: {self.journaled} journaled, {self.received} received by the backend "
            f"({self.received / self.seconds:.1f}/s), "
            f"not delivered {self.journaled - self.received}, "
            f"gaps {self.gaps}, duplicates {self.duplicates}",
            f"CPU: {self.cpu_percent:.0f} % of one core for the whole fleet process",
        ]


class SimCabinet:
    """One cabinet: world, controller, fleet link, rider."""

    def __init__(self, index: int, tmp: Path, broker_url: str, seed: int) -> None:
        self.cabinet_id = f"fleet-{index:03d}"
        self.rng = random.Random(seed + index)
        self.world = SimulatedCabinet(clock=time.monotonic, seed=seed + index, charge_speedup=120)
        bus = ModbusBus(  # never opened: the simulated world answers through DirectClient
            parse_endpoint("tcp://127.0.0.1:9"),
            client=DirectClient(self.world, self.rng, wire_delay_s=WIRE_S),
        )
        self.controller = CabinetController(
            cabinet_id=self.cabinet_id,
            journal=Journal(tmp / f"{self.cabinet_id}.db"),
            scheduler=BusScheduler(bus),
        )
        self.fleet = FleetLink(
            self.controller,
            lambda **kw: MqttLink(broker_url, client_id=f"cabinet-{self.cabinet_id}", **kw),
            telemetry_interval_s=10.0,
        )
        self.riders = 0
        self.stopped = False

    async def run(self) -> None:
        """The daemon's tasks and the rider, until cancelled."""
        c = self.controller
        async with asyncio.TaskGroup() as group:
            group.create_task(c.scheduler.run())
            group.create_task(c.poller.heartbeat_forever())
            group.create_task(c.poller.safety_writes_forever())
            await c.recover()
            group.create_task(c.poller.poll_forever())
            group.create_task(c.timers_forever())
            group.create_task(self.fleet.run())
            group.create_task(self._rider())

    async def _rider(self) -> None:
        c = self.controller
        while not self.stopped:
            await asyncio.sleep(self.rng.uniform(*RIDER_EVERY_S))
            if self.stopped or c.refusal() is not None:
                continue
            self.riders += 1
            c.request_session(f"R-{self.riders}", Mode.SWAP, "qr")
            with contextlib.suppress(SimCommandError):
                await self._through_the_session()

    async def _through_the_session(self) -> None:
        c, world = self.controller, self.world
        for _ in range(200):  # a session with no progress for 20 s: the rider walks off
            state = c.state
            if state.phase is Phase.IDLE:
                return
            ret, out = state.return_bay, state.dispense_bay
            if state.phase is Phase.AWAITING_DEPOSIT and ret and not world.bays[ret].door_closed:
                if world.bays[ret].battery is None:
                    world.insert(ret, f"BAT-{self.cabinet_id[-3:]}{self.riders:05d}", 20.0)
                world.close(ret)
            elif state.phase is Phase.AWAITING_PICKUP and out and not world.bays[out].door_closed:
                if world.bays[out].battery is not None:
                    world.take(out)
                world.close(out)
            await asyncio.sleep(0.1)


async def run_fleet(n: int, broker_url: str, duration_s: float, seed: int = 1) -> FleetReport:
    """Run ``n`` cabinets for ``duration_s`` seconds and compare journals with the backend."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    address = parse_broker_url(broker_url)
    backend = await asyncio.to_thread(Backend, address.host, address.port, mqtt5=False)
    cpu0 = _cpu_s()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cabinet-fleet-") as tmp:
        cabinets = [SimCabinet(i, Path(tmp), broker_url, seed) for i in range(n)]
        tasks = [asyncio.create_task(cab.run()) for cab in cabinets]
        try:
            await asyncio.sleep(duration_s)
            for cab in cabinets:  # riders stop; what is journaled is drained to the broker
                cab.stopped = True
            deadline = time.monotonic() + DRAIN_S
            # the backend counts in paho's thread: polling it is the only way to watch it
            while time.monotonic() < deadline and not _drained(cabinets, backend):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            report = _report(cabinets, backend, time.monotonic() - started, cpu0)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for cab in cabinets:
                cab.controller.journal.close()
            backend.close()
    return report


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _drained(cabinets: list[SimCabinet], backend: Backend) -> bool:
    return all(
        cab.controller.journal.outbox_depth() == 0
        and len(backend.event_list(cab.cabinet_id)) >= _last_seq(cab)
        for cab in cabinets
    )


def _last_seq(cab: SimCabinet) -> int:
    last = cab.controller.journal.last_event()
    return int(last["seq"]) if last else 0


def _report(
    cabinets: list[SimCabinet], backend: Backend, seconds: float, cpu0: float
) -> FleetReport:
    journaled = sum(_last_seq(cab) for cab in cabinets)
    received = sum(len(backend.event_list(cab.cabinet_id)) for cab in cabinets)
    completed = sum(
        sum(e["type"] == "swap.completed" for e in backend.event_list(cab.cabinet_id))
        for cab in cabinets
    )
    online = sum(bool((backend.status.get(cab.cabinet_id) or {}).get("online")) for cab in cabinets)
    return FleetReport(
        cabinets=len(cabinets),
        seconds=seconds,
        online=online,
        swaps_completed=completed,
        journaled=journaled,
        received=received,
        gaps=sum(len(backend.gaps(cab.cabinet_id)) for cab in cabinets),
        duplicates=sum(backend.duplicates[cab.cabinet_id] for cab in cabinets),
        cpu_percent=100 * (_cpu_s() - cpu0) / seconds,
    )


def main(n: int, broker_url: str, duration_s: float, seed: int) -> int:
    """Entry point of ``cabinet sim fleet``."""
    report = asyncio.run(run_fleet(n, broker_url, duration_s, seed))
    for line in report.lines():
        print(line)
    lost = report.journaled - report.received
    return 0 if lost == 0 and report.gaps == 0 and report.online == n else 3


__all__ = ["FleetReport", "main", "run_fleet"]
