"""The technician CLI's side of the daemon's control socket.

One JSON object per line each way over a Unix socket. A request is
``{"verb": ..., "args": {...}}``; the daemon answers with zero or more
``{"progress": ...}`` lines (a follow, a self-test) and one final line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "message"}}``.
The socket is the only way in: the CLI never opens the serial bus under a running
daemon, so a technician's command can never fight the daemon for the line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_LINE_BYTES = 1024 * 1024  # a full event page; anything longer is not ours
#: AF_UNIX paths longer than this do not fit ``sockaddr_un`` on Linux.
MAX_SOCKET_PATH = 107
REQUEST_TIMEOUT_S = 30.0  # a bus survey of 14 units with timeouts fits well within this


class DaemonNotRunningError(Exception):
    """Nobody listens on the control socket: the daemon is stopped (or elsewhere)."""


class ControlRefusedError(Exception):
    """The daemon understood the request and refused it, with a stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ControlProtocolError(Exception):
    """The daemon's answer made no sense (a different program on the socket?)."""


def check_socket_path(path: Path) -> None:
    """Refuse a path the kernel would truncate, with the reason rather than ENAMETOOLONG."""
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise ValueError(
            f"control socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "set cabinet.control_socket to a shorter path"
        )


def encode(message: dict[str, Any]) -> bytes:
    """One line of the protocol."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def _open(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    check_socket_path(path)
    try:
        return await asyncio.open_unix_connection(str(path), limit=MAX_LINE_BYTES)
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonNotRunningError(
            f"the daemon is not running (nothing listens on {path}); "
            "start it with `systemctl start cabinet` or `cabinet run`"
        ) from None
    except PermissionError:
        raise PermissionError(
            f"permission denied on {path}: run as the cabinet service's group (or root)"
        ) from None


async def _read(reader: asyncio.StreamReader, timeout_s: float | None) -> dict[str, Any]:
    try:
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except TimeoutError:
        raise ControlProtocolError("the daemon did not answer in time") from None
    if not line:
        raise ControlProtocolError("the daemon closed the connection without an answer")
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        raise ControlProtocolError("the daemon's answer is not JSON") from None
    if not isinstance(message, dict):
        raise ControlProtocolError("the daemon's answer is not a JSON object")
    return message


def _final(message: dict[str, Any]) -> Any:
    if message.get("ok") is True:
        return message.get("result")
    error = message.get("error")
    if isinstance(error, dict):
        raise ControlRefusedError(str(error.get("code")), str(error.get("message")))
    raise ControlProtocolError(f"unexpected answer: {message}")


async def request(
    path: Path,
    verb: str,
    args: dict[str, Any] | None = None,
    *,
    timeout_s: float | None = REQUEST_TIMEOUT_S,
    on_progress: Callable[[Any], None] | None = None,
) -> Any:
    """Send one request and return its result; progress lines go to ``on_progress``.

    ``timeout_s`` bounds the wait for each line, not the whole exchange: a self-test
    waiting for a technician to shut a door keeps talking, a silent daemon does not.
    """
    reader, writer = await _open(path)
    try:
        writer.write(encode({"verb": verb, "args": args or {}}))
        await writer.drain()
        while True:
            message = await _read(reader, timeout_s)
            if "progress" not in message:
                return _final(message)
            if on_progress is not None:
                on_progress(message["progress"])
    finally:
        writer.close()


async def is_running(path: Path) -> bool:
    """Whether a daemon answers on ``path`` (used to refuse starting a second one)."""
    try:
        reader, writer = await _open(path)
    except (DaemonNotRunningError, PermissionError, ValueError):
        return False
    writer.close()
    del reader
    return True
