"""After a broadcast the master keeps the line quiet until every board has acted.

docs/hardware.md: nobody replies to a write to unit 0, so the master keeps the line quiet
for 10 ms after it; on a serial line that counts from the frame's last byte, which leaves
the UART a frame time after the write call returned. Measured as a board sees it: from
the broadcast's first byte to the next request's first byte, on a pseudo-terminal.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tty

import pytest

from drivers.boards import BayBoard
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import BROADCAST_TURNAROUND_S, ModbusBus
from protocol import bay_map, rtu_timing
from tests.test_golden_frames import GOLDEN

#: The line process notices a frame's first byte up to about this late on a loaded
#: machine (a wake-up), which shortens the quiet it measures, never lengthens it. It asks
#: for real-time scheduling so a busy machine cannot hold it back for longer (a CI run
#: under the suite's own load once measured 3 ms short as an ordinary process).
OBSERVER_LATE_S = 0.002


#: A process of its own plays the line, so that the test's event loop (which holds the
#: GIL while it works) cannot make it notice a frame late: it prints when each 8-byte
#: frame's first byte arrived (CLOCK_MONOTONIC, the same clock in every process) and
#: answers a bay-status request with ``reply``.
LINE = """
import os, select, socket, sys, time
fd, reply = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
try:  # woken first when a frame arrives, whatever else the machine runs (root only)
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
except PermissionError:
    pass
pending, first, seen_broadcast = b"", 0.0, False
print("ready", flush=True)
if sys.argv[3] == "gateway":  # fd listens: a transparent gateway's TCP side, one master
    conn, _ = socket.socket(fileno=fd).accept()
    fd = conn.fileno()
while True:
    if not select.select([fd], [], [], 5)[0]:
        break
    data = os.read(fd, 512)
    if not pending:
        first = time.perf_counter()
    pending += data
    if len(pending) >= 8:
        print(first, pending[0], flush=True)
        if pending[0] != 0:
            os.write(fd, reply)
            if pending[0] == 3 and seen_broadcast:
                break
        seen_broadcast = seen_broadcast or pending[0] == 0
        pending = b""
"""


def quiet_after_broadcast(url: str, line_fd: int, mode: str) -> float:
    """Seconds from the broadcast's first byte to the next request's, as the line saw them.

    ``line_fd`` is the line's end (a pty master, or a listening socket for ``mode``
    "gateway"); the master at ``url`` reads bay 3, broadcasts the heartbeat, reads bay 3.
    """
    line = subprocess.Popen(
        [sys.executable, "-c", LINE, str(line_fd), GOLDEN["bay-status"].reply.hex(), mode],
        pass_fds=[line_fd],
        stdout=subprocess.PIPE,
        text=True,
    )

    async def master() -> None:
        async with ModbusBus(parse_endpoint(url), timeout_s=0.5) as bus:
            # as in the daemon, the heartbeat goes out amid polling: right after the port
            # opens the event loop is still busy and the write leaves late
            await BayBoard(bus, 3).read_status()
            await bus.broadcast_register(bay_map.CommandReg.HEARTBEAT, 7)
            await BayBoard(bus, 3).read_status()

    try:
        assert line.stdout is not None
        assert line.stdout.readline() == "ready\n"  # listening before the first frame
        asyncio.run(master())
        out, _ = line.communicate(timeout=10)
    finally:
        line.kill()
    frames = [(float(t), int(unit)) for t, unit in (row.split() for row in out.splitlines())]
    assert [unit for _, unit in frames] == [3, 0, 3]
    return frames[2][0] - frames[1][0]


@pytest.mark.parametrize("baud", [9600, 115200])
def test_the_next_request_waits_for_the_broadcast_frame_and_the_boards(baud: int) -> None:
    pty_master, pty_slave = os.openpty()
    tty.setraw(pty_slave)
    try:
        url = f"serial://{os.ttyname(pty_slave)}?baud={baud}&parity=N"
        quiet = quiet_after_broadcast(url, pty_master, "pty")
    finally:
        os.close(pty_master)
        os.close(pty_slave)
    frame_s = rtu_timing.frame_time(rtu_timing.WRITE_SINGLE_BYTES, baud)
    assert quiet >= frame_s + BROADCAST_TURNAROUND_S - OBSERVER_LATE_S


@pytest.mark.parametrize("baud", [9600, 19200])
def test_through_a_gateway_the_next_request_waits_for_the_broadcast_on_its_line(
    baud: int,
) -> None:
    """RTU over TCP with the gateway's line speed (``tcp://...?baud=``): the same quiet.

    A transparent gateway puts a frame on its serial line when it has it; the master sees
    neither the line nor the frame's end there. Sent 10 ms after the broadcast, the next
    request reached a 9600-baud line 0.8 ms after the broadcast's last byte (less than
    t3.5: one garbled frame for every board, the heartbeat lost), at 19200 5.4 ms after
    (less than the boards' 10 ms). Measured as the gateway sees it: from the broadcast's
    first byte to the next request's, each frame reaching the gateway in one piece.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"tcp://127.0.0.1:{listener.getsockname()[1]}?baud={baud}"
        quiet = quiet_after_broadcast(url, listener.fileno(), "gateway")
    frame_s = rtu_timing.frame_time(rtu_timing.WRITE_SINGLE_BYTES, baud)
    assert quiet >= frame_s + BROADCAST_TURNAROUND_S - OBSERVER_LATE_S
