"""The bay board's bootloader window: firmware transfer over the same Modbus line.

Theory of operation (bay-board register map version 2 = version 1 + this window):
the daemon writes the image's header (size, version, target board, SHA-256) and
``BEGIN``; the board answers by staging. Chunks of up to 240 bytes follow, each one
FC16 write carrying its byte offset, which must equal what the board has received
so far (so a lost or repeated chunk is caught, never written twice). ``COMMIT`` makes
the board hash what it staged; ``ACTIVATE`` reboots it into the new image, which
must be ``CONFIRM``ed within the board's confirm window or its bootloader reverts to
the previous image by itself. The staged bytes survive a power cut: a ``BEGIN`` with
the same SHA-256 resumes at the received offset instead of starting again.
See docs/firmware.md.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.codec import expect_length, u16

#: Bay-board map version that carries this window (see bay_map.SUPPORTED_MAP_VERSIONS).
FIRMWARE_MAP_VERSION = 2

#: The only board type that takes images over the bus today (the bay board, rev 1).
BAY_BOARD_TYPE = 0x0B01
BOARD_TYPES = {"bay-board": BAY_BOARD_TYPE}

MAX_IMAGE_BYTES = 512 * 1024  # the board's staging flash
CHUNK_DATA_REGS = 120  # with the 3-register chunk header: 123, the FC16 maximum
CHUNK_BYTES = 2 * CHUNK_DATA_REGS
SHA_REGS = 16


class Command(enum.IntEnum):
    """Values of ``COMMAND_REG``."""

    BEGIN = 1
    COMMIT = 2
    ACTIVATE = 3
    CONFIRM = 4
    ABORT = 5
    ROLLBACK = 6


class State(enum.IntEnum):
    """The bootloader's state (``STATUS_START``)."""

    IDLE = 0
    RECEIVING = 1
    VERIFIED = 2
    VERIFY_FAILED = 3
    PENDING_CONFIRM = 4  # running the new image; rolls back unless confirmed
    ROLLED_BACK = 5


COMMAND_REG = 200
HEADER_START = 210  # size (u32), version, board type, SHA-256 (16 registers)
HEADER_COUNT = 4 + SHA_REGS
CHUNK_START = 300  # offset (u32), length in bytes, data (up to 120 registers)
STATUS_START = 400
STATUS_COUNT = 6 + SHA_REGS


def _u32(value: int) -> list[int]:
    return [(value >> 16) & 0xFFFF, value & 0xFFFF]


def _from_u32(hi: int, lo: int) -> int:
    return (hi << 16) | lo


def bytes_to_regs(data: bytes) -> list[int]:
    """Big-endian register pairs; an odd final byte is padded with zero."""
    padded = data + b"\0" * (len(data) % 2)
    return [int.from_bytes(padded[i : i + 2], "big") for i in range(0, len(padded), 2)]


def regs_to_bytes(regs: Sequence[int], length: int) -> bytes:
    """Inverse of ``bytes_to_regs`` for ``length`` bytes."""
    return b"".join(u16(r).to_bytes(2, "big") for r in regs)[:length]


@dataclass(frozen=True, slots=True)
class Header:
    """What ``BEGIN`` is told about the image."""

    size: int
    version: int  # major << 8 | minor, as bay_map.FIRMWARE_VERSION
    board_type: int
    sha256: bytes

    def encode(self) -> list[int]:
        """Registers ``HEADER_START`` .. ``HEADER_START + HEADER_COUNT``."""
        return [*_u32(self.size), self.version, self.board_type, *bytes_to_regs(self.sha256)]

    @classmethod
    def decode(cls, regs: Sequence[int]) -> Header:
        """Parse the header registers."""
        expect_length(regs, HEADER_COUNT, "firmware header")
        return cls(
            _from_u32(regs[0], regs[1]), regs[2], regs[3], regs_to_bytes(regs[4:], 2 * SHA_REGS)
        )


def encode_chunk(offset: int, data: bytes) -> list[int]:
    """One FC16 write at ``CHUNK_START``."""
    if not 0 < len(data) <= CHUNK_BYTES:
        raise ValueError(f"a chunk is 1-{CHUNK_BYTES} bytes")
    return [*_u32(offset), len(data), *bytes_to_regs(data)]


def decode_chunk(regs: Sequence[int]) -> tuple[int, bytes]:
    """The board's side of ``encode_chunk``: (offset, data)."""
    if len(regs) < 4:
        raise ValueError("a chunk write carries offset, length and data")
    offset, length = _from_u32(regs[0], regs[1]), regs[2]
    if not 0 < length <= CHUNK_BYTES or len(regs) - 3 < (length + 1) // 2:
        raise ValueError("chunk length does not match the registers written")
    return offset, regs_to_bytes(regs[3:], length)


@dataclass(frozen=True, slots=True)
class Status:
    """The bootloader status block (FC04 at ``STATUS_START``)."""

    state: State
    received: int
    staged_version: int
    previous_version: int
    board_type: int
    staged_sha256: bytes

    def encode(self) -> list[int]:
        """Registers ``STATUS_START`` .. ``STATUS_START + STATUS_COUNT``."""
        return [
            int(self.state),
            *_u32(self.received),
            self.staged_version,
            self.previous_version,
            self.board_type,
            *bytes_to_regs(self.staged_sha256.ljust(2 * SHA_REGS, b"\0")),
        ]

    @classmethod
    def decode(cls, regs: Sequence[int]) -> Status:
        """Parse the status block; an unknown state is a RegisterBlockError."""
        from protocol.errors import RegisterBlockError  # noqa: PLC0415 - keeps imports minimal

        expect_length(regs, STATUS_COUNT, "firmware status")
        try:
            state = State(regs[0])
        except ValueError:
            raise RegisterBlockError(f"unknown bootloader state {regs[0]}") from None
        return cls(
            state,
            _from_u32(regs[1], regs[2]),
            regs[3],
            regs[4],
            regs[5],
            regs_to_bytes(regs[6:], 2 * SHA_REGS),
        )
