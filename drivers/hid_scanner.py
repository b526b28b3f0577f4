"""A QR scanner that presents itself as a USB keyboard, read through Linux input events.

Theory of operation: a "keyboard wedge" scanner types each scan as key presses and
ends it with Enter. The kernel hands those to ``/dev/input/eventN`` as ``struct
input_event`` records (a timestamp, then type, code and value: a stable ABI), which
this module reads directly, with no dependency: the records are fixed-size, and the
only ioctl needed is ``EVIOCGRAB``. Grabbing makes the cabinet the device's only
reader, so a scan never leaks into a console login or the kiosk page as typed text.

``KeyDecoder`` is pure: key events in, a ``Scan`` or ``ScanGarbage`` out at each
Enter, on a US keymap (the layout scanners ship with). A key the keymap does not know
spoils only the scan it is in, which is reported as garbage like a mangled serial line.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import struct
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Final

from drivers.qr_scanner import MAX_LINE_BYTES, Scan, ScanGarbage, ScannerUnavailableError, classify

# struct input_event on 64-bit Linux: struct timeval (two longs), u16 type, u16 code, s32 value
INPUT_EVENT: Final = struct.Struct("@llHHi")
EV_KEY: Final = 0x01
KEY_RELEASED, KEY_PRESSED, KEY_REPEATED = 0, 1, 2
# _IOW('E', 0x90, int): exclusive access to the device for this file descriptor
EVIOCGRAB: Final = 0x40044590

KEY_ENTER, KEY_KPENTER = 28, 96
KEY_LEFTSHIFT, KEY_RIGHTSHIFT, KEY_CAPSLOCK = 42, 54, 58
SHIFT_KEYS: Final = frozenset({KEY_LEFTSHIFT, KEY_RIGHTSHIFT})
# Keys that carry no character and may sit inside a scan (modifiers a scanner presses).
IGNORED_KEYS: Final = frozenset({29, 56, 97, 100, 125, 126})  # ctrl, alt, meta (left/right)


def _row(first_code: int, plain: str, shifted: str) -> dict[int, tuple[str, str]]:
    return {first_code + i: (p, s) for i, (p, s) in enumerate(zip(plain, shifted, strict=True))}


# Linux key codes (input-event-codes.h) to (plain, shifted) characters on a US layout.
US_KEYMAP: Final[dict[int, tuple[str, str]]] = {
    **_row(2, "1234567890-=", "!@#$%^&*()_+"),
    **_row(16, "qwertyuiop[]", "QWERTYUIOP{}"),
    **_row(30, "asdfghjkl;'`", 'ASDFGHJKL:"~'),
    **_row(43, "\\zxcvbnm,./", "|ZXCVBNM<>?"),
    57: (" ", " "),
    55: ("*", "*"),  # keypad
    **_row(71, "789-456+1230.", "789-456+1230."),  # keypad, num lock on (scanners' mode)
    98: ("/", "/"),
}


@dataclass
class KeyDecoder:
    """Turns key events into scans: characters until Enter, shift and caps lock honoured."""

    keymap: dict[int, tuple[str, str]] = field(default_factory=lambda: dict(US_KEYMAP))
    _text: list[str] = field(default_factory=list)
    _shift: set[int] = field(default_factory=set)
    _caps: bool = False
    _unknown: int | None = None  # the first key in this scan the keymap has no character for
    _overlong: bool = False

    def feed(self, type_: int, code: int, value: int) -> Scan | ScanGarbage | None:
        """One input event; returns a scan when Enter ends one."""
        if type_ != EV_KEY:
            return None  # EV_SYN, EV_MSC (scan codes), EV_LED: framing, not text
        if code in SHIFT_KEYS:
            (self._shift.add if value != KEY_RELEASED else self._shift.discard)(code)
            return None
        if value == KEY_RELEASED:
            return None  # a character is typed on press (and on auto-repeat)
        if code in {KEY_ENTER, KEY_KPENTER}:
            return self._finish()
        if code == KEY_CAPSLOCK:
            if value == KEY_PRESSED:  # toggles on press; auto-repeat does not toggle again
                self._caps = not self._caps
            return None
        if code in IGNORED_KEYS:
            return None
        self._type(code)
        return None

    def _type(self, code: int) -> None:
        chars = self.keymap.get(code)
        if chars is None:
            if self._unknown is None:
                self._unknown = code
            return
        shifted = bool(self._shift)
        if self._caps and chars[0].isalpha():
            shifted = not shifted
        if len(self._text) >= MAX_LINE_BYTES:
            self._overlong = True
            return
        self._text.append(chars[1] if shifted else chars[0])

    def _finish(self) -> Scan | ScanGarbage:
        text, unknown, overlong = "".join(self._text), self._unknown, self._overlong
        self._text, self._unknown, self._overlong = [], None, False
        raw = text.encode("ascii")
        if overlong:
            return ScanGarbage(f"line longer than {MAX_LINE_BYTES} bytes", raw[:64])
        if unknown is not None:
            return ScanGarbage(f"key code {unknown} is not on the scanner keymap (US)", raw[:64])
        return classify(raw)


def _grab(fd: int, path: str) -> None:
    """Take the device for ourselves, so scans do not also arrive as console keystrokes."""
    try:
        fcntl.ioctl(fd, EVIOCGRAB, 1)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            raise ScannerUnavailableError(
                f"the scanner {path} is grabbed by another program (a second cabinet daemon?)"
            ) from exc
        raise ScannerUnavailableError(f"{path} is not an input device: {exc}") from exc


def open_input_device(path: str) -> int:
    """Open (and, for a real input device, grab) ``path``; return the file descriptor.

    A FIFO is accepted without grabbing: tests and bench replay recorded event streams
    through one, as no virtual input device (uinput) is offered everywhere.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ScannerUnavailableError(
            f"scanner {path} does not exist (is it plugged in?)"
        ) from None
    except PermissionError:
        raise ScannerUnavailableError(
            f"permission denied opening {path} (is the user in the input group?)"
        ) from None
    except OSError as exc:
        raise ScannerUnavailableError(f"cannot open the scanner at {path}: {exc}") from exc
    if stat.S_ISCHR(os.fstat(fd).st_mode):
        _grab(fd, path)
    return fd


async def read_key_scans(path: str) -> AsyncGenerator[Scan | ScanGarbage, None]:
    """Yield every scan the keyboard-wedge scanner at ``path`` types, until it goes away."""
    fd = open_input_device(path)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(fd, "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
    except ValueError as exc:  # a regular file or a directory: no stream of events
        pipe.close()
        raise ScannerUnavailableError(f"{path} is not an input device: {exc}") from exc
    decoder = KeyDecoder()
    try:
        while True:
            try:
                record = await reader.readexactly(INPUT_EVENT.size)
            except asyncio.IncompleteReadError:
                raise ScannerUnavailableError(f"the scanner {path} went away") from None
            except OSError as exc:  # ENODEV: the USB device was unplugged
                raise ScannerUnavailableError(f"the scanner {path} went away: {exc}") from exc
            _sec, _usec, type_, code, value = INPUT_EVENT.unpack(record)
            item = decoder.feed(type_, code, value)
            if item is not None:
                yield item
    finally:
        transport.close()  # closing the descriptor releases the grab
