"""The state directory's lock: one daemon per journal, whatever its control socket.

The control socket's path is configurable, so "is another daemon answering there?" does
not stop a second daemon started with another config on the same ``cabinet.state_dir``:
two daemons would write into one journal, take turns on the bus and fight over the
MQTT client id. ``fcntl.flock`` on ``<state_dir>/lock`` is taken before the journal is
opened and held for the daemon's life; the kernel drops it when the process ends, even
by ``kill -9`` or a power cut, so a stale file never blocks a restart. The file holds
the holder's pid, only to say who it is: the lock, not the file, decides.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_FILE = "lock"


class StateDirLockedError(Exception):
    """Another daemon holds the state directory; the message names it and its pid."""


class StateDirLock:
    """An exclusive ``flock`` on ``<state_dir>/lock``, released by :meth:`release` or exit."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path) -> StateDirLock:
        """Lock ``state_dir`` for this process, or raise naming the daemon that holds it."""
        path = state_dir / LOCK_FILE
        try:
            state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateDirLockedError(
                f"cannot lock the state directory {state_dir}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StateDirLockedError(
                f"another daemon is running ({holder}) on the state directory {state_dir}:"
                " stop it first, or give this one its own cabinet.state_dir"
            ) from None
        except OSError as exc:  # e.g. a file system without locks
            os.close(fd)
            raise StateDirLockedError(
                f"cannot lock the state directory {state_dir}: {exc.strerror}"
            ) from None
        os.fchmod(fd, 0o600)  # whatever the umask: the pid is nobody else's business to edit
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        """Let the next daemon in (the journal must be closed first)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _holder(fd: int) -> str:
    """``pid N`` from the lock file, or a plain phrase while the holder is still writing it."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"
