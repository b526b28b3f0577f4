"""The catalogue of faults the simulator can inject, and where each one applies."""

from __future__ import annotations

import enum


class FaultKind(enum.StrEnum):
    """What fate can do to the cabinet (``cabinet sim ctl fault KIND``)."""

    SILENT = "silent"  # the unit stops answering on the bus
    CRC = "crc"  # the unit's replies arrive with a corrupted CRC
    LOCK_STUCK = "lock_stuck"  # unlock pulses do not release the latch
    DOOR_SENSOR_STUCK = "door_sensor_stuck"  # the door switch keeps reporting its last value
    OVERHEAT = "overheat"  # the battery in the bay heats towards 65 degC
    THERMAL_RUNAWAY = "thermal_runaway"  # the battery's temperature climbs several degC/s
    BMS_FAULT = "bms_fault"  # the battery's BMS reports an internal fault
    SMOKE = "smoke"  # the cabinet's smoke detector trips
    MAINS_LOSS = "mains_loss"  # mains power disappears: chargers and meter go dead
    POWER_CUT = "power_cut"  # the bay board loses power (flash kept); back on heal
    FIRMWARE_BAD = "firmware_bad"  # the next image activated on the bay will not boot
    #: the next image activated on the bay hangs when told to CONFIRM or ROLLBACK: no reply,
    #: silent until its watchdog resets it and the bootloader boots the previous image
    FIRMWARE_HANGS = "firmware_hangs"
    #: the next image activated on the bay reports the version it replaced (a build whose
    #: version was not bumped): the daemon rolls it back
    FIRMWARE_MISLABELLED = "firmware_mislabelled"
    CHARGER_STUCK = "charger_stuck"  # the board acknowledges charger-off writes, ignores them
    CONTACTOR_STUCK = "contactor_stuck"  # the cabinet board acknowledges "open", stays closed
    LOCK_FAILURE = "lock_failure"  # the lock driver is broken: unlocks get 0x04 device failure
    BOARD_FAILURE = "board_failure"  # the board answers every request with 0x04 device failure
    #: the board ignores broadcast frames (unit 0), so the heartbeat broadcast never reaches
    #: it: a transparent gateway without its line speed, noise, a firmware quirk
    BROADCAST_DEAF = "broadcast_deaf"


#: Faults that need ``--bay`` (or, for bus faults, ``--unit``).
UNIT_FAULTS = frozenset({FaultKind.SILENT, FaultKind.CRC})
BAY_FAULTS = frozenset(
    {
        FaultKind.LOCK_STUCK,
        FaultKind.DOOR_SENSOR_STUCK,
        FaultKind.OVERHEAT,
        FaultKind.THERMAL_RUNAWAY,
        FaultKind.BMS_FAULT,
        FaultKind.POWER_CUT,
        FaultKind.FIRMWARE_BAD,
        FaultKind.FIRMWARE_HANGS,
        FaultKind.FIRMWARE_MISLABELLED,
        FaultKind.CHARGER_STUCK,
        FaultKind.LOCK_FAILURE,
        FaultKind.BOARD_FAILURE,
        FaultKind.BROADCAST_DEAF,
    }
)
CABINET_FAULTS = frozenset({FaultKind.SMOKE, FaultKind.MAINS_LOSS, FaultKind.CONTACTOR_STUCK})


class SimCommandError(Exception):
    """A rider or fault action the simulated world cannot perform (take from a shut bay, ...)."""


ILLEGAL_ADDRESS = 0x02
ILLEGAL_VALUE = 0x03
DEVICE_FAILURE = 0x04  # the board is failing (a broken lock driver)
DEVICE_BUSY = 0x06  # heartbeat fail-safe: retry after a heartbeat (docs/hardware.md)


class WriteRefusedError(Exception):
    """A board refused a register write; ``code`` is the Modbus exception code it replies."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
