"""The Modbus RTU bus master: one connection, short timeouts, per-unit health and isolation.

Theory of operation: every transaction goes through ``ModbusBus`` (one lock, so
one frame on the line at a time) on top of ``drivers.modbus_master``, which only
frames, sends and matches replies, so that silence is cheap: a request gets one
short timeout, a retry only when the caller asks for it, and the connection is
never dropped for silence (a generic client's defaults - seconds of timeout,
several retries, hanging up after a few silences - would stall a 12-bay line for
seconds per dead board and cut off the eleven healthy ones). A unit that fails
``isolate_after`` times in a row is isolated: requests to it fail at once without
touching the wire, except one re-probe every ``reprobe_interval_s``, so a dead bay
costs at most one timeout per poll cycle and then almost nothing. Going bad and
recovering are each logged once.

A unit the caller itself silenced (a bay board rebooting into a new image after our
ACTIVATE) is announced with ``expect_silence``: until then a request for it fails at
once (``UnitRestartingError``, no wire time, no timeout booked, not isolated: its
silence is not news), and the first request after it goes to the wire at once instead
of waiting for a re-probe; if the unit is still silent then, the rules above apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import serial
import serial.rs485
import structlog

from drivers.bus_client import BusClient, BusReply, link_lost_errors, no_reply_errors
from drivers.bus_url import Endpoint, Rs485Settings, SerialEndpoint, TcpEndpoint
from drivers.modbus_master import (
    EXCEPTION_BIT,
    FC_READ_HOLDING,
    FC_READ_INPUT,
    FC_WRITE_MULTIPLE,
    FC_WRITE_SINGLE,
    ModbusMaster,
)
from protocol import rtu_timing
from protocol.units import BAY_UNITS, unit_name

log = structlog.get_logger("bus")

DEFAULT_TIMEOUT_S = 0.25  # ~4x a 23-register read at 9600 baud; seconds would stall the line
DEFAULT_ISOLATE_AFTER = 3  # consecutive failures: one bad frame is noise, three is a dead board
DEFAULT_REPROBE_INTERVAL_S = 5.0  # a few poll cycles: recovery noticed fast, silence cheap
#: The last stretch of a wait before a frame is slept exactly (blocking the loop at most
#: this long): the event loop's timers go through epoll, whose timeout is whole
#: milliseconds rounded up, so an asyncio sleep of 0.3 ms lasts 1 ms and more. t3.5 at
#: 19200 baud and above (1.75-2 ms) is thus slept exactly, in one piece.
PRECISE_TAIL_S = 0.002
PR_SET_TIMERSLACK = 29  # prctl(2): the thread's timer slack, in ns
BROADCAST_TURNAROUND_S = 0.01  # boards act on a broadcast within 10 ms (our firmware's spec)
CONNECT_ATTEMPTS = 3  # connect tries (each the reply timeout) before a gateway is called down
# A bay board in heartbeat fail-safe refuses an unlock with 0x06 SLAVE DEVICE BUSY ("try
# again later": after a heartbeat it accepts); 0x04 SLAVE DEVICE FAILURE is a failing board.
HEARTBEAT_FAILSAFE_EXCEPTION = 0x06


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


class UnitBadReplyError(UnitNoAnswerError):
    """The unit answered, but not the reply the Modbus spec prescribes for the request.

    A reply's function code must be the request's (bit 7 set for an exception); a reply
    to another function is a frame from a confused board or a second master, not data.
    """


class UnitBadEchoError(UnitBadReplyError):
    """The unit's reply to a write is not the echo the Modbus spec prescribes.

    FC06 echoes address and value, FC16 address and quantity; anything else means the
    write may not have landed as sent (another master on the line, a firmware bug), so
    the write is not reported done.
    """


class UnitIsolatedError(UnitNoAnswerError):
    """The unit is isolated after repeated failures and was not due for a re-probe."""


class UnitRestartingError(UnitNoAnswerError):
    """The unit was announced silent (``ModbusBus.expect_silence``) and it is not over yet.

    Not an ``UnitIsolatedError``: nothing failed, so nobody should report the unit offline.
    """


class ExceptionReplyError(BusError):
    """The unit answered with a Modbus exception: it heard us and refused."""

    def __init__(self, unit: int, code: int) -> None:
        reason = _EXCEPTION_NAMES.get(code, str(code))
        if code == HEARTBEAT_FAILSAFE_EXCEPTION and unit in BAY_UNITS:
            reason += " (heartbeat fail-safe: write the heartbeat register first)"
        super().__init__(f"{unit_name(unit)} refused the request: {reason}")
        self.unit = unit
        self.code = code

    @property
    def heartbeat_failsafe(self) -> bool:
        """Whether a bay board refused because it is in heartbeat fail-safe, not failing."""
        return self.code == HEARTBEAT_FAILSAFE_EXCEPTION and self.unit in BAY_UNITS


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
    bad_replies: int = 0  # wrong function code or a write reply that is not an echo
    exception_replies: int = 0
    consecutive_failures: int = 0
    isolated: bool = False
    #: bus-clock time until which the unit is expected silent (``expect_silence``); None
    #: once the first request after it went to the wire
    silent_until: float | None = None
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
            "bad_replies": self.bad_replies,
            "exception_replies": self.exception_replies,
            "isolated": self.isolated,
            "restarting": self.silent_until is not None,
            "latency_ms": {
                "last": round(self.latency_last_s * 1000, 2),
                "mean": round(self.latency_mean_s * 1000, 2),
                "max": round(self.latency_max_s * 1000, 2),
            },
        }


@dataclass
class ModbusBus:
    """The one owner of the RS-485 line (or RTU-over-TCP gateway)."""

    endpoint: Endpoint
    timeout_s: float = DEFAULT_TIMEOUT_S
    isolate_after: int = DEFAULT_ISOLATE_AFTER
    reprobe_interval_s: float = DEFAULT_REPROBE_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    stats: dict[int, UnitStats] = field(default_factory=dict)
    #: a client to use instead of opening ``endpoint`` (a simulator: ``sim.direct_bus``);
    #: it counts as connected from the start and is never closed by the bus
    client: BusClient | None = None
    _client: BusClient | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _quiet_until: float = 0.0  # perf_counter time before which the line must stay silent
    _gap_s: float = field(init=False, default=0.0)  # _inter_frame_gap(endpoint), worked out once

    # -- connection ---------------------------------------------------------------------

    async def _keep_inter_frame_gap(self) -> None:
        """Wait until t3.5 has passed since the line's last frame (a no-op if it has)."""
        wait = self._quiet_until - time.perf_counter()
        if wait <= 0:
            return
        if wait > PRECISE_TAIL_S:
            await asyncio.sleep(wait - PRECISE_TAIL_S)
        remaining = self._quiet_until - time.perf_counter()
        if remaining > 0:
            # the event loop wakes up to ~1 ms late: the last stretch (<= 2 ms) is slept
            # exactly, so the gap costs the poll cycle no more than t3.5 itself
            time.sleep(remaining)  # noqa: ASYNC251 - deliberate, bounded by PRECISE_TAIL_S

    def _line_went_quiet(self, since: float | None = None) -> None:
        """The line's last frame ended at ``since`` (perf_counter; None: now): t3.5 from there.

        A reply ended when the master read its last byte (``ModbusMaster.replied_at``),
        not when the caller's task got round to it a loop pass or more later: counted
        from the reading, the t3.5 overlaps the master's own bookkeeping instead of
        following it (measured on a pty, issue 16: bench/daemon_cycle.py's "gap").
        """
        if since is None:
            since = time.perf_counter()
        self._quiet_until = since + self._gap_s

    def _make_master(self) -> ModbusMaster:
        mbap = isinstance(self.endpoint, TcpEndpoint) and self.endpoint.framing == "mbap"
        # Modbus/TCP: the MBAP header replaces the CRC; the gateway checks the line's CRC
        return ModbusMaster(timeout_s=self.timeout_s, mbap=mbap)

    def __post_init__(self) -> None:
        self._gap_s = _inter_frame_gap(self.endpoint)
        if self.client is not None:
            self._client = self.client

    async def connect(self) -> None:
        """Open the port or the gateway connection, or say precisely why it cannot be opened."""
        if self.client is not None:  # supplied by the caller: nothing to open
            self._client = self.client
            return
        endpoint = self.endpoint
        master = self._make_master()
        if isinstance(endpoint, SerialEndpoint):
            _exact_sleeps()
            _check_serial_port(endpoint)
            if endpoint.rs485 is not None:
                _set_rs485_mode(endpoint.path, endpoint.rs485)
            try:
                master.open_serial(
                    endpoint.path,
                    baud=endpoint.baud,
                    parity=endpoint.parity,
                    stopbits=endpoint.stopbits,
                )
            except (serial.SerialException, termios.error, OSError, ValueError) as exc:
                # a pty takes a setting once and refuses it on the next open: the probe
                # above can pass and the real open still fail
                raise _port_problem(endpoint, exc) from exc
            self._client = master
            return
        # a gateway gets a few tries (each the reply timeout) before it is called down
        problem: BaseException | None = None
        for _ in range(CONNECT_ATTEMPTS):
            try:
                await master.connect_tcp(endpoint.host, endpoint.port)
            except (OSError, TimeoutError) as exc:
                problem = exc
                continue
            self._client = master
            return
        raise BusUnavailableError(
            f"cannot connect to the bus at {endpoint}: {problem}"
        ) from problem

    def close(self) -> None:
        """Release the port (a supplied client is the caller's: only let go of it)."""
        if isinstance(self._client, ModbusMaster):
            self._client.close()
        self._client = None

    async def __aenter__(self) -> ModbusBus:
        await self.connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------

    # The reads return ``_transact``'s coroutine itself rather than awaiting it in one of
    # their own: every resume of the poller's read (the reply, a t3.5 wait) then passes
    # one coroutine frame fewer (issue 16). ``await bus.read_input(...)`` is unchanged.

    def read_input(
        self, unit: int, address: int, count: int, *, retries: int = 0
    ) -> Coroutine[Any, Any, list[int]]:
        """Read input registers (FC04) from ``unit``."""
        return self._transact(
            unit,
            count,
            retries,
            lambda c: c.read_input_registers(address, count=count, device_id=unit),
            function_code=FC_READ_INPUT,
        )

    def read_holding(
        self, unit: int, address: int, count: int, *, retries: int = 0
    ) -> Coroutine[Any, Any, list[int]]:
        """Read holding registers (FC03) from ``unit``."""
        return self._transact(
            unit,
            count,
            retries,
            lambda c: c.read_holding_registers(address, count=count, device_id=unit),
            function_code=FC_READ_HOLDING,
        )

    async def write_register(
        self, unit: int, address: int, value: int, *, retries: int = 0
    ) -> None:
        """Write one holding register (FC06); the reply must echo ``address`` and ``value``."""
        await self._transact(
            unit,
            None,
            retries,
            lambda c: c.write_register(address, value, device_id=unit),
            function_code=FC_WRITE_SINGLE,
            echo=(address, value),
        )

    async def write_registers(
        self, unit: int, address: int, values: list[int], *, retries: int = 0
    ) -> None:
        """Write consecutive holding registers (FC16); the reply must echo address and count."""
        await self._transact(
            unit,
            None,
            retries,
            lambda c: c.write_registers(address, values, device_id=unit),
            function_code=FC_WRITE_MULTIPLE,
            echo=(address, len(values)),
        )

    async def broadcast_register(self, address: int, value: int) -> None:
        """Write one register on every unit at once (unit id 0); nobody replies.

        Used for the heartbeat: one frame a second instead of twelve. The master then
        keeps the line quiet for the turnaround delay so every board has acted, counted
        from the frame's end: on a serial line the frame is still going out when the
        write returns (8 characters: 9 ms at 9600 baud), so its wire time is waited too.
        Through a gateway whose line speed the URL gives (``tcp://...?baud=9600``) the
        frame goes out on that line when the gateway has it, so its wire time and t3.5
        are waited the same way; a next request sent sooner would run into the broadcast
        on the gateway's line (at 9600 baud the frame alone takes 9 ms of the 10).
        """
        async with self._lock:
            client = self._client
            if client is None:
                raise BusUnavailableError("the bus is not connected")
            await self._keep_inter_frame_gap()
            try:
                await client.write_register(address, value, device_id=0, no_response_expected=True)
            except link_lost_errors() as exc:
                self._client = None
                raise BusUnavailableError(f"lost the bus at {self.endpoint}: {exc}") from exc
            frame_s = 0.0
            if isinstance(self.endpoint, SerialEndpoint):
                frame_s = rtu_timing.WRITE_SINGLE_BYTES * rtu_timing.char_time(self.endpoint.baud)
            elif self.endpoint.baud is not None:  # the gateway's line: the frame and its t3.5
                frame_s = rtu_timing.frame_time(rtu_timing.WRITE_SINGLE_BYTES, self.endpoint.baud)
            await asyncio.sleep(frame_s + BROADCAST_TURNAROUND_S)
            self._line_went_quiet()

    def unit_stats(self, unit: int) -> UnitStats:
        """Statistics of ``unit``, created on first use (not made anew to be thrown away)."""
        stats = self.stats.get(unit)
        if stats is None:
            stats = self.stats[unit] = UnitStats()
        return stats

    def is_isolated(self, unit: int) -> bool:
        """Whether ``unit`` is currently isolated."""
        return self.unit_stats(unit).isolated

    def expect_silence(self, unit: int, for_s: float) -> None:
        """``unit`` will not answer for about ``for_s`` seconds, by our own doing (a reboot).

        Until then its requests fail at once with ``UnitRestartingError``: no wire time,
        no time-out holding the line, nothing booked against the unit (its silence is
        expected, not news: no isolation, no offline report). The first request after
        ``for_s`` is sent at once, whatever the re-probe interval, so the unit is found
        again as soon as it can be; silent then, it fails and is isolated as any unit.
        """
        self.unit_stats(unit).silent_until = self.clock() + for_s
        log.info("unit_restarting", unit=unit, name=unit_name(unit), expected_silent_s=for_s)

    async def _transact(
        self,
        unit: int,
        expected_registers: int | None,
        retries: int,
        call: Callable[[BusClient], Awaitable[BusReply | None]],
        *,
        function_code: int,
        echo: tuple[int, int] | None = None,
    ) -> list[int]:
        """One request/reply, checked as the spec prescribes.

        A read's reply must carry ``expected_registers`` registers; a write's must repeat
        ``echo``, its (address, value-or-count).
        """
        stats = self.unit_stats(unit)
        now = self.clock()
        probe = False  # the first request after an expected silence: sent whatever the interval
        if stats.silent_until is not None:
            if now < stats.silent_until:
                raise UnitRestartingError(
                    unit,
                    f"{unit_name(unit)} is restarting (silent for about "
                    f"{stats.silent_until - now:.1f} s more)",
                )
            stats.silent_until, probe = None, True
        if (
            stats.isolated
            and not probe
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
                started = time.perf_counter()
                if self._quiet_until > started:  # (over TCP never: no coroutine for nothing)
                    await self._keep_inter_frame_gap()
                    started = time.perf_counter()
                replied_at: float | None = None  # no reply read: the line is quiet from now
                try:
                    response = await call(client)
                    replied_at = getattr(client, "replied_at", None)
                except link_lost_errors() as exc:
                    self._client = None  # gone: the next call says so without a wire attempt
                    raise BusUnavailableError(f"lost the bus at {self.endpoint}: {exc}") from exc
                except no_reply_errors() as exc:
                    # the master says whether a reply came with a bad CRC; a simulator's
                    # client (sim.direct_bus) raises pymodbus' own: silence
                    failure = self._no_answer(unit, stats, garbled=getattr(exc, "garbled", False))
                    continue
                finally:
                    self._line_went_quiet(replied_at)
                problem = _reply_problem(response, function_code, expected_registers, echo)
                if problem is not None:
                    failure = self._bad_reply(unit, stats, problem, echo is not None)
                    continue
                assert response is not None  # _reply_problem names a missing reply
                self._answered(unit, stats, time.perf_counter() - started)
                if response.function_code & EXCEPTION_BIT:
                    stats.exception_replies += 1
                    raise ExceptionReplyError(unit, response.exception_code)
                return list(response.registers)
        assert failure is not None
        raise failure

    def _no_answer(self, unit: int, stats: UnitStats, *, garbled: bool) -> UnitNoAnswerError:
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

    def _bad_reply(
        self, unit: int, stats: UnitStats, problem: str, echo: bool
    ) -> UnitBadReplyError:
        stats.bad_replies += 1
        stats.consecutive_failures += 1
        if stats.consecutive_failures == 1:
            log.warning("unit_failing", unit=unit, name=unit_name(unit), problem=problem)
        error = UnitBadEchoError if echo else UnitBadReplyError
        return error(unit, f"{unit_name(unit)}: {problem}")

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


def _reply_problem(
    response: BusReply | None,
    function_code: int,
    expected_registers: int | None,
    echo: tuple[int, int] | None,
) -> str | None:
    """What makes ``response`` not the spec's reply to the request, or None if it is."""
    if response is None:
        return f"no reply object for a function {function_code} request"
    answered = response.function_code & ~EXCEPTION_BIT
    if answered != function_code:
        return f"replied with function {answered} to a function {function_code} request"
    if response.function_code & EXCEPTION_BIT:
        return None
    if expected_registers is not None:
        if len(response.registers) == expected_registers:
            return None
        return f"replied with {len(response.registers)} registers to a read of {expected_registers}"
    assert echo is not None
    if function_code == FC_WRITE_MULTIPLE:
        heard = (response.address, response.count)
    else:
        heard = (response.address, (list(response.registers) or [-1])[0])
    if heard == echo:
        return None
    return (
        f"the reply to a write at {echo[0]} echoed {heard[0]}={heard[1]}, not {echo[0]}={echo[1]}"
    )


def _inter_frame_gap(endpoint: Endpoint) -> float:
    """The silence kept between frames: t3.5 on a serial line, none through a gateway.

    An RTU receiver finds the end of a frame by 3.5 characters of silence (1.75 ms above
    19200 baud); a request sent sooner after the previous reply runs into it and both are
    lost. The bus keeps it before each request it sends. A gateway frames the TCP side
    itself and keeps the gap on its own line.
    """
    if isinstance(endpoint, SerialEndpoint):
        return rtu_timing.inter_frame_gap(endpoint.baud)
    return 0.0


def _exact_sleeps() -> None:
    """Ask Linux to end this thread's sleeps on time (1 ns of timer slack instead of 50 us).

    The t3.5 before each request is slept (``PRECISE_TAIL_S``); the default slack lets the
    kernel end that sleep up to 50 us late to batch wake-ups, which on a serial line is
    wire time lost per transaction (measured: a 2 ms sleep ended 80 us late, 31 us with
    1 ns; issue 16). Only the event loop's thread is affected; elsewhere it is skipped.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # noqa: PLC0415 - ~0.35 MB resident, paid only by a serial bus's daemon

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


def _set_rs485_mode(path: str, settings: Rs485Settings) -> None:
    """Switch the UART into the kernel's RS-485 mode (TIOCSRS485) before the master opens it.

    The mode is a property of the port in the kernel and stays set after this handle is
    closed, so the master's own open finds it. A driver without RS-485 support (USB adapters,
    which switch direction in hardware, and pseudo-terminals) refuses it: that is named.
    """
    port = _open_port(path)
    try:
        port.rs485_mode = serial.rs485.RS485Settings(
            rts_level_for_tx=settings.rts_level_for_tx,
            rts_level_for_rx=not settings.rts_level_for_tx,
            delay_before_tx=settings.delay_before_tx_ms / 1000,
            delay_before_rx=settings.delay_after_tx_ms / 1000,
        )
    except (ValueError, OSError, serial.SerialException) as exc:
        raise BusUnavailableError(
            f"serial port {path} refuses RS-485 mode ({exc}): its driver does not support "
            "it; an adapter that switches direction itself needs no rs485 option"
        ) from exc
    finally:
        port.close()


def _check_serial_port(endpoint: SerialEndpoint) -> None:
    """Open the port as the master will, and turn every way that fails into one actionable line.

    The probe uses pyserial with ``exclusive=True`` (a ``flock``), as the master's own
    open does, so a port already held by another master (the daemon) is refused: two
    masters on one RS-485 line corrupt each other's frames. Then each setting is applied
    and read back, because a port may refuse one either loudly (EINVAL) or silently (a
    pseudo-terminal drops parity and would then talk 8N1 while we believe 8E1).
    """
    path = endpoint.path
    if not os.path.exists(path):  # noqa: PTH110 - a device path, not a project file
        raise BusUnavailableError(f"serial port {path} does not exist (is the adapter plugged in?)")
    try:
        _open_port(path).close()
    except (serial.SerialException, termios.error, OSError, ValueError) as exc:
        raise _port_problem(endpoint, exc) from exc
    refused = _refused_setting(endpoint)
    if refused is not None:
        raise _setting_refused(path, refused)


def _open_port(path: str) -> serial.Serial:
    # do_not_open + open(): no setting is changed before the lock is taken
    port = serial.Serial(exclusive=True, timeout=0)
    port.port = path
    port.open()
    return port


def _port_problem(endpoint: SerialEndpoint, exc: BaseException) -> BusUnavailableError:
    path = endpoint.path
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    if code in {errno.EACCES, errno.EPERM}:
        return BusUnavailableError(
            f"permission denied opening {path} (is the user in the dialout group?)"
        )
    if code in {errno.EAGAIN, errno.EBUSY} or "exclusively lock" in str(exc):
        return BusUnavailableError(
            f"serial port {path} is in use by another bus master (the cabinet daemon?); one "
            "master per line: run `cabinet bus scan -c FILE` without --bus to go through "
            "the daemon"
        )
    refused = _refused_setting(endpoint)
    if refused is not None:
        return _setting_refused(path, refused)
    return BusUnavailableError(f"cannot open {path}: {exc}")


def _setting_refused(path: str, setting: str) -> BusUnavailableError:
    hint = " (a pseudo-terminal takes only parity=N)" if _is_pty(path) else ""
    return BusUnavailableError(
        f"serial port {path} refuses {setting}: use settings the port supports{hint}"
    )


_TermiosAttrs = list[Any]


_Trial = tuple[str, Callable[[_TermiosAttrs], None], Callable[[_TermiosAttrs], bool]]


def _setting_trials(endpoint: SerialEndpoint) -> list[_Trial]:
    """(setting, how to apply it to termios attributes, whether a read-back shows it)."""
    speed = getattr(termios, f"B{endpoint.baud}")
    cflag = 2

    def set_speed(attrs: _TermiosAttrs) -> None:
        attrs[4] = attrs[5] = speed

    trials: list[_Trial] = [
        (f"baud={endpoint.baud}", set_speed, lambda a: a[4] == speed and a[5] == speed)
    ]
    if endpoint.parity != "N":
        odd = termios.PARODD if endpoint.parity == "O" else 0

        def set_parity(attrs: _TermiosAttrs) -> None:
            attrs[cflag] = (attrs[cflag] & ~termios.PARODD) | termios.PARENB | odd

        trials.append(
            (
                f"parity={endpoint.parity}",
                set_parity,
                lambda a: a[cflag] & (termios.PARENB | termios.PARODD) == termios.PARENB | odd,
            )
        )
    if endpoint.stopbits == 2:

        def set_stopbits(attrs: _TermiosAttrs) -> None:
            attrs[cflag] |= termios.CSTOPB

        trials.append(("stopbits=2", set_stopbits, lambda a: bool(a[cflag] & termios.CSTOPB)))
    return trials


def _refused_setting(endpoint: SerialEndpoint) -> str | None:
    """The first of baud, parity and stop bits the port refuses or silently drops, if any."""
    try:
        fd = os.open(endpoint.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        original = termios.tcgetattr(fd)
        try:
            for setting, apply, applied in _setting_trials(endpoint):
                attrs = termios.tcgetattr(fd)
                apply(attrs)
                try:
                    termios.tcsetattr(fd, termios.TCSANOW, attrs)
                except termios.error:
                    return setting
                if not applied(termios.tcgetattr(fd)):
                    return setting
        finally:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(fd, termios.TCSANOW, original)
    except termios.error:
        return None  # not a terminal at all: nothing to check
    finally:
        os.close(fd)
    return None


def _is_pty(path: str) -> bool:
    """Whether ``path`` is a Unix98 pseudo-terminal (major numbers 136-143)."""
    try:
        return os.major(os.stat(path).st_rdev) in range(136, 144)  # noqa: PTH116
    except OSError:
        return False
