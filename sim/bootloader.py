"""A bay board's bootloader, as the simulator models it (protocol/firmware_map.py).

It is deliberately strict, like a real one should be: a chunk at the wrong offset is
refused, a commit hashes the staged bytes, an image that does not boot (fault
``firmware_bad``) or is not confirmed in time is replaced by the previous one, and
the staged bytes survive a power cut so a transfer can resume where it stopped.
Two more faults make the new image misbehave after it booted, so the daemon's
handling of an activated image it cannot confirm can be tried over the bus:
``firmware_hangs`` (CONFIRM or ROLLBACK is never answered: the image hangs, its
watchdog resets the board and the bootloader boots the previous image) and
``firmware_mislabelled`` (the image reports the version it replaced, so the daemon
rolls it back).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field

from protocol import firmware_map as fw
from protocol.firmware_map import Command, State
from sim.faults import ILLEGAL_ADDRESS, ILLEGAL_VALUE, FaultKind, WriteRefusedError

FIRMWARE_VERSION = 0x0103  # 1.3: what every board runs out of the factory
REBOOT_S = 1.5  # from ACTIVATE (or power back) to answering on the bus again
ACK_S = 0.05  # a board acknowledges ACTIVATE / ROLLBACK before it resets
CONFIRM_WINDOW_S = 30.0  # a new image not confirmed by then is rolled back
#: A hung image (fault ``firmware_hangs``) is reset by the board's watchdog after this long;
#: longer than the daemon's bounded CONFIRM tries, so they all go unanswered
WATCHDOG_S = 4.0


@dataclass(slots=True)
class Bootloader:
    """One board's firmware slots and transfer state."""

    active_version: int = FIRMWARE_VERSION
    previous_version: int = 0
    state: State = State.IDLE
    header_regs: list[int] = field(default_factory=list)
    header: fw.Header | None = None
    staged: bytearray = field(default_factory=bytearray)
    reboot_from: float = float("-inf")
    reboot_until: float = float("-inf")
    confirm_deadline: float | None = None
    booting_bad_image: bool = False  # the image being booted will not come up
    next_image_bad: bool = False  # fault firmware_bad: the next activation fails
    next_image_hangs: bool = False  # fault firmware_hangs: the next image hangs at CONFIRM
    next_image_mislabelled: bool = False  # fault firmware_mislabelled
    image_hangs: bool = False  # the image pending confirmation hangs at CONFIRM / ROLLBACK
    powered: bool = True
    bytes_received: int = 0  # over the bus, all transfers: a resume shows as less than 2x
    activations: int = 0

    def set_faults(self, faults: Collection[FaultKind]) -> None:
        """Arm (or disarm) the faults that act on the next activated image, as injected."""
        self.next_image_bad = FaultKind.FIRMWARE_BAD in faults
        self.next_image_hangs = FaultKind.FIRMWARE_HANGS in faults
        self.next_image_mislabelled = FaultKind.FIRMWARE_MISLABELLED in faults

    def silent(self, now: float) -> bool:
        """Rebooting or without power: nothing answers."""
        return not self.powered or self.reboot_from <= now < self.reboot_until

    def tick(self, now: float) -> None:
        """Finish a reboot; roll back an image that was not confirmed in time."""
        if self.booting_bad_image and now >= self.reboot_until:
            # the new image never came up: the bootloader's watchdog restores the old one
            self.booting_bad_image = False
            self.active_version, self.previous_version = self.previous_version, 0
            self.state = State.ROLLED_BACK
            self._reboot(now, ack=False)
        if (
            self.state is State.PENDING_CONFIRM
            and self.confirm_deadline is not None
            and now >= self.confirm_deadline
        ):
            self._revert(now)

    def power(self, *, on: bool, now: float) -> None:
        """A power cut keeps the flash (staged bytes); power back means a reboot."""
        if on and not self.powered:
            self._reboot(now, ack=False)
        self.powered = on

    def status(self) -> fw.Status:
        """The bootloader status block."""
        header = self.header
        return fw.Status(
            state=self.state,
            received=len(self.staged),
            staged_version=header.version if header else 0,
            previous_version=self.previous_version,
            board_type=fw.BAY_BOARD_TYPE,
            staged_sha256=header.sha256 if header else b"",
        )

    def write(self, now: float, address: int, values: list[int]) -> None:
        """A write into the bootloader window, or WriteRefusedError."""
        if address == fw.HEADER_START:
            if len(values) != fw.HEADER_COUNT:
                raise WriteRefusedError(ILLEGAL_VALUE, "the header is written in one piece")
            self.header_regs = list(values)
        elif address == fw.CHUNK_START:
            self._chunk(values)
        elif address == fw.COMMAND_REG and len(values) == 1:
            self._command(now, values[0])
        else:
            raise WriteRefusedError(ILLEGAL_ADDRESS, f"no bootloader register at {address}")

    def _chunk(self, values: list[int]) -> None:
        if self.state is not State.RECEIVING or self.header is None:
            raise WriteRefusedError(ILLEGAL_VALUE, "not receiving: BEGIN first")
        try:
            offset, data = fw.decode_chunk(values)
        except ValueError as exc:
            raise WriteRefusedError(ILLEGAL_VALUE, str(exc)) from None
        if offset != len(self.staged):
            raise WriteRefusedError(ILLEGAL_VALUE, f"expected offset {len(self.staged)}")
        if offset + len(data) > self.header.size:
            raise WriteRefusedError(ILLEGAL_VALUE, "chunk beyond the image's size")
        self.staged += data
        self.bytes_received += len(data)

    def _command(self, now: float, value: int) -> None:
        try:
            command = Command(value)
        except ValueError:
            raise WriteRefusedError(ILLEGAL_VALUE, f"unknown bootloader command {value}") from None
        if command is Command.BEGIN:
            self._begin()
        elif command is Command.COMMIT:
            self._commit()
        elif command is Command.ACTIVATE:
            self._activate(now)
        elif command in (Command.CONFIRM, Command.ROLLBACK) and self.image_hangs:
            if self.state is not State.PENDING_CONFIRM:
                raise WriteRefusedError(ILLEGAL_VALUE, "no new image to confirm or roll back")
            self._hang(now)
        elif command is Command.CONFIRM:
            if self.state is not State.PENDING_CONFIRM:
                raise WriteRefusedError(ILLEGAL_VALUE, "nothing to confirm")
            self.state = State.IDLE
            self.confirm_deadline = None
            self.header, self.staged = None, bytearray()
        elif command is Command.ROLLBACK:
            if self.state is not State.PENDING_CONFIRM:
                raise WriteRefusedError(ILLEGAL_VALUE, "no new image to roll back")
            self._revert(now)
        else:  # ABORT
            self.state = State.IDLE
            self.header, self.staged = None, bytearray()

    def _begin(self) -> None:
        try:
            header = fw.Header.decode(self.header_regs)
        except ValueError:
            raise WriteRefusedError(ILLEGAL_VALUE, "write the header before BEGIN") from None
        if header.board_type != fw.BAY_BOARD_TYPE:
            raise WriteRefusedError(ILLEGAL_VALUE, "image is for another board type")
        if not 0 < header.size <= fw.MAX_IMAGE_BYTES:
            raise WriteRefusedError(ILLEGAL_VALUE, "image does not fit the staging flash")
        same = self.header is not None and self.header.sha256 == header.sha256
        if same and self.state in (State.RECEIVING, State.VERIFIED, State.VERIFY_FAILED):
            self.state = State.RECEIVING  # resume: the staged bytes are still in flash
            return
        self.header, self.staged, self.state = header, bytearray(), State.RECEIVING

    def _commit(self) -> None:
        header = self.header
        if self.state is not State.RECEIVING or header is None:
            raise WriteRefusedError(ILLEGAL_VALUE, "nothing staged to commit")
        complete = len(self.staged) == header.size
        good = complete and hashlib.sha256(self.staged).digest() == header.sha256
        self.state = State.VERIFIED if good else State.VERIFY_FAILED

    def _activate(self, now: float) -> None:
        if self.state is not State.VERIFIED or self.header is None:
            raise WriteRefusedError(ILLEGAL_VALUE, "only a verified image can be activated")
        self.activations += 1
        self.previous_version, self.active_version = self.active_version, self.header.version
        if self.next_image_mislabelled:  # the build still says the version it replaces
            self.next_image_mislabelled = False
            self.active_version = self.previous_version
        self.image_hangs, self.next_image_hangs = self.next_image_hangs, False
        self._reboot(now, ack=True)
        if self.next_image_bad:
            self.next_image_bad = False
            self.booting_bad_image = True
            self.state = State.IDLE
            return
        self.state = State.PENDING_CONFIRM
        self.confirm_deadline = self.reboot_until + CONFIRM_WINDOW_S

    def _hang(self, now: float) -> None:
        """The new image hangs on the command: silent at once, so its reply is never sent.

        The watchdog resets the board after ``WATCHDOG_S``; the bootloader, finding the
        image unconfirmed, boots the previous one (``rolled_back``) in a normal reboot.
        The RTU server (``sim/bus_server.py``) drops the reply of a unit silent by the
        time it goes out; the in-process ``DirectClient`` looks only before a request,
        so there the command's reply still comes.
        """
        self.image_hangs = False
        self.active_version, self.previous_version = self.previous_version, 0
        self.state = State.ROLLED_BACK
        self.confirm_deadline = None
        self.reboot_from = now
        self.reboot_until = now + WATCHDOG_S + REBOOT_S

    def _revert(self, now: float) -> None:
        self.active_version, self.previous_version = self.previous_version, 0
        self.state = State.ROLLED_BACK
        self.confirm_deadline = None
        self._reboot(now, ack=True)

    def _reboot(self, now: float, *, ack: bool) -> None:
        self.reboot_from = now + (ACK_S if ack else 0.0)
        self.reboot_until = self.reboot_from + REBOOT_S
