"""The technician's commands against a running daemon + simulator, and with the daemon stopped."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

import pytest

from protocol import bay_map
from tests.conftest import REPO, cabinet_cmd, cabinet_popen
from tests.daemon_harness import Cabinet, running_cabinet, wait_until

EXIT_PROBLEM = 3
EXIT_NO_DAEMON = 4


def tech(cab: Cabinet, *args: str) -> subprocess.CompletedProcess[str]:
    return cabinet_cmd(*args, "-c", str(cab.config))


def tech_json(cab: Cabinet, *args: str) -> Any:
    result = tech(cab, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_clean_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def cab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_cabinet(tmp_path_factory.mktemp("tech"), seed=5) as cabinet:
        yield cabinet


def test_status_shows_the_cabinet_at_a_glance(cab: Cabinet) -> None:
    human = tech(cab, "status")
    assert human.returncode == 0, human.stderr
    assert "cabinet cab-test" in human.stdout
    assert "12/12 online" in human.stdout
    assert "session   none (accepting riders)" in human.stdout
    assert "mqtt      not configured" in human.stdout
    status = tech_json(cab, "status")
    assert status["ready"] is True and status["refusal"] is None
    sim_bays = cab.state()["bays"]
    assert status["bays"]["empty"] == sum(b["battery"] is None for b in sim_bays)


def test_bays_agree_with_the_hardware(cab: Cabinet) -> None:
    bays = tech_json(cab, "bays")
    sim_bays = cab.state()["bays"]
    assert [b["bay"] for b in bays] == list(range(1, 13))
    for ours, real in zip(bays, sim_bays, strict=True):
        real_id = real["battery"]["id"] if real["battery"] else None
        assert ours["battery_id"] == real_id
        assert ours["door"] == real["door"]
    human = tech(cab, "bays")
    assert human.returncode == 0
    lines = human.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["BAY", "DOOR", "LOCK", "BATTERY"]
    assert len(lines) == 13
    holding = next(b for b in bays if b["battery_id"])
    assert holding["battery_id"] in lines[holding["bay"]]


def test_doctor_gives_a_verdict_per_line(cab: Cabinet) -> None:
    human = tech(cab, "doctor")
    assert human.returncode == 0, human.stdout  # no "fail" on a healthy cabinet
    assert "WARN  mqtt" in human.stdout  # not configured here: the events stay local
    report = tech_json(cab, "doctor")
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["bus unit 1 (bay 1)"]["verdict"] == "ok"
    assert checks["disk"]["verdict"] == "ok"
    assert checks["config"]["verdict"] == "ok"
    assert report["failed"] == 0


def test_doctor_fails_a_silent_bay_and_names_it(cab: Cabinet) -> None:
    cab.ctl("fault", "silent", "--bay", "9")
    try:
        wait_until("bay 9 offline", lambda: not tech_json(cab, "bays")[8]["online"])
        result = tech(cab, "doctor")
        assert result.returncode == EXIT_PROBLEM
        line = next(x for x in result.stdout.splitlines() if "bus unit 9" in x)
        assert line.startswith("FAIL") and "isolated" in line
        result = tech(cab, "bus", "scan", "--json")
        assert result.returncode == EXIT_PROBLEM  # looked, and found a unit silent
        scan = json.loads(result.stdout)
        assert scan["via"] == "daemon"
        nine = next(u for u in scan["units"] if u["unit"] == 9)
        assert nine["answered"] is False and "isolated" in nine["health"]
    finally:
        cab.ctl("heal", "silent", "--bay", "9")
    wait_until("bay 9 back", lambda: tech_json(cab, "bays")[8]["online"])


def test_bay_disable_enable_and_open_are_journaled(cab: Cabinet) -> None:
    result = tech(cab, "bay", "disable", "3", "--reason", "hinge squeaks")
    assert result.returncode == 0, result.stderr
    assert "bay 3: out of service (hinge squeaks)" in result.stdout
    assert tech_json(cab, "bays")[2]["out_of_service_reason"] == "hinge squeaks"
    cab.wait_event("bay.disabled", bay=3, by="technician", reason="hinge squeaks")
    assert tech(cab, "bay", "enable", "3").returncode == 0
    cab.wait_event("bay.enabled", bay=3, by="technician")
    assert tech_json(cab, "bays")[2]["in_service"] is True

    assert tech(cab, "bay", "open", "5").returncode == 0
    cab.wait_door(5, "open")
    cab.wait_event("bay.opened", bay=5, by="technician")
    cab.ctl("close", "5")
    cab.wait_door(5, "closed")

    bad = tech(cab, "bay", "open", "13")
    assert bad.returncode == 2 and "bays are numbered 1-12" in bad.stderr


def test_events_page_and_follow(cab: Cabinet) -> None:
    page = tech(cab, "events", "--json")
    assert page.returncode == 0
    events = [json.loads(line) for line in page.stdout.splitlines()]
    assert "cabinet.started" in [e["type"] for e in events]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    follow = cabinet_popen("events", "--follow", "--json", "-c", str(cab.config))
    try:
        assert follow.stdout is not None
        assert json.loads(follow.stdout.readline())["seq"] == seqs[0]  # history first
        assert tech(cab, "bay", "disable", "11", "--reason", "followed").returncode == 0
        while True:  # the new event arrives on the open stream, without polling
            event = json.loads(follow.stdout.readline())
            if event["type"] == "bay.disabled" and event["bay"] == 11:
                break
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=10) == 0  # Ctrl-C is how a person ends a follow
    finally:
        if follow.poll() is None:
            follow.kill()
        tech(cab, "bay", "enable", "11")


def test_ctrl_c_ends_a_follow_started_with_sigint_ignored(cab: Cabinet) -> None:
    # A shell starts a background job (`cmd &`) with SIGINT ignored and its children inherit
    # that; exec keeps it, as here. A technician's script (or a test runner) started that way
    # must still be able to end a follow with SIGINT.
    ignore_then_exec = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    command = ["events", "--follow", "--json", "-c", str(cab.config)]
    follow = subprocess.Popen(
        [sys.executable, "-c", ignore_then_exec, "-m", "cabinet.console.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert follow.stdout is not None
        assert json.loads(follow.stdout.readline())["type"]  # following: history first
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=10) == 0
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


def test_bus_read_and_write_go_through_the_daemon(cab: Cabinet) -> None:
    read = tech_json(cab, "bus", "read", "2", "0", "3")
    assert read["registers"][0] == bay_map.MAP_VERSION  # the map version register
    written = tech(cab, "bus", "write", "20", "100", "1")  # the cabinet fan
    assert written.returncode == 0, written.stderr
    cab.wait_event("bus.written", unit=20, address=100, values=[1], by="technician")
    assert cab.state()["cabinet"]["fan_on"] is True
    assert tech(cab, "bus", "write", "20", "100", "0").returncode == 0


def test_selftest_exercises_a_lock_and_door_with_the_technician(cab: Cabinet) -> None:
    proc = cabinet_popen("selftest", "--bay", "2", "--close-timeout", "20", "-c", str(cab.config))
    hang = threading.Timer(60, proc.kill)  # a failure detector only: a hung self-test ends
    hang.start()
    try:
        assert proc.stdout is not None
        said = []
        # as a technician does: the door is shut when the self-test asks for it, once its
        # sensor has seen the door open (shut at once, a loaded daemon could miss it open)
        for line in proc.stdout:
            said.append(line)
            if line.startswith(">>> bay 2: shut the door"):
                break
        assert said and said[-1].startswith(">>> bay 2: shut"), "".join(said) + proc.stderr.read()
        assert cab.bay(2)["door"] == "open"
        cab.ctl("close", "2")
        out, err = proc.communicate(timeout=30)
        out = "".join(said) + out
    finally:
        hang.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert "PASS  meter" in out
    assert "PASS  lock bay 2" in out and "PASS  door bay 2" in out
    assert ">>> bay 2: shut the door" in out
    finished = cab.wait_event("selftest.finished")
    assert finished["failed"] == []


def test_selftest_reports_a_stuck_lock(cab: Cabinet) -> None:
    cab.ctl("fault", "lock_stuck", "--bay", "4")
    try:
        result = tech(cab, "selftest", "--bay", "4", "--close-timeout", "5")
    finally:
        cab.ctl("heal", "lock_stuck", "--bay", "4")
    assert result.returncode == EXIT_PROBLEM, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if "lock bay 4" in x)
    assert line.startswith("FAIL") and "did not open" in line
    assert cab.bay(4)["door"] == "closed"
    # repaired: the technician opens it once more, which clears the board's jam flag
    assert tech(cab, "bay", "open", "4").returncode == 0
    cab.wait_door(4, "open")
    cab.ctl("close", "4")


def test_selftest_is_refused_during_a_swap(cab: Cabinet) -> None:
    started = cab.swap_begins("R-tech")
    result = tech(cab, "selftest", "--bay", "1")
    assert result.returncode == 1
    assert "cannot run the self-test now: busy" in one_clean_line(result.stderr)
    ret, out = started["return_bay"], started["dispense_bay"]
    cab.wait_door(ret, "open")
    cab.ctl("insert", str(ret), "--battery", "BAT-TECH1", "--soc", "20")
    cab.ctl("close", str(ret))
    cab.wait_door(out, "open")
    cab.ctl("take", str(out))
    cab.ctl("close", str(out))
    cab.wait_event("swap.completed", session_id=started["session_id"])


def test_garbage_on_the_socket_gets_an_error_and_the_daemon_carries_on(cab: Cabinet) -> None:
    path = cab.tmp / "state" / "control.sock"
    for garbage in (b"not json\n", b'{"verb": "explode"}\n', b'{"verb": "bays", "args": 3}\n'):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(garbage)
            answer = json.loads(sock.makefile().readline())
        assert answer["ok"] is False and answer["error"]["code"] in {"malformed", "unknown_verb"}
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    assert tech(cab, "status").returncode == 0


def test_a_second_daemon_refuses_to_start(cab: Cabinet) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "cabinet.console.cli", "run", "-c", str(cab.config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert second.returncode == 1
    assert "another daemon is running" in second.stdout + second.stderr
    assert tech(cab, "status").returncode == 0  # the first one is untouched


def test_commands_with_the_daemon_stopped(cab: Cabinet) -> None:
    cab.stop()
    try:
        for command in (
            ["status"],
            ["bays", "--json"],
            ["doctor"],
            ["selftest"],
            ["bay", "open", "1"],
        ):
            result = tech(cab, *command)
            assert result.returncode == EXIT_NO_DAEMON, (command, result.stderr)
            assert "the daemon is not running" in one_clean_line(result.stderr)
        events = tech(cab, "events")  # history is most wanted when the daemon is down
        assert events.returncode == 0 and "cabinet.started" in events.stdout
        result = tech(cab, "bus", "scan", "--json")  # straight to the bus when nobody owns it
        scan = json.loads(result.stdout)
        assert scan["via"] == "bus"
        assert [u["health"] for u in scan["units"] if u["health"] != "ok"] == []
        assert len(scan["units"]) == 14
    finally:
        cab.start()
