"""A real `cabinet run` against a real `cabinet sim`, driven as riders and fate would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cabinet.daemon.journal import Journal, JournalError
from sim.launcher import stop_process
from tests.conftest import REPO, SimProcess, cabinet_cmd, start_sim_process, stop_sim_process

WAIT_S = 20.0


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Poll ``predicate`` until it returns something truthy (condition, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Cabinet:
    sim: SimProcess
    tmp: Path
    config: Path
    key: Path
    daemon: subprocess.Popen[bytes] | None = None
    extra_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def journal_path(self) -> Path:
        return self.tmp / "state" / "journal.db"

    # -- the daemon -----------------------------------------------------------------------

    def start(self) -> None:
        log = (self.tmp / "daemon.log").open("ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "cabinet.console.cli", "run", "-c", str(self.config)],
            stdout=log,
            stderr=log,
            cwd=REPO,
            env={**os.environ, **self.env},
        )
        count = len(self.events("cabinet.started"))
        wait_until("the daemon to be ready", lambda: len(self.events("cabinet.started")) > count)

    def kill9(self) -> None:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait()
        self.daemon = None

    def stop(self) -> None:
        if self.daemon is not None:
            stop_process(self.daemon)
            self.daemon = None

    # -- what the backend would see ------------------------------------------------------------

    def _open_journal(self) -> Journal | None:
        # a daemon that is just starting holds the new journal while it sets WAL mode
        try:
            return Journal(self.journal_path)
        except JournalError as exc:
            if "locked" not in str(exc):
                raise
            return None

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        if not self.journal_path.exists():
            return []
        journal = wait_until("the journal to open", self._open_journal)
        try:
            events = journal.events(limit=100_000)
        finally:
            journal.close()
        return [e for e in events if type_ is None or e["type"] == type_]

    def wait_event(self, type_: str, timeout: float = WAIT_S, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for event in self.events(type_):
                if all(event.get(k) == v for k, v in match.items()):
                    return event
            return None

        return wait_until(f"event {type_} {match}", found, timeout)  # type: ignore[no-any-return]

    def session_events(self, session_id: str) -> list[str]:
        return [e["type"] for e in self.events() if e.get("session_id") == session_id]

    # -- riders and fate ------------------------------------------------------------------------

    def token(self, rider: str, *extra: str) -> str:
        if "--cabinet" not in extra and "--fleet-wide" not in extra:
            extra = ("--cabinet", "cab-test", *extra)  # the cabinet write_config sets up
        result = cabinet_cmd("token", "issue", "--key", str(self.key), "--rider", rider, *extra)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def scan(self, text: str) -> None:
        """Scan once the daemon's scanner reader is connected (a line nobody reads is lost)."""

        def delivered() -> bool:
            result = self.sim.ctl("--json", "scan", text)
            assert result.returncode == 0, result.stderr
            return bool(json.loads(result.stdout)["delivered_to"])

        wait_until("the daemon to read the scanner", delivered)

    def ctl(self, *args: str) -> None:
        result = self.sim.ctl(*args)
        assert result.returncode == 0, result.stderr

    def state(self) -> dict[str, Any]:
        return self.sim.state()

    def bay(self, n: int) -> dict[str, Any]:
        return self.state()["bays"][n - 1]  # type: ignore[no-any-return]

    def wait_door(self, n: int, door: str) -> None:
        wait_until(f"bay {n} door {door}", lambda: self.bay(n)["door"] == door)

    def swap_begins(self, rider: str) -> dict[str, Any]:
        """Scan a fresh token; return the swap.started event."""
        count = len(self.events("swap.started"))
        self.scan(self.token(rider))
        wait_until("swap.started", lambda: len(self.events("swap.started")) > count)
        return self.events("swap.started")[-1]


def write_config(tmp: Path, sim: SimProcess, extra: dict[str, dict[str, Any]]) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "cabinet": {"id": "cab-test", "state_dir": str(tmp / "state")},
        "bus": {"url": sim.bus, "timeout_ms": 100},
        "scanner": {"url": sim.scanner},
        "auth": {"public_keys": [str(tmp / "backend.pub")]},
        "log_level": {},
    }
    for section, values in extra.items():
        sections.setdefault(section, {}).update(values)
    lines = ['log_level = "info"']
    for section, values in sections.items():
        if section == "log_level":
            continue
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = tmp / "cabinet.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def running_cabinet(
    tmp: Path,
    *,
    seed: int = 3,
    extra: dict[str, dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Cabinet]:
    """Simulator + daemon on free ports, torn down whatever happens."""
    sim = start_sim_process("--baud", "115200", "--reply-ms", "0", "--seed", str(seed))
    try:
        result = cabinet_cmd("keys", "generate", str(tmp / "backend"))
        assert result.returncode == 0, result.stderr
        config = write_config(tmp, sim, extra or {})
        cab = Cabinet(sim, tmp, config, tmp / "backend.key", env=env or {})
        failed = True
        try:
            cab.start()
            yield cab
            failed = False
        finally:
            cab.stop()
            log = tmp / "daemon.log"
            # a failing test shows what the daemon said (pytest prints a failed test's stderr)
            if log.exists() and (failed or os.environ.get("CABINET_TEST_SHOW_LOG")):
                sys.stderr.write(log.read_text()[-20_000:])
    finally:
        stop_sim_process(sim)
