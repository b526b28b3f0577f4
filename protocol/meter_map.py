"""Register map of the energy meter, after the public map of common DIN-rail meters.

Eastron SDM-series layout: float32 input registers, high word first, at the
addresses those meters use, so a real meter of that family drops in. The
instantaneous values sit in one block at 0x0000; total energy lives far away at
0x0156, so a meter reading is two transactions (the meter is polled rarely).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.codec import expect_length, float32_to_regs, regs_to_float32
from protocol.errors import RegisterBlockError


class MeterReg(enum.IntEnum):
    """Input-register addresses (FC04) of float32 values."""

    VOLTAGE = 0x0000
    CURRENT = 0x0006
    ACTIVE_POWER = 0x000C
    TOTAL_ENERGY = 0x0156


INSTANT_START = 0x0000
INSTANT_COUNT = 14  # voltage .. active power, including the meter's unused words between
ENERGY_START = 0x0156
ENERGY_COUNT = 2


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One reading of the meter."""

    voltage_v: float
    current_a: float
    power_w: float
    energy_kwh: float


def encode_instant(reading: MeterReading) -> list[int]:
    """Encode the instantaneous block (voltage, current, power)."""
    regs = [0] * INSTANT_COUNT
    for reg, value in (
        (MeterReg.VOLTAGE, reading.voltage_v),
        (MeterReg.CURRENT, reading.current_a),
        (MeterReg.ACTIVE_POWER, reading.power_w),
    ):
        regs[reg - INSTANT_START : reg - INSTANT_START + 2] = float32_to_regs(value)
    return regs


def encode_energy(reading: MeterReading) -> list[int]:
    """Encode the total-energy block."""
    return list(float32_to_regs(reading.energy_kwh))


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise RegisterBlockError(f"meter reports a non-finite {what}")
    return value


def decode(instant: Sequence[int], energy: Sequence[int]) -> MeterReading:
    """Decode the two blocks of a meter reading; NaN or infinity is a block error."""
    expect_length(instant, INSTANT_COUNT, "meter instant block")
    expect_length(energy, ENERGY_COUNT, "meter energy block")

    def at(reg: MeterReg) -> float:
        offset = reg - INSTANT_START
        return regs_to_float32(instant[offset], instant[offset + 1])

    return MeterReading(
        voltage_v=_finite(at(MeterReg.VOLTAGE), "voltage"),
        current_a=_finite(at(MeterReg.CURRENT), "current"),
        power_w=_finite(at(MeterReg.ACTIVE_POWER), "power"),
        energy_kwh=_finite(regs_to_float32(energy[0], energy[1]), "energy"),
    )
