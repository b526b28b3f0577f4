"""How a firmware transfer shares the bus with everything else (``BusScheduler``).

Held on the order in which jobs reach the bus, not on the wall clock: a fake bus
records what went on it, and the scheduler's clock is a counter the test moves.
What a user would notice if these broke: a rider's door waiting behind a queue of
image chunks, or a bay's once-a-second read waiting for a chunk that started just
before its cycle was due.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cabinet.daemon.bus_scheduler import BusScheduler, Priority
from drivers.modbus_bus import ModbusBus


class FakeClock:
    """The scheduler's clock: moves only when a job on the 'wire' says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Line:
    """Runs jobs on a scheduler and records their order on the 'wire'."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.scheduler = BusScheduler(ModbusBus.__new__(ModbusBus), clock=self.clock)
        self.sent: list[str] = []

    def job(
        self, name: str, wire_s: float = 0.0, then: Callable[[], None] | None = None
    ) -> Callable[[ModbusBus], Awaitable[str]]:
        async def on_the_wire(_bus: ModbusBus) -> str:
            self.sent.append(name)
            self.clock.now += wire_s
            if then is not None:
                then()
            await asyncio.sleep(0)
            return name

        return on_the_wire


def run(scenario: Callable[[Line], Awaitable[None]]) -> Line:
    line = Line()

    async def main() -> None:
        worker = asyncio.create_task(line.scheduler.run())
        try:
            await asyncio.wait_for(scenario(line), 5)
        finally:
            worker.cancel()

    asyncio.run(main())
    return line


def test_an_unlock_goes_right_after_the_chunk_on_the_wire_not_after_the_queued_ones() -> None:
    async def scenario(line: Line) -> None:
        submit = line.scheduler.submit
        unlock: list[asyncio.Task[Any]] = []

        def rider_scans() -> None:  # while chunk 1 is on the wire
            if not unlock:
                unlock.append(asyncio.ensure_future(submit(Priority.UNLOCK, line.job("unlock"))))

        chunks = [
            asyncio.ensure_future(submit(Priority.BULK, line.job(f"chunk {n}", then=rider_scans)))
            for n in (1, 2, 3)
        ]
        await asyncio.gather(*chunks, *unlock)

    assert run(scenario).sent == ["chunk 1", "unlock", "chunk 2", "chunk 3"]


def test_a_chunk_that_would_outlast_the_lend_waits_and_the_line_is_given_back() -> None:
    """The poller lends 0.22 s: two 0.1 s chunks fit; 0.02 s is too short for any chunk."""
    given_back: list[bool] = []

    async def scenario(line: Line) -> None:
        scheduler = line.scheduler
        scheduler.lend_to_bulk(0.22)
        chunks = [
            asyncio.ensure_future(scheduler.submit(Priority.BULK, line.job(f"chunk {n}", 0.1)))
            for n in (1, 2, 3)
        ]
        given_back.append(await scheduler.lend_given_back(1.0))
        # the next poll cycle: its reads go on the wire before any chunk
        await scheduler.submit(Priority.ROUTINE, line.job("read bay 1", 0.01))
        assert not chunks[2].done()
        scheduler.lend_to_bulk(0.25)
        await asyncio.gather(*chunks)

    line = run(scenario)
    assert given_back == [True]
    assert line.sent == ["chunk 1", "chunk 2", "read bay 1", "chunk 3"]


def test_the_rest_of_a_lend_is_filled_with_a_shortened_chunk() -> None:
    """The poller lends 0.25 s: two whole 0.1 s chunks, then one told it has half the time.

    Before, the 0.05 s left was given back: at 19200 baud up to a chunk of line a cycle
    went to polling more often than once a second instead of to the image.
    """
    shares: list[float | None] = []
    given_back: list[bool] = []

    async def scenario(line: Line) -> None:
        scheduler = line.scheduler

        def chunk(n: int) -> Callable[[ModbusBus], Awaitable[str]]:
            async def fitted(bus: ModbusBus) -> str:
                share = scheduler.bulk_share()
                shares.append(share)
                return await line.job(f"chunk {n}", 0.1 * (share or 1.0))(bus)

            return fitted

        scheduler.lend_to_bulk(0.25)
        chunks = [
            asyncio.ensure_future(scheduler.submit(Priority.BULK, chunk(n))) for n in (1, 2, 3, 4)
        ]
        given_back.append(await scheduler.lend_given_back(1.0))
        await scheduler.submit(Priority.ROUTINE, line.job("read bay 1", 0.01))
        assert not chunks[3].done()
        scheduler.lend_to_bulk(0.25)
        await asyncio.gather(*chunks)

    line = run(scenario)
    assert given_back == [True]
    assert line.sent == ["chunk 1", "chunk 2", "chunk 3", "read bay 1", "chunk 4"]
    assert shares[:2] == [None, None] and shares[3] is None
    assert shares[2] == pytest.approx(0.5)


def test_a_lend_too_short_for_any_chunk_still_moves_the_transfer_on() -> None:
    """At 9600 baud a cycle leaves no room: one chunk a cycle still goes, so it never stalls."""

    async def scenario(line: Line) -> None:
        scheduler = line.scheduler
        await scheduler.submit(Priority.BULK, line.job("chunk 0", 0.3))  # its length is known
        for cycle in (1, 2):
            await scheduler.submit(Priority.ROUTINE, line.job(f"cycle {cycle}", 1.0))
            scheduler.lend_to_bulk(-0.05)  # the cycle overran its period
            await scheduler.submit(Priority.BULK, line.job(f"chunk {cycle}", 0.3))

    assert run(scenario).sent == ["chunk 0", "cycle 1", "chunk 1", "cycle 2", "chunk 2"]


def test_the_line_comes_back_once_the_last_chunk_is_out() -> None:
    """After the transfer's last chunk the poller gets the line back, not at the lend's end."""
    given_back: list[bool] = []

    async def scenario(line: Line) -> None:
        scheduler = line.scheduler
        scheduler.lend_to_bulk(0.8)
        await scheduler.submit(Priority.BULK, line.job("last chunk", 0.1))
        # the lend still has 0.7 s of the scheduler's clock to go: nothing waits that long
        given_back.append(await scheduler.lend_given_back(1.0))
        scheduler.lend_to_bulk(0.8)  # a lend no bulk job uses is never given back
        given_back.append(await scheduler.lend_given_back(0.05))

    run(scenario)
    assert given_back == [True, False]
