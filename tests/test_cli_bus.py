"""`cabinet bus …` and `cabinet sim ctl …` run as a technician runs them, against `cabinet sim`."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from protocol import bay_map
from tests.conftest import SimProcess, cabinet_cmd, master


def test_bus_scan_finds_every_unit_with_versions(sim_process: SimProcess) -> None:
    result = cabinet_cmd("bus", "scan", "--bus", sim_process.bus)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["UNIT", "NAME", "MAP", "FIRMWARE", "LATENCY_MS", "HEALTH"]
    assert "bay 12" in result.stdout and "cabinet board" in result.stdout
    assert "energy meter" in result.stdout
    assert lines[-1] == "14 of 14 units answered (directly on the bus)"
    assert result.stderr == ""


def test_bus_scan_json_names_a_silent_bay_and_exits_3(sim_process: SimProcess) -> None:
    assert sim_process.ctl("fault", "silent", "--bay", "7").returncode == 0
    assert sim_process.ctl("fault", "smoke").returncode == 0
    result = cabinet_cmd("bus", "scan", "--bus", sim_process.bus, "--json", "--timeout-ms", "60")
    assert result.returncode == 3
    units = {u["unit"]: u for u in json.loads(result.stdout)["units"]}
    assert units[7]["answered"] is False and units[7]["health"] == "no answer"
    assert units[20]["health"] == "faults: SMOKE"
    assert units[1]["answered"] and units[1]["map_version"] == bay_map.MAP_VERSION
    assert units[1]["firmware"] == "1.3"


def test_bus_scan_over_a_serial_port(sim_pty: SimProcess) -> None:
    assert sim_pty.bus.startswith("serial://")
    result = cabinet_cmd("bus", "scan", "--bus", sim_pty.bus, "--json")
    assert result.returncode == 0, result.stderr
    assert all(u["answered"] for u in json.loads(result.stdout)["units"])


def test_bus_read_and_write_open_a_door(sim_process: SimProcess) -> None:
    bay = next(b["bay"] for b in sim_process.state()["bays"] if b["battery"] is None)
    read = cabinet_cmd("bus", "read", str(bay), "0", "4", "--bus", sim_process.bus, "--json")
    assert read.returncode == 0, read.stderr
    regs = json.loads(read.stdout)["registers"]
    assert regs[0] == bay_map.MAP_VERSION and len(regs) == 4
    heartbeat = cabinet_cmd("bus", "write", str(bay), "100", "1", "--bus", sim_process.bus)
    assert heartbeat.returncode == 0, heartbeat.stderr
    unlock = cabinet_cmd("bus", "write", str(bay), "101", "0x55AA", "--bus", sim_process.bus)
    assert unlock.returncode == 0, unlock.stderr
    assert unlock.stdout.strip() == f"wrote 1 register(s) to unit {bay} at 101"
    assert sim_process.state()["bays"][bay - 1]["door"] == "open"


def test_a_refused_write_is_one_clear_line(sim_process: SimProcess) -> None:
    result = cabinet_cmd("bus", "write", "1", "101", "1", "--bus", sim_process.bus)
    assert result.returncode == 1
    assert result.stderr.strip() == "cabinet: error: bay 1 refused the request: illegal data value"
    assert sim_process.state()["bays"][0]["door"] == "closed"


def test_reading_a_silent_unit_says_so(sim_process: SimProcess) -> None:
    assert sim_process.ctl("fault", "silent", "--unit", "9").returncode == 0
    result = cabinet_cmd(
        "bus", "read", "9", "0", "1", "--bus", sim_process.bus, "--timeout-ms", "50"
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "cabinet: error: bay 9: no answer within 50 ms"


@pytest.mark.parametrize(
    ("bus", "message"),
    [
        ("serial:///dev/ttyUSB-missing", "serial port /dev/ttyUSB-missing does not exist"),
        ("tcp://127.0.0.1:1", "cannot connect to the bus at tcp://127.0.0.1:1"),
        ("ftp://x", "use tcp://host:port or serial:///dev/..."),
        ("serial:///dev/null?baud=1234", "baud 1234 is not one of"),
    ],
)
def test_bus_errors_are_one_line_and_exit_1(bus: str, message: str) -> None:
    result = cabinet_cmd("bus", "scan", "--bus", bus, "--timeout-ms", "50")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bus_scan_takes_the_bus_from_the_config_file(
    sim_process: SimProcess, tmp_path: Path
) -> None:
    config = tmp_path / "cabinet.toml"
    config.write_text('[cabinet]\nid = "cab-1"\n[bus]\nurl = "tcp://127.0.0.1:1"\n')
    result = cabinet_cmd(
        "bus", "scan", "-c", str(config), "--json", env={"CABINET_BUS__URL": sim_process.bus}
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["units"]) == 14


def test_sim_ctl_acts_as_a_rider_and_refuses_the_impossible(sim_process: SimProcess) -> None:
    state = sim_process.state()
    bay = next(b["bay"] for b in state["bays"] if b["battery"] is None)
    refused = sim_process.ctl("insert", str(bay), "--battery", "BAT-X", "--soc", "20")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"cabinet: error: bay {bay}'s door is shut: nothing can be put in"
    )
    unknown = sim_process.ctl("fault", "gremlins")
    assert unknown.returncode == 1 and "unknown fault kind 'gremlins'" in unknown.stderr
    assert state["bus"]["units"]["1"]["requests"] == 0
    assert state["seed"] == 0 and state["baud"] == 115200


def test_sim_ctl_without_a_simulator_is_a_clear_error() -> None:
    result = cabinet_cmd("sim", "ctl", "--control", "tcp://127.0.0.1:1", "state")
    assert result.returncode == 1
    assert "no simulator control endpoint at tcp://127.0.0.1:1" in result.stderr


def test_bus_scan_counts_exception_replies_apart_from_answers(sim_process: SimProcess) -> None:
    assert sim_process.ctl("fault", "board_failure", "--bay", "4").returncode == 0
    human = cabinet_cmd("bus", "scan", "--bus", sim_process.bus)
    assert human.returncode == 3
    assert human.stdout.splitlines()[-1] == (
        "13 of 14 units answered, 1 answered with an exception (directly on the bus)"
    )
    assert "refused: bay 4 refused the request: device failure" in human.stdout
    result = cabinet_cmd("bus", "scan", "--bus", sim_process.bus, "--json")
    scan = json.loads(result.stdout)
    assert scan["summary"] == {"units": 14, "answered": 13, "exception": 1, "silent": 0}
    units = {u["unit"]: u for u in scan["units"]}
    assert units[4]["exception"] is True and units[4]["answered"] is True
    assert units[5]["exception"] is False


def _pty_port(sim: SimProcess) -> str:
    return sim.bus.removeprefix("serial://").split("?")[0]


@pytest.mark.parametrize(
    ("query", "setting"), [("parity=E", "parity=E"), ("", "parity=E"), ("parity=O", "parity=O")]
)
def test_a_serial_setting_the_port_refuses_is_named(
    sim_pty: SimProcess, query: str, setting: str
) -> None:
    """A pseudo-terminal takes no parity; the default framing (8E1) is refused by name."""
    url = f"serial://{_pty_port(sim_pty)}" + (f"?{query}" if query else "")
    result = cabinet_cmd("bus", "scan", "--bus", url)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"cabinet: error: serial port {_pty_port(sim_pty)} refuses {setting}: use settings "
        "the port supports (a pseudo-terminal takes only parity=N)"
    )


def test_a_second_master_on_the_line_is_refused_and_pointed_to_the_daemon(
    sim_pty: SimProcess,
) -> None:
    """The daemon's bus master holds its port; a direct-mode scan must not join the line."""

    async def while_a_master_holds_the_port() -> subprocess.CompletedProcess[str]:
        async with master(sim_pty.bus):
            return cabinet_cmd("bus", "scan", "--bus", sim_pty.bus)

    result = asyncio.run(while_a_master_holds_the_port())
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"cabinet: error: serial port {_pty_port(sim_pty)} is in use by another bus master "
        "(the cabinet daemon?); one master per line: run `cabinet bus scan -c FILE` "
        "without --bus to go through the daemon"
    )
    after = cabinet_cmd("bus", "scan", "--bus", sim_pty.bus)
    assert after.returncode == 0, after.stderr
