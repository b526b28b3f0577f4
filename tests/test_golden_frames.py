"""The master's bytes against the golden frames of docs/hardware.md, written from the spec.

A tiny RTU-over-TCP "unit" records what the master writes and answers the documented
reply, so the test compares the master with the Modbus spec, not with our simulator.
The CRC here is a separate bit-by-bit CRC-16/MODBUS, not the one pymodbus or we use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import threading
import time
import tty
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from drivers.boards import BayBoard, CabinetBoard, EnergyMeter
from drivers.modbus_bus import (
    ExceptionReplyError,
    ModbusBus,
    UnitBadEchoError,
    UnitBadReplyError,
)
from protocol import bay_map, firmware_map, rtu_timing
from tests.conftest import master

HARDWARE_DOC = Path(__file__).resolve().parent.parent / "docs" / "hardware.md"


def crc16_modbus(data: bytes) -> bytes:
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF), low byte first on the wire."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


@dataclass(frozen=True)
class Golden:
    name: str
    request: bytes
    reply: bytes


def golden_frames() -> dict[str, Golden]:
    """Every frame of the ```frames block in docs/hardware.md, by its [id]."""
    block = re.search(r"```frames\n(.*?)```", HARDWARE_DOC.read_text(), re.DOTALL)
    assert block is not None, "docs/hardware.md has no ```frames block"
    frames: dict[str, Golden] = {}
    for entry in block.group(1).strip().split("\n\n"):
        title, request, reply = entry.splitlines()
        ident = re.fullmatch(r"\[([a-z-]+)\] .+", title)
        assert ident is not None, title
        assert request.startswith("-> ") and reply.startswith("<- ")
        raw_reply = b"" if reply == "<- (no reply)" else bytes.fromhex(reply[3:])
        frames[ident.group(1)] = Golden(title, bytes.fromhex(request[3:]), raw_reply)
    return frames


GOLDEN = golden_frames()


@dataclass
class RecordingUnit:
    """An RTU-over-TCP peer that records requests and answers each with scripted bytes."""

    replies: list[bytes]
    heard: bytearray = field(default_factory=bytearray)
    port: int = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(512):
                self.heard += data
                if self.replies and (reply := self.replies.pop(0)):
                    writer.write(reply)
                    await writer.drain()


@contextlib.asynccontextmanager
async def recording_unit(*replies: bytes) -> AsyncIterator[RecordingUnit]:
    unit = RecordingUnit(list(replies))
    server = await asyncio.start_server(unit._serve, "127.0.0.1", 0)
    unit.port = server.sockets[0].getsockname()[1]
    try:
        yield unit
    finally:
        server.close()


def test_every_golden_frame_carries_a_correct_crc() -> None:
    assert len(GOLDEN) >= 11
    for frame in GOLDEN.values():
        for raw in (frame.request, frame.reply):
            if raw:
                assert crc16_modbus(raw[:-2]) == raw[-2:], frame.name


async def _bay_status(bus: ModbusBus) -> None:
    status = await BayBoard(bus, 3).read_status()
    assert status.map_version == bay_map.MAP_VERSION
    assert bay_map.firmware_version_str(status.firmware_version) == "1.3"
    assert status.door_closed and status.locked and not status.battery_present
    assert status.bay_temp_c == pytest.approx(25.0)
    assert status.battery is None and status.door_open_count == 7


async def _bay_commands(bus: ModbusBus) -> None:
    assert await bus.read_holding(1, bay_map.COMMAND_START, bay_map.COMMAND_COUNT) == [7, 0, 1, 500]


async def _heartbeat(bus: ModbusBus) -> None:
    await BayBoard(bus, 1).heartbeat(7)


async def _unlock(bus: ModbusBus) -> None:
    await BayBoard(bus, 5).unlock(retries=0)


async def _charger(bus: ModbusBus) -> None:
    await BayBoard(bus, 2).set_charger(enabled=True, current_limit_a=5.0)


async def _firmware_chunk(bus: ModbusBus) -> None:
    regs = firmware_map.encode_chunk(256, bytes.fromhex("DEADBEEF"))
    await bus.write_registers(4, firmware_map.CHUNK_START, regs)


async def _broadcast(bus: ModbusBus) -> None:
    await bus.broadcast_register(bay_map.CommandReg.HEARTBEAT, 42)


async def _exception(bus: ModbusBus) -> None:
    with pytest.raises(ExceptionReplyError) as refused:
        await bus.write_register(1, bay_map.CommandReg.UNLOCK, 1)
    assert refused.value.code == 3 and bus.unit_stats(1).exception_replies == 1


async def _cabinet_status(bus: ModbusBus) -> None:
    status = await CabinetBoard(bus).read_status()
    assert status.mains_present and status.contactor_closed and not status.smoke
    assert status.cabinet_temp_c == pytest.approx(21.5)


async def _meter(bus: ModbusBus) -> None:
    reading = await EnergyMeter(bus).read()
    assert (reading.voltage_v, reading.current_a, reading.power_w) == (230.0, 4.5, 1035.0)
    assert reading.energy_kwh == 1234.5


USES: dict[str, tuple[tuple[str, ...], Callable[[ModbusBus], Awaitable[None]]]] = {
    "bay-status": (("bay-status",), _bay_status),
    "bay-commands": (("bay-commands",), _bay_commands),
    "heartbeat": (("heartbeat",), _heartbeat),
    "unlock": (("unlock",), _unlock),
    "charger": (("charger",), _charger),
    "firmware-chunk": (("firmware-chunk",), _firmware_chunk),
    "broadcast": (("broadcast",), _broadcast),
    "exception": (("exception",), _exception),
    "cabinet-status": (("cabinet-status",), _cabinet_status),
    "meter": (("meter-instant", "meter-energy"), _meter),
}


def test_every_golden_frame_is_exercised() -> None:
    used = {ident for frames, _ in USES.values() for ident in frames}
    assert used == set(GOLDEN)


@pytest.mark.parametrize("use", sorted(USES))
def test_the_master_speaks_the_golden_frames(use: str) -> None:
    frames, run = USES[use]
    golden = [GOLDEN[ident] for ident in frames]

    async def scenario() -> bytes:
        async with recording_unit(*(g.reply for g in golden)) as unit:
            async with master(f"tcp://127.0.0.1:{unit.port}", timeout_s=0.5) as bus:
                await run(bus)
            return bytes(unit.heard)

    assert asyncio.run(scenario()) == b"".join(g.request for g in golden)


def _with_crc(body: bytes) -> bytes:
    return body + crc16_modbus(body)


@pytest.mark.parametrize(
    ("reply", "what"),
    [
        (_with_crc(bytes.fromhex("050600650000")), "value 0 echoed"),
        (_with_crc(bytes.fromhex("0506006655AA")), "another address echoed"),
    ],
)
def test_a_write_whose_echo_differs_is_a_bus_error(reply: bytes, what: str) -> None:
    """The unlock register reads back 0 once consumed: an echo of 0 is not an echo."""

    async def scenario() -> None:
        async with (
            recording_unit(reply) as unit,
            master(f"tcp://127.0.0.1:{unit.port}", timeout_s=0.3) as bus,
        ):
            with pytest.raises(UnitBadEchoError, match="bay 5: the reply to a write at 101"):
                await BayBoard(bus, 5).unlock(retries=0)
            stats = bus.unit_stats(5)
            assert (stats.bad_replies, stats.ok, stats.exception_replies) == (1, 0, 0), what

    asyncio.run(scenario())


def test_an_fc16_echo_with_another_quantity_is_a_bus_error() -> None:
    async def scenario() -> None:
        async with (
            recording_unit(_with_crc(bytes.fromhex("021000660001"))) as unit,
            master(f"tcp://127.0.0.1:{unit.port}", timeout_s=0.3) as bus,
        ):
            with pytest.raises(UnitBadEchoError):
                await bus.write_registers(2, bay_map.CommandReg.CHARGER_ENABLE, [1, 500])
            assert bus.unit_stats(2).bad_replies == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "reply",
    [
        _with_crc(bytes.fromhex("0503020007")),  # an FC03 reply to an FC04 request
        _with_crc(bytes.fromhex("058302")),  # an exception to FC03, not to our FC04
    ],
    ids=["normal-reply", "exception-reply"],
)
def test_a_reply_to_another_function_is_a_bus_error(reply: bytes) -> None:
    async def scenario() -> None:
        async with (
            recording_unit(reply) as unit,
            master(f"tcp://127.0.0.1:{unit.port}", timeout_s=0.3) as bus,
        ):
            with pytest.raises(UnitBadReplyError, match="replied with function 3 to a function 4"):
                await bus.read_input(5, 0, 1)
            stats = bus.unit_stats(5)
            assert (stats.bad_replies, stats.ok, stats.exception_replies) == (1, 0, 0)

    asyncio.run(scenario())


@pytest.mark.parametrize("baud", [9600, 115200])
def test_the_master_keeps_t35_between_transactions_on_a_serial_line(baud: int) -> None:
    """As the board sees it: from the end of its reply to the next request's first byte."""
    golden = GOLDEN["bay-status"]
    pty_master, pty_slave = os.openpty()
    tty.setraw(pty_slave)
    replied: list[float] = []
    arrived: list[float] = []
    stop = threading.Event()

    def board() -> None:
        pending = b""
        while not stop.is_set():
            if not select.select([pty_master], [], [], 0.02)[0]:
                continue
            data = os.read(pty_master, 512)
            if not pending:
                arrived.append(time.perf_counter())
            pending += data
            if len(pending) >= len(golden.request):
                # stamped as the write starts: once the bytes are in, the master (this
                # process's other thread) may hold the GIL for up to 5 ms before this thread
                # could stamp "after", which made a kept gap look short under load
                replied.append(time.perf_counter())
                os.write(pty_master, golden.reply)
                pending = b""

    async def poll() -> None:
        url = f"serial://{os.ttyname(pty_slave)}?baud={baud}&parity=N"
        async with master(url, timeout_s=0.5) as bus:
            for _ in range(6):
                await BayBoard(bus, 3).read_status()

    worker = threading.Thread(target=board, daemon=True)
    worker.start()
    try:
        asyncio.run(poll())
    finally:
        stop.set()
        worker.join(timeout=2)
        os.close(pty_master)
        os.close(pty_slave)
    gaps = [nxt - reply for reply, nxt in zip(replied, arrived[1:], strict=False)]
    assert len(gaps) == 5
    assert min(gaps) >= rtu_timing.inter_frame_gap(baud)
