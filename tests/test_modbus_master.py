"""The wire end of the bus master against a peer that sends exactly the bytes we choose.

A tiny real TCP server (or a real pseudo-terminal) plays the unit or the gateway: it
records every byte the master writes and answers with scripted bytes, so each test
states, from the Modbus specs and docs/hardware.md's golden frames, what goes onto the
line and which replies must (and must not) be taken as the answer. The expected
registers are decoded here by hand from the golden bytes, not by the master's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import selectors
import socket
import sys
import threading
import time
import tty
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from drivers.bus_client import BusClient
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus, UnitBadReplyError
from drivers.modbus_master import LinkLostError, ModbusMaster, ModbusReply, NoReplyError
from tests.test_golden_frames import GOLDEN, crc16_modbus

TIMEOUT_S = 0.2


def _registers(reply: bytes) -> tuple[int, ...]:
    """A read reply's registers, by the spec: big-endian words after the byte count."""
    data = reply[3 : 3 + reply[2]]
    return tuple(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))


def _with_crc(body: bytes) -> bytes:
    return body + crc16_modbus(body)


#: Peer behaviour: given the request just heard, the byte strings to send (each its own write).
Script = Callable[[bytes], list[bytes]]


@dataclass
class Peer:
    """A TCP peer: records requests, answers each request per ``script``."""

    script: Script
    heard: list[bytes] = field(default_factory=list)
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(512):
                self.heard.append(data)
                for piece in self.script(data):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0)  # a loop pass: the master sees each piece apart

    def hang_up(self) -> None:
        for writer in self.writers:
            writer.close()


@contextlib.asynccontextmanager
async def peer_and_master(
    script: Script, *, mbap: bool = False
) -> AsyncIterator[tuple[Peer, ModbusMaster]]:
    peer = Peer(script)
    server = await asyncio.start_server(peer._serve, "127.0.0.1", 0)
    peer.port = server.sockets[0].getsockname()[1]
    master = ModbusMaster(timeout_s=TIMEOUT_S, mbap=mbap)
    await master.connect_tcp("127.0.0.1", peer.port)
    try:
        yield peer, master
    finally:
        master.close()
        server.close()


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


# -- golden frames: the bytes sent and the replies read ---------------------------------


def _send(master: ModbusMaster, request: bytes) -> Any:
    """Ask the master for ``request`` (a golden RTU frame) through its four requests."""
    unit, function = request[0], request[1]
    address = int.from_bytes(request[2:4], "big")
    word = int.from_bytes(request[4:6], "big")
    if function == 4:
        return master.read_input_registers(address, count=word, device_id=unit)
    if function == 3:
        return master.read_holding_registers(address, count=word, device_id=unit)
    if function == 6:
        return master.write_register(address, word, device_id=unit, no_response_expected=unit == 0)
    values = tuple(int.from_bytes(request[7 + 2 * i : 9 + 2 * i], "big") for i in range(word))
    return master.write_registers(address, list(values), device_id=unit)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_the_master_sends_the_golden_request_and_reads_the_golden_reply(name: str) -> None:
    golden = GOLDEN[name]

    async def scenario() -> None:
        async with peer_and_master(lambda _req: [golden.reply] if golden.reply else []) as (
            peer,
            master,
        ):
            reply = await _send(master, golden.request)
            if not golden.reply:  # the broadcast: sent, nobody answers, nothing awaited
                assert reply is None
                await _heard(peer, golden.request)
                return
            assert b"".join(peer.heard) == golden.request
            function = golden.reply[1]
            assert reply.function_code == function
            if function & 0x80:
                assert reply.exception_code == golden.reply[2]
            elif function in (3, 4):
                assert reply.registers == _registers(golden.reply)
            else:  # FC06 echoes address and value, FC16 address and quantity
                address = int.from_bytes(golden.reply[2:4], "big")
                word = int.from_bytes(golden.reply[4:6], "big")
                assert reply.address == address
                assert (reply.registers[0] if function == 6 else reply.count) == word

    run(scenario())


async def _heard(peer: Peer, expected: bytes) -> None:
    """Wait until the peer has heard ``expected`` (the master does not wait for a broadcast)."""
    async with asyncio.timeout(2):
        while len(b"".join(peer.heard)) < len(expected):
            await asyncio.sleep(0.001)
    assert b"".join(peer.heard) == expected


# -- replies that are not the answer -------------------------------------------------------

STATUS = GOLDEN["bay-status"]  # unit 3, FC04, 23 registers
COMMANDS = GOLDEN["bay-commands"]  # unit 1, FC03, 4 registers
#: bay 1 answering a status read with other data, a valid frame of the wrong unit for bay 3
BAY1_STATUS = _with_crc(bytes([1]) + STATUS.reply[1:-2])


async def _status(master: ModbusMaster) -> ModbusReply:
    return await master.read_input_registers(0, count=23, device_id=3)


def test_a_reply_from_another_unit_is_not_the_answer() -> None:
    async def scenario() -> None:
        async with peer_and_master(lambda _req: [BAY1_STATUS]) as (_peer, master):
            with pytest.raises(NoReplyError) as silent:
                await _status(master)
            assert not silent.value.garbled  # silence from bay 3, not a CRC error

    run(scenario())


def test_the_asked_units_reply_is_found_after_another_units() -> None:
    async def scenario() -> None:
        async with peer_and_master(lambda _req: [BAY1_STATUS + STATUS.reply]) as (_peer, master):
            assert (await _status(master)).registers == _registers(STATUS.reply)

    run(scenario())


def test_a_reply_with_a_bad_crc_is_garbled_not_the_answer() -> None:
    corrupted = bytearray(STATUS.reply)
    corrupted[10] ^= 0x01  # one bit of noise in a register

    async def scenario() -> None:
        async with peer_and_master(lambda _req: [bytes(corrupted)]) as (_peer, master):
            with pytest.raises(NoReplyError) as garbled:
                await _status(master)
            assert garbled.value.garbled

    run(scenario())


def test_a_late_reply_is_not_taken_for_the_next_requests_answer() -> None:
    """Bay 3 answers only after the master gave up and asked again (bay 3, then bay 1)."""
    answers = iter(
        [
            [],  # bay 3's status: silence within the timeout ...
            [STATUS.reply, COMMANDS.reply],  # ... its reply comes with bay 1's
        ]
    )

    async def scenario() -> None:
        async with peer_and_master(lambda _req: next(answers)) as (_peer, master):
            with pytest.raises(NoReplyError):
                await _status(master)
            reply = await master.read_holding_registers(100, count=4, device_id=1)
            assert reply.registers == _registers(COMMANDS.reply) == (7, 0, 1, 500)

    run(scenario())


def test_a_late_reply_of_the_same_unit_to_another_request_is_skipped() -> None:
    """Bay 3 asked for its status, then for its commands: the late status is not them."""
    late_commands = _with_crc(bytes.fromhex("030308") + bytes.fromhex("0001000200030004"))
    answers = iter([[], [STATUS.reply, late_commands]])

    async def scenario() -> None:
        async with peer_and_master(lambda _req: next(answers)) as (_peer, master):
            with pytest.raises(NoReplyError):
                await _status(master)
            reply = await master.read_holding_registers(100, count=4, device_id=3)
            assert reply.function_code == 3 and reply.registers == (1, 2, 3, 4)

    run(scenario())


def test_trailing_bytes_after_a_reply_are_discarded_before_the_next_request() -> None:
    """A valid-looking frame of bay 1 trailing bay 3's reply is not bay 1's answer later."""
    forged_bay1 = _with_crc(bytes.fromhex("010308") + bytes(8))
    answers = iter([[STATUS.reply + forged_bay1], [COMMANDS.reply]])

    async def scenario() -> None:
        async with peer_and_master(lambda _req: next(answers)) as (_peer, master):
            assert (await _status(master)).registers == _registers(STATUS.reply)
            reply = await master.read_holding_registers(100, count=4, device_id=1)
            assert reply.registers == (7, 0, 1, 500)

    run(scenario())


def test_a_reply_arriving_in_pieces_is_put_together() -> None:
    reply = STATUS.reply
    pieces = [reply[:1], reply[1:3], reply[3:30], reply[30:-1], reply[-1:]]

    async def scenario() -> None:
        async with peer_and_master(lambda _req: pieces) as (_peer, master):
            assert (await _status(master)).registers == _registers(reply)

    run(scenario())


def test_a_reply_to_another_function_is_handed_over_for_the_bus_to_refuse() -> None:
    """The unit answered, just not what was asked: ModbusBus counts it as a bad reply."""
    fc03 = _with_crc(bytes.fromhex("0303020007"))

    async def scenario() -> None:
        async with peer_and_master(lambda _req: [fc03]) as (_peer, master):
            reply = await _status(master)
            assert (reply.function_code, reply.registers) == (3, (7,))

    run(scenario())


def test_a_lost_connection_fails_the_waiting_request_and_every_later_one() -> None:
    async def scenario() -> None:
        async with peer_and_master(lambda _req: []) as (peer, master):
            waiting = asyncio.ensure_future(_status(master))
            async with asyncio.timeout(2):
                while not peer.heard:
                    await asyncio.sleep(0.001)
            peer.hang_up()
            with pytest.raises(LinkLostError):
                await waiting
            assert not master.connected
            with pytest.raises(LinkLostError):
                await _status(master)

    run(scenario())


class _TimerWakeUps(selectors.DefaultSelector):
    """The loop's selector, counting the waits that ended with no I/O: a timer woke it."""

    def __init__(self) -> None:
        super().__init__()
        self.timer_wake_ups = 0

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        ready = super().select(timeout)
        if not ready and timeout != 0:  # 0: the loop only looked, it had work queued
            self.timer_wake_ups += 1
        return ready


def _slow_unit(listener: socket.socket, reply_after_s: float, replies: int) -> None:
    """Bay 3 on its own thread: each status reply after ``reply_after_s``, as a slow line."""
    connection, _ = listener.accept()
    with connection:
        for _ in range(replies):
            if not connection.recv(512):
                return
            time.sleep(reply_after_s)  # the line's wire time at a low baud rate
            connection.sendall(STATUS.reply)


def test_a_busy_line_wakes_the_master_only_for_its_replies() -> None:
    """Answered requests leave no timer behind: the process sleeps until the next reply.

    A request every 0.1 s, each answered within the 0.5 s timeout, for 1.2 s: nothing but
    the replies may wake the event loop (a timer that outlived its request woke it every
    timeout period, a tenth of the daemon's CPU at 9600 baud).
    """
    requests = 12
    listener = socket.create_server(("127.0.0.1", 0))
    unit = threading.Thread(target=_slow_unit, args=(listener, 0.1, requests))
    unit.start()
    selector = _TimerWakeUps()

    async def scenario() -> None:
        master = ModbusMaster(timeout_s=0.5)
        await master.connect_tcp("127.0.0.1", listener.getsockname()[1])
        try:
            for _ in range(requests):
                assert (await _status(master)).registers == _registers(STATUS.reply)
        finally:
            master.close()

    try:
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
            runner.run(scenario())
    finally:
        unit.join(timeout=5)
        listener.close()
    assert selector.timer_wake_ups == 0


def test_a_request_given_up_does_not_time_out_the_next_one() -> None:
    """A caller cancels its wait (shutdown, Ctrl-C); the next request keeps its own timeout."""

    async def scenario() -> None:
        async with peer_and_master(lambda _req: []) as (_peer, master):
            loop = asyncio.get_running_loop()
            abandoned = _send(master, STATUS.request)
            abandoned.cancel()
            await asyncio.sleep(TIMEOUT_S / 2)  # the abandoned request's timeout is half gone
            second = _send(master, STATUS.request)
            # timers run in deadline order: this one runs after the abandoned request's
            # deadline and before the second's own, whatever the machine's load
            settled: asyncio.Future[bool] = loop.create_future()
            loop.call_at(loop.time() + TIMEOUT_S * 0.75, lambda: settled.set_result(second.done()))
            assert not await settled
            with pytest.raises(NoReplyError):
                await second

    run(scenario())


# -- Modbus/TCP (MBAP) ----------------------------------------------------------------


def _mbap(transaction_id: int, rtu: bytes) -> bytes:
    """The Modbus/TCP ADU of an RTU frame: MBAP header (protocol 0, length), no CRC."""
    pdu = rtu[:-2]
    return transaction_id.to_bytes(2, "big") + bytes(2) + len(pdu).to_bytes(2, "big") + pdu


def test_mbap_requests_carry_increasing_transaction_ids_and_the_unit_id() -> None:
    def gateway(request: bytes) -> list[bytes]:
        return [_mbap(int.from_bytes(request[:2], "big"), STATUS.reply)]

    async def scenario() -> None:
        async with peer_and_master(gateway, mbap=True) as (peer, master):
            for _ in range(2):
                assert (await _status(master)).registers == _registers(STATUS.reply)
            assert peer.heard == [_mbap(1, STATUS.request), _mbap(2, STATUS.request)]

    run(scenario())


def test_an_mbap_reply_with_another_transaction_id_is_not_the_answer() -> None:
    other = _with_crc(bytes([3]) + STATUS.reply[1:-8] + bytes(6))

    def gateway(request: bytes) -> list[bytes]:
        transaction_id = int.from_bytes(request[:2], "big")
        if transaction_id == 1:
            return [_mbap(transaction_id + 7, STATUS.reply)]  # nobody asked for this one
        # the first request's reply comes late, in front of the second's
        return [_mbap(transaction_id - 1, other), _mbap(transaction_id, STATUS.reply)]

    async def scenario() -> None:
        async with peer_and_master(gateway, mbap=True) as (_peer, master):
            with pytest.raises(NoReplyError) as silent:
                await _status(master)
            assert not silent.value.garbled  # no CRC on the TCP side: never garbled
            assert (await _status(master)).registers == _registers(STATUS.reply)

    run(scenario())


def test_a_gateways_no_answer_exception_is_silence_at_once() -> None:
    """0x0B: the gateway's target device failed to respond (Modbus Application Protocol)."""

    def gateway(request: bytes) -> list[bytes]:
        head = request[:4] + (3).to_bytes(2, "big")
        return [head + bytes([3, 0x84, 0x0B])]

    async def scenario() -> None:
        async with peer_and_master(gateway, mbap=True) as (_peer, master):
            started = asyncio.get_running_loop().time()
            with pytest.raises(NoReplyError, match="did not answer"):
                await _status(master)
            assert asyncio.get_running_loop().time() - started < TIMEOUT_S

    run(scenario())


# -- a serial port (a real pseudo-terminal) ---------------------------------------------


@contextlib.contextmanager
def pseudo_terminal() -> Iterator[tuple[int, int, str]]:
    """A raw pty pair: the board's end, the serial port's end and the port's path."""
    board, port = os.openpty()
    tty.setraw(port)
    try:
        yield board, port, os.ttyname(port)
    finally:
        os.close(board)
        os.close(port)


@contextlib.contextmanager
def serial_master(path: str) -> Iterator[ModbusMaster]:
    """A master on the serial port at ``path``, 19200 8N1 (a pty takes no parity twice)."""
    master = ModbusMaster(timeout_s=TIMEOUT_S)
    master.open_serial(path, baud=19200, parity="N", stopbits=1)
    try:
        yield master
    finally:
        master.close()


def test_on_a_serial_port_the_golden_request_goes_out_and_a_split_reply_is_read() -> None:
    heard = bytearray()

    async def scenario(board: int, path: str) -> None:
        loop = asyncio.get_running_loop()

        def board_readable() -> None:
            heard.extend(os.read(board, 512))
            if len(heard) == len(STATUS.request):
                os.write(board, STATUS.reply[:20])  # the rest a little later: two reads
                loop.call_later(0.003, os.write, board, STATUS.reply[20:])

        with serial_master(path) as master:
            loop.add_reader(board, board_readable)
            try:
                assert (await _status(master)).registers == _registers(STATUS.reply)
            finally:
                loop.remove_reader(board)

    with pseudo_terminal() as (board, _port, path):
        run(scenario(board, path))
    assert bytes(heard) == STATUS.request


def test_a_late_reply_flushed_by_the_next_request_leaves_the_serial_port_open() -> None:
    """A late reply lands as the next request goes out: the request's flush discards it.

    The loop saw the port readable before the flush; the read after it finds nothing, which
    on a serial port in polling mode (VMIN=0) is an empty read, not an unplugged adapter.
    """

    async def scenario(board: int, port: int, path: str) -> None:
        with serial_master(path) as master:
            os.write(board, STATUS.reply)  # the late reply reaches the port ...
            select.select([port], [], [], 5)  # (the tty hands it on in a kernel worker)
            await asyncio.sleep(0)  # ... and the loop's next pass sends first, then reads
            with pytest.raises(NoReplyError):  # silence, not a lost link
                await _status(master)
            assert master.connected

    with pseudo_terminal() as (board, port, path):
        run(scenario(board, port, path))


# -- through the bus master: what a technician sees --------------------------------------


def test_a_read_reply_with_other_registers_than_asked_is_a_bad_reply() -> None:
    """A CRC-valid FC04 reply of bay 3 with 1 register to a 23-register read: not data."""
    short = _with_crc(bytes.fromhex("0304020007"))

    async def scenario() -> None:
        async with peer_and_master(lambda _req: [short]) as (peer, _master):
            bus = ModbusBus(parse_endpoint(f"tcp://127.0.0.1:{peer.port}"), timeout_s=TIMEOUT_S)
            await bus.connect()
            try:
                with pytest.raises(UnitBadReplyError, match="1 registers to a read of 23"):
                    await bus.read_input(3, 0, 23)
                assert bus.unit_stats(3).bad_replies == 1
            finally:
                bus.close()

    run(scenario())


class _AnsweringUnit:
    """A ``BusClient`` whose every status read is answered, the reply read at ``replied_at``."""

    def __init__(self, reply_read_ago_s: float) -> None:
        self.reply_read_ago_s = reply_read_ago_s
        self.replied_at = 0.0

    def read_input_registers(
        self, address: int, *, count: int, device_id: int
    ) -> asyncio.Future[ModbusReply]:
        del address, device_id
        self.replied_at = time.perf_counter() - self.reply_read_ago_s
        done: asyncio.Future[ModbusReply] = asyncio.get_running_loop().create_future()
        done.set_result(ModbusReply(4, registers=(0,) * count))
        return done


def _goes_out_at_once(bus: ModbusBus) -> bool:
    """Whether a status read reaches the wire without waiting (its coroutine never suspends)."""
    read = bus.read_input(3, 0, 23)
    try:
        read.send(None)
    except StopIteration:
        return True
    read.close()  # it waits for the line's t3.5: not sent
    return False


@pytest.mark.parametrize(("reply_read_ago_s", "waits"), [(10.0, False), (0.0, True)])
def test_the_inter_frame_gap_counts_from_when_the_reply_was_read(
    reply_read_ago_s: float, waits: bool
) -> None:
    """t3.5 (32 ms at 1200 baud) runs from the reply's last byte, not from the caller's turn.

    A reply read ten seconds ago (a loaded loop, the poller's own bookkeeping) has left
    the line quiet long enough: the next request goes out at once. A reply read just now
    still holds it back for t3.5 (the Modbus spec's frame end; a guard, it held before).
    """

    async def scenario() -> None:
        unit = _AnsweringUnit(reply_read_ago_s)
        endpoint = parse_endpoint("serial:///dev/ttyUSB9?baud=1200&parity=N")
        bus = ModbusBus(endpoint, client=cast("BusClient", unit))  # asked for reads only
        await bus.read_input(3, 0, 23)
        assert _goes_out_at_once(bus) is not waits

    run(scenario())


_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30  # prctl(2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timer slack is Linux's")
def test_a_serial_bus_asks_for_sleeps_that_end_on_time() -> None:
    """The t3.5 before each request is slept; Linux may end a sleep 50 us late by default.

    On a serial line that is wire time lost every transaction, so the bus asks for 1 ns.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_TIMERSLACK, 0, 0, 0, 0)  # 0: back to the default (50 us)
    assert libc.prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0) > 1

    async def scenario(path: str) -> None:
        async with ModbusBus(parse_endpoint(f"serial://{path}?baud=19200&parity=N")):
            assert libc.prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0) == 1

    try:
        with pseudo_terminal() as (_board, _port, path):
            run(scenario(path))
    finally:
        libc.prctl(_PR_SET_TIMERSLACK, 0, 0, 0, 0)
