"""A pseudo-terminal standing in for a serial cable (RS-485 adapter or USB-CDC scanner).

The simulator keeps the master side and publishes the slave side under a stable
symlink, so the daemon opens it with pyserial exactly as it would open
/dev/serial/by-id/usb-...; closing the link and opening a new one at the same path is
what a USB adapter's re-enumeration looks like (a new device node behind the same name).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import Callable
from pathlib import Path


class PtyLink:
    """One pty pair: bytes written by the far end arrive at ``on_data``; ``write`` sends back."""

    def __init__(self, link_path: str, on_data: Callable[[bytes], None]) -> None:
        self.link_path = Path(link_path)
        self._on_data = on_data
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line discipline: raw bytes as on a UART
        os.set_blocking(self._master, False)
        if self.link_path.is_symlink() or self.link_path.exists():
            self.link_path.unlink()
        self.device_path = os.ttyname(self._slave)  # the /dev/pts/N behind the stable link
        self.link_path.symlink_to(self.device_path)
        asyncio.get_running_loop().add_reader(self._master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError:
            return  # EIO while no process has the far end open: nothing to read
        if data:
            self._on_data(data)

    def write(self, data: bytes) -> None:
        """Send bytes to whoever has the port open (dropped if nobody reads, as on a cable)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._master, data)

    def close(self) -> None:
        """Remove the symlink and release both sides."""
        asyncio.get_running_loop().remove_reader(self._master)
        with contextlib.suppress(FileNotFoundError):
            self.link_path.unlink()
        os.close(self._master)
        os.close(self._slave)
