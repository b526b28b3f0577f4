"""A master on the simulator's serial port never hears a reply sooner than the wire allows.

``cabinet sim`` over a pseudo-terminal writes each reply when the wire-time model says
its last byte arrives (request frame and t3.5, the board's turnaround, reply frame),
timed from when the request reached the pty. A reply that came sooner would flatter
every master and benchmark measured against it, so these tests time, as a master on
the port does, from writing the request to holding the whole reply, and hold that
against the model worked out from the frames' own bytes and the simulator's own
``busy_s`` counter. Only the lower bound is asserted: lateness is a figure for
``bench/bus_cycle.py`` on a quiet machine, not for a loaded CI runner.
"""

from __future__ import annotations

import os
import select
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymodbus.framer import FramerRTU

from protocol import bay_map, rtu_timing
from tests.conftest import SimProcess, start_sim_process, stop_sim_process

BAUD = 115200
REPLY_MS = 20  # a slow board: a reply that skipped it would be ~20 ms early, not a jitter
UNMAPPED_REGISTER = 0x7000  # no board has it: the answer is exception 0x02


@pytest.fixture
def slow_pty_sim(tmp_path: Path) -> Iterator[SimProcess]:
    sim = start_sim_process(
        "--baud", str(BAUD), "--reply-ms", str(REPLY_MS), bus=f"pty://{tmp_path}/bus"
    )
    yield sim
    stop_sim_process(sim)


class RawMaster:
    """A master with nothing between it and the port: write a frame, read the reply's bytes."""

    def __init__(self, sim: SimProcess) -> None:
        self.fd = os.open(sim.bus.removeprefix("serial://").split("?")[0], os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)

    def transact(self, unit: int, pdu: bytes, reply_bytes: int) -> tuple[bytes, float]:
        """Send one request; return the reply and the seconds from request sent to reply held."""
        body = bytes([unit]) + pdu
        sent = time.perf_counter()
        os.write(self.fd, body + FramerRTU.compute_CRC(body).to_bytes(2, "big"))
        reply = b""
        while len(reply) < reply_bytes:
            readable, _, _ = select.select([self.fd], [], [], 5.0)
            assert readable, f"unit {unit}: no reply within 5 s (got {reply.hex()})"
            reply += os.read(self.fd, 256)
        return reply, time.perf_counter() - sent

    def close(self) -> None:
        os.close(self.fd)


def _model(request_bytes: int, reply_bytes: int) -> float:
    """The earliest a reply's last byte can arrive: request frame (with t3.5), turnaround, reply."""
    return (
        rtu_timing.frame_time(request_bytes, BAUD)
        + REPLY_MS / 1000.0
        + reply_bytes * rtu_timing.char_time(BAUD)
    )


def _read_pdu(function_code: int, start: int, count: int) -> bytes:
    return bytes([function_code]) + start.to_bytes(2, "big") + count.to_bytes(2, "big")


def test_a_read_reply_comes_no_sooner_than_the_line_and_the_board_allow(
    slow_pty_sim: SimProcess,
) -> None:
    master = RawMaster(slow_pty_sim)
    busy_before = slow_pty_sim.state()["bus"]["units"]["3"]["busy_s"]
    try:
        reply_bytes = rtu_timing.read_reply_bytes(bay_map.STATUS_COUNT)
        pdu = _read_pdu(4, bay_map.STATUS_START, bay_map.STATUS_COUNT)
        reply, took = master.transact(3, pdu, reply_bytes)
    finally:
        master.close()
    assert reply[:2] == bytes([3, 4]) and len(reply) == reply_bytes
    assert took >= _model(rtu_timing.READ_REQUEST_BYTES, reply_bytes)
    # the simulator booked the same line time for it (plus the t3.5 after the reply)
    busy = slow_pty_sim.state()["bus"]["units"]["3"]["busy_s"] - busy_before
    assert took >= busy - rtu_timing.inter_frame_gap(BAUD) - 0.0001  # busy_s is rounded


def test_writes_and_garbled_replies_keep_the_wire_time_too(slow_pty_sim: SimProcess) -> None:
    slow_pty_sim.ctl("fault", "crc", "--bay", "2")
    master = RawMaster(slow_pty_sim)
    try:
        single = bytes([6]) + bay_map.CommandReg.HEARTBEAT.to_bytes(2, "big") + (1).to_bytes(2)
        echo, took_single = master.transact(1, single, rtu_timing.WRITE_SINGLE_BYTES)
        block = bytes([16]) + bay_map.CommandReg.CHARGER_ENABLE.to_bytes(2, "big")
        block += (2).to_bytes(2, "big") + bytes([4]) + (0).to_bytes(2) + (500).to_bytes(2, "big")
        acked, took_block = master.transact(1, block, rtu_timing.WRITE_SINGLE_BYTES)
        reply_bytes = rtu_timing.read_reply_bytes(bay_map.STATUS_COUNT)
        pdu = _read_pdu(4, bay_map.STATUS_START, bay_map.STATUS_COUNT)
        garbled, took_garbled = master.transact(2, pdu, reply_bytes)
    finally:
        master.close()
    assert echo[:2] == bytes([1, 6]) and acked[:2] == bytes([1, 16])
    assert FramerRTU.compute_CRC(garbled[:-2]).to_bytes(2, "big") != garbled[-2:]
    write_single = rtu_timing.WRITE_SINGLE_BYTES
    assert took_single >= _model(write_single, write_single)
    assert took_block >= _model(rtu_timing.write_multiple_request_bytes(2), write_single)
    assert took_garbled >= _model(rtu_timing.READ_REQUEST_BYTES, reply_bytes)


def test_an_exception_the_server_makes_itself_still_waits_for_the_board(
    slow_pty_sim: SimProcess,
) -> None:
    """An illegal address is answered by pymodbus without asking the board; a real board
    still takes its turnaround and the reply still crosses the wire."""
    master = RawMaster(slow_pty_sim)
    try:
        pdu = _read_pdu(4, UNMAPPED_REGISTER, 2)
        reply, took = master.transact(4, pdu, rtu_timing.EXCEPTION_REPLY_BYTES)
    finally:
        master.close()
    assert reply[:3] == bytes([4, 0x84, 0x02])
    assert took >= _model(rtu_timing.READ_REQUEST_BYTES, rtu_timing.EXCEPTION_REPLY_BYTES)
