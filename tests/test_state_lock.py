"""Two daemons on one state directory: the second refuses to start, naming the holder.

Two daemons with different control sockets but one state directory both reached
``ready``, wrote into one journal and fought over the bus and the MQTT client id
(issue 15, item 9). The check must not depend on the control socket's path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, cabinet_cmd
from tests.daemon_harness import Cabinet, running_cabinet, write_config

SECOND_START_S = 30.0  # a daemon that starts after all runs forever: the test fails here


def second_daemon(cab: Cabinet, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``cabinet run`` with another config and control socket, on the first one's state dir."""
    other = tmp / "second"
    other.mkdir()
    config = write_config(
        other,
        cab.sim,
        {
            "cabinet": {
                "state_dir": str(cab.tmp / "state"),
                "control_socket": str(other / "control.sock"),
            },
            "auth": {"public_keys": [str(cab.tmp / "backend.pub")]},
        },
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cabinet.console.cli", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        stdout, stderr = proc.communicate(timeout=SECOND_START_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the second daemon kept running: {stderr[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        assert cab.daemon is not None
        started = len(cab.events("cabinet.started"))
        second = second_daemon(cab, tmp_path)
        assert second.returncode == 1, second.stderr
        said = second.stdout + second.stderr
        assert str(cab.tmp / "state") in said, said
        assert f"pid {cab.daemon.pid}" in said, said
        assert "Traceback" not in said
        # the first one is untouched: it answers, and nobody else wrote into its journal
        status = cabinet_cmd("status", "--json", "-c", str(cab.config), timeout=20)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["ready"] is True
        assert len(cab.events("cabinet.started")) == started


def test_the_lock_goes_with_a_killed_daemon(tmp_path: Path) -> None:
    """kill -9 leaves the lock file, not the lock: the next start must not be refused."""
    with running_cabinet(tmp_path) as cab:
        cab.kill9()
        cab.start()  # waits for cabinet.started: refused, it would time out
        assert cab.daemon is not None
        lock = cab.tmp / "state" / "lock"
        assert lock.read_text().split()[0] == str(cab.daemon.pid)
        assert oct(lock.stat().st_mode & 0o777) == "0o600"
