"""A plain pymodbus client polling the 12 bays' status blocks, as its own process.

The bench needs the plain client as a separate process for the measurements that look
at a process from outside, the way it looks at the daemon: ``valgrind --tool=callgrind``
(instructions), ``strace -c -p`` (system calls), ``/proc/PID`` (utime, stime, context
switches). In the bench's own process those would count the bench too.

``--reads N`` reads N bay blocks (bays 1..12 in turn) after one warm-up cycle and exits:
callgrind runs it twice (N large and N small) and the difference is the cost of the
extra reads alone, start-up, imports, connection and exit cancelling out. Without
``--reads`` it polls until it is stopped, for a window measured from outside.

    python bench/plain_poller.py sync|async tcp://HOST:PORT [--reads N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from collections.abc import Iterable
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient, ModbusTcpClient
from pymodbus.framer import FramerType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an install
from protocol import bay_map
from protocol.units import BAY_UNITS


def reads(count: int | None) -> Iterable[int]:
    """Read indices: ``count`` of them, or without end."""
    return range(count) if count is not None else itertools.count()


def poll_sync(host: str, port: int, count: int | None) -> None:
    """pymodbus' sync client with default settings (RTU framing over TCP)."""
    client = ModbusTcpClient(host, port=port, framer=FramerType.RTU)
    assert client.connect()  # type: ignore[no-untyped-call]
    units = list(BAY_UNITS)
    for unit in units:  # warm-up cycle: first-call caches, not the steady state
        assert not client.read_input_registers(
            bay_map.STATUS_START, count=bay_map.STATUS_COUNT, device_id=unit
        ).isError()
    for i in reads(count):
        reply = client.read_input_registers(
            bay_map.STATUS_START, count=bay_map.STATUS_COUNT, device_id=units[i % len(units)]
        )
        assert not reply.isError()
    client.close()  # type: ignore[no-untyped-call]


async def poll_async(host: str, port: int, count: int | None) -> None:
    """pymodbus' async client with default settings (RTU framing over TCP)."""
    client = AsyncModbusTcpClient(host, port=port, framer=FramerType.RTU)
    assert await client.connect()
    units = list(BAY_UNITS)
    for unit in units:
        reply = await client.read_input_registers(
            bay_map.STATUS_START, count=bay_map.STATUS_COUNT, device_id=unit
        )
        assert not reply.isError()
    for i in reads(count):
        reply = await client.read_input_registers(
            bay_map.STATUS_START, count=bay_map.STATUS_COUNT, device_id=units[i % len(units)]
        )
        assert not reply.isError()
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["sync", "async"])
    parser.add_argument("url", help="tcp://HOST:PORT of the simulator's bus (RTU over TCP)")
    parser.add_argument("--reads", type=int, help="read this many blocks and exit")
    args = parser.parse_args()
    host, port = args.url.removeprefix("tcp://").split(":")
    if args.kind == "sync":
        poll_sync(host, int(port), args.reads)
    else:
        asyncio.run(poll_async(host, int(port), args.reads))


if __name__ == "__main__":
    main()
