"""The cabinet's voice: a new prompt launches the configured player, never blocking; silence
when there is no player, in quiet hours or at volume 0."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cabinet.daemon.display.voice import Voice, find_program, in_quiet_hours
from tests.conftest import REPO

WRITER = f"{sys.executable} -c \"import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')\""


async def _until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def test_a_new_prompt_launches_the_player_without_waiting(tmp_path: Path) -> None:
    spoken = tmp_path / "spoken.txt"

    async def scenario() -> float:
        voice = Voice(f"{WRITER} {spoken} {{text}}", tmp_path / "clips")
        began = time.monotonic()
        voice.say("insert", "en", ["Put your battery in bay 3"])
        returned = time.monotonic() - began
        await _until(lambda: spoken.exists() and "bay 3" in spoken.read_text())
        return returned

    assert asyncio.run(scenario()) < 0.05  # the controller's loop is never held up
    assert spoken.read_text() == "Put your battery in bay 3\n"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_clips_are_synthesised_once_and_played_from_a_file(tmp_path: Path) -> None:
    played = tmp_path / "played.txt"

    async def scenario() -> None:
        voice = Voice(f"{WRITER} {played} {{file}}", tmp_path / "clips")
        voice.say("take", "zh-CN", ["请从 4 号仓取出电池并关好仓门"])
        # the player creates the file before it writes the clip's path into it
        await _until(lambda: played.exists() and played.read_text().endswith("\n"))

    asyncio.run(scenario())
    clip = Path(played.read_text().strip())
    assert clip.parent == tmp_path / "clips" / "zh-CN"
    assert clip.read_bytes()[:4] == b"RIFF"


def test_a_missing_player_is_silent(tmp_path: Path) -> None:
    async def scenario() -> None:
        voice = Voice("/nonexistent/player {text}", tmp_path / "clips")
        voice.say("insert", "en", ["hello"])
        await asyncio.sleep(0)
        await asyncio.gather(*voice._tasks)

    asyncio.run(scenario())  # no exception escapes


def test_quiet_hours_and_volume_zero_keep_it_silent(tmp_path: Path) -> None:
    spoken = tmp_path / "spoken.txt"

    async def scenario() -> None:
        night = Voice(
            f"{WRITER} {spoken} {{text}}",
            tmp_path,
            quiet_hours="22:00-07:00",
            local_time=lambda: dt.time(23, 30),
        )
        night.say("insert", "en", ["at night"])
        mute = Voice(f"{WRITER} {spoken} {{text}}", tmp_path, volume=0)
        mute.say("insert", "en", ["muted"])
        assert not night._tasks and not mute._tasks

    asyncio.run(scenario())
    assert not spoken.exists()
    assert in_quiet_hours("22:00-07:00", dt.time(6, 59))
    assert not in_quiet_hours("22:00-07:00", dt.time(7, 0))
    assert in_quiet_hours("12:00-13:00", dt.time(12, 30))


def test_espeak_ng_is_found_on_path_as_shutil_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The voice's own PATH lookup (no shutil in the daemon) agrees with shutil.which."""
    bin_dir, other = tmp_path / "bin", tmp_path / "other"
    bin_dir.mkdir()
    other.mkdir()
    (other / "espeak-ng").write_text("not executable")  # skipped, as shutil.which skips it
    program = bin_dir / "espeak-ng"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{other}:{bin_dir}")
    assert find_program("espeak-ng") == shutil.which("espeak-ng") == str(program)
    assert Voice("aplay -q {file}", tmp_path / "clips").espeak == str(program)
    monkeypatch.setenv("PATH", str(other))
    assert find_program("espeak-ng") is shutil.which("espeak-ng") is None


def test_a_path_entry_it_may_not_enter_is_skipped(tmp_path: Path) -> None:
    """PATH inherited from root (``/root/.local/bin``): skipped, as shutil.which skips it.

    A PermissionError there escaped the voice's lookup and stopped the daemon at start.
    Run as nobody: root enters any directory.
    """
    locked = tmp_path / "locked"
    (locked / "inner").mkdir(parents=True)
    locked.chmod(0o700)
    script = "from cabinet.daemon.display.voice import find_program; print(find_program('sh'))"
    command = [sys.executable, "-c", script]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop to nobody")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    env = {"PATH": f"{locked / 'inner'}:/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, check=False, env=env, cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "/usr/bin/sh"
