"""A USB RS-485 adapter that can be pulled out and plugged back in, for tests.

A pseudo-terminal published under a stable symlink (as udev publishes
``/dev/serial/by-id/usb-...``) relays to the simulator's RTU-over-TCP line. Unplugging
closes the pty (the daemon's open port hangs up) and removes the symlink; plugging in
again creates a *new* pty behind the same name, as USB re-enumeration gives a new
``/dev/ttyUSBn``.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

from sim.pty_link import PtyLink


class UnpluggableAdapter:
    """The adapter at ``link_path``, wired to the RTU-over-TCP line at ``host``:``port``."""

    def __init__(self, link_path: str, host: str, port: int) -> None:
        self.link_path = link_path
        self._address = (host, port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._pty: PtyLink | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None
        self.plugged_devices: list[str] = []  # the pty behind the link at each plug-in

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=10)

    def plug_in(self) -> None:
        """A new device node appears behind the stable name."""
        self._run(self._plug_in())

    def unplug(self) -> None:
        """The device node vanishes; whoever had it open is hung up on."""
        self._run(self._unplug())

    def close(self) -> None:
        """Unplug (if plugged) and stop the relay thread."""
        self.unplug()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _plug_in(self) -> None:
        reader, writer = await asyncio.open_connection(*self._address)
        self._writer = writer
        self._pty = PtyLink(self.link_path, on_data=writer.write)
        self.plugged_devices.append(self._pty.device_path)
        self._pump = asyncio.create_task(self._replies(reader, self._pty))

    @staticmethod
    async def _replies(reader: asyncio.StreamReader, pty: PtyLink) -> None:
        while data := await reader.read(4096):
            pty.write(data)

    async def _unplug(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if self._pty is not None:
            self._pty.close()
            self._pty = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
