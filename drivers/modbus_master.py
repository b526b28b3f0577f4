"""The wire end of the bus master: Modbus requests framed, sent and answered, one at a time.

Theory of operation: ``ModbusBus`` keeps the bookkeeping (lock, gap, retries, isolation,
statistics) and hands each request to a ``ModbusMaster``, which only frames it, writes
it and waits for the reply. ``ModbusBus``'s lock guarantees one request in flight, so
the master is a buffer, a future and a timer: the request is written at once, in the
caller's turn of the event loop (pymodbus' serial client wrote it a loop pass later), a
future waits for the reply and a ``loop.call_at`` timer fails it with ``NoReplyError``
after the timeout, counted from the moment the request went onto the line. The timer is
lazy both ways (measured, issue 16: bench/daemon_syscalls.py, --side-by-side): it is
not cancelled when a reply comes, and a request keeps the one armed for an earlier
request as long as that leaves it at least half a timeout; when it fires early it
re-arms at the waiting request's deadline. Re-armed only when it would fire within half
a timeout, it never fires while replies come within half a timeout (a timer that fired
and re-armed once per timeout period woke the process four times a second for nothing,
a tenth of the CPU per transaction at 9600 baud), and it is made about twice per
timeout period, not once per request (a timer per request, made and cancelled, cost 9 %
of the CPU per transaction at 115200 baud: asyncio's timer heap compares in Python).
Bytes that arrive go into the buffer, which is searched for the answer to the current
request only:

* RTU (a serial port, or an RTU-over-TCP gateway): a frame starting with the unit id
  that was asked, cut to the length its function code prescribes (5 + byte count for
  FC03/04, 8 for FC06/16, 5 for an exception) and passing the CRC-16/MODBUS check.
  Anything else - another unit's reply, a frame with a bad CRC, noise - is skipped. The
  buffer (and on a serial port the kernel's input queue) is discarded before each
  request is sent, so neither trailing garbage nor a late reply to an earlier request
  can be taken for this request's answer.
* Modbus/TCP (MBAP): frames are cut by the header's length field; only the frame with
  the current transaction id and unit id answers. A late reply carries an earlier
  transaction id and is dropped. A gateway's exception 0x0A/0x0B ("path unavailable",
  "target device failed to respond") means the unit did not answer: ``NoReplyError``.

Why not pymodbus' client: measured (issue 16), its async receive path (transaction
manager, generic framer, per-frame logging checks, ``asyncio.wait_for``) was about a
third of the daemon's CPU, and its serial client writes a loop pass late. pymodbus still
serves the simulator; the errors raised here are the ``BusClient`` contract's own
(``drivers.bus_client``), so the daemon does not load pymodbus at all.
"""

from __future__ import annotations

import asyncio
import os
import select
import struct
import termios
import time
from dataclasses import dataclass
from typing import Any

import serial

from drivers.bus_client import LinkLostError, NoReplyError  # what the master raises

FC_READ_HOLDING = 3
FC_READ_INPUT = 4
FC_WRITE_SINGLE = 6
FC_WRITE_MULTIPLE = 16
EXCEPTION_BIT = 0x80  # an exception reply carries the request's function code with bit 7 set
BROADCAST_UNIT = 0
#: Modbus/TCP gateway exceptions that mean the unit behind it never answered
GATEWAY_NO_ANSWER = frozenset({0x0A, 0x0B})
MBAP_HEADER_BYTES = 7  # transaction id, protocol id, length, unit id
MAX_MBAP_LENGTH = 254  # unit id + the largest PDU (253 bytes)
#: bytes kept while no request waits: noise on an idle line must not grow without bound
MAX_IDLE_BUFFER = 4096
#: frames remembered (requests with their CRC, replies known intact with their decoding):
#: a poller sends the same few requests and mostly hears the same replies, so most frames
#: skip the CRC; more distinct frames than this and the memory starts over
MAX_KNOWN_FRAMES = 256
READ_CHUNK = 512  # larger than any Modbus RTU frame (256 bytes)

_HEADER = struct.Struct(">BBHH")  # unit, function, address, count-or-value
_MBAP = struct.Struct(">HHHB")  # transaction id, protocol id 0, length, unit id
_ADDRESS_AND_WORD = struct.Struct(">HH")


@dataclass(frozen=True, slots=True)
class ModbusReply:
    """A decoded reply PDU: what ``ModbusBus`` checks against the request.

    ``registers`` carries a read's registers and FC06's echoed value; ``address`` and
    ``count`` a write's echo (FC06: count 1); ``exception_code`` an exception reply's
    code, whose ``function_code`` has bit 7 set.
    """

    function_code: int
    registers: tuple[int, ...] = ()
    address: int = 0
    count: int = 0
    exception_code: int = 0


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray, table: tuple[int, ...] = _CRC_TABLE) -> int:
    """CRC-16/MODBUS of ``data``; 0 over a whole frame (CRC included) means the frame is intact.

    Table-driven, a byte per step: 4 us for a 23-register reply against pymodbus'
    ``FramerRTU.compute_CRC`` at 11 us (measured on the 2-core development VM).
    """
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def rtu_frame(unit: int, pdu: bytes) -> bytes:
    """The RTU frame of ``pdu`` for ``unit``: address, PDU, CRC low byte first."""
    body = bytes((unit,)) + pdu
    return body + crc16(body).to_bytes(2, "little")


def decode_pdu(pdu: bytes) -> ModbusReply | None:
    """The reply a PDU carries, or None if it is not a well-formed reply we can read."""
    function_code = pdu[0]
    if function_code & EXCEPTION_BIT:
        if len(pdu) != 2:
            return None
        return ModbusReply(function_code, exception_code=pdu[1])
    if function_code in (FC_READ_HOLDING, FC_READ_INPUT):
        byte_count = pdu[1] if len(pdu) > 1 else -1
        if byte_count % 2 or len(pdu) != 2 + byte_count:
            return None
        return ModbusReply(function_code, struct.unpack_from(f">{byte_count // 2}H", pdu, 2))
    if len(pdu) != 5 or function_code not in (FC_WRITE_SINGLE, FC_WRITE_MULTIPLE):
        return None
    address, word = _ADDRESS_AND_WORD.unpack_from(pdu, 1)
    if function_code == FC_WRITE_SINGLE:
        return ModbusReply(function_code, (word,), address=address, count=1)
    return ModbusReply(function_code, address=address, count=word)


def rtu_reply_length(frame: bytes | bytearray, start: int) -> int:
    """Bytes of the RTU reply starting at ``start``, by its function code; 0 if unknowable."""
    if start + 1 >= len(frame):
        return 0
    function_code = frame[start + 1]
    if function_code & EXCEPTION_BIT:
        return 5
    if function_code in (FC_READ_HOLDING, FC_READ_INPUT):
        return 5 + frame[start + 2] if start + 2 < len(frame) else 0
    if function_code in (FC_WRITE_SINGLE, FC_WRITE_MULTIPLE):
        return 8
    return 0


class _TcpLink(asyncio.Protocol):
    """The gateway connection: hands every received chunk straight to the master."""

    def __init__(self, master: ModbusMaster) -> None:
        self._master = master

    def data_received(self, data: bytes) -> None:
        self._master._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._master._lost(exc)


class ModbusMaster:
    """A Modbus master on one serial port or gateway connection (``drivers.bus_client``'s port).

    ``mbap``: the connection speaks Modbus/TCP (MBAP header, no CRC); otherwise RTU frames.
    Only one request may be in flight (``ModbusBus`` holds a lock around each).
    """

    def __init__(self, *, timeout_s: float, mbap: bool = False) -> None:
        self.timeout_s = timeout_s
        self.mbap = mbap
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._pending: asyncio.Future[ModbusReply] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # loop time at which the timer fires
        self._deadline = 0.0  # loop time at which the waiting request times out
        #: perf_counter when the latest reply was read whole: the line's last frame ended
        #: then at the latest, and ``ModbusBus`` counts its t3.5 from there
        self.replied_at = 0.0
        self._request_frames: dict[bytes, bytes] = {}
        self._intact_replies: dict[bytes, ModbusReply] = {}
        self._unit = -1
        self._function_code = 0
        self._expected_bytes = 0  # the RTU reply's size, to tell a garbled one from silence
        self._garbled = False
        self._other_reply: ModbusReply | None = None  # the unit's reply to something else
        self._transaction_id = 0
        self._transport: asyncio.Transport | None = None
        self._port: serial.Serial | None = None
        self._fd = -1
        self._unsent = b""
        self._open = False

    # -- opening and closing ------------------------------------------------------------

    async def connect_tcp(self, host: str, port: int) -> None:
        """Connect to a gateway; ``OSError`` (refused, unreachable) or ``TimeoutError``."""
        async with asyncio.timeout(self.timeout_s):
            transport, _ = await self._loop.create_connection(lambda: _TcpLink(self), host, port)
        self._transport = transport
        self._open = True

    def open_serial(self, path: str, *, baud: int, parity: str, stopbits: int) -> None:
        """Open the port exclusively (a ``flock``: one master per line) and watch it.

        Raises pyserial's ``SerialException`` (or ``OSError``/``termios.error``/
        ``ValueError`` for a setting the port refuses); ``ModbusBus`` names the cause.
        """
        port = serial.Serial(
            baudrate=baud, bytesize=8, parity=parity, stopbits=stopbits, timeout=0, exclusive=True
        )
        port.port = path
        port.open()
        self._port = port
        self._fd = port.fileno()
        os.set_blocking(self._fd, False)
        self._loop.add_reader(self._fd, self._readable)
        self._open = True

    def close(self) -> None:
        """Let go of the port or connection; a request still waiting fails as a lost link."""
        self._lost(None)

    @property
    def connected(self) -> bool:
        """Whether the port or connection is open (a lost one stays closed)."""
        return self._open

    # -- the four requests (``drivers.bus_client.BusClient``) -----------------------------

    def read_input_registers(
        self, address: int, *, count: int, device_id: int
    ) -> asyncio.Future[ModbusReply]:
        """FC04: ``count`` input registers from ``address``."""
        return self._request(device_id, _HEADER.pack(device_id, FC_READ_INPUT, address, count))

    def read_holding_registers(
        self, address: int, *, count: int, device_id: int
    ) -> asyncio.Future[ModbusReply]:
        """FC03: ``count`` holding registers from ``address``."""
        return self._request(device_id, _HEADER.pack(device_id, FC_READ_HOLDING, address, count))

    def write_register(
        self, address: int, value: int, *, device_id: int, no_response_expected: bool = False
    ) -> asyncio.Future[ModbusReply | None]:
        """FC06; to unit 0 with ``no_response_expected`` a broadcast: sent, nobody answers."""
        head = _HEADER.pack(device_id, FC_WRITE_SINGLE, address, value)
        if device_id == BROADCAST_UNIT and no_response_expected:
            self._send(head)
            done: asyncio.Future[ModbusReply | None] = self._loop.create_future()
            done.set_result(None)
            return done
        return self._request(device_id, head)  # type: ignore[return-value] # never None

    def write_registers(
        self, address: int, values: list[int], *, device_id: int
    ) -> asyncio.Future[ModbusReply]:
        """FC16: ``values`` into consecutive holding registers from ``address``."""
        head = _HEADER.pack(device_id, FC_WRITE_MULTIPLE, address, len(values))
        data = struct.pack(f">B{len(values)}H", 2 * len(values), *values)
        return self._request(device_id, head + data)

    # -- one exchange -------------------------------------------------------------------

    def _request(self, unit: int, head: bytes) -> asyncio.Future[ModbusReply]:
        """Send ``head`` (unit id + PDU) and return the future its reply will settle."""
        if self._pending is not None and not self._pending.done():
            raise RuntimeError("a request is already waiting for its reply (one at a time)")
        # the timeout counts from the request going onto the line, not from after the write
        deadline = self._loop.time() + self.timeout_s
        self._send(head)
        self._unit = unit
        self._garbled = False
        self._other_reply = None
        function_code = self._function_code = head[1]
        if function_code in (FC_READ_HOLDING, FC_READ_INPUT):
            self._expected_bytes = 5 + 2 * int.from_bytes(head[4:6], "big")
        else:
            self._expected_bytes = 8
        future: asyncio.Future[ModbusReply] = self._loop.create_future()
        self._pending = future
        self._deadline = deadline
        if self._timer is None or self._timer_at < deadline - self.timeout_s / 2:
            # none armed, or it would fire within half a timeout: a timer of this request's
            # own (a reply is seldom that slow, so the old one will not wake us for nothing)
            self._cancel_timer()
            self._timer = self._loop.call_at(deadline, self._timer_fired)
            self._timer_at = deadline
        return future

    def _send(self, head: bytes) -> None:
        """Frame ``head`` and write it now; RTU first drops whatever was received before."""
        if not self._open:
            raise LinkLostError("the bus connection is closed")
        if self.mbap:
            self._transaction_id = (self._transaction_id + 1) & 0xFFFF
            frame = (
                _MBAP.pack(self._transaction_id, 0, len(head), head[0]) + head[1:]
            )  # MBAP length counts the unit id and the PDU
        else:
            self._buffer.clear()
            known = self._request_frames.get(head)
            if known is None:
                known = head + crc16(head).to_bytes(2, "little")
                _remember(self._request_frames, head, known)
            frame = known
        if self._transport is not None:
            self._transport.write(frame)
            return
        try:
            # a late reply or noise still in the kernel's queue is not this request's answer
            termios.tcflush(self._fd, termios.TCIFLUSH)
            self._write_serial(frame)
        except (OSError, termios.error) as exc:
            self._lost(exc)
            raise LinkLostError(f"writing to the serial port failed: {exc}") from exc

    def _write_serial(self, frame: bytes) -> None:
        try:
            written = os.write(self._fd, frame)
        except BlockingIOError:
            written = 0
        if written < len(frame):  # the UART's queue is full: the rest when it drains
            self._unsent = frame[written:]
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            written = os.write(self._fd, self._unsent)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc)
            return
        self._unsent = self._unsent[written:]
        if not self._unsent:
            self._loop.remove_writer(self._fd)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the adapter was unplugged, the pty's other end closed
            self._lost(exc)
            return
        if not data:
            # pyserial's timeout=0 sets VMIN=0/VTIME=0, where a read finding nothing returns
            # empty: a readiness whose bytes _send's flush has discarded since reads so. Only a
            # port that also polls hung up (an adapter unplugged) is gone.
            if _hung_up(self._fd):
                self._lost(None)
            return
        self._received(data)

    def _received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        future = self._pending
        if future is None or future.done():
            if len(buffer) > MAX_IDLE_BUFFER:
                buffer.clear()
            return
        outcome = self._mbap_reply() if self.mbap else self._rtu_reply()
        if outcome is None:
            return
        self._pending = None  # the timer, when it fires, finds nothing waiting
        if isinstance(outcome, ModbusReply):
            self.replied_at = time.perf_counter()
            future.set_result(outcome)
        else:
            future.set_exception(outcome)

    def _rtu_reply(self) -> ModbusReply | None:
        """The asked unit's reply in the buffer, if a complete one with a good CRC is there.

        A reply of the asked unit to another request (another function, another number of
        registers: a late reply to an earlier request) is skipped for a matching one that
        may follow; only if none comes is it handed over at the timeout, as a bad reply.
        """
        buffer = self._buffer
        unit = self._unit
        start = buffer.find(unit)
        while start >= 0:
            size = rtu_reply_length(buffer, start)
            if size and start + size <= len(buffer):
                frame = bytes(buffer[start : start + size])
                reply = self._intact_replies.get(frame) or self._check(frame)
                if reply is not None:
                    function_code = reply.function_code
                    if function_code == self._function_code and size == self._expected_bytes:
                        return reply  # the answer (FC06/16: whatever it echoes, ModbusBus judges)
                    if function_code == self._function_code | EXCEPTION_BIT:
                        return reply
                    if self._other_reply is None:
                        self._other_reply = reply
            start = buffer.find(unit, start + 1)
        return None

    def _check(self, frame: bytes) -> ModbusReply | None:
        """Decode an RTU frame not seen before: None if its CRC is wrong or it is malformed."""
        if crc16(frame) != 0:
            self._garbled = True
            return None
        reply = decode_pdu(frame[1:-2])
        if reply is not None:
            _remember(self._intact_replies, frame, reply)
        return reply

    def _mbap_reply(self) -> ModbusReply | NoReplyError | None:
        """The current transaction's reply; frames of earlier transactions are dropped."""
        buffer = self._buffer
        while len(buffer) > MBAP_HEADER_BYTES:
            transaction_id, protocol_id, length, unit = _MBAP.unpack_from(buffer)
            if protocol_id != 0 or not 2 <= length <= MAX_MBAP_LENGTH:
                buffer.clear()  # not Modbus/TCP: no frame boundary left to find
                return None
            end = 6 + length
            if len(buffer) < end:
                return None
            pdu = bytes(buffer[MBAP_HEADER_BYTES:end])
            del buffer[:end]
            if transaction_id != self._transaction_id or unit != self._unit:
                continue
            if pdu[0] & EXCEPTION_BIT and len(pdu) == 2 and pdu[1] in GATEWAY_NO_ANSWER:
                return NoReplyError(f"the gateway says unit {unit} did not answer ({pdu[1]:#04x})")
            reply = decode_pdu(pdu)
            if reply is not None:
                return reply
        return None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        future = self._pending
        if future is None or future.done():
            return  # answered (or given up) meanwhile: no timer until the next request
        if self._loop.time() < self._deadline:  # armed for an earlier request: wait on
            self._timer = self._loop.call_at(self._deadline, self._timer_fired)
            self._timer_at = self._deadline
            return
        self._time_out()

    def _time_out(self) -> None:
        future, self._pending = self._pending, None
        if future is None or future.done():
            return
        if self._other_reply is not None:  # the unit answered, but not this request
            self.replied_at = time.perf_counter()  # more of it may have come since: now
            future.set_result(self._other_reply)
            return
        garbled = self._garbled or (not self.mbap and self._starts_garbled())
        what = "a garbled reply" if garbled else "no reply"
        message = f"{what} from unit {self._unit} within {self.timeout_s:g} s"
        future.set_exception(NoReplyError(message, garbled=garbled))

    def _starts_garbled(self) -> bool:
        """Whether the buffer starts with a reply-sized frame whose CRC is wrong.

        Noise on the address or function byte hides the frame from the search by unit.
        """
        buffer = self._buffer
        size = 5 if len(buffer) > 1 and buffer[1] & EXCEPTION_BIT else self._expected_bytes
        return len(buffer) >= size and crc16(buffer[:size]) != 0

    def _lost(self, exc: BaseException | None) -> None:
        """The link is gone (or closed): release it and fail a waiting request."""
        self._open = False
        self._cancel_timer()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._port is not None:
            self._loop.remove_reader(self._fd)
            if self._unsent:
                self._loop.remove_writer(self._fd)
                self._unsent = b""
            self._port.close()
            self._port = None
        future, self._pending = self._pending, None
        if future is not None and not future.done():
            why = f": {exc}" if exc is not None else ""
            future.set_exception(LinkLostError(f"the bus connection was lost{why}"))


def _hung_up(fd: int) -> bool:
    """Whether the serial port ``fd`` reports a hang-up or an error right now."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    gone = select.POLLHUP | select.POLLERR | select.POLLNVAL
    return any(events & gone for _, events in poller.poll(0))


def _remember(memory: dict[bytes, Any], frame: bytes, value: Any) -> None:
    if len(memory) >= MAX_KNOWN_FRAMES:
        memory.clear()
    memory[frame] = value
