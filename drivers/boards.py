"""Typed drivers for the boards on the bus: bay controller, cabinet board, energy meter.

Each turns register traffic into the frozen status objects of ``protocol`` and back;
none opens a port (they borrow the one ``ModbusBus``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from drivers.modbus_bus import ModbusBus
from protocol import bay_map, cabinet_map, meter_map
from protocol.units import CABINET_BOARD_UNIT, ENERGY_METER_UNIT

#: Decoded status blocks kept by their registers: 12 bays and the cabinet board, a few
#: versions each. A board mostly reports the same block cycle after cycle (an idle or full
#: bay, the cabinet board); decoding it again would cost the poll path for nothing.
DECODED_BLOCKS_KEPT = 64


@functools.lru_cache(maxsize=DECODED_BLOCKS_KEPT)
def _bay_status(regs: tuple[int, ...]) -> bay_map.BayStatus:
    """Decode a bay status block (pure, and the result is frozen: safe to share)."""
    return bay_map.decode_status(regs)


@functools.lru_cache(maxsize=DECODED_BLOCKS_KEPT)
def _cabinet_status(regs: tuple[int, ...]) -> cabinet_map.CabinetStatus:
    """Decode a cabinet status block (pure, and the result is frozen: safe to share)."""
    return cabinet_map.decode_status(regs)


@dataclass(frozen=True, slots=True)
class BayBoard:
    """The controller board of one bay (unit id = bay number)."""

    bus: ModbusBus
    unit: int

    async def read_status(self) -> bay_map.BayStatus:
        """Read the whole status block in one transaction."""
        regs = await self.bus.read_input(self.unit, bay_map.STATUS_START, bay_map.STATUS_COUNT)
        return _bay_status(tuple(regs))

    async def heartbeat(self, counter: int) -> None:
        """Tell the board the daemon is alive (it fails safe a few seconds after the last one)."""
        await self.bus.write_register(self.unit, bay_map.CommandReg.HEARTBEAT, counter & 0xFFFF)

    async def unlock(self, *, retries: int = 1) -> None:
        """Pulse the lock; the door springs open if the latch releases."""
        await self.bus.write_register(
            self.unit, bay_map.CommandReg.UNLOCK, bay_map.UNLOCK_MAGIC, retries=retries
        )

    async def set_charger(self, *, enabled: bool, current_limit_a: float) -> None:
        """Set limit and enable together (FC16) so the board never runs at a stale limit."""
        limit = bay_map.encode_current_limit(current_limit_a)
        await self.bus.write_registers(
            self.unit, bay_map.CommandReg.CHARGER_ENABLE, [int(enabled), limit], retries=1
        )


@dataclass(frozen=True, slots=True)
class CabinetBoard:
    """The cabinet board: smoke, temperature, fan, main contactor."""

    bus: ModbusBus
    unit: int = CABINET_BOARD_UNIT

    async def read_status(self) -> cabinet_map.CabinetStatus:
        """Read the cabinet status block in one transaction."""
        regs = await self.bus.read_input(
            self.unit, cabinet_map.STATUS_START, cabinet_map.STATUS_COUNT
        )
        return _cabinet_status(tuple(regs))

    async def set_fan(self, *, on: bool) -> None:
        """Switch the cabinet fan."""
        await self.bus.write_register(self.unit, cabinet_map.CommandReg.FAN, int(on), retries=1)

    async def set_contactor(self, *, closed: bool) -> None:
        """Close (power) or open (cut) the main charging contactor."""
        await self.bus.write_register(
            self.unit, cabinet_map.CommandReg.MAIN_CONTACTOR, int(closed), retries=2
        )


@dataclass(frozen=True, slots=True)
class EnergyMeter:
    """The DIN-rail energy meter."""

    bus: ModbusBus
    unit: int = ENERGY_METER_UNIT

    async def read(self) -> meter_map.MeterReading:
        """Read voltage, current, power and total energy (two transactions)."""
        instant = await self.bus.read_input(
            self.unit, meter_map.INSTANT_START, meter_map.INSTANT_COUNT
        )
        energy = await self.bus.read_input(
            self.unit, meter_map.ENERGY_START, meter_map.ENERGY_COUNT
        )
        return meter_map.decode(instant, energy)
