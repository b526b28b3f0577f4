"""The simulated RS-485 line: every unit as a pymodbus RTU slave, with wire time and bus faults.

Theory of operation: one pymodbus ``ModbusTcpServer`` with the RTU framer (RTU
over TCP, like an RS-485 gateway) serves a ``SimDevice`` per unit. Each device's
``action`` hook refreshes the register image from the world before a read, hands
writes to the world, and holds the reply back for the time the request and reply
frames would occupy the wire at the configured baud rate plus the slave's reply
time. A single lock makes the line half-duplex across all TCP connections, as a
real bus is. ``trace_packet`` on the way out silences units (a dead board, or a
unit id nobody answers to) and corrupts CRCs, which is where those faults live on
a real line too.

A master's frames can reach the simulator in one read of its socket: a request sent
10 ms after a heartbeat broadcast (nobody answers a broadcast, so the master does not
wait for one) meets a simulator held off the CPU for longer. pymodbus' RTU framer takes
the first frame of a read and drops the rest as noise, so the request was lost and a
healthy board "did not answer". The line hears every frame: ``_trace_packet`` hands
pymodbus one request at a time, and each connection takes the next one left in its
buffer as soon as the previous one is served (``_LineConnection``).

Behind a pty (``cabinet sim --bus pty:///...``) the replies do not travel back over
TCP: the gateway takes each one from ``trace_packet`` with the instant the model says
its last byte arrives (``deliver_replies_to``) and writes it to the pty then, so the
server's and the relay's own latency are not added to the wire time a master sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerRTU, FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice

from protocol import bay_map, cabinet_map, firmware_map, meter_map, rtu_timing
from protocol.units import ALL_UNITS, BAY_UNITS, CABINET_BOARD_UNIT
from sim.cabinet_model import SimulatedCabinet
from sim.faults import WriteRefusedError
from sim.mbap_gateway import mbap_trace

# pymodbus logs every request it cannot serve with a frame dump; the simulator's own
# counters say the same once, so its chatter is kept to real failures.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

READ_FUNCTIONS = frozenset({3, 4})
WRITE_SINGLE = 6
WRITE_MULTIPLE = 16
# asyncio's timers wake up to ~1 ms late; the last stretch of a modelled delay is slept
# with a blocking sleep so that 115200-baud transactions (~9 ms) keep their shape.
PRECISE_TAIL_S = 0.002
#: ... and its last 100 us are spun (see precise_sleep_until).
SPIN_S = 0.0001
PR_SET_TIMERSLACK = 29  # prctl(2)
#: A master keeps the line quiet this long after a broadcast so every board has acted
#: (docs/hardware.md); the counters book it as line time, not as the master's idling.
BROADCAST_QUIET_S = 0.01

#: Where a serial gateway takes the replies: the bytes as they go onto the line, and the
#: perf_counter instant their last byte leaves it by the wire-time model.
ReplySink = Callable[[bytes, float], None]


@dataclass(slots=True)
class UnitCounters:
    """What the bus saw of one unit: the figures ``ctl state`` reports per unit."""

    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    busy_s: float = 0.0
    dropped: int = 0
    corrupted: int = 0
    #: register reads (FC03/FC04) and when the latest went onto the line (perf_counter,
    #: the simulator's clock): two ``ctl state`` readings give a master's exact poll period
    reads: int = 0
    last_read_at: float = 0.0
    #: the line's busy time (``SimulatedBus.line_busy_s``) when that read went onto it: two
    #: readings give the wire time a master put on the line between two reads of the unit,
    #: exactly, however late the readings themselves come on a loaded machine
    line_busy_at_read: float = 0.0
    #: line silence before this unit's requests beyond the t3.5 that ends the previous
    #: frame: the master's own time between transactions (and its pacing), never the wire's
    idle_before_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """Render for ``ctl state``."""
        return {
            "requests": self.requests,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "busy_s": round(self.busy_s, 4),
            "dropped": self.dropped,
            "corrupted": self.corrupted,
            "reads": self.reads,
            "last_read_at": round(self.last_read_at, 6),
            "line_busy_at_read": round(self.line_busy_at_read, 6),
            "idle_before_s": round(self.idle_before_s, 6),
        }


def _block(start: int, count: int) -> SimData:
    return SimData(start, count=count, values=0, datatype=DataType.REGISTERS)


def _first_request(data: bytes) -> bytes:
    """The first whole request frame of ``data`` (a function our boards serve), else ``data``."""
    if len(data) < rtu_timing.READ_REQUEST_BYTES:
        return data
    function_code = data[1]
    if function_code not in READ_FUNCTIONS and function_code not in (WRITE_SINGLE, WRITE_MULTIPLE):
        return data  # pymodbus frames (or refuses) what the boards do not serve
    # bytes 4-5: a read's or an FC16's register count (the only count a size depends on)
    size, _ = _frame_bytes(function_code, int.from_bytes(data[4:6], "big"))
    return data[:size] if size < len(data) else data


class _LineConnection(ServerRequestHandler):
    """One master's connection: every request it sent is served, one after the other.

    pymodbus keeps what follows a frame in its receive buffer, which its next send
    clears, and looks at it again only when more bytes come: requests that came in
    one read wait here instead, and the next is taken as soon as one is served.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)  # type: ignore[no-untyped-call]
        self._queued = b""  # whole requests (and anything after them) not yet served

    def callback_data(self, data: bytes, addr: tuple[str, int] | None = None) -> int:
        if self._queued:  # an earlier request is still being served: these wait their turn
            self._queued += data
            return len(data)
        used: int = super().callback_data(data, addr)
        if 0 < used < len(data):
            if self.last_pdu is None:  # that was no request (noise, a bad CRC): go on
                return used + self.callback_data(data[used:], addr)
            self._queued = data[used:]
            return len(data)
        return used

    async def handle_request(self) -> None:
        try:
            await super().handle_request()  # type: ignore[no-untyped-call]
        finally:
            queued, self._queued = self._queued, b""
            if queued:
                self.datagram_received(queued, self.last_addr)


class _LineServer(ModbusTcpServer):
    """pymodbus' TCP server with connections that leave no request unserved."""

    def callback_new_connection(self) -> ServerRequestHandler:
        return _LineConnection(self, self.trace_packet, self.trace_pdu, self.trace_connect)


def _frame_bytes(function_code: int, count: int) -> tuple[int, int]:
    """Request and reply sizes of a transaction, for the wire-time model."""
    if function_code in READ_FUNCTIONS:
        return rtu_timing.READ_REQUEST_BYTES, rtu_timing.read_reply_bytes(count)
    if function_code == WRITE_MULTIPLE:
        return rtu_timing.write_multiple_request_bytes(count), rtu_timing.WRITE_SINGLE_BYTES
    return rtu_timing.WRITE_SINGLE_BYTES, rtu_timing.WRITE_SINGLE_BYTES


async def precise_sleep_until(deadline: float) -> None:
    """Sleep until ``time.perf_counter() >= deadline`` with sub-millisecond accuracy.

    Never returns early (a reply before its modelled time would flatter the master); the
    last ``SPIN_S`` are spun because a sleeping thread wakes tens of microseconds late.
    """
    remaining = deadline - time.perf_counter()
    if remaining > PRECISE_TAIL_S:
        await asyncio.sleep(remaining - PRECISE_TAIL_S)
    remaining = deadline - time.perf_counter()
    if remaining > SPIN_S:
        time.sleep(remaining - SPIN_S)  # noqa: ASYNC251 - deliberate: the tail must not be late
    while time.perf_counter() < deadline:
        pass


def tighten_timer_slack() -> None:
    """Ask Linux to wake this thread's sleeps on time (1 ns slack instead of 50 us).

    The simulator's sleeps stand for wire time; the default slack alone would make every
    reply ~50-80 us late. Elsewhere (or if refused) the spin in precise_sleep_until covers it.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


class SimulatedBus:
    """The line: units, counters, wire timing and the faults that live on the wire."""

    def __init__(
        self, world: SimulatedCabinet, *, baud: int, reply_delay_s: float, seed: int = 0
    ) -> None:
        self.world = world
        self.baud = baud
        self.reply_delay_s = reply_delay_s
        self.counters: dict[int, UnitCounters] = {unit: UnitCounters() for unit in ALL_UNITS}
        self._line = asyncio.Lock()
        self._crc_tick = 0
        self._seed = seed
        self._server: ModbusTcpServer | None = None
        self.connections = 0  # masters that connected: a reconnect storm shows here
        self.broadcasts = 0  # unit-0 frames (the heartbeat): on the line, in no unit's counters
        self.broadcast_s = 0.0  # their wire time and the quiet after them
        #: every unit's ``busy_s`` and ``broadcast_s`` together: the line's whole busy time
        self.line_busy_s = 0.0
        #: replies that left for the master (written to the TCP connection or the pty):
        #: equal to the requests a test sent, the line holds nothing late any more
        self.replies_out = 0
        self._broadcast_quiet_until = 0.0
        self._last_rx = 0.0  # when the latest request bytes reached the simulator
        self._broadcast = False  # the latest request was addressed to unit 0 (everyone)
        self._gateway_rx: float | None = None  # a request's first byte at the pty gateway
        self._answering: int | None = None  # the unit whose reply pymodbus is about to send
        self._line_free_at = 0.0  # when the previous transaction left the wire
        self._request_bytes = 0  # size of the latest request frame, for replies _action skips
        # When the reply being sent is due (its last byte on the line), set by _action.
        self._reply_due: float | None = None
        # A serial gateway that delivers replies itself at their due time (deliver_replies_to).
        self._reply_sink: ReplySink | None = None
        # The last write request heard per unit: its normal reply is an echo (see _echo).
        self._write_requests: dict[int, bytes] = {}

    # -- devices ------------------------------------------------------------------------

    def _device(self, unit: int) -> SimDevice:
        bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
        if unit in BAY_UNITS:
            inputs = [
                _block(bay_map.STATUS_START, bay_map.STATUS_COUNT),
                _block(firmware_map.STATUS_START, firmware_map.STATUS_COUNT),
            ]
            holding = [
                _block(bay_map.COMMAND_START, bay_map.COMMAND_COUNT),
                _block(firmware_map.COMMAND_REG, 1),
                _block(firmware_map.HEADER_START, firmware_map.HEADER_COUNT),
                _block(firmware_map.CHUNK_START, 3 + firmware_map.CHUNK_DATA_REGS),
            ]
        elif unit == CABINET_BOARD_UNIT:
            inputs = [
                SimData(
                    cabinet_map.STATUS_START,
                    count=cabinet_map.STATUS_COUNT,
                    values=0,
                    datatype=DataType.REGISTERS,
                )
            ]
            holding = [
                SimData(
                    cabinet_map.COMMAND_START,
                    count=cabinet_map.COMMAND_COUNT,
                    values=0,
                    datatype=DataType.REGISTERS,
                )
            ]
        else:
            inputs = [
                SimData(
                    meter_map.INSTANT_START,
                    count=meter_map.INSTANT_COUNT,
                    values=0,
                    datatype=DataType.REGISTERS,
                ),
                SimData(
                    meter_map.ENERGY_START,
                    count=meter_map.ENERGY_COUNT,
                    values=0,
                    datatype=DataType.REGISTERS,
                ),
            ]
            # the meter's configuration registers are not modelled: read-only placeholders
            holding = [SimData(0, count=2, values=0, datatype=DataType.REGISTERS, readonly=True)]
        return SimDevice(
            id=unit,
            simdata=(bits, list(bits), holding, inputs),
            action=functools.partial(self._action, unit),
        )

    async def _action(  # noqa: PLR0917 - the signature is pymodbus' SimAction
        self,
        unit: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Serve one transaction for ``unit`` as the board and the wire would."""
        counters = self.counters[unit]
        request_bytes, reply_bytes = _frame_bytes(function_code, count)
        if self._broadcast:
            # pymodbus hands a broadcast to every device in turn; the frame crossed the wire
            # once and nobody replies, so each board just acts on it.
            self.world.sync()
            if self.world.hears_broadcasts(unit):
                return self._serve(
                    unit, function_code, (start_address, address, count), registers, set_values
                )
            return None
        async with self._line:
            # The request went onto the wire when its bytes arrived, unless the line was
            # still busy with the previous transaction: the simulator's own processing
            # time is part of the modelled time, not added on top of it.
            began = max(self._last_rx, self._line_free_at)
            if self._line_free_at:
                quiet_until = max(self._line_free_at, self._broadcast_quiet_until)
                counters.idle_before_s += max(0.0, began - quiet_until)
            counters.requests += 1
            if function_code in READ_FUNCTIONS:
                counters.reads += 1
                counters.last_read_at = began
                counters.line_busy_at_read = self.line_busy_s
            counters.bytes_in += request_bytes
            self.world.sync()
            silent = self.world.unit_silent(unit)
            result: ExcCodes | None = None
            if not silent:
                result = self._serve(
                    unit, function_code, (start_address, address, count), registers, set_values
                )
            wire = rtu_timing.frame_time(request_bytes, self.baud)
            if not silent:
                if result is not None:
                    reply_bytes = rtu_timing.EXCEPTION_REPLY_BYTES
                wire += self.reply_delay_s + rtu_timing.frame_time(reply_bytes, self.baud)
                counters.bytes_out += reply_bytes
            counters.busy_s += wire
            self.line_busy_s += wire
            self._line_free_at = began + wire
            # The reply reaches the master when its last byte does; the t3.5 of silence
            # after it is the master's to keep (a request arriving sooner waits for
            # _line_free_at above, as the gateway of an RTU-over-TCP line would).
            trailing_gap = 0.0 if silent else rtu_timing.inter_frame_gap(self.baud)
            due = self._line_free_at - trailing_gap
            if self._reply_sink is None:
                await precise_sleep_until(due)
            # else the gateway holds the reply until ``due`` itself: releasing it now
            # keeps the server's and the relay's own latency out of the wire time
            self._reply_due = None if silent else due
        # pymodbus labels a reply with the unit id of the request that arrived *last*: a
        # request for the next unit that came in while this one was held would get this
        # unit's registers under its own address. _trace_packet puts the real one back.
        self._answering = unit
        return result

    def _serve(
        self,
        unit: int,
        function_code: int,
        window: tuple[int, int, int],
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Apply a write or refresh ``registers`` for a read; ``window`` is (start, addr, count)."""
        start_address, address, count = window
        world = self.world
        world.sync()
        if world.board_failing(unit):
            return ExcCodes.DEVICE_FAILURE
        if set_values is not None and function_code in (WRITE_SINGLE, WRITE_MULTIPLE):
            try:
                world.write_holding(unit, address, [int(v) for v in set_values])
            except WriteRefusedError as refused:
                return ExcCodes(refused.code)
            return None
        image = world.input_image(unit) if function_code == 4 else world.holding_image(unit)
        for addr in range(address, address + count):
            if addr in image:
                registers[addr - start_address] = image[addr]
        return None

    # -- the wire on the way out -----------------------------------------------------------

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        """Note requests; pass replies through the line's faults (and to a serial gateway)."""
        if not sending:
            # one request at a time: pymodbus would take the first and drop the rest
            return self._request_heard(_first_request(data))
        reply = self._on_the_line(data)
        if self._reply_sink is None or not reply:
            # pymodbus writes what this returns to the connection in the same call
            self.replies_out += bool(reply)
            return reply
        due, self._reply_due = self._reply_due, None
        if due is None:
            due = self._unmodelled_reply_due(len(reply))
        self._reply_sink(reply, due)
        return b""  # the gateway has it: nothing goes back over the internal TCP hop

    def _unmodelled_reply_due(self, reply_bytes: int) -> float:
        """When a reply pymodbus made without asking the board (an illegal address) is due.

        A real board takes its turnaround for those too; the line stays busy as long.
        """
        began = max(self._last_rx, self._line_free_at)
        due = (
            began
            + rtu_timing.frame_time(self._request_bytes, self.baud)
            + self.reply_delay_s
            + reply_bytes * rtu_timing.char_time(self.baud)
        )
        self._line_free_at = max(self._line_free_at, due + rtu_timing.inter_frame_gap(self.baud))
        return due

    def _request_heard(self, data: bytes) -> bytes:
        """A request reached the line: note when, and what it was."""
        # a request relayed by the pty gateway reached the line when the gateway saw it
        self._last_rx = self._gateway_rx or time.perf_counter()
        self._gateway_rx = None
        self._request_bytes = len(data)
        self._reply_due = None  # whatever was due belonged to an earlier request
        self._broadcast = bool(data) and data[0] == 0
        if self._broadcast:
            # counters only: the frame's time on the wire and the quiet the master owes
            # the boards; the timing model itself does not hold the next request back
            self.broadcasts += 1
            busy = rtu_timing.frame_time(len(data), self.baud) + BROADCAST_QUIET_S
            self.broadcast_s += busy
            self.line_busy_s += busy
            self._broadcast_quiet_until = max(self._last_rx, self._line_free_at) + busy
        if len(data) >= rtu_timing.WRITE_SINGLE_BYTES and data[1] in (
            WRITE_SINGLE,
            WRITE_MULTIPLE,
        ):
            self._write_requests[data[0]] = bytes(data)
        return data

    def _on_the_line(self, data: bytes) -> bytes:
        """Drop replies of silent or unknown units; corrupt replies of units with CRC faults."""
        if not data:
            return data
        data = self._own_address(data)
        unit = data[0]
        data = self._echo(data)
        if unit not in self.counters or self.world.unit_silent(unit):
            if unit in self.counters:
                self.counters[unit].dropped += 1
            return b""
        rate = self.world.crc_units.get(unit)
        if rate is not None and self._corrupt_now(rate):
            self.counters[unit].corrupted += 1
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data

    def _own_address(self, reply: bytes) -> bytes:
        """The reply under the address of the board that answered, as on a real line.

        A late reply then reaches a master that has moved on to the next unit with the
        late unit's address, and the master drops it, instead of taking one bay's
        registers for its neighbour's (tests/test_sim_late_reply.py).
        """
        answering, self._answering = self._answering, None
        if answering is None or reply[0] == answering or len(reply) < 4:
            return reply
        body = bytes([answering]) + reply[1:-2]
        return body + FramerRTU.compute_CRC(body).to_bytes(2, "big")

    def _echo(self, reply: bytes) -> bytes:
        """A write's normal reply as the Modbus spec words it, whatever the register holds now.

        pymodbus builds the reply from the register image after the write, and a board
        that acts on a write (the unlock magic is consumed, the register reads back 0)
        would then answer something other than what it was sent; a standard master
        rejects that. FC06 echoes the whole request; FC16 echoes address and quantity.
        """
        request = self._write_requests.pop(reply[0], None)
        if request is None or len(reply) < 2 or reply[1] != request[1]:
            return reply  # not a write's normal reply (an exception has bit 7 set)
        if request[1] == WRITE_SINGLE:
            return request[: rtu_timing.WRITE_SINGLE_BYTES]
        head = request[:6]
        return head + FramerRTU.compute_CRC(head).to_bytes(2, "big")

    def deliver_replies_to(self, sink: ReplySink | None) -> None:
        """Hand every reply to ``sink`` with its due time instead of sending it back.

        The pty gateway uses this: it writes each reply to the serial port at the instant
        the model says its last byte arrives, so no relay hop is added to the wire time.
        """
        self._reply_sink = sink

    def request_arriving(self) -> None:
        """The pty gateway saw request bytes: the line time starts now, not after the relay."""
        if self._gateway_rx is None:
            self._gateway_rx = time.perf_counter()

    def _trace_connect(self, connected: bool) -> None:
        if connected:
            self.connections += 1

    def _corrupt_now(self, rate: float) -> bool:
        """Deterministic corruption pattern: every reply at rate 1, a reproducible share below."""
        self._crc_tick += 1
        return rate >= 1.0 or ((self._crc_tick * 2654435761 + self._seed) % 1000) < rate * 1000

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, host: str, port: int, *, mbap: bool = False) -> int:
        """Listen for masters; return the bound port (``port`` may be 0).

        RTU over TCP by default; with ``mbap`` Modbus/TCP, as a gateway in that mode.
        """
        # id 0 is pymodbus' catch-all: it serves unit ids nobody has, and _trace_packet then
        # drops the reply, so a scan of an empty address hears silence as on a real line.
        nobody = SimDevice(id=0, simdata=[SimData(0, values=0, datatype=DataType.REGISTERS)])
        self._server = _LineServer(
            [self._device(unit) for unit in ALL_UNITS] + [nobody],
            framer=FramerType.SOCKET if mbap else FramerType.RTU,
            address=(host, port),
            trace_packet=mbap_trace(self._trace_packet) if mbap else self._trace_packet,
            trace_connect=self._trace_connect,
            broadcast_enable=True,
        )
        await self._server.serve_forever(background=True)
        listener: Any = self._server.transport
        return int(listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]

    def counters_json(self) -> dict[str, Any]:
        """Per-unit counters keyed by unit id, and the count of master connections.

        ``now`` is the simulator's clock (perf_counter), the one the ``*_at`` counters use.
        """
        return {
            "now": round(time.perf_counter(), 6),
            "connections": self.connections,
            "broadcasts": self.broadcasts,
            "broadcast_s": round(self.broadcast_s, 4),
            "line_busy_s": round(self.line_busy_s, 6),
            "replies_out": self.replies_out,
            "units": {str(unit): c.as_json() for unit, c in self.counters.items()},
        }
