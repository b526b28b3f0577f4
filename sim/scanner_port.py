"""The QR scanner's byte stream: one ASCII line per scan, to every listener."""

from __future__ import annotations

import asyncio
import contextlib

from sim.endpoints import ListenSpec
from sim.pty_link import PtyLink


class ScannerPort:
    """Serves scans over TCP (any number of readers) or a pseudo-terminal."""

    def __init__(self) -> None:
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._pty: PtyLink | None = None
        self.scans = 0

    async def start(self, spec: ListenSpec) -> str:
        """Start listening; return the URL a reader connects to."""
        if spec.kind == "pty":
            self._pty = PtyLink(spec.path, on_data=lambda _data: None)
            return f"serial://{spec.path}?baud=9600&parity=N"
        self._server = await asyncio.start_server(self._connected, spec.host, spec.port)
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"tcp://{host}:{port}"

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await reader.read()  # readers never send; returns at disconnect
        finally:
            self._writers.discard(writer)
            writer.close()

    def emit(self, raw: bytes) -> int:
        """Send one scan (already terminated) to every reader; return how many got it."""
        self.scans += 1
        if self._pty is not None:
            self._pty.write(raw)
            return 1
        for writer in list(self._writers):
            writer.write(raw)
        return len(self._writers)

    async def stop(self) -> None:
        """Stop serving."""
        if self._pty is not None:
            self._pty.close()
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
