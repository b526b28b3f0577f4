"""The cabinet's voice: each new prompt spoken through a configurable command.

Clips are synthesised with espeak-ng on first use into ``<state_dir>/voice/<lang>/``
(reproducible: same text, voice and speed give the same WAV; nothing binary in the
repository) and played with ``display.audio_command`` (``aplay -q {file}``). ``{text}``
in the command gets the sentence instead, for players that speak by themselves.
Everything runs as child processes the loop never waits on: a hung speaker cannot
delay a door. No command, no espeak-ng for a ``{file}`` command, quiet hours or
volume 0: silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

ESPEAK_VOICES = {"en": "en", "zh-CN": "cmn"}


def find_program(name: str) -> str | None:
    """The executable ``name`` on PATH, as ``shutil.which`` finds it on Linux.

    Not ``shutil`` itself: it brings ``bz2`` and ``lzma`` with it, ~0.4 MB resident in the
    daemon for this one lookup (issue 14: ``cabinet run`` with the screen in 40 MB).
    """
    for directory in os.get_exec_path():
        path = Path(directory or ".") / name
        try:
            found = path.is_file() and os.access(path, os.X_OK)
        except OSError:  # a directory on PATH we may not enter: skipped, as shutil skips it
            continue
        if found:
            return str(path)
    return None


PLAY_TIMEOUT_S = 30.0


def in_quiet_hours(spec: str | None, now: dt.time) -> bool:
    """Whether ``now`` falls in ``"HH:MM-HH:MM"`` (which may wrap past midnight)."""
    if not spec:
        return False
    start_s, end_s = spec.split("-")
    start, end = dt.time.fromisoformat(start_s), dt.time.fromisoformat(end_s)
    if start <= end:
        return start <= now < end
    return now >= start or now < end


class Voice:
    """Speaks prompts without ever blocking the caller."""

    def __init__(
        self,
        command: str | None,
        clip_dir: Path,
        *,
        volume: int = 80,
        quiet_hours: str | None = None,
        local_time: Callable[[], dt.time] = lambda: dt.datetime.now().time(),
    ) -> None:
        self.command = command
        self.clip_dir = clip_dir
        self.volume = volume
        self.quiet_hours = quiet_hours
        self.local_time = local_time
        self.espeak = find_program("espeak-ng")
        self._tasks: set[asyncio.Task[None]] = set()

    def say(self, code: str, language: str, lines: Sequence[str]) -> None:
        """Speak the first line of a new screen (fire and forget)."""
        if not self.command or not lines or self.volume == 0:
            return
        if in_quiet_hours(self.quiet_hours, self.local_time()):
            return
        task = asyncio.get_running_loop().create_task(self._speak(code, language, lines[0]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _speak(self, code: str, language: str, sentence: str) -> None:
        assert self.command is not None
        file = ""
        if "{file}" in self.command:
            clip = await self._clip(code, language, sentence)
            if clip is None:
                return
            file = str(clip)
        argv = [part.format(file=file, text=sentence) for part in shlex.split(self.command)]
        await _run(argv)

    async def _clip(self, code: str, language: str, sentence: str) -> Path | None:
        if self.espeak is None:
            return None
        digest = hashlib.sha256(f"{sentence}|{self.volume}".encode()).hexdigest()[:12]
        clip = self.clip_dir / language / f"{code}.{digest}.wav"
        if not clip.exists():
            clip.parent.mkdir(parents=True, exist_ok=True)
            amplitude = str(round(self.volume * 2))  # espeak-ng: 0-200, 100 is normal
            voice = ESPEAK_VOICES.get(language, "en")
            argv = [self.espeak, "-v", voice, "-a", amplitude, "-s", "150", "-w", str(clip)]
            if not await _run([*argv, sentence]):
                return None
        return clip


async def _run(argv: list[str]) -> bool:
    """Run ``argv`` to completion in the background; False if it could not."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:  # no such player: silent, said once per prompt in the log
        log.debug("voice_unavailable", command=argv[0], error=str(exc))
        return False
    try:
        return await asyncio.wait_for(proc.wait(), PLAY_TIMEOUT_S) == 0
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return False
