"""The Modbus RTU bus master: one connection, short timeouts, per-unit health and isolation.

Theory of operation: every transaction goes through ``ModbusBus`` (one lock, so
one frame on the line at a time) on top of pymodbus' async client, configured so
that silence is cheap. pymodbus' defaults (3 s x 3 retries, and closing the
connection after a few silent requests) would stall a 12-bay line for seconds
per dead board and cut off the eleven healthy ones; here a request gets one
short timeout, a retry only when the caller asks for it, and the connection is
never dropped for silence. A unit that fails ``isolate_after`` times in a row is
isolated: requests to it fail at once without touching the wire, except one
re-probe every ``reprobe_interval_s``, so a dead bay costs at most one timeout
per poll cycle and then almost nothing. Going bad and recovering are each
logged once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.framer import FramerRTU, FramerType

from drivers.bus_url import Endpoint, SerialEndpoint, TcpEndpoint
from protocol import rtu_timing
from protocol.units import unit_name

# pymodbus logs each timeout with a frame dump; per-unit health below logs a unit going
# bad once and recovering once, which is what a technician can act on.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

log = structlog.get_logger("bus")

DEFAULT_TIMEOUT_S = 0.25  # ~4x a 23-register read at 9600 baud; seconds would stall the line
DEFAULT_ISOLATE_AFTER = 3  # consecutive failures: one bad frame is noise, three is a dead board
DEFAULT_REPROBE_INTERVAL_S = 5.0  # a few poll cycles: recovery noticed fast, silence cheap
BROADCAST_TURNAROUND_S = 0.01  # boards act on a broadcast within 10 ms (our firmware's spec)
CONNECT_ATTEMPTS = 3
NEVER_DISCONNECT = 2**31  # pymodbus closes a connection after this many silent requests


class BusError(Exception):
    """Base of every failure talking to a unit; the message names the unit."""


class BusUnavailableError(BusError):
    """The bus itself cannot be reached: port missing, permission denied, gateway down."""


class UnitNoAnswerError(BusError):
    """The unit did not answer within the timeout (dead, unpowered, wrong id or wiring)."""

    def __init__(self, unit: int, message: str) -> None:
        super().__init__(message)
        self.unit = unit


class UnitGarbledError(UnitNoAnswerError):
    """The unit answered but its reply failed the CRC check (noise, termination, baud)."""


class UnitIsolatedError(UnitNoAnswerError):
    """The unit is isolated after repeated failures and was not due for a re-probe."""


class ExceptionReplyError(BusError):
    """The unit answered with a Modbus exception: it heard us and refused."""

    def __init__(self, unit: int, code: int) -> None:
        super().__init__(
            f"{unit_name(unit)} refused the request: {_EXCEPTION_NAMES.get(code, code)}"
        )
        self.unit = unit
        self.code = code


_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    6: "device busy",
}


@dataclass(slots=True)
class UnitStats:
    """What the master knows about one unit's health on the line."""

    requests: int = 0
    ok: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    exception_replies: int = 0
    consecutive_failures: int = 0
    isolated: bool = False
    last_attempt: float | None = None
    latency_total_s: float = 0.0
    latency_max_s: float = 0.0
    latency_last_s: float = 0.0

    @property
    def latency_mean_s(self) -> float:
        """Mean round-trip time of successful transactions."""
        return self.latency_total_s / self.ok if self.ok else 0.0

    def as_json(self) -> dict[str, Any]:
        """Render for ``--json`` output and diagnostics."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "timeouts": self.timeouts,
            "crc_errors": self.crc_errors,
            "exception_replies": self.exception_replies,
            "isolated": self.isolated,
            "latency_ms": {
                "last": round(self.latency_last_s * 1000, 2),
                "mean": round(self.latency_mean_s * 1000, 2),
                "max": round(self.latency_max_s * 1000, 2),
            },
        }


@dataclass(slots=True)
class _Exchange:
    """The reply the master is waiting for, so a garbled one can be told from silence."""

    expected_bytes: int = 0
    garbled: bool = False


def _reply_is_garbled(data: bytes, expected_bytes: int) -> bool:
    """Whether enough of a reply has arrived to know its CRC is wrong."""
    if len(data) >= 5 and data[1] & 0x80:
        expected_bytes = 5  # exception reply
    if expected_bytes < 4 or len(data) < expected_bytes:
        return False
    frame = data[:expected_bytes]
    crc = int.from_bytes(frame[-2:], "big")
    return not FramerRTU.check_CRC(frame[:-2], crc)


@dataclass
class ModbusBus:
    """The one owner of the RS-485 line (or RTU-over-TCP gateway)."""

    endpoint: Endpoint
    timeout_s: float = DEFAULT_TIMEOUT_S
    isolate_after: int = DEFAULT_ISOLATE_AFTER
    reprobe_interval_s: float = DEFAULT_REPROBE_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    stats: dict[int, UnitStats] = field(default_factory=dict)
    _client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _exchange: _Exchange = field(default_factory=_Exchange)

    # -- connection ---------------------------------------------------------------------

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        common: dict[str, Any] = {
            "framer": FramerType.RTU,
            "timeout": self.timeout_s,
            "retries": 0,  # retries are ours, per call: see module docstring
            "trace_packet": self._trace_packet,
            "reconnect_delay": 0.1,
            "reconnect_delay_max": 2.0,
        }
        if isinstance(self.endpoint, TcpEndpoint):
            client: AsyncModbusTcpClient | AsyncModbusSerialClient = AsyncModbusTcpClient(
                self.endpoint.host, port=self.endpoint.port, **common
            )
        else:
            client = AsyncModbusSerialClient(
                self.endpoint.path,
                baudrate=self.endpoint.baud,
                bytesize=8,
                parity=self.endpoint.parity,
                stopbits=self.endpoint.stopbits,
                **common,
            )
        client.set_max_no_responses(NEVER_DISCONNECT)
        return client

    async def connect(self) -> None:
        """Open the port or the gateway connection, or say precisely why it cannot be opened."""
        if isinstance(self.endpoint, SerialEndpoint):
            _check_serial_port(self.endpoint.path)
        self._client = self._make_client()
        # pymodbus uses the (short) reply timeout for the TCP connect as well: give a
        # gateway a few tries before calling it unreachable.
        for _ in range(CONNECT_ATTEMPTS):
            if await self._client.connect():
                return
        self._client.close()
        self._client = None
        raise BusUnavailableError(f"cannot connect to the bus at {self.endpoint}")

    def close(self) -> None:
        """Release the port."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def __aenter__(self) -> ModbusBus:
        await self.connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------

    async def read_input(
        self, unit: int, address: int, count: int, *, retries: int = 0
    ) -> list[int]:
        """Read input registers (FC04) from ``unit``."""
        return await self._transact(
            unit,
            rtu_timing.read_reply_bytes(count),
            retries,
            lambda c: c.read_input_registers(address, count=count, device_id=unit),
        )

    async def read_holding(
        self, unit: int, address: int, count: int, *, retries: int = 0
    ) -> list[int]:
        """Read holding registers (FC03) from ``unit``."""
        return await self._transact(
            unit,
            rtu_timing.read_reply_bytes(count),
            retries,
            lambda c: c.read_holding_registers(address, count=count, device_id=unit),
        )

    async def write_register(
        self, unit: int, address: int, value: int, *, retries: int = 0
    ) -> None:
        """Write one holding register (FC06)."""
        await self._transact(
            unit,
            rtu_timing.WRITE_SINGLE_BYTES,
            retries,
            lambda c: c.write_register(address, value, device_id=unit),
        )

    async def write_registers(
        self, unit: int, address: int, values: list[int], *, retries: int = 0
    ) -> None:
        """Write consecutive holding registers (FC16)."""
        await self._transact(
            unit,
            rtu_timing.WRITE_SINGLE_BYTES,
            retries,
            lambda c: c.write_registers(address, values, device_id=unit),
        )

    async def broadcast_register(self, address: int, value: int) -> None:
        """Write one register on every unit at once (unit id 0); nobody replies.

        Used for the heartbeat: one frame a second instead of twelve. The master then
        keeps the line quiet for the turnaround delay so every board has acted.
        """
        async with self._lock:
            client = self._client
            if client is None:
                raise BusUnavailableError("the bus is not connected")
            try:
                await client.write_register(address, value, device_id=0, no_response_expected=True)
            except ConnectionException as exc:
                raise BusUnavailableError(f"lost the bus at {self.endpoint}: {exc}") from exc
            await asyncio.sleep(BROADCAST_TURNAROUND_S)

    def unit_stats(self, unit: int) -> UnitStats:
        """Statistics of ``unit``, created on first use."""
        return self.stats.setdefault(unit, UnitStats())

    def is_isolated(self, unit: int) -> bool:
        """Whether ``unit`` is currently isolated."""
        return self.unit_stats(unit).isolated

    async def _transact(
        self,
        unit: int,
        expected_bytes: int,
        retries: int,
        call: Callable[[Any], Any],
    ) -> list[int]:
        stats = self.unit_stats(unit)
        now = self.clock()
        if (
            stats.isolated
            and stats.last_attempt is not None
            and (now - stats.last_attempt < self.reprobe_interval_s)
        ):
            raise UnitIsolatedError(unit, f"{unit_name(unit)} is isolated after repeated silence")
        attempts = 1 + (0 if stats.isolated else retries)
        async with self._lock:
            client = self._client
            if client is None:
                raise BusUnavailableError("the bus is not connected")
            failure: UnitNoAnswerError | None = None
            for _ in range(attempts):
                stats.requests += 1
                stats.last_attempt = self.clock()
                self._exchange = _Exchange(expected_bytes)
                started = time.perf_counter()
                try:
                    response = await call(client)
                except ConnectionException as exc:
                    raise BusUnavailableError(f"lost the bus at {self.endpoint}: {exc}") from exc
                except ModbusException:
                    failure = self._no_answer(unit, stats)
                    continue
                self._answered(unit, stats, time.perf_counter() - started)
                if response.isError():
                    stats.exception_replies += 1
                    raise ExceptionReplyError(unit, int(getattr(response, "exception_code", 0)))
                return list(response.registers)
        assert failure is not None
        raise failure

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending and _reply_is_garbled(data, self._exchange.expected_bytes):
            self._exchange.garbled = True
        return data

    def _no_answer(self, unit: int, stats: UnitStats) -> UnitNoAnswerError:
        garbled = self._exchange.garbled
        if garbled:
            stats.crc_errors += 1
        else:
            stats.timeouts += 1
        stats.consecutive_failures += 1
        what = "garbled replies (CRC errors)" if garbled else "no answer"
        if stats.consecutive_failures == 1:
            log.warning("unit_failing", unit=unit, name=unit_name(unit), problem=what)
        if not stats.isolated and stats.consecutive_failures >= self.isolate_after:
            stats.isolated = True
            log.warning(
                "unit_isolated",
                unit=unit,
                name=unit_name(unit),
                reprobe_interval_s=self.reprobe_interval_s,
            )
        message = f"{unit_name(unit)}: {what} within {self.timeout_s * 1000:.0f} ms"
        return UnitGarbledError(unit, message) if garbled else UnitNoAnswerError(unit, message)

    def _answered(self, unit: int, stats: UnitStats, latency: float) -> None:
        if stats.consecutive_failures:
            log.info(
                "unit_recovered",
                unit=unit,
                name=unit_name(unit),
                after_failures=stats.consecutive_failures,
            )
        stats.ok += 1
        stats.consecutive_failures = 0
        stats.isolated = False
        stats.latency_last_s = latency
        stats.latency_total_s += latency
        stats.latency_max_s = max(stats.latency_max_s, latency)


def _check_serial_port(path: str) -> None:
    """Turn the usual ways a serial port cannot be opened into one actionable line."""
    if not os.path.exists(path):  # noqa: PTH110 - a device path, not a project file
        raise BusUnavailableError(f"serial port {path} does not exist (is the adapter plugged in?)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except PermissionError as exc:
        raise BusUnavailableError(
            f"permission denied opening {path} (is the user in the dialout group?)"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise BusUnavailableError(f"{path} is in use by another process") from exc
        raise BusUnavailableError(f"cannot open {path}: {exc.strerror}") from exc
    os.close(fd)
