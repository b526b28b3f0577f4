"""What ``ModbusBus`` needs from a Modbus client: the declared port a simulator plugs into.

``ModbusBus`` keeps all the bookkeeping (one lock, retries, isolation, re-probing,
statistics) and uses only these four requests. Anything that answers them -
``drivers.modbus_master.ModbusMaster`` on a real line or gateway, or
``sim.direct_bus.DirectClient`` answering from the simulated world with no wire - can
be handed to ``ModbusBus(..., client=...)``. The match is structural
(``typing.Protocol``): ``sim/`` imports ``protocol`` only and never this module, which
is why the errors are pymodbus' exception classes (both sides already depend on
pymodbus) rather than ours.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol


class BusReply(Protocol):
    """A decoded reply, as the bus master checks it against its request.

    Every field is present on every reply (0 or empty where the function has none), so
    the master reads them directly: ``registers`` holds a read's registers and FC06's
    echoed value, ``address`` and ``count`` a write's echo, ``exception_code`` the code
    of an exception reply.
    """

    @property
    def function_code(self) -> int:
        """The request's function code, ``| 0x80`` on an exception reply."""
        ...

    @property
    def registers(self) -> Sequence[int]:
        """A read's registers; FC06: the echoed value."""
        ...

    @property
    def address(self) -> int:
        """A write's echoed start address."""
        ...

    @property
    def count(self) -> int:
        """FC16's echoed quantity of registers."""
        ...

    @property
    def exception_code(self) -> int:
        """An exception reply's code (0 otherwise)."""
        ...


class BusClient(Protocol):
    """The four requests the bus master makes, nothing more (pymodbus' method names).

    A request that gets no answer raises ``pymodbus.exceptions.ModbusException``; one
    whose ``garbled`` attribute is true says a reply came but failed its CRC
    (``drivers.modbus_master.NoReplyError``). A lost connection raises its subclass
    ``ConnectionException`` (``drivers.modbus_master.LinkLostError``).
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
