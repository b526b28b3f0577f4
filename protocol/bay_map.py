"""Register map of the bay controller board (Modbus unit ids 1-12).

Theory of operation: everything the daemon polls routinely lives in one block of
input registers starting at 0 (``STATUS_BLOCK``), so a bay costs exactly one
FC04 transaction per poll cycle. Commands are holding registers at 100 and up.
The unlock register only acts on a magic value, so a stray write of 1 (a
mistyped ``bus write``, a bit flip) can never open a door. See docs/hardware.md.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.codec import (
    ascii_to_regs,
    decode_flags,
    expect_length,
    reg_to_scaled,
    regs_to_ascii,
    scaled_to_reg,
    u16,
)
from protocol.errors import RegisterBlockError, UnknownMapVersionError

#: Version of this map, reported by the board in register 0. Bump on any change.
#: Version 2 adds the bootloader window (protocol/firmware_map.py); the status and
#: command registers are those of version 1, so both are driven.
MAP_VERSION = 2
SUPPORTED_MAP_VERSIONS = frozenset({1, MAP_VERSION})

BATTERY_ID_REGS = 8  # 16 ASCII characters: our pack serials are 12, with room to spare


class StatusReg(enum.IntEnum):
    """Input-register addresses of the status block (FC04)."""

    MAP_VERSION = 0
    FIRMWARE_VERSION = 1
    BOARD_FAULTS = 2
    IO_FLAGS = 3
    BAY_TEMP = 4
    CHARGER_VOLTAGE = 5
    CHARGER_CURRENT = 6
    CHARGER_LIMIT = 7
    BATTERY_ID = 8  # .. 15
    SOC = 16
    HEALTH = 17
    PACK_VOLTAGE = 18
    CELL_TEMP = 19
    CYCLE_COUNT = 20
    BMS_FAULTS = 21
    DOOR_OPEN_COUNT = 22


STATUS_START = 0
STATUS_COUNT = 23


class CommandReg(enum.IntEnum):
    """Holding-register addresses the daemon writes (FC06/FC16)."""

    HEARTBEAT = 100
    UNLOCK = 101
    CHARGER_ENABLE = 102
    CHARGER_CURRENT_LIMIT = 103


COMMAND_START = 100
COMMAND_COUNT = 4

#: Writing this to UNLOCK pulses the lock; any other value is refused (ILLEGAL_VALUE).
UNLOCK_MAGIC = 0x55AA
#: A board that hears no heartbeat write for this long stops charging and keeps its door
#: locked; a few poll cycles of margin so one lost frame never trips it.
HEARTBEAT_TIMEOUT_S = 5.0
#: Highest charger current a bay board accepts, in amps (hardware limit of the charger).
MAX_CHARGE_CURRENT_A = 10.0

TEMP_SCALE = 0.1  # degC per count, signed
VOLT_SCALE = 0.01  # V per count
AMP_SCALE = 0.01  # A per count, signed
PERCENT_SCALE = 0.1  # % per count


class IoFlag(enum.IntFlag):
    """Bits of IO_FLAGS: the board's switches and outputs as it sees them now."""

    DOOR_CLOSED = 1 << 0
    LOCK_ENGAGED = 1 << 1
    BATTERY_PRESENT = 1 << 2
    CHARGER_ON = 1 << 3
    BMS_LINK = 1 << 4  # the battery's BMS answers on the bay connector: it is plugged in
    HEARTBEAT_OK = 1 << 5  # cleared while the board is in heartbeat fail-safe


class BoardFault(enum.IntFlag):
    """Bits of BOARD_FAULTS, latched by the board until the condition clears."""

    LOCK_JAMMED = 1 << 0  # an unlock pulse did not release the latch
    DOOR_SENSOR = 1 << 1
    TEMP_SENSOR = 1 << 2
    CHARGER = 1 << 3
    HEARTBEAT_LOST = 1 << 4
    OVER_TEMP = 1 << 5  # the board's own bay-temperature cut-off tripped


class BmsFault(enum.IntFlag):
    """Bits of BMS_FAULTS, passed through from the battery's BMS."""

    OVER_VOLTAGE = 1 << 0
    UNDER_VOLTAGE = 1 << 1
    OVER_CURRENT = 1 << 2
    OVER_TEMP = 1 << 3
    CELL_IMBALANCE = 1 << 4
    INTERNAL = 1 << 5


@dataclass(frozen=True, slots=True)
class BatteryInfo:
    """What the BMS pass-through reports about the plugged battery."""

    battery_id: str
    soc_pct: float
    health_pct: float
    pack_voltage_v: float
    cell_temp_c: float
    cycle_count: int
    faults: BmsFault


@dataclass(frozen=True, slots=True)
class BayStatus:
    """One decoded status block of a bay board.

    ``battery`` is None when no BMS answers on the connector: an empty bay, or a
    battery that is present but unplugged or unidentifiable.
    """

    map_version: int
    firmware_version: int
    board_faults: BoardFault
    io: IoFlag
    bay_temp_c: float
    charger_voltage_v: float
    charger_current_a: float
    charger_limit_a: float
    battery: BatteryInfo | None
    door_open_count: int

    @property
    def door_closed(self) -> bool:
        """Whether the door switch reports the door shut."""
        return IoFlag.DOOR_CLOSED in self.io

    @property
    def locked(self) -> bool:
        """Whether the latch is engaged."""
        return IoFlag.LOCK_ENGAGED in self.io

    @property
    def battery_present(self) -> bool:
        """Whether the presence switch sees a battery, identified or not."""
        return IoFlag.BATTERY_PRESENT in self.io

    @property
    def charging(self) -> bool:
        """Whether the charger output is on."""
        return IoFlag.CHARGER_ON in self.io


def firmware_version_str(raw: int) -> str:
    """Render the packed firmware version (major in the high byte) as technicians read it."""
    return f"{raw >> 8}.{raw & 0xFF}"


def encode_status(status: BayStatus) -> list[int]:
    """Encode a status into the register image the board serves."""
    regs = [0] * STATUS_COUNT
    regs[StatusReg.MAP_VERSION] = u16(status.map_version)
    regs[StatusReg.FIRMWARE_VERSION] = u16(status.firmware_version)
    regs[StatusReg.BOARD_FAULTS] = int(status.board_faults)
    regs[StatusReg.IO_FLAGS] = int(status.io)
    regs[StatusReg.BAY_TEMP] = scaled_to_reg(status.bay_temp_c, TEMP_SCALE, signed=True)
    regs[StatusReg.CHARGER_VOLTAGE] = scaled_to_reg(status.charger_voltage_v, VOLT_SCALE)
    regs[StatusReg.CHARGER_CURRENT] = scaled_to_reg(
        status.charger_current_a, AMP_SCALE, signed=True
    )
    regs[StatusReg.CHARGER_LIMIT] = scaled_to_reg(status.charger_limit_a, AMP_SCALE)
    regs[StatusReg.DOOR_OPEN_COUNT] = u16(status.door_open_count)
    battery = status.battery
    if battery is not None:
        id_regs = ascii_to_regs(battery.battery_id, BATTERY_ID_REGS)
        regs[StatusReg.BATTERY_ID : StatusReg.BATTERY_ID + BATTERY_ID_REGS] = id_regs
        regs[StatusReg.SOC] = scaled_to_reg(battery.soc_pct, PERCENT_SCALE)
        regs[StatusReg.HEALTH] = scaled_to_reg(battery.health_pct, PERCENT_SCALE)
        regs[StatusReg.PACK_VOLTAGE] = scaled_to_reg(battery.pack_voltage_v, VOLT_SCALE)
        regs[StatusReg.CELL_TEMP] = scaled_to_reg(battery.cell_temp_c, TEMP_SCALE, signed=True)
        regs[StatusReg.CYCLE_COUNT] = u16(battery.cycle_count)
        regs[StatusReg.BMS_FAULTS] = int(battery.faults)
    return regs


def decode_status(regs: Sequence[int]) -> BayStatus:
    """Decode a status block read from a bay board.

    The battery fields are trusted only when the BMS link bit is set and an id is
    present: a half-identified battery is reported as ``battery=None``.
    """
    expect_length(regs, STATUS_COUNT, "bay status block")
    version = regs[StatusReg.MAP_VERSION]
    if version not in SUPPORTED_MAP_VERSIONS:
        raise UnknownMapVersionError(
            f"bay board reports register map version {version}; this software drives "
            f"{sorted(SUPPORTED_MAP_VERSIONS)}"
        )
    io = decode_flags(IoFlag, regs[StatusReg.IO_FLAGS], "bay io flags")
    battery: BatteryInfo | None = None
    id_regs = regs[StatusReg.BATTERY_ID : StatusReg.BATTERY_ID + BATTERY_ID_REGS]
    battery_id = regs_to_ascii(id_regs) if IoFlag.BMS_LINK in io else ""
    if battery_id:
        battery = BatteryInfo(
            battery_id=battery_id,
            soc_pct=reg_to_scaled(regs[StatusReg.SOC], PERCENT_SCALE),
            health_pct=reg_to_scaled(regs[StatusReg.HEALTH], PERCENT_SCALE),
            pack_voltage_v=reg_to_scaled(regs[StatusReg.PACK_VOLTAGE], VOLT_SCALE),
            cell_temp_c=reg_to_scaled(regs[StatusReg.CELL_TEMP], TEMP_SCALE, signed=True),
            cycle_count=regs[StatusReg.CYCLE_COUNT],
            faults=decode_flags(BmsFault, regs[StatusReg.BMS_FAULTS], "bms faults"),
        )
        if battery.soc_pct > 100.0 or battery.health_pct > 100.0:
            raise RegisterBlockError("bms reports a percentage above 100")
    return BayStatus(
        map_version=version,
        firmware_version=regs[StatusReg.FIRMWARE_VERSION],
        board_faults=decode_flags(BoardFault, regs[StatusReg.BOARD_FAULTS], "bay board faults"),
        io=io,
        bay_temp_c=reg_to_scaled(regs[StatusReg.BAY_TEMP], TEMP_SCALE, signed=True),
        charger_voltage_v=reg_to_scaled(regs[StatusReg.CHARGER_VOLTAGE], VOLT_SCALE),
        charger_current_a=reg_to_scaled(regs[StatusReg.CHARGER_CURRENT], AMP_SCALE, signed=True),
        charger_limit_a=reg_to_scaled(regs[StatusReg.CHARGER_LIMIT], AMP_SCALE),
        battery=battery,
        door_open_count=regs[StatusReg.DOOR_OPEN_COUNT],
    )


def encode_current_limit(amps: float) -> int:
    """Encode a charger current limit, refusing what the charger cannot do."""
    if not 0.0 <= amps <= MAX_CHARGE_CURRENT_A:
        raise ValueError(f"charger current {amps} A outside 0..{MAX_CHARGE_CURRENT_A} A")
    return scaled_to_reg(amps, AMP_SCALE)
