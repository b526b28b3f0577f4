"""The one bus master task: every transaction, scheduled by priority.

DESIGN.md §3.3: safety actions and door unlocks first, the bay in an active swap
next, routine polling last. Callers submit one transaction at a time (the poller
never queues a whole cycle), so an unlock waits at most for the transaction
already on the wire — never for a poll cycle.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from drivers.modbus_bus import ModbusBus

T = TypeVar("T")


class Priority(enum.IntEnum):
    """Lower runs first."""

    SAFETY = 0  # chargers off, contactor open
    UNLOCK = 1  # a rider is waiting for a door
    ACTIVE = 2  # the bays of the running session, and the heartbeat
    ROUTINE = 3  # the poll cycle, charger settings, the meter
    BULK = 4  # firmware chunks: only the wire time polling leaves (docs/firmware.md)


Job = Callable[[ModbusBus], Awaitable[Any]]


class BusScheduler:
    """A priority queue in front of the bus, drained by one worker.

    The queue is a plain heap with one wake-up future rather than an
    ``asyncio.PriorityQueue``: only the worker ever takes from it. After each job the
    worker yields once before it looks for the next: the caller whose result was just
    delivered runs in that same loop iteration and usually submits its next transaction
    (the poller reads bay after bay), so the worker finds it at once instead of going to
    sleep and being woken one event-loop iteration later.
    """

    def __init__(self, bus: ModbusBus) -> None:
        self.bus = bus
        self._queue: list[tuple[int, int, Job, asyncio.Future[Any]]] = []
        self._order = itertools.count()
        self._wakeup: asyncio.Future[None] | None = None

    async def submit(self, priority: Priority, job: Callable[[ModbusBus], Awaitable[T]]) -> T:
        """Run ``job`` on the bus when its turn comes; return its result or raise its error."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (int(priority), next(self._order), job, future))
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        return await future

    def waiting(self, priority: Priority) -> bool:
        """Whether a job of ``priority`` is queued: the poller stretches its pacing for bulk."""
        return any(queued[0] == priority and not queued[3].done() for queued in self._queue)

    async def run(self) -> None:
        """Drain the queue forever (the supervised bus-master task)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or self._queue[0][0] == Priority.BULK:
                # let the caller just answered submit its next job: the poller's next read
                # must not lose the race to a firmware chunk that was already waiting
                await asyncio.sleep(0)
            while not self._queue:
                self._wakeup = loop.create_future()
                await self._wakeup
            _priority, _order, job, future = heapq.heappop(self._queue)
            if future.done():  # the caller gave up (cancelled) while queued
                continue
            try:
                result = await job(self.bus)
            except Exception as exc:  # noqa: BLE001 - delivered to the caller, who knows the unit
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)
