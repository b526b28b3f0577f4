"""The simulated cabinet behind pymodbus' client interface, with no wire at all.

``ModbusBus`` keeps all its bookkeeping (retries, isolation, re-probing, statistics)
while a ``DirectClient`` in place of its pymodbus client hands every request to the
simulated world. The virtual-time fault campaign uses it with no delay at all; the
fleet simulation with a small real delay per transaction, so that pollers written for
a real line do not spin.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

from pymodbus.exceptions import ModbusException

from protocol.units import ALL_UNITS, BAY_UNITS
from sim.cabinet_model import SimulatedCabinet
from sim.faults import WriteRefusedError

ILLEGAL_ADDRESS = 2
DEVICE_FAILURE = 4
EXCEPTION_BIT = 0x80


@dataclass
class _Response:
    """A reply as pymodbus decodes it: function code (bit 7 on an exception), echo fields."""

    function_code: int
    registers: list[int] = field(default_factory=list)
    exception_code: int = 0
    address: int = 0
    count: int = 0

    def __post_init__(self) -> None:
        if self.exception_code:
            self.function_code |= EXCEPTION_BIT

    def isError(self) -> bool:  # noqa: N802 - pymodbus' name
        return self.exception_code != 0


class DirectClient:
    """The pymodbus client's methods, answered by the simulated world (no wire)."""

    def __init__(
        self, world: SimulatedCabinet, rng: random.Random, *, wire_delay_s: float = 0.0
    ) -> None:
        self.world = world
        self.rng = rng
        self.wire_delay_s = wire_delay_s  # real time per transaction, for real-time pollers

    def _silent(self, unit: int) -> bool:
        self.world.sync()
        if unit not in ALL_UNITS or self.world.unit_silent(unit):
            return True
        rate = self.world.crc_units.get(unit)
        return rate is not None and self.rng.random() < rate

    async def _read(self, unit: int, address: int, count: int, holding: bool) -> _Response:
        if self.wire_delay_s:
            await asyncio.sleep(self.wire_delay_s)
        if self._silent(unit):
            raise ModbusException("no answer")
        function_code = 3 if holding else 4
        if self.world.board_failing(unit):
            return _Response(function_code, exception_code=DEVICE_FAILURE)
        image = self.world.holding_image(unit) if holding else self.world.input_image(unit)
        if any(a not in image for a in range(address, address + count)):
            return _Response(function_code, exception_code=ILLEGAL_ADDRESS)
        return _Response(function_code, [image[a] for a in range(address, address + count)])

    async def read_input_registers(self, address: int, *, count: int, device_id: int) -> _Response:
        """FC04."""
        return await self._read(device_id, address, count, holding=False)

    async def read_holding_registers(
        self, address: int, *, count: int, device_id: int
    ) -> _Response:
        """FC03."""
        return await self._read(device_id, address, count, holding=True)

    async def write_registers(self, address: int, values: list[int], *, device_id: int) -> Any:
        """FC16; unit 0 is a broadcast."""
        return await self._write(16, address, values, device_id)

    async def _write(
        self, function_code: int, address: int, values: list[int], device_id: int
    ) -> Any:
        """A write as the board would answer it: the spec's echo, or an exception."""
        if device_id == 0:  # broadcast: every board that hears it acts, nobody answers
            for unit in BAY_UNITS:
                if not self._silent(unit) and self.world.hears_broadcasts(unit):
                    self.world.write_holding(unit, address, values)
            return None
        if self.wire_delay_s:
            await asyncio.sleep(self.wire_delay_s)
        if self._silent(device_id):
            raise ModbusException("no answer")
        if self.world.board_failing(device_id):
            return _Response(function_code, exception_code=DEVICE_FAILURE)
        try:
            self.world.write_holding(device_id, address, values)
        except WriteRefusedError as refused:
            return _Response(function_code, exception_code=refused.code)
        # FC06 echoes address and value, FC16 address and quantity
        return _Response(function_code, list(values[:1]), address=address, count=len(values))

    async def write_register(
        self, address: int, value: int, *, device_id: int, no_response_expected: bool = False
    ) -> Any:
        """FC06."""
        del no_response_expected
        return await self._write(6, address, [value], device_id)
