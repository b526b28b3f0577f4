"""Masters we did not write (minimalmodbus, mbpoll) accept the simulator over a serial port.

The simulator and our master were written together, so agreeing with each other proves
little; a standard master checks the frames against the Modbus spec (a write's reply is
an echo of the request) and refuses anything else.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from protocol import bay_map
from tests.conftest import SimProcess

minimalmodbus = pytest.importorskip("minimalmodbus")


def _pty_path(sim: SimProcess) -> str:
    return sim.bus.removeprefix("serial://").split("?")[0]


def _empty_bay(sim: SimProcess) -> int:
    return next(int(b["bay"]) for b in sim.state()["bays"] if b["battery"] is None)


def _instrument(sim: SimProcess, unit: int) -> object:
    instrument = minimalmodbus.Instrument(_pty_path(sim), unit)
    instrument.serial.baudrate = 115200
    instrument.serial.timeout = 0.5
    instrument.close_port_after_each_call = True  # leave the line to the next master
    instrument.clear_buffers_before_each_transaction = True
    return instrument


def test_minimalmodbus_reads_a_bay_block_and_opens_a_door(sim_pty: SimProcess) -> None:
    bay = _empty_bay(sim_pty)
    board = _instrument(sim_pty, bay)
    status = board.read_registers(  # type: ignore[attr-defined]
        bay_map.STATUS_START, bay_map.STATUS_COUNT, functioncode=4
    )
    assert status[bay_map.StatusReg.MAP_VERSION] == bay_map.MAP_VERSION
    board.write_register(  # type: ignore[attr-defined]
        bay_map.CommandReg.HEARTBEAT, 1, functioncode=6
    )
    # the unlock magic is consumed by the board: the reply must still echo the request
    board.write_register(  # type: ignore[attr-defined]
        bay_map.CommandReg.UNLOCK, bay_map.UNLOCK_MAGIC, functioncode=6
    )
    assert sim_pty.state()["bays"][bay - 1]["door"] == "open"


def test_minimalmodbus_writes_the_charger_block_with_fc16(sim_pty: SimProcess) -> None:
    board = _instrument(sim_pty, 1)
    board.write_registers(  # type: ignore[attr-defined]
        bay_map.CommandReg.CHARGER_ENABLE, [0, 500]
    )
    held = board.read_registers(  # type: ignore[attr-defined]
        bay_map.CommandReg.CHARGER_ENABLE, 2, functioncode=3
    )
    assert held == [0, 500]


@pytest.mark.skipif(shutil.which("mbpoll") is None, reason="mbpoll is not installed")
def test_mbpoll_reads_a_bay_block_and_opens_a_door(sim_pty: SimProcess) -> None:
    bay = _empty_bay(sim_pty)
    port = _pty_path(sim_pty)
    serial = ["-m", "rtu", "-b", "115200", "-P", "none", "-a", str(bay), "-1", "-0", "-o", "0.5"]

    def mbpoll(*args: str, values: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["mbpoll", *serial, *args, port, *values],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )

    read = mbpoll("-t", "3", "-r", "0", "-c", str(bay_map.STATUS_COUNT))
    assert read.returncode == 0, read.stdout + read.stderr
    values = dict(line.split(":") for line in read.stdout.splitlines() if line.startswith("["))
    assert int(values["[0]"]) == bay_map.MAP_VERSION and len(values) == bay_map.STATUS_COUNT
    for register, value in (
        (bay_map.CommandReg.HEARTBEAT, 1),
        (bay_map.CommandReg.UNLOCK, bay_map.UNLOCK_MAGIC),
    ):
        write = mbpoll("-t", "4", "-r", str(int(register)), values=(str(value),))
        assert write.returncode == 0, write.stdout + write.stderr
        assert "Written 1 references" in write.stdout
    assert sim_pty.state()["bays"][bay - 1]["door"] == "open"
