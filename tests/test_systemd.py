"""The systemd side: the unit verifies and is hardened; the daemon speaks sd_notify."""

from __future__ import annotations

import pwd
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cabinet.daemon.config import validate
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.run import POLL_STALL_S, controller_for, health_problem
from cabinet.daemon.systemd_notify import Notifier
from cabinet.daemon.task_health import TaskHealth
from tests.conftest import REPO
from tests.daemon_harness import Cabinet, running_cabinet, wait_until
from tests.test_bus_truth import assert_paced, doctor

UNIT = REPO / "systemd" / "cabinet.service"
EXPOSURE_GOAL = 2.0

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd
def test_the_unit_verifies(tmp_path: Path) -> None:
    # ExecStart must exist for verify: point it at this checkout's console script
    unit = tmp_path / "cabinet.service"
    cabinet = Path(sys.executable).parent / "cabinet"
    unit.write_text(UNIT.read_text().replace("/opt/cabinet/venv/bin/cabinet", str(cabinet)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "cabinet.service" not in result.stderr, result.stderr  # no warnings about it


@needs_systemd
def test_the_unit_is_hardened(capsys: pytest.CaptureFixture[str]) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for cabinet\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    with capsys.disabled():
        print(f"\nsystemd-analyze security exposure of cabinet.service: {exposure}")
    assert exposure <= EXPOSURE_GOAL


class NotifySocket:
    """What systemd listens on: a datagram socket whose path goes into $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(20)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def until_status(self, prefix: str) -> list[dict[str, str]]:
        """Messages up to the first STATUS starting with ``prefix``."""
        seen = []
        while True:
            message = self.next()
            seen.append(message)
            if message.get("STATUS", "").startswith(prefix):
                return seen

    def until(self, key: str) -> list[dict[str, str]]:
        seen = []
        while True:
            message = self.next()
            seen.append(message)
            if key in message:
                return seen


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.sock.close()


def test_the_daemon_says_ready_feeds_the_watchdog_and_says_stopping(
    tmp_path: Path, notify: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}  # fed every 0.2 s
    with running_cabinet(tmp_path, env=env) as cab:
        before_ready = notify.until("READY")
        statuses = [m["STATUS"] for m in before_ready if "STATUS" in m]
        assert statuses[:2] == ["connecting to the bus", "reconciling the journal with the boards"]
        assert before_ready[-1]["READY"] == "1"
        # READY comes after recovery: the boards' picture is already journaled
        assert cab.events("cabinet.started")
        fed = [notify.until("WATCHDOG") for _ in range(3)]
        assert all(m[-1]["WATCHDOG"] == "1" for m in fed)
        cab.stop()
        assert notify.until("STOPPING")[-1]["STOPPING"] == "1"


def test_an_abstract_notify_socket_is_addressed_with_a_nul(tmp_path: Path) -> None:
    name = f"cabinet-test-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier({"NOTIFY_SOCKET": "@" + name}).notify(ready="1", status="running")
        assert sock.recv(100) == b"READY=1\nSTATUS=running"


def test_no_watchdog_for_another_pid_and_none_without_systemd() -> None:
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "1000000"}).watchdog_interval_s == 0.5
    quiet = Notifier({})
    assert not quiet.enabled
    quiet.notify(ready="1")  # nothing to talk to: nothing happens, nothing raised


ALL_UNITS_SILENT = [*(("--bay", str(b)) for b in range(1, 13)), ("--unit", "20"), ("--unit", "21")]


def _silence_every_unit(cab: Cabinet) -> None:
    for where in ALL_UNITS_SILENT:
        cab.ctl("fault", "silent", *where)


def test_a_cabinet_talking_to_nobody_is_paced_starves_the_watchdog_and_recovers(
    tmp_path: Path, notify: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    extra = {"bus": {"silence_unhealthy_s": 2.0}}
    with running_cabinet(tmp_path, env=env, extra=extra) as cab:
        notify.until("READY")
        notify.until("WATCHDOG")
        _silence_every_unit(cab)
        starving = notify.until_status("unhealthy")[-1]
        assert "no unit has answered" in starving["STATUS"], starving
        assert "WATCHDOG" not in starving
        assert_paced(cab)  # every call now fails at once: the poller must not spin
        bus = doctor(cab)["bus"]
        assert bus["verdict"] == "fail" and "no unit has answered" in bus["detail"]
        cab.ctl("heal", "silent")
        while_unhealthy = notify.until_status("running")[:-2]  # [-2]: the first feed again
        assert not any("WATCHDOG" in m for m in while_unhealthy), while_unhealthy
        assert notify.until("WATCHDOG")[-1]["WATCHDOG"] == "1"  # fed again
        wait_until("doctor to agree", lambda: doctor(cab)["bus"]["verdict"] == "ok")


def _controller(tmp_path: Path) -> CabinetController:
    config = validate(
        {"cabinet": {"id": "c1", "state_dir": str(tmp_path)}, "bus": {"url": "tcp://127.0.0.1:9"}}
    )
    return controller_for(config)


def test_the_watchdog_starves_on_a_crash_loop_or_a_stalled_poll(tmp_path: Path) -> None:
    controller = _controller(tmp_path)
    tasks = TaskHealth()
    tasks.started("poller")
    assert health_problem(tasks, controller) is None
    tasks.failed("poller", "boom", recovered_before=False)
    tasks.started("poller")
    assert health_problem(tasks, controller) is None  # one failure, restarted: fine
    tasks.failed("poller", "boom", recovered_before=False)
    tasks.started("poller")
    assert health_problem(tasks, controller) == "tasks failing: poller"
    healthy = TaskHealth()
    healthy.started("poller")
    controller.last_cycle_at = controller.clock.monotonic() - POLL_STALL_S - 1
    problem = health_problem(healthy, controller)
    assert problem is not None and problem.startswith("no full poll cycle for")
    controller.journal.close()


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_the_sysusers_file_creates_the_user_in_dialout() -> None:
    result = subprocess.run(
        ["systemd-sysusers", "--dry-run", str(REPO / "systemd" / "cabinet.sysusers")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    try:
        pwd.getpwnam("cabinet")  # exists already: sysusers has nothing to say
    except KeyError:
        assert "Creating user 'cabinet'" in out, out
