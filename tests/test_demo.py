"""`cabinet demo`: broker, simulator, daemon and riders on one machine, headless and live."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, cabinet_cmd
from tests.daemon_harness import wait_until


def test_a_headless_demo_swaps_and_explains_every_failure() -> None:
    result = cabinet_cmd("demo", "--duration", "30", timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    completed = int(re.search(r"swaps completed: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert completed >= 2
    assert "unexplained: 0" in out
    assert "refused:bad_signature: 1" in out  # the forger met a closed door
    published = re.search(r"events published: (\d+) of (\d+) journaled", out)
    assert published and published.group(1) == published.group(2) and int(published.group(1)) > 0
    assert "gaps 0, duplicates 0" in out
    assert "the cabinet's screen: open http://127.0.0.1:" in out  # the rider's kiosk page
    assert "(app): completed" in out  # an app rider got in through the screen's QR challenge
    assert "Traceback" not in result.stderr


class Terminal:
    """A real terminal (tmux) a person would watch the demo in."""

    def __init__(self) -> None:
        self.socket = f"cabinet-test-{uuid.uuid4().hex[:8]}"

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True
        )
        return result.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "demo")


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    term = Terminal()
    try:
        yield term
    finally:
        subprocess.run(["tmux", "-L", term.socket, "kill-server"], capture_output=True, check=False)


def test_the_live_view_shows_the_cabinet_as_it_swaps(terminal: Terminal) -> None:
    command = (
        f"cd {shlex.quote(str(REPO))} && {shlex.quote(sys.executable)} -m cabinet.console.cli demo"
    )
    terminal.tmux(
        *("new-session", "-d", "-s", "demo", "-x", "120", "-y", "50", command),
        *(";", "set-option", "-t", "demo", "remain-on-exit", "on"),
    )
    wait_until("the bay table", lambda: " BAY DOOR" in terminal.screen(), timeout=40)
    wait_until("the broker link", lambda: "MQTT connected mqtt://" in terminal.screen())
    screen = terminal.screen()
    bay_rows = [
        line for line in screen.splitlines() if re.match(r"^ +\d{1,2}  (closed|OPEN)", line)
    ]
    assert len(bay_rows) == 12
    assert re.search(r"\[#+-*\] +\d+%", screen)  # a battery's charge bar
    wait_until(
        "a completed swap on screen",
        lambda: re.search(r"swaps completed [1-9]", terminal.screen()),
        timeout=60,
    )
    screen = terminal.screen()
    assert "swap.completed" in screen  # in the recent events
    assert "(normal): completed" in screen  # in the riders' log
    terminal.tmux("send-keys", "-t", "demo", "C-c")
    wait_until("the summary", lambda: "unexplained: 0" in terminal.screen(), timeout=30)
    assert "Traceback" not in terminal.screen()
