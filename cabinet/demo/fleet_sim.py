"""``cabinet sim fleet``: N simulated cabinets, each with its daemon logic, against one broker.

The N cabinets are split over P worker processes (``multiprocessing`` with spawn; one
event loop each, so the fleet uses every core; at most ``CABINETS_PER_PROCESS`` each,
since paho's select() only takes fds below 1024). Every cabinet is a real
``CabinetController`` (poller, heartbeat, timers, journal) with a real ``FleetLink`` and
its own MQTT connection, driving its own simulated cabinet through
``sim.direct_bus.DirectClient`` (each bus transaction costs the modelled wire time of a
23-register read at 19200 baud, times ``pace``, so the pollers run at a real cabinet's
pace without sockets to a simulator). A rider per cabinet swaps every few seconds
(times ``pace``). One backend stand-in in the parent, subscribed to the whole fleet,
counts what arrives; each worker reports its cabinets' journals (last seq, outbox), and
the parent compares: events journaled vs received, gaps and duplicates per cabinet,
message rates, and the CPU time of the workers and of itself, which is what limits N.

``pace`` > 1 makes each cabinet cheaper (a slower bus, fewer riders, rarer telemetry)
so that a large N fits on a small machine; the delivery check is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
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
TELEMETRY_EVERY_S = 10.0
DRAIN_S = 15.0
#: paho's network thread waits in select(), which takes only fds below 1024
#: (FD_SETSIZE), and a cabinet holds 6 (its socket, paho's wake-up pair, the journal's
#: db/wal/shm): a worker with more cabinets than this sees its connections fail
CABINETS_PER_PROCESS = 150
#: a worker builds and connects its cabinets, runs, drains: beyond this it is stuck
WORKER_SLACK_S = 120.0


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """What one worker process runs (sent to it at spawn)."""

    indices: list[int]  # its cabinets' numbers
    broker_url: str
    duration_s: float
    seed: int
    pace: float


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """What one worker process knows of its cabinets (sent to the parent)."""

    last_seqs: dict[str, int]  # cabinet id -> seq of its last journaled event
    outbox: int  # events journaled but not yet acknowledged by the broker
    cpu_s: float
    max_rss_mb: float


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
    cpu_percent: float  # of one core, all workers together
    processes: int = 1
    backend_cpu_percent: float = 0.0
    worker_rss_mb: float = 0.0  # the largest worker's peak resident memory

    def lines(self) -> list[str]:
        """The report, for people."""
        return [
            f"fleet of {self.cabinets} cabinets in {self.processes} processes "
            f"for {self.seconds:.0f} s: "
            f"{self.online} online at the broker, {self.swaps_completed} swaps completed",
            f"events: {self.journaled} journaled, {self.received} received by the backend "
            f"({self.received / self.seconds:.1f}/s), "
            f"not delivered {self.journaled - self.received}, "
            f"gaps {self.gaps}, duplicates {self.duplicates}",
            f"CPU: {self.cpu_percent:.0f} % of one core for the {self.processes} fleet "
            f"processes, {self.backend_cpu_percent:.0f} % for the backend; "
            f"largest worker {self.worker_rss_mb:.0f} MB resident",
        ]


class SimCabinet:
    """One cabinet: world, controller, fleet link, rider."""

    def __init__(
        self, index: int, tmp: Path, broker_url: str, seed: int, pace: float = 1.0
    ) -> None:
        self.cabinet_id = f"fleet-{index:03d}"
        self.rng = random.Random(seed + index)
        self.pace = pace
        self.world = SimulatedCabinet(clock=time.monotonic, seed=seed + index, charge_speedup=120)
        bus = ModbusBus(  # never opened: the simulated world answers through DirectClient
            parse_endpoint("tcp://127.0.0.1:9"),
            client=DirectClient(self.world, self.rng, wire_delay_s=WIRE_S * pace),
        )
        self.controller = CabinetController(
            cabinet_id=self.cabinet_id,
            journal=Journal(tmp / f"{self.cabinet_id}.db"),
            scheduler=BusScheduler(bus),
        )
        self.fleet = FleetLink(
            self.controller,
            lambda **kw: MqttLink(broker_url, client_id=f"cabinet-{self.cabinet_id}", **kw),
            telemetry_interval_s=TELEMETRY_EVERY_S * pace,
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
        low, high = RIDER_EVERY_S
        while not self.stopped:
            await asyncio.sleep(self.rng.uniform(low * self.pace, high * self.pace))
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


# -- a worker process: its share of the cabinets ----------------------------------------------


def _worker(conn: Connection, plan: WorkerPlan) -> None:
    """A spawned process: run the plan's cabinets, report their journals, stop when told."""
    _raise_fd_limit()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    asyncio.run(_worker_fleet(conn, plan))


def _raise_fd_limit() -> None:
    """Each cabinet holds a socket, paho's wake-up pair and its journal's files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _worker_fleet(conn: Connection, plan: WorkerPlan) -> None:
    with tempfile.TemporaryDirectory(prefix="cabinet-fleet-") as tmp:
        cabinets = [
            SimCabinet(i, Path(tmp), plan.broker_url, plan.seed, plan.pace) for i in plan.indices
        ]
        tasks = [asyncio.create_task(cab.run()) for cab in cabinets]
        try:
            await asyncio.sleep(plan.duration_s)
            for cab in cabinets:  # riders stop; what is journaled is drained to the broker
                cab.stopped = True
            deadline = time.monotonic() + DRAIN_S
            # sessions under way finish, the outbox (a sqlite table) empties: polled
            while time.monotonic() < deadline and not _settled(cabinets):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            conn.send(
                WorkerReport(
                    last_seqs={cab.cabinet_id: _last_seq(cab) for cab in cabinets},
                    outbox=_outbox(cabinets),
                    cpu_s=usage.ru_utime + usage.ru_stime,
                    max_rss_mb=usage.ru_maxrss / 1024,
                )
            )
            # connected (online) until the parent has counted what arrived
            await asyncio.to_thread(conn.poll, DRAIN_S + WORKER_SLACK_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for cab in cabinets:
                cab.controller.journal.close()


def _settled(cabinets: list[SimCabinet]) -> bool:
    return _outbox(cabinets) == 0 and all(
        cab.controller.state.phase is Phase.IDLE for cab in cabinets
    )


def _outbox(cabinets: list[SimCabinet]) -> int:
    return sum(cab.controller.journal.outbox_depth() for cab in cabinets)


def _last_seq(cab: SimCabinet) -> int:
    last = cab.controller.journal.last_event()
    return int(last["seq"]) if last else 0


# -- the parent: the backend and the verdict --------------------------------------------------


def split(n: int, processes: int) -> list[list[int]]:
    """Cabinet indices 0..n-1 dealt round-robin over ``processes`` workers.

    Or more workers, where one would hold more than ``CABINETS_PER_PROCESS``; never more
    workers than cabinets.
    """
    p = max(1, min(max(processes, -(-n // CABINETS_PER_PROCESS)), n))
    return [list(range(k, n, p)) for k in range(p)]


def run_fleet(
    n: int,
    broker_url: str,
    duration_s: float,
    seed: int = 1,
    *,
    processes: int = 1,
    pace: float = 1.0,
) -> FleetReport:
    """Run ``n`` cabinets in worker processes and compare their journals with the backend.

    Blocking (it waits on its workers' pipes): ``bench/broker_cost.py`` runs it in a thread
    next to its own observer.
    """
    address = parse_broker_url(broker_url)
    backend = Backend(address.host, address.port, mqtt5=False)
    cpu0 = _cpu_s()
    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for indices in split(n, processes):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker,
                args=(theirs, WorkerPlan(indices, broker_url, duration_s, seed, pace)),
                daemon=True,
            )
            proc.start()
            theirs.close()
            workers.append((proc, mine))
        reports = _collect(workers, time.monotonic() + duration_s + DRAIN_S + WORKER_SLACK_S)
        last_seqs = {cab: seq for r in reports for cab, seq in r.last_seqs.items()}
        deadline = time.monotonic() + DRAIN_S
        # the backend counts in paho's thread: polling it is the only way to watch it
        while time.monotonic() < deadline and not _arrived(last_seqs, backend):
            time.sleep(0.2)
        seconds = time.monotonic() - started
        return _report(last_seqs, reports, backend, seconds=seconds, cpu0=cpu0)
    finally:
        for _, conn in workers:
            with contextlib.suppress(OSError):
                conn.send("stop")
        for worker, _ in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
        backend.close()


def _collect(
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]], deadline: float
) -> list[WorkerReport]:
    reports = []
    for proc, conn in workers:
        if not conn.poll(max(0.0, deadline - time.monotonic())):
            raise RuntimeError(f"fleet worker {proc.pid} sent no report")
        try:
            report = conn.recv()
        except EOFError as exc:
            raise RuntimeError(f"fleet worker {proc.pid} died (exit {proc.exitcode})") from exc
        reports.append(report)
    return reports


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _arrived(last_seqs: dict[str, int], backend: Backend) -> bool:
    return all(
        sum(int(e["seq"]) <= last for e in backend.event_list(cab)) >= last
        for cab, last in last_seqs.items()
    )


def _report(
    last_seqs: dict[str, int],
    reports: list[WorkerReport],
    backend: Backend,
    *,
    seconds: float,
    cpu0: float,
) -> FleetReport:
    # the snapshot is each cabinet's journal when its worker reported: what a cabinet
    # journals afterwards (a timer firing) is outside the comparison
    events = {
        cab: [e for e in backend.event_list(cab) if int(e["seq"]) <= last]
        for cab, last in last_seqs.items()
    }
    return FleetReport(
        cabinets=len(last_seqs),
        seconds=seconds,
        online=sum(bool((backend.status.get(cab) or {}).get("online")) for cab in last_seqs),
        swaps_completed=sum(
            sum(e["type"] == "swap.completed" for e in got) for got in events.values()
        ),
        journaled=sum(last_seqs.values()),
        received=sum(len(got) for got in events.values()),
        gaps=sum(len(_gaps(got, last_seqs[cab])) for cab, got in events.items()),
        duplicates=sum(backend.duplicates[cab] for cab in last_seqs),
        cpu_percent=100 * sum(r.cpu_s for r in reports) / seconds,
        processes=len(reports),
        backend_cpu_percent=100 * (_cpu_s() - cpu0) / seconds,
        worker_rss_mb=max(r.max_rss_mb for r in reports),
    )


def _gaps(events: list[dict[str, object]], last_seq: int) -> list[int]:
    """Seqs 1..last journaled that never arrived (not only holes between those that did)."""
    seen = {int(str(e["seq"])) for e in events}
    return [seq for seq in range(1, last_seq + 1) if seq not in seen]


def main(
    n: int,
    broker_url: str,
    duration_s: float,
    seed: int,
    *,
    processes: int | None = None,
    pace: float = 1.0,
) -> int:
    """Entry point of ``cabinet sim fleet``."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    report = run_fleet(
        n, broker_url, duration_s, seed, processes=processes or os.cpu_count() or 1, pace=pace
    )
    for line in report.lines():
        print(line)
    lost = report.journaled - report.received
    return (
        0 if lost == 0 and report.gaps == 0 and report.duplicates == 0 and report.online == n else 3
    )


__all__ = ["CABINETS_PER_PROCESS", "FleetReport", "WorkerReport", "main", "run_fleet", "split"]
