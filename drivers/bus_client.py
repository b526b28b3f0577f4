"""What ``ModbusBus`` needs from a Modbus client: the declared port a simulator plugs into.

``ModbusBus`` keeps all the bookkeeping (one lock, retries, isolation, re-probing,
statistics) and uses only these four requests of pymodbus' async client. Anything
that answers them — pymodbus' TCP or serial client on a real line, or
``sim.direct_bus.DirectClient`` answering from the simulated world with no wire —
can be handed to ``ModbusBus(..., client=...)``. The match is structural
(``typing.Protocol``): ``sim/`` imports ``protocol`` only and never this module.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol


class BusReply(Protocol):
    """A decoded reply: its function code (bit 7 set on an exception reply).

    The registers, echo fields and exception code are read with ``getattr`` by the
    bus master, because pymodbus' reply classes each carry only their own.
    """

    @property
    def function_code(self) -> int:
        """The request's function code, ``| 0x80`` on an exception reply."""
        ...

    def isError(self) -> bool:  # noqa: N802 - pymodbus' name
        """Whether this is an exception reply."""
        ...


class BusClient(Protocol):
    """The subset of pymodbus' async client the bus master calls, nothing more.

    A request that gets no answer raises ``pymodbus.exceptions.ModbusException``;
    a lost connection raises its subclass ``ConnectionException``.
    """

    def read_input_registers(
        self, address: int, *, count: int, device_id: int
    ) -> Awaitable[BusReply]:
        """FC04."""
        ...

    def read_holding_registers(
        self, address: int, *, count: int, device_id: int
    ) -> Awaitable[BusReply]:
        """FC03."""
        ...

    def write_register(
        self, address: int, value: int, *, device_id: int, no_response_expected: bool = False
    ) -> Awaitable[BusReply | None]:
        """FC06; to unit 0 (a broadcast) with ``no_response_expected``: nobody answers."""
        ...

    def write_registers(
        self, address: int, values: list[int], *, device_id: int
    ) -> Awaitable[BusReply | None]:
        """FC16."""
        ...
