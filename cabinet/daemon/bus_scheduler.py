"""The one bus master task: every transaction, scheduled by priority.

DESIGN.md §3.3: safety actions and door unlocks first, the bay in an active swap
next, routine polling last. Callers submit one transaction at a time (the poller
never queues a whole cycle), so an unlock waits at most for the transaction
already on the wire — never for a poll cycle.

Bulk work (firmware chunks, ``Priority.BULK``) goes last, and only while the poller
lends it the line (``lend_to_bulk``): between two poll cycles, up to the moment the
next cycle is due. A bulk job starts only if it is expected to end by then, so the
next cycle's first read never waits for a chunk on the wire, and every bay keeps its
once-a-second read however long the transfer is (docs/firmware.md, "Sharing the line").
The rest of a lend too short for a whole job is not left idle: a job may still start
there, told what share of a whole job's time it has (``bulk_share``), and fits itself
to it (a shorter image chunk).

One job is on the bus at a time, whoever runs it. Mostly the worker does; but a job
submitted while the line is idle and nothing is queued is run by the caller itself
(``submit``'s fast path): nothing could go before it, and the poller's read then costs
no hand-over to the worker and back (measured, issue 16: bench/daemon_cycle.py). Jobs
submitted meanwhile queue as usual and the worker takes them, by priority, as soon as
that job is off the line: an unlock still waits only for the transaction on the wire.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from drivers.modbus_bus import ModbusBus

T = TypeVar("T")

#: Bulk jobs whose length predicts the next one's: a chunk is as long as the last few
#: (the same frame size), and one slow job (a CPU wait) is forgotten after this many.
BULK_JOBS_REMEMBERED = 8
#: The least share of a whole bulk job's time worth a shortened one at the end of a lend:
#: a chunk's frame overhead (23 of its 263 bytes, the gaps, the turnaround) on a few
#: bytes of image would cost more line than it moves
BULK_MIN_SHARE = 0.25


class Priority(enum.IntEnum):
    """Lower runs first."""

    SAFETY = 0  # chargers off, contactor open
    UNLOCK = 1  # a rider is waiting for a door
    ACTIVE = 2  # the bays of the running session, and the heartbeat
    ROUTINE = 3  # the poll cycle, charger settings, the meter
    BULK = 4  # firmware chunks: only the wire time polling lends (docs/firmware.md)


Job = Callable[[ModbusBus], Awaitable[Any]]


class BusScheduler:
    """A priority queue in front of the bus, drained by one worker.

    The queue is a plain heap with one wake-up future rather than an
    ``asyncio.PriorityQueue``: only the worker ever takes from it. After each job the
    worker yields once before it looks for the next: the caller whose result was just
    delivered runs in that same loop iteration and usually submits its next transaction
    (the poller reads bay after bay), so the worker finds it at once instead of going to
    sleep and being woken one event-loop iteration later (or, with nothing else queued,
    the caller runs it itself: ``submit``).
    """

    def __init__(self, bus: ModbusBus, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self._clock = clock
        self._queue: list[tuple[int, int, Job, asyncio.Future[Any]]] = []
        self._order = itertools.count()
        self._wakeup: asyncio.Future[None] | None = None
        #: a job is on the bus (the worker's or a caller's own): no other may start
        self._on_the_wire = False
        #: until when bulk jobs may start; None until a poller first paces them (a
        #: scheduler with no poller, as in a bench or a test, runs bulk whenever it is free)
        self._bulk_until: float | None = None
        #: the first bulk job after a lend always runs: a transfer moves on every cycle
        #: even on a line so slow that the cycle leaves no room (9600 baud)
        self._bulk_started_since_lend = False
        self._bulk_lengths: collections.deque[float] = collections.deque(
            maxlen=BULK_JOBS_REMEMBERED
        )
        #: the bulk job on the wire fits this share of a whole one's time; None: whole
        self._bulk_share: float | None = None
        self._lend_given_back = asyncio.Event()

    async def submit(self, priority: Priority, job: Callable[[ModbusBus], Awaitable[T]]) -> T:
        """Run ``job`` on the bus when its turn comes; return its result or raise its error.

        Its turn is now if no job is on the bus and none is queued: the caller runs it
        itself, and anything submitted meanwhile queues behind it for the worker. Bulk
        jobs always queue: only the worker knows whether the lend has room for one.
        """
        if not self._queue and not self._on_the_wire and priority != Priority.BULK:
            self._on_the_wire = True
            try:
                result = await job(self.bus)
            except asyncio.CancelledError:
                # The caller gave up (shutdown, a technician's Ctrl-C) with its request
                # perhaps on the wire; the bus's lock went with the job's ``async with``.
                # The reply may still be coming, and a request sent into it collides on
                # RS-485: the line stays taken for the reply timeout, the longest that
                # reply can take (the worker used to run such a job on to its end).
                asyncio.get_running_loop().call_later(self.bus.timeout_s, self._line_free)
                raise
            except BaseException:
                self._line_free()
                raise
            self._line_free()
            return result
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (int(priority), next(self._order), job, future))
        self._wake()
        return await future

    def waiting(self, priority: Priority) -> bool:
        """Whether a job of ``priority`` is queued: the poller stretches its pacing for bulk."""
        return any(queued[0] == priority and not queued[3].done() for queued in self._queue)

    def bulk_share(self) -> float | None:
        """The share of a whole bulk job's time the bulk job now running may take.

        None: a whole job (it fits the lend, nobody lends, or it is the lend's first and
        the lend has no room even for a shortened one: the transfer still moves on).
        A number (``BULK_MIN_SHARE`` to 1): the job starts in the last part of a lend too
        short for a whole one and must fit itself to it, so the lend's rest goes to the
        transfer instead of to an early poll cycle (docs/firmware.md, "Sharing the line").
        """
        return self._bulk_share

    def lend_to_bulk(self, for_s: float) -> None:
        """Let bulk jobs use the line for the next ``for_s`` seconds, then hold them.

        The poller calls this after each cycle with the time until its next one. Bulk
        jobs start while one more is expected to end within the lend (the longest of
        the last few bulk jobs), then wait for the next lend; anything of higher
        priority still goes first, between any two of them.
        """
        self._bulk_until = self._clock() + for_s
        self._bulk_started_since_lend = False
        self._lend_given_back.clear()
        self._wake()

    async def lend_given_back(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for bulk work to give the lent line back; whether it has.

        It does when its next job would not end within the lend, or when it has no next
        job (the transfer's last chunk is out): the poller then starts its next cycle at
        once rather than leave the rest of the lend idle (at 19200 baud that rest is up to
        a chunk, 0.16 s a cycle). A lend no bulk job used is never given back, so a poller
        whose every call fails at once still waits out its minimum cycle.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lend_given_back.wait(), timeout_s)
        return self._lend_given_back.is_set()

    def _line_free(self) -> None:
        """A caller's own job is off the line: the worker takes what queued meanwhile."""
        self._on_the_wire = False
        if self._queue:
            self._wake()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _ready(self) -> bool:
        """Whether the head of the queue may go on the wire now (cancelled jobs dropped)."""
        while self._queue and self._queue[0][3].done():  # the caller gave up while queued
            heapq.heappop(self._queue)
        if not self._queue:
            if self._bulk_started_since_lend:  # bulk work used the lend and has no more now
                self._lend_given_back.set()
            return False
        if self._on_the_wire:  # a caller's own job: its end wakes the worker
            return False
        self._bulk_share = None
        if self._queue[0][0] != Priority.BULK or self._bulk_until is None:
            return True
        expected = max(self._bulk_lengths, default=0.0)
        room = self._bulk_until - self._clock()
        if expected <= room:
            return True
        if expected > 0 and room >= BULK_MIN_SHARE * expected:
            self._bulk_share = room / expected  # a shortened job fills the rest
            return True
        if not self._bulk_started_since_lend:  # no room: one whole job all the same
            return True
        self._lend_given_back.set()
        return False

    async def run(self) -> None:
        """Drain the queue forever (the supervised bus-master task)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or self._queue[0][0] == Priority.BULK:
                # let the caller just answered submit its next job: the poller's next read
                # must not lose the race to a firmware chunk that was already waiting
                await asyncio.sleep(0)
            while not self._ready():
                self._wakeup = loop.create_future()
                await self._wakeup
            priority, _order, job, future = heapq.heappop(self._queue)
            bulk = priority == Priority.BULK
            if bulk:
                self._bulk_started_since_lend = True
            started = self._clock()
            self._on_the_wire = True
            try:
                result = await job(self.bus)
            except Exception as exc:  # noqa: BLE001 - delivered to the caller, who knows the unit
                if not future.done():
                    future.set_exception(exc)
            else:
                # only whole jobs that went through: a timed-out or shortened one says
                # nothing of the next whole one
                if bulk and self._bulk_share is None:
                    self._bulk_lengths.append(self._clock() - started)
                if not future.done():
                    future.set_result(result)
            finally:
                self._on_the_wire = False
                self._bulk_share = None
