"""Requests that reach the simulator in one read of its socket are all answered.

Found by the flake hunt (a full run under two CPU hogs): a healthy bay "did not answer"
(``unit_failing``) and test_firmware_polling saw it unread for 1.15 s of wire. The
master sends the next request 10 ms after a heartbeat broadcast (nobody answers one);
a simulator held off the CPU for longer reads both frames at once, and pymodbus' RTU
framer (3.16) takes the first frame of a read and drops the rest as noise. A master
that timed out on a request the simulator had not read yet, and asked the next board,
lost that one too: at the end-to-end tests' 100 ms timeout, three such losses isolate a bay.
On a real line every frame reaches the boards; ``sim/bus_server.py`` now serves them
one after the other. The simulator is held off the CPU here as the load did it
(SIGSTOP), so both frames are waiting in its socket when it resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator

import pytest

from drivers.modbus_bus import ModbusBus, UnitNoAnswerError
from protocol import bay_map
from tests.conftest import SimProcess, master

#: Far longer than a resumed simulator needs to answer (a few ms at 115200 baud), so a
#: loaded machine cannot fail the test; the old simulator never answered at all.
TIMEOUT_S = 2.0
BAY, NEXT_BAY = 3, 4


@contextlib.contextmanager
def held_off_the_cpu(sim: SimProcess) -> Iterator[None]:
    """The simulator reads nothing meanwhile: what the master sends waits in its socket."""
    os.kill(sim.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(sim.proc.pid, signal.SIGCONT)


def read_status(bus: ModbusBus, unit: int) -> asyncio.Task[list[int]]:
    return asyncio.create_task(bus.read_input(unit, bay_map.STATUS_START, bay_map.STATUS_COUNT))


async def written(bus: ModbusBus, unit: int) -> None:
    """Until the master has sent its request to ``unit`` (counted as it is written)."""
    while not bus.unit_stats(unit).requests:
        await asyncio.sleep(0)


def test_a_request_read_together_with_the_heartbeat_is_answered(sim_process: SimProcess) -> None:
    sim = sim_process

    async def scenario() -> None:
        async with master(sim.bus, timeout_s=TIMEOUT_S) as bus:
            with held_off_the_cpu(sim):
                await bus.broadcast_register(bay_map.CommandReg.HEARTBEAT, 1)
                read = read_status(bus, BAY)
                await written(bus, BAY)
            assert len(await read) == bay_map.STATUS_COUNT

    asyncio.run(scenario())
    assert sim.state()["bus"]["broadcasts"] == 1  # and the heartbeat reached the boards


def test_the_next_request_after_a_timeout_is_answered_though_read_with_the_late_one(
    sim_process: SimProcess,
) -> None:
    sim = sim_process

    async def scenario() -> None:
        async with master(sim.bus, timeout_s=TIMEOUT_S) as bus:
            with held_off_the_cpu(sim):
                with pytest.raises(UnitNoAnswerError):
                    await read_status(bus, BAY)
                read = read_status(bus, NEXT_BAY)
                await written(bus, NEXT_BAY)
            assert len(await read) == bay_map.STATUS_COUNT

    asyncio.run(scenario())
    units = sim.state()["bus"]["units"]
    assert (units[str(BAY)]["requests"], units[str(NEXT_BAY)]["requests"]) == (1, 1)
