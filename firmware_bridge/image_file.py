"""Opening a firmware image file without ever waiting on it.

A path is only a name: it may be a FIFO (an ``open`` or a ``read`` that waits for a
writer forever), a device (``/dev/kmsg`` never ends, a serial port toggles its
control lines when opened) or a file that grows while it is read. Inside the
daemon a wait on the event loop stops polling, heartbeats and the control socket,
and the boards' fail-safe then cuts charging. So an image is opened with
``O_NONBLOCK`` (an ``open`` that returns at once whatever the path is), judged by
``fstat`` on that very descriptor (no window between the check and the use), and
read only if it is a regular file within the size cap. The read itself is left to
the caller to run off the event loop.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from protocol.errors import CodedError

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class ImageSourceError(CodedError):
    """The image cannot be taken from this path; ``reason`` is a stable code."""


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def inside(path: Path, directory: Path) -> Path:
    """``path`` with every link resolved, if it lies in ``directory``; else ``bad_source``.

    Resolving first means neither ``..`` nor a symbolic link can lead out of it.
    """
    resolved = Path(os.path.realpath(path))
    if not resolved.is_relative_to(os.path.realpath(directory)):
        raise ImageSourceError("bad_source", f"{path} is not in the image directory {directory}")
    return resolved


def _check(fd: int, path: Path, max_bytes: int) -> None:
    info = os.fstat(fd)  # the descriptor itself: what was checked is what is read
    if not stat.S_ISREG(info.st_mode):
        raise ImageSourceError("bad_source", f"{path} is {_kind(info.st_mode)}, not a regular file")
    if info.st_size > max_bytes:
        raise ImageSourceError("too_large", f"{path} is over {max_bytes} bytes")


def open_image(path: Path, max_bytes: int) -> int:
    """A descriptor on ``path`` if it is a regular file of at most ``max_bytes``; never blocks."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise ImageSourceError("unreadable", f"cannot read {path}: {exc.strerror}") from None
    try:
        _check(fd, path, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_image(fd: int, path: Path, max_bytes: int) -> bytes:
    """Read and close a descriptor from ``open_image`` (disk I/O: off the event loop)."""
    try:
        with os.fdopen(fd, "rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise ImageSourceError("unreadable", f"cannot read {path}: {exc.strerror}") from None
    if len(data) > max_bytes:  # it grew after the fstat
        raise ImageSourceError("too_large", f"{path} is over {max_bytes} bytes")
    return data


def load_image_file(path: Path, max_bytes: int) -> bytes:
    """Open, check and read an image file in one call (a CLI process, not the daemon)."""
    return read_image(open_image(path, max_bytes), path, max_bytes)
