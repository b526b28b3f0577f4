"""Register map of the cabinet board: smoke, cabinet temperature, fan, main contactor, mains.

Same layout rules as the bay board: one FC04 status block from 0, commands as
holding registers from 100. The main contactor cuts power to every charger, so
it is the daemon's hard stop on smoke.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.codec import decode_flags, expect_length, reg_to_scaled, scaled_to_reg, u16
from protocol.errors import UnknownMapVersionError

MAP_VERSION = 1
SUPPORTED_MAP_VERSIONS = frozenset({MAP_VERSION})
TEMP_SCALE = 0.1


class StatusReg(enum.IntEnum):
    """Input-register addresses of the cabinet status block (FC04)."""

    MAP_VERSION = 0
    FIRMWARE_VERSION = 1
    BOARD_FAULTS = 2
    IO_FLAGS = 3
    CABINET_TEMP = 4


STATUS_START = 0
STATUS_COUNT = 5


class CommandReg(enum.IntEnum):
    """Holding-register addresses of the cabinet board."""

    FAN = 100
    MAIN_CONTACTOR = 101  # powers up open: no charger is live until the daemon says so


COMMAND_START = 100
COMMAND_COUNT = 2


class IoFlag(enum.IntFlag):
    """Bits of the cabinet board's IO_FLAGS."""

    SMOKE = 1 << 0
    MAINS_PRESENT = 1 << 1
    SERVICE_DOOR_CLOSED = 1 << 2
    FAN_ON = 1 << 3
    CONTACTOR_CLOSED = 1 << 4


class BoardFault(enum.IntFlag):
    """Bits of the cabinet board's BOARD_FAULTS."""

    SMOKE_SENSOR = 1 << 0
    TEMP_SENSOR = 1 << 1
    FAN_STALLED = 1 << 2


@dataclass(frozen=True, slots=True)
class CabinetStatus:
    """One decoded status block of the cabinet board."""

    map_version: int
    firmware_version: int
    board_faults: BoardFault
    io: IoFlag
    cabinet_temp_c: float

    @property
    def smoke(self) -> bool:
        """Whether the smoke detector is tripped."""
        return IoFlag.SMOKE in self.io

    @property
    def mains_present(self) -> bool:
        """Whether mains power reaches the chargers' supply."""
        return IoFlag.MAINS_PRESENT in self.io

    @property
    def contactor_closed(self) -> bool:
        """Whether the main charging contactor is closed (chargers powered)."""
        return IoFlag.CONTACTOR_CLOSED in self.io


def encode_status(status: CabinetStatus) -> list[int]:
    """Encode a cabinet status into the board's register image."""
    regs = [0] * STATUS_COUNT
    regs[StatusReg.MAP_VERSION] = u16(status.map_version)
    regs[StatusReg.FIRMWARE_VERSION] = u16(status.firmware_version)
    regs[StatusReg.BOARD_FAULTS] = int(status.board_faults)
    regs[StatusReg.IO_FLAGS] = int(status.io)
    regs[StatusReg.CABINET_TEMP] = scaled_to_reg(status.cabinet_temp_c, TEMP_SCALE, signed=True)
    return regs


def decode_status(regs: Sequence[int]) -> CabinetStatus:
    """Decode a status block read from the cabinet board."""
    expect_length(regs, STATUS_COUNT, "cabinet status block")
    version = regs[StatusReg.MAP_VERSION]
    if version not in SUPPORTED_MAP_VERSIONS:
        raise UnknownMapVersionError(
            f"cabinet board reports register map version {version}; this software drives "
            f"{sorted(SUPPORTED_MAP_VERSIONS)}"
        )
    return CabinetStatus(
        map_version=version,
        firmware_version=regs[StatusReg.FIRMWARE_VERSION],
        board_faults=decode_flags(BoardFault, regs[StatusReg.BOARD_FAULTS], "cabinet faults"),
        io=decode_flags(IoFlag, regs[StatusReg.IO_FLAGS], "cabinet io flags"),
        cabinet_temp_c=reg_to_scaled(regs[StatusReg.CABINET_TEMP], TEMP_SCALE, signed=True),
    )
