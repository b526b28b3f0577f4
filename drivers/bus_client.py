"""What ``ModbusBus`` needs from a Modbus client: the declared port a simulator plugs into.

``ModbusBus`` keeps all the bookkeeping (one lock, retries, isolation, re-probing,
statistics) and uses only these four requests. Anything that answers them -
``drivers.modbus_master.ModbusMaster`` on a real line or gateway, or
``sim.direct_bus.DirectClient`` answering from the simulated world with no wire - can
be handed to ``ModbusBus(..., client=...)``. The match is structural
(``typing.Protocol``): ``sim/`` imports ``protocol`` only and never this module.

The errors are ours (``NoReplyError``, ``LinkLostError``), so that the daemon, whose
master raises them, never loads pymodbus (~1 MB resident, DESIGN.md §6). A client built
on pymodbus - the simulator's, which cannot import ours - raises pymodbus' exception
classes instead; ``no_reply_errors`` and ``link_lost_errors`` name both, pymodbus' found
among the loaded modules rather than imported: a client that raised one has loaded it.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Sequence
from typing import Protocol


class NoReplyError(Exception):
    """The unit did not answer within the timeout; ``garbled``: a reply came, CRC wrong."""

    def __init__(self, message: str, *, garbled: bool = False) -> None:
        super().__init__(message)
        self.garbled = garbled


class LinkLostError(Exception):
    """The serial port or the gateway connection is gone: it must be opened again."""


def _pymodbus_error(name: str) -> tuple[type[Exception], ...]:
    """The class ``name`` of pymodbus' exceptions, if pymodbus is loaded (else none raised it)."""
    exceptions = sys.modules.get("pymodbus.exceptions")
    return () if exceptions is None else (getattr(exceptions, name),)


def link_lost_errors() -> tuple[type[Exception], ...]:
    """What a client raises when its connection is gone: ours, or pymodbus' own."""
    return (LinkLostError, *_pymodbus_error("ConnectionException"))


def no_reply_errors() -> tuple[type[Exception], ...]:
    """What a client raises for a request that got no answer: ours, or pymodbus' own.

    pymodbus' ``ModbusException`` is also the base of its ``ConnectionException``: catch
    ``link_lost_errors()`` first.
    """
    return (NoReplyError, *_pymodbus_error("ModbusException"))


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

    A request that gets no answer raises ``NoReplyError`` (``garbled`` true: a reply came
    but failed its CRC); a lost connection raises ``LinkLostError``. A client built on
    pymodbus raises its ``ModbusException`` and ``ConnectionException`` instead.
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
