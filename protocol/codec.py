"""Encoding of scalar values into 16-bit Modbus registers and back.

Every multi-register value is big-endian with the high word first, the order used
by common DIN-rail meters, so one set of helpers serves all our boards.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence
from typing import TypeVar

from protocol.errors import RegisterBlockError

U16_MAX = 0xFFFF

FlagT = TypeVar("FlagT", bound=enum.IntFlag)


def u16(value: int) -> int:
    """Clamp an unsigned quantity into one register (saturate, never wrap)."""
    return max(0, min(U16_MAX, value))


def s16_to_reg(value: int) -> int:
    """Encode a signed quantity as two's complement, saturating at the s16 range."""
    value = max(-0x8000, min(0x7FFF, value))
    return value & U16_MAX


def reg_to_s16(reg: int) -> int:
    """Decode a two's complement register."""
    return reg - 0x10000 if reg & 0x8000 else reg


def scaled_to_reg(value: float, scale: float, *, signed: bool = False) -> int:
    """Encode a physical value with a fixed-point scale (e.g. 0.1 degC per count)."""
    counts = round(value / scale) if math.isfinite(value) else 0
    return s16_to_reg(counts) if signed else u16(counts)


def reg_to_scaled(reg: int, scale: float, *, signed: bool = False) -> float:
    """Decode a fixed-point register into its physical value."""
    counts = reg_to_s16(reg) if signed else reg
    return round(counts * scale, 6)


def float32_to_regs(value: float) -> tuple[int, int]:
    """Encode an IEEE-754 float32 into two registers, high word first."""
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return hi, lo


def regs_to_float32(hi: int, lo: int) -> float:
    """Decode two registers (high word first) into a float32."""
    (value,) = struct.unpack(">f", struct.pack(">HH", hi, lo))
    return float(value)


def ascii_to_regs(text: str, n_regs: int) -> list[int]:
    """Encode printable ASCII into a fixed register field, NUL padded, two chars a register."""
    raw = text.encode("ascii")
    if len(raw) > 2 * n_regs:
        raise ValueError(f"{text!r} does not fit in {n_regs} registers")
    raw = raw.ljust(2 * n_regs, b"\0")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def regs_to_ascii(regs: Sequence[int]) -> str:
    """Decode a NUL-padded ASCII field; non-printable content is a block error."""
    raw = b"".join(r.to_bytes(2, "big") for r in regs).rstrip(b"\0")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise RegisterBlockError(f"text field holds non-ASCII bytes {raw!r}") from exc
    if "\0" in text or not text.isprintable():
        raise RegisterBlockError(f"text field holds non-printable bytes {raw!r}")
    return text


def expect_length(regs: Sequence[int], length: int, what: str) -> None:
    """Refuse a block whose length is not the map's, before any field is read."""
    if len(regs) != length:
        raise RegisterBlockError(f"{what}: expected {length} registers, got {len(regs)}")
    if any(not 0 <= r <= U16_MAX for r in regs):
        raise RegisterBlockError(f"{what}: register value outside 0..65535")


def decode_flags(kind: type[FlagT], raw: int, what: str) -> FlagT:
    """Decode a bit field, refusing bits the map does not define.

    An undefined bit means the board speaks another map (or the frame is garbage),
    so the whole block is rejected rather than half-understood.
    """
    unknown = raw & ~sum(int(member) for member in kind)
    if unknown:
        raise RegisterBlockError(f"{what}: undefined bits 0x{unknown:04x} set")
    return kind(raw)
