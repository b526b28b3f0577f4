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


#: Faults that need ``--bay`` (or, for bus faults, ``--unit``).
UNIT_FAULTS = frozenset({FaultKind.SILENT, FaultKind.CRC})
BAY_FAULTS = frozenset(
    {
        FaultKind.LOCK_STUCK,
        FaultKind.DOOR_SENSOR_STUCK,
        FaultKind.OVERHEAT,
        FaultKind.THERMAL_RUNAWAY,
        FaultKind.BMS_FAULT,
    }
)
CABINET_FAULTS = frozenset({FaultKind.SMOKE, FaultKind.MAINS_LOSS})


class SimCommandError(Exception):
    """A rider or fault action the simulated world cannot perform (take from a shut bay, ...)."""
