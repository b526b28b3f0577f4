"""A reply that comes too late must still say which board sent it (the simulator's line).

Found by the kill campaign under load (two full runs at load 16-23: "BAT-... is in bay N,
the ledger says MISSING" with ``battery_missing`` alarms; the same alarm in an idle
telemetry test): the master timed out on one bay, asked the next one, and took the first
bay's late reply, labelled with the next bay's unit id, as the next bay's answer. The
ledger then did what it must with what it heard (a full bay read empty: "missing").

The mislabelling is the simulator's, not the wire's: pymodbus' server request handler
(3.16) reads the request it answers (``last_pdu``) again *after* awaiting the device's
action hook, and the simulator's hook holds every reply for its wire time, so a request
arriving meanwhile lends the late reply its unit id. A real board's reply carries its own
address, which our master checks (a late one is skipped). ``sim/bus_server.py`` now
answers each request under the unit it asked; on a pty the simulator holds each reply
until the wire model says it is due, so the same must hold there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.boards import BayBoard
from drivers.modbus_bus import BusError, UnitNoAnswerError
from tests.conftest import SimProcess, master, start_sim_process, stop_sim_process

#: The boards answer this late (``--reply-ms``); the master gives up sooner, so the next
#: request (sent at TIMEOUT_S, waited for until 2 x TIMEOUT_S) meets the late reply. The
#: margin on each side is what a loaded machine may take from the test: a master process
#: held off the CPU for longer than REPLY_S - TIMEOUT_S reads the reply before its timer
#: fires and takes it, rightly, as the answer it is (a CI run held it more than 0.1 s).
TIMEOUT_S = 0.5
REPLY_S = 0.8


@pytest.fixture(params=["tcp", "pty"])
def slow_sim(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SimProcess]:
    """Over RTU-over-TCP and over a pty (where the simulator holds replies until due)."""
    bus = {"pty": {"bus": f"pty://{tmp_path}/bus"}, "tcp": {}}[request.param]
    sim = start_sim_process("--baud", "115200", "--reply-ms", str(int(REPLY_S * 1000)), **bus)
    yield sim
    stop_sim_process(sim)


def _full_and_empty(sim: SimProcess) -> tuple[int, int, str]:
    """Two neighbouring bays, one full and one empty, and the full one's battery."""
    bays = {b["bay"]: b["battery"] for b in sim.state()["bays"]}
    for bay in sorted(bays)[:-1]:
        if bays[bay] is None and bays[bay + 1] is not None:
            return bay, bay + 1, bays[bay + 1]["id"]
        if bays[bay] is not None and bays[bay + 1] is None:
            return bay + 1, bay, bays[bay]["id"]
    pytest.skip("the simulator's seed left no full bay beside an empty one")


async def _line_quiet(sim: SimProcess, requests: int) -> None:
    """Until the simulator has put every reply to our ``requests`` on the line.

    Then nothing late is left to meet the next round: a reply to the same unit arriving
    after the next request is indistinguishable from its answer on RTU (no transaction
    id), so a round that began while the previous one's replies were still held proved
    nothing. Read off the simulator's own counter, in a thread so the master's event
    loop keeps taking in (and discarding) what arrives meanwhile.
    """
    deadline = time.monotonic() + 10 * REPLY_S * requests
    while (await asyncio.to_thread(sim.state))["bus"]["replies_out"] < requests:
        assert time.monotonic() < deadline, "the simulator never sent its late replies"


def test_a_late_reply_is_never_taken_for_the_next_bays_answer(slow_sim: SimProcess) -> None:
    empty, full, battery = _full_and_empty(slow_sim)

    async def scenario() -> None:
        async with master(slow_sim.bus, timeout_s=TIMEOUT_S) as bus:
            sent = 0
            for asked_first, asked_next in ((empty, full), (full, empty)):
                await _line_quiet(slow_sim, sent)
                sent += 2
                with pytest.raises(UnitNoAnswerError):
                    await BayBoard(bus, asked_first).read_status()  # the master gives up
                try:
                    status = await BayBoard(bus, asked_next).read_status()
                except BusError:
                    continue  # silence is honest: the reading is stale, not wrong
                holds = status.battery.battery_id if status.battery else None
                assert holds == (battery if asked_next == full else None), (
                    f"bay {asked_next} answered with bay {asked_first}'s registers"
                )

    asyncio.run(scenario())
