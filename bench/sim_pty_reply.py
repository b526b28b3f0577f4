"""How late `cabinet sim` delivers replies on its serial (pty) port, with no master in the way.

``bench/bus_cycle.py`` measures our master and the simulator together; this isolates the
simulator: a bare master writes one read request to the pty and reads the reply's bytes
with nothing but ``select``/``read``, and the time from write to whole reply is held
against the wire-time model (request frame and t3.5, the reply frame; ``--reply-ms 0``).
What remains is the pty's own latency both ways plus whatever the simulator adds. It
must never be negative (a reply before the wire allows would flatter every master).

    .venv/bin/python bench/sim_pty_reply.py [--baud 115200] [--count 300]

Wall-clock figures: quote them with the load average printed below.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import tempfile
import time
import tty
from pathlib import Path

from pymodbus.framer import FramerRTU

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an install
from protocol import bay_map, rtu_timing
from sim.launcher import start_simulator

REPO = Path(__file__).resolve().parent.parent


def measure(baud: int, count: int) -> list[float]:
    """Seconds beyond the model of each of ``count`` reads, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, ready = start_simulator(
            "--baud", str(baud), "--reply-ms", "0", bus=f"pty://{tmp}/bus", cwd=REPO
        )
        fd = os.open(ready["bus"].removeprefix("serial://").split("?")[0], os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        regs = bay_map.STATUS_COUNT
        reply_bytes = rtu_timing.read_reply_bytes(regs)
        model = rtu_timing.frame_time(
            rtu_timing.READ_REQUEST_BYTES, baud
        ) + reply_bytes * rtu_timing.char_time(baud)
        excess = []
        try:
            for i in range(count):
                body = bytes([1 + i % 12, 4]) + bay_map.STATUS_START.to_bytes(2, "big")
                body += regs.to_bytes(2, "big")
                time.sleep(rtu_timing.inter_frame_gap(baud) + 0.001)  # keep the master's t3.5
                sent = time.perf_counter()
                os.write(fd, body + FramerRTU.compute_CRC(body).to_bytes(2, "big"))
                reply = b""
                while len(reply) < reply_bytes:
                    readable, _, _ = select.select([fd], [], [], 1.0)
                    if not readable:
                        raise RuntimeError(f"no reply to request {i}")
                    reply += os.read(fd, 4096)
                excess.append(time.perf_counter() - sent - model)
        finally:
            os.close(fd)
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        return excess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baud", type=int, action="append")
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| baud | reads | median us | p90 us | min us | early |")
    print("|---|---|---|---|---|---|")
    for baud in args.baud or [115200, 19200]:
        excess = sorted(measure(baud, args.count))
        n = len(excess)
        print(
            f"| {baud} | {n} | {excess[n // 2] * 1e6:.0f} | {excess[int(n * 0.9)] * 1e6:.0f} "
            f"| {excess[0] * 1e6:.0f} | {sum(e < 0 for e in excess)} |"
        )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
