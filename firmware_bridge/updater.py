"""Flashing one bay board over the bus, through whoever owns the bus.

Every exchange is one ``submit``-ted job, so the daemon's scheduler interleaves the
transfer with polling and puts a rider's unlock ahead of the next chunk: the
cabinet keeps swapping on its other bays while one is flashed. The board is the
source of truth for progress: after any interruption (a lost reply, a power cut)
the updater waits for the board, re-sends ``BEGIN`` with the same SHA-256 and
carries on from the offset the board reports. After ``ACTIVATE`` the board must come
back running the new version with a register map this software drives; only then
is the image ``CONFIRM``ed. Otherwise it is rolled back (the board's own bootloader
also reverts an unconfirmed image by itself). CONFIRM and ROLLBACK are each tried a
few times, the board's status telling whether one took (a lost reply is not a lost
command); a board that still runs the new image unconfirmed after them ends the update
with ``bus`` (``UnconfirmedError``), saying what the board is left running.

A command that restarts the board (ACTIVATE, ROLLBACK) tells the bus in the same bus
job that the board will be silent for its reboot (``ModbusBus.expect_silence``): its
reads fail at once meanwhile instead of timing out, holding the line and getting the
board isolated and reported offline, and the first read after the reboot goes to the
board at once instead of after the bus's re-probe interval.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from drivers.boards import BayBoard
from drivers.modbus_bus import BusError, ExceptionReplyError, ModbusBus
from firmware_bridge.image import FirmwareImage
from protocol import firmware_map as fw
from protocol import rtu_timing
from protocol.bay_map import BayStatus, firmware_version_str
from protocol.errors import CodedError, ProtocolError, UnknownMapVersionError

T = TypeVar("T")
Submit = Callable[[Callable[[ModbusBus], Awaitable[Any]]], Awaitable[Any]]
#: The share of a whole chunk's line time the chunk now starting may take; None: whole
#: (``BusScheduler.bulk_share``: the last part of a lend too short for a whole chunk)
ChunkShare = Callable[[], float | None]

BOARD_WAIT_S = 60.0  # how long a board may stay silent (power cut, reboot) before we give up
POLL_S = 0.5
MAX_RESUMES = 20  # a line so bad that the transfer resumes this often is not worth fighting
#: Chunks queued at once: one on the wire, the next ones ready behind it, so the bus
#: master never waits for this task between two chunks (docs/firmware.md, "Sharing the line")
WRITE_WINDOW = 3
#: Commands after which a bay board restarts (into the new image, or back to the old one).
RESTARTING_COMMANDS = frozenset({fw.Command.ACTIVATE, fw.Command.ROLLBACK})
#: How long a bay board is silent after acknowledging ACTIVATE or ROLLBACK: it resets
#: within 50 ms and answers again 1.5 s later (docs/firmware.md; the simulator models it),
#: plus a margin, so the first read after it finds the board up instead of costing a
#: time-out at the end of its boot. Too short only costs that one time-out.
BOARD_RESTART_S = 1.6
#: Tries of CONFIRM (and of ROLLBACK) before the update gives up on the board: each is
#: the command and a status read, at the bus's own time-out, ``POLL_S`` apart
SETTLE_TRIES = 3
#: A chunk's bytes on the wire besides its image bytes: the FC16 request's own (9), the
#: chunk's offset and length (6 registers' worth) and the 8-byte echo
CHUNK_FRAME_BYTES = rtu_timing.write_multiple_request_bytes(3) + rtu_timing.WRITE_SINGLE_BYTES


def chunk_length(share: float | None) -> int:
    """Image bytes a chunk may carry in ``share`` of a whole chunk's line time.

    A chunk may be 1-240 bytes (docs/firmware.md). Its line time is taken as its frames'
    bytes; the two t3.5 gaps and the board's turnaround do not shrink with it, so a
    shortened chunk may end those few milliseconds after its share (the poller's slack
    covers that). An even count: the data travels in whole registers anyway.
    """
    if share is None:
        return fw.CHUNK_BYTES
    fitting = int(share * (CHUNK_FRAME_BYTES + fw.CHUNK_BYTES)) - CHUNK_FRAME_BYTES
    return max(2, min(fw.CHUNK_BYTES, fitting) // 2 * 2)


class UpdateFailedError(CodedError):
    """The update did not complete; ``reason`` is stable for programs."""


class UnconfirmedError(UpdateFailedError):
    """The new image is activated but neither confirmed nor rolled back (reason ``bus``).

    The board runs it until its bootloader reverts it at the end of its confirm window
    (docs/firmware.md): the bay's service is then for its next reading to decide.
    """


class ChunkWithdrawnError(Exception):
    """A chunk queued behind one that failed: taken back, not sent (the transfer resumes)."""


def _forget(task: asyncio.Task[Any]) -> None:
    """Retrieve a withdrawn chunk's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a transfer is."""

    phase: str  # sending, verifying, activating, confirming
    sent: int
    total: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """A completed update."""

    previous_version: int
    version: int
    duration_s: float
    resumes: int


async def read_status(bus: ModbusBus, unit: int) -> fw.Status:
    """The board's bootloader status block."""
    regs = await bus.read_input(unit, fw.STATUS_START, fw.STATUS_COUNT)
    return fw.Status.decode(regs)


class BayUpdater:
    """One image onto one bay board."""

    def __init__(
        self,
        submit: Submit,
        unit: int,
        image: FirmwareImage,
        *,
        on_progress: Callable[[Progress], Awaitable[None] | None] = lambda _p: None,
        board_wait_s: float = BOARD_WAIT_S,
        submit_chunk: Submit | None = None,
        chunk_share: ChunkShare = lambda: None,
        board_restart_s: float = BOARD_RESTART_S,
    ) -> None:
        self._submit = submit
        self._board_restart_s = board_restart_s
        # the image chunks: the daemon queues them below its polling (Priority.BULK), so
        # the transfer fills the wire polling leaves and never delays a bay's reading
        self._submit_chunk = submit_chunk or submit
        self._chunk_share = chunk_share
        self.unit = unit
        self.image = image
        self._on_progress = on_progress
        self._board_wait_s = board_wait_s
        self.resumes = 0
        self._chunk_failed = False  # a chunk of the current window failed: withdraw the rest
        self._next_byte = 0  # where the next chunk to go on the wire starts
        self._unsent = 0  # chunks queued that have not gone on the wire yet
        self._chunk_order = asyncio.Lock()

    async def run(self, running_version: int) -> Outcome:
        """Transfer, verify, activate, confirm; raise UpdateFailedError on the way."""
        started = time.monotonic()
        await self._transfer()
        await self._progress(
            Progress("verifying", len(self.image.payload), len(self.image.payload))
        )
        try:
            await self._command(fw.Command.COMMIT)
            status = await self._status()
        except (BusError, ProtocolError) as exc:
            # before ACTIVATE the board runs the image it ran: the caller may put the bay
            # back in service (a bus error escaping here was "internal", the bay left out)
            raise UpdateFailedError(
                "bus",
                f"bay {self.unit} did not answer at COMMIT ({exc}); its firmware is unchanged",
            ) from exc
        if status.state is not fw.State.VERIFIED:
            await self._command(fw.Command.ABORT)
            raise UpdateFailedError("verify_failed", "the board's hash of the image did not match")
        await self._progress(
            Progress("activating", len(self.image.payload), len(self.image.payload))
        )
        # the board may reset before its reply is out: its status afterwards tells, not this
        with contextlib.suppress(BusError):
            await self._command(fw.Command.ACTIVATE)
        await self._confirm(running_version)
        return Outcome(
            running_version, self.image.version, time.monotonic() - started, self.resumes
        )

    # -- the transfer ----------------------------------------------------------------------

    async def _transfer(self) -> None:
        total = len(self.image.payload)
        try:
            offset = await self._begin()
        except BusError:  # a reply lost (or a board rebooting) before the first chunk
            offset = await self._resume()
        # the board accepted BEGIN: say where sending starts (0, or a resume's offset)
        await self._progress(Progress("sending", offset, total))
        while offset < total:
            try:
                offset = await self._send_from(offset)
            except (BusError, ChunkWithdrawnError):
                offset = await self._resume()

    async def _send_from(self, offset: int) -> int:
        """Send the chunks from ``offset`` to the end, ``WRITE_WINDOW`` of them queued at once.

        The next chunk is queued while the current one is on the wire, so the bus master
        goes from one to the next without waiting for this task to run; each is still a
        job of its own, so polling and a rider's unlock go first between any two. A chunk
        takes its bytes when it goes on the wire: whole, or fewer in the last part of a
        lend (``chunk_share``). One more is queued while those queued, whole, would not
        reach the end, so none ever starts with nothing left to send. A chunk queued
        behind one that failed is withdrawn when its turn comes, never sent (it would be
        refused: its offset is no longer the board's).
        """
        total = len(self.image.payload)
        self._chunk_failed = False
        self._next_byte, self._unsent = offset, 0
        window: collections.deque[asyncio.Task[int]] = collections.deque()
        try:
            while offset < total:
                while (
                    len(window) < WRITE_WINDOW
                    and self._next_byte + self._unsent * fw.CHUNK_BYTES < total
                ):
                    self._unsent += 1
                    window.append(asyncio.ensure_future(self._write_chunk()))
                offset = await window.popleft()
                await self._progress(Progress("sending", offset, total))
        finally:
            for task in window:
                task.cancel()
                task.add_done_callback(_forget)
        return offset

    async def _begin(self) -> int:
        header = fw.Header(
            size=len(self.image.payload),
            version=self.image.version,
            board_type=self.image.board_type,
            sha256=self.image.sha256,
        )
        await self._write(fw.HEADER_START, header.encode())
        await self._command(fw.Command.BEGIN)
        status = await self._status()
        if status.state is not fw.State.RECEIVING:
            raise UpdateFailedError(
                "board_refused", f"the board is {status.state.name} after BEGIN"
            )
        return status.received

    async def _resume(self) -> int:
        """The board stopped answering (or refused a chunk): wait for it, carry on."""
        self.resumes += 1
        if self.resumes > MAX_RESUMES:
            raise UpdateFailedError("bus", f"gave up after {MAX_RESUMES} interruptions")
        await self._wait_for_board()
        try:
            return await self._begin()
        except BusError:
            return await self._resume()

    async def _wait_for_board(self) -> fw.Status:
        deadline = time.monotonic() + self._board_wait_s
        while True:
            try:
                return await self._status()
            except (BusError, ProtocolError):
                if time.monotonic() > deadline:
                    raise UpdateFailedError(
                        "board_lost", f"bay {self.unit} did not answer for {self._board_wait_s} s"
                    ) from None
                await asyncio.sleep(POLL_S)

    # -- after activation ------------------------------------------------------------------

    async def _confirm(self, running_version: int) -> None:
        deadline = time.monotonic() + self._board_wait_s
        while True:
            await asyncio.sleep(POLL_S)
            try:
                board, status = await self._submit(self._read_back)
            except UnknownMapVersionError as exc:
                await self._roll_back(
                    running_version, f"the new image reports a register map we cannot drive: {exc}"
                )
            except (BusError, ProtocolError):
                if time.monotonic() > deadline:
                    raise UpdateFailedError(
                        "board_lost",
                        f"bay {self.unit} did not come back within {self._board_wait_s:g} s "
                        "after activation",
                    ) from None
                continue
            if status.state is fw.State.ROLLED_BACK:
                raise UpdateFailedError(
                    "rolled_back", "the new image did not boot: the board went back to the old one"
                )
            if status.state is fw.State.PENDING_CONFIRM:
                if board.firmware_version != self.image.version:
                    await self._roll_back(
                        running_version, "the board came back with an unexpected version"
                    )
                total = len(self.image.payload)
                await self._progress(Progress("confirming", total, total))
                await self._settle_confirm(running_version)
                return

    async def _settle_confirm(self, running_version: int) -> None:
        """CONFIRM until the board's status shows it taken, ``SETTLE_TRIES`` at most.

        CONFIRM can be repeated safely: each try is followed by a status read, so a
        CONFIRM whose reply was lost is seen taken and not sent again. A board that
        still holds the image unconfirmed after the last try is left to its bootloader,
        which reverts it at the end of its confirm window (``UnconfirmedError``).
        """
        error: Exception | None = None
        for attempt in range(SETTLE_TRIES):
            if attempt:
                await asyncio.sleep(POLL_S)
            try:
                await self._send(fw.Command.CONFIRM)
            except BusError as exc:  # no reply, or refused: the status read tells
                error = exc
            try:
                status = await self._status()
            except (BusError, ProtocolError) as exc:
                error = exc
                continue
            if status.state is fw.State.IDLE:
                return
            if status.state is fw.State.ROLLED_BACK:
                raise UpdateFailedError(
                    "rolled_back", "the board went back to the old image before it was confirmed"
                )
        raise UnconfirmedError(
            "bus",
            f"new image {self.image.version_str} activated but not confirmed (bay {self.unit}: "
            f"{error or 'CONFIRM not taken'}); {self._reverts_to(running_version)}",
        )

    async def _roll_back(self, running_version: int, why: str) -> NoReturn:
        """ROLLBACK until the board comes back with the old image, ``SETTLE_TRIES`` at most.

        Each try waits for the board through its reboot (``board_lost`` if it never
        answers again); a board still holding the new image unconfirmed is asked again.
        """
        error: Exception | None = None
        for attempt in range(SETTLE_TRIES):
            if attempt:
                await asyncio.sleep(POLL_S)
            try:
                await self._send(fw.Command.ROLLBACK)
            except BusError as exc:  # no reply (it may have reset first), or refused
                error = exc
            status = await self._wait_for_board()
            if status.state is fw.State.ROLLED_BACK:
                raise UpdateFailedError("rolled_back", why)
        raise UnconfirmedError(
            "bus",
            f"new image {self.image.version_str} activated but not rolled back ({why}; "
            f"bay {self.unit}: {error or 'ROLLBACK not taken'}); "
            f"{self._reverts_to(running_version)}",
        )

    def _reverts_to(self, running_version: int) -> str:
        old = firmware_version_str(running_version)
        return f"the board rolls back to {old} by itself at the end of its confirm window"

    async def _read_back(self, bus: ModbusBus) -> tuple[BayStatus, fw.Status]:
        """The rebooted board's status block and bootloader status, in one bus slot."""
        board = await BayBoard(bus, self.unit).read_status()
        return board, await read_status(bus, self.unit)

    # -- exchanges -------------------------------------------------------------------------

    async def _status(self) -> fw.Status:
        result: fw.Status = await self._submit(lambda bus: read_status(bus, self.unit))
        return result

    async def _progress(self, progress: Progress) -> None:
        result = self._on_progress(progress)
        if result is not None:
            await result

    async def _write(self, address: int, regs: list[int]) -> None:
        await self._submit(lambda bus: bus.write_registers(self.unit, address, regs))

    async def _write_chunk(self) -> int:
        """The next chunk, sized when it goes on the wire; the offset it ends at."""

        async def write(bus: ModbusBus) -> int:
            # the lock is free under the daemon's bus master, which runs jobs one after the
            # other; a caller that runs jobs as they come gets the same order through it
            async with self._chunk_order:
                self._unsent -= 1
                if self._chunk_failed:  # the chunk before this one failed
                    raise ChunkWithdrawnError("an earlier chunk of this window failed")
                start = self._next_byte
                data = self.image.payload[start : start + chunk_length(self._chunk_share())]
                end = self._next_byte = start + len(data)
                try:
                    await bus.write_registers(
                        self.unit, fw.CHUNK_START, fw.encode_chunk(start, data)
                    )
                except BaseException:
                    self._chunk_failed = True
                    raise
                return end

        sent: int = await self._submit_chunk(write)
        return sent

    async def _command(self, command: fw.Command) -> None:
        """``_send`` where a refusal ends the update (``board_refused``)."""
        try:
            await self._send(command)
        except ExceptionReplyError as exc:
            raise UpdateFailedError("board_refused", f"{command.name} refused: {exc}") from exc

    async def _send(self, command: fw.Command) -> None:
        """One bootloader command; a restarting one announces the board's reboot to the bus."""
        restarts = command in RESTARTING_COMMANDS
        unit = self.unit

        async def send(bus: ModbusBus) -> None:
            try:
                await bus.write_register(unit, fw.COMMAND_REG, command)
            except ExceptionReplyError:
                raise  # refused: the board keeps running
            except BusError:
                if restarts:  # it may reset before its reply is out
                    bus.expect_silence(unit, self._board_restart_s)
                raise
            if restarts:  # in the same bus job: no poll of the rebooting board in between
                bus.expect_silence(unit, self._board_restart_s)

        await self._submit(send)
