"""The QR scanner: one ASCII line per scan over USB-CDC serial (or a TCP byte stream).

A scanner that presents itself as a USB keyboard (``evdev:///dev/input/...``) is read by
``drivers.hid_scanner`` and yields the same ``Scan`` / ``ScanGarbage`` items.

A line the scanner mangled (not ASCII, unprintable, absurdly long, empty) is
reported as ``ScanGarbage`` and reading goes on: a smudged code must never take
the scanner input down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import serial

from drivers.bus_url import (
    InputDeviceEndpoint,
    SerialEndpoint,
    TcpEndpoint,
    parse_scanner_endpoint,
)

MAX_LINE_BYTES = 1024  # a signed rider token is ~200 characters; anything far longer is noise


class ScannerUnavailableError(Exception):
    """The scanner's port cannot be opened or the stream ended."""


@dataclass(frozen=True, slots=True)
class Scan:
    """One clean scanned line."""

    text: str


@dataclass(frozen=True, slots=True)
class ScanGarbage:
    """A line that is not a usable scan, with the reason a technician would want."""

    reason: str
    raw: bytes


def classify(raw: bytes) -> Scan | ScanGarbage:
    """Judge one line (terminator already removed)."""
    line = raw.strip(b"\r\n")
    if not line.strip():
        return ScanGarbage("empty line", raw)
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return ScanGarbage("not ASCII", raw[:64])
    if not text.isprintable():
        return ScanGarbage("unprintable characters", raw[:64])
    return Scan(text.strip())


async def _open(endpoint: TcpEndpoint | SerialEndpoint) -> tuple[asyncio.StreamReader, Any]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    if isinstance(endpoint, TcpEndpoint):
        try:
            reader, writer = await asyncio.open_connection(
                endpoint.host, endpoint.port, limit=MAX_LINE_BYTES
            )
        except OSError as exc:
            raise ScannerUnavailableError(f"cannot reach the scanner at {endpoint}: {exc}") from exc
        return reader, writer
    assert isinstance(endpoint, SerialEndpoint)
    try:
        port = serial.Serial(endpoint.path, endpoint.baud, timeout=0)
    except serial.SerialException as exc:
        raise ScannerUnavailableError(f"cannot open the scanner at {endpoint.path}: {exc}") from exc
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), port)
    return reader, transport


async def _discard_rest_of_line(reader: asyncio.StreamReader) -> None:
    while True:
        try:
            await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
        else:
            return


async def _next_line(reader: asyncio.StreamReader) -> Scan | ScanGarbage:
    try:
        return classify(await reader.readuntil(b"\n"))
    except asyncio.LimitOverrunError as exc:
        head = await reader.readexactly(exc.consumed)
        await _discard_rest_of_line(reader)
        return ScanGarbage(f"line longer than {MAX_LINE_BYTES} bytes", head[:64])


async def read_scans(url: str) -> AsyncGenerator[Scan | ScanGarbage, None]:
    """Yield every line the scanner sends until the stream ends."""
    endpoint = parse_scanner_endpoint(url)
    if isinstance(endpoint, InputDeviceEndpoint):
        # imported here: a cabinet with a serial scanner never loads the keymap
        from drivers.hid_scanner import read_key_scans  # noqa: PLC0415

        async for item in read_key_scans(endpoint.path):
            yield item
        return
    reader, closer = await _open(endpoint)
    try:
        while True:
            try:
                item = await _next_line(reader)
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    yield classify(exc.partial)
                raise ScannerUnavailableError("the scanner stream ended") from None
            yield item
    finally:
        closer.close()
