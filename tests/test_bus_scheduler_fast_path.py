"""The bus scheduler's priorities and its recovery from a cancelled caller, on a real bus.

A real ``ModbusBus`` talks RTU over TCP to the simulator (``tests.conftest.running_sim``),
and a real ``BusScheduler`` with its worker orders the jobs, as in the daemon. The
scheduler runs a caller's job itself when the line is idle and nothing waits (the fast
path, issue 16); these are the promises that must hold however a job reaches the wire.
What a user would notice if they broke: a rider's door opened only after the next
routine read (DESIGN.md §3.3: an unlock waits at most for the transaction already on the
wire), a read told "bus lost" while the daemon reopens the port, or a cabinet whose bus
hangs for good after a technician pressed Ctrl-C during a command.

The moments "while a read is on the wire" are made by the jobs themselves: a job that
starts another caller's submit from inside itself, before its own frame goes out, has
that caller submit while its request waits for the reply (the new task runs at the next
pass of the event loop, and the reply cannot come back within the same pass).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from cabinet.daemon.bus_scheduler import BusScheduler, Priority
from drivers.boards import BayBoard
from drivers.modbus_bus import BusUnavailableError, ModbusBus
from protocol import bay_map
from tests.conftest import master, running_sim

T = TypeVar("T")
TEST_TIMEOUT_S = 10.0  # a hung scheduler fails the test instead of the suite


def run(scenario: Callable[[BusScheduler], Coroutine[Any, Any, T]], *, baud: int = 115200) -> T:
    """``scenario`` against a scheduler whose worker runs, on a connected bus to the simulator."""

    async def main() -> T:
        async with running_sim(baud=baud) as sim, master(sim.url) as bus:
            scheduler = BusScheduler(bus)
            worker = asyncio.create_task(scheduler.run())
            try:
                # the boards act on an unlock only after a heartbeat (fail-safe otherwise)
                await scheduler.submit(
                    Priority.ACTIVE,
                    lambda b: b.broadcast_register(bay_map.CommandReg.HEARTBEAT, 1),
                )
                return await asyncio.wait_for(scenario(scheduler), TEST_TIMEOUT_S)
            finally:
                worker.cancel()

    return asyncio.run(main())


def read_bay(bay: int, meanwhile: Callable[[], None] | None = None) -> Callable[[ModbusBus], Any]:
    """A job reading ``bay``'s status; ``meanwhile`` starts another caller's submit first."""

    async def job(bus: ModbusBus) -> bay_map.BayStatus:
        if meanwhile is not None:
            meanwhile()
        return await BayBoard(bus, bay).read_status()

    return job


def unlock(bay: int) -> Callable[[ModbusBus], Awaitable[None]]:
    return lambda bus: BayBoard(bus, bay).unlock(retries=0)


def test_an_unlock_goes_out_before_the_next_routine_read() -> None:
    """The poller reads bay after bay; a rider's unlock of bay 4 comes in during bay 3's read.

    The poller's next read is bay 4's own: it must already see the latch released,
    i.e. the unlock frame went onto the wire between the two routine reads.
    """

    async def scenario(scheduler: BusScheduler) -> tuple[bool, bool]:
        unlocks: list[asyncio.Future[None]] = []

        def rider_scans() -> None:
            unlocks.append(asyncio.ensure_future(scheduler.submit(Priority.UNLOCK, unlock(4))))

        before = await scheduler.submit(Priority.ROUTINE, read_bay(4))
        await scheduler.submit(Priority.ROUTINE, read_bay(3, meanwhile=rider_scans))
        after = await scheduler.submit(Priority.ROUTINE, read_bay(4))
        await unlocks[0]
        return before.locked, after.locked

    assert run(scenario) == (True, False)


def test_a_routine_read_while_a_safety_job_holds_the_line_waits_for_it() -> None:
    """The poller reads while the bus is being reopened (a SAFETY job): it waits, it is not lost.

    The reopen job closes the port and connects again; a read that went onto the bus in
    between would be told the bus is not connected, and the poller would report the
    bus lost for a moment that never happened.
    """

    async def scenario(scheduler: BusScheduler) -> str:
        reads: list[asyncio.Future[bay_map.BayStatus]] = []

        async def reopen(bus: ModbusBus) -> None:
            # the poller asks for its next read while the port is closed
            reads.append(asyncio.ensure_future(scheduler.submit(Priority.ROUTINE, read_bay(5))))
            bus.close()
            await asyncio.sleep(0)  # one pass of the loop: the read's task submits now
            await bus.connect()

        await scheduler.submit(Priority.SAFETY, reopen)
        try:
            await reads[0]
        except BusUnavailableError as exc:
            return f"read failed: {exc}"
        return "read waited"

    assert run(scenario) == "read waited"


def test_a_caller_cancelled_with_its_read_on_the_wire_leaves_the_bus_usable() -> None:
    """A caller gives up (Ctrl-C on a technician's command, shutdown) while its read is out.

    The unlock that came in meanwhile still goes out and the next read is answered: the
    bus is not left locked, and the scheduler does not believe the line still busy.
    """

    async def scenario(scheduler: BusScheduler) -> tuple[bool, bool]:
        unlocks: list[asyncio.Future[None]] = []
        on_the_wire = asyncio.Event()

        def rider_scans() -> None:
            unlocks.append(asyncio.ensure_future(scheduler.submit(Priority.UNLOCK, unlock(6))))
            on_the_wire.set()

        caller = asyncio.ensure_future(
            scheduler.submit(Priority.ROUTINE, read_bay(2, meanwhile=rider_scans))
        )
        await on_the_wire.wait()
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        await unlocks[0]
        status = await scheduler.submit(Priority.ROUTINE, read_bay(6))
        again = await scheduler.submit(Priority.ROUTINE, read_bay(2))
        return caller.cancelled(), not status.locked and again.map_version == bay_map.MAP_VERSION

    assert run(scenario) == (True, True)


def test_a_caller_cancelled_while_the_line_is_idle_leaves_the_next_ones_running() -> None:
    """Shutdown cancels the poller between two reads, then other callers go on at once."""

    async def scenario(scheduler: BusScheduler) -> list[int]:
        read_once = asyncio.Event()

        async def poller() -> None:
            while True:
                await scheduler.submit(Priority.ROUTINE, read_bay(1))
                read_once.set()

        task = asyncio.ensure_future(poller())
        await read_once.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        results = await asyncio.gather(
            *(scheduler.submit(Priority.ROUTINE, read_bay(bay)) for bay in (7, 8, 9))
        )
        return [status.map_version for status in results]

    assert run(scenario) == [bay_map.MAP_VERSION] * 3


def test_after_a_caller_gives_up_mid_read_the_line_stays_quiet_until_its_reply_is_due() -> None:
    """The abandoned request's reply may still come: nothing is sent into it (RS-485 collides).

    The unlock that came in meanwhile goes out first, but only once the bus's reply
    timeout has passed since the caller gave up: the longest that reply can take. (When
    the worker ran every job, an abandoned job ran on to its reply; a caller's own job
    stops with the caller, and nobody sees when its reply has passed.)
    """

    async def scenario(scheduler: BusScheduler) -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        on_the_wire = asyncio.Event()
        unlock_sent_at: list[float] = []

        async def unlock_6(bus: ModbusBus) -> None:
            unlock_sent_at.append(loop.time())
            await BayBoard(bus, 6).unlock(retries=0)

        def rider_scans() -> None:
            unlocks.append(asyncio.ensure_future(scheduler.submit(Priority.UNLOCK, unlock_6)))
            on_the_wire.set()

        unlocks: list[asyncio.Future[None]] = []
        caller = asyncio.ensure_future(
            scheduler.submit(Priority.ROUTINE, read_bay(2, meanwhile=rider_scans))
        )
        await on_the_wire.wait()
        caller.cancel()
        gave_up_at = loop.time()
        await asyncio.gather(caller, return_exceptions=True)
        await unlocks[0]
        return unlock_sent_at[0] - gave_up_at, scheduler.bus.timeout_s

    quiet, reply_timeout = run(scenario)
    assert quiet >= reply_timeout
