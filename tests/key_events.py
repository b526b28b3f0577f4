"""Input-event streams as a USB keyboard-wedge QR scanner produces them, for tests.

No virtual input device (``/dev/uinput``) exists on the machines these tests run on, so
the tests write what the kernel would deliver from ``/dev/input/eventN`` - ``struct
input_event`` records - into a FIFO that stands in for the device. The stream has the
shape a real HID keyboard's has (evtest on a scanner): for each key an ``EV_MSC
MSC_SCAN`` with the HID usage, the ``EV_KEY`` press or release, and a ``SYN_REPORT``;
shift is held around shifted characters; Enter ends the scan.

The key codes below are copied from linux/input-event-codes.h, independently of the
keymap in ``drivers/hid_scanner.py`` they test.
"""

from __future__ import annotations

import struct

EVENT = struct.Struct("=qqHHi")  # timeval (64-bit sec, usec), type, code, value: 24 bytes
EV_SYN, EV_KEY, EV_MSC = 0, 1, 4
MSC_SCAN = 4
KEY_LEFTSHIFT, KEY_ENTER, KEY_CAPSLOCK, KEY_F13 = 42, 28, 58, 183

_LETTERS = {
    **dict(zip("qwertyuiop", range(16, 26), strict=True)),
    **dict(zip("asdfghjkl", range(30, 39), strict=True)),
    **dict(zip("zxcvbnm", range(44, 51), strict=True)),
}
_PLAIN = {**_LETTERS, **dict(zip("1234567890", range(2, 12), strict=True))}
_PLAIN |= {"-": 12, "=": 13, ".": 52, "/": 53, " ": 57, ",": 51, ";": 39}
_SHIFTED = {c.upper(): code for c, code in _LETTERS.items()}
_SHIFTED |= {"_": 12, "+": 13, ":": 39, "!": 2, "@": 3, "#": 4}


def _event(type_: int, code: int, value: int, t: float) -> bytes:
    return EVENT.pack(int(t), int((t % 1) * 1e6), type_, code, value)


def key(code: int, value: int, t: float = 0.0) -> bytes:
    """One key press (1), release (0) or auto-repeat (2), framed as a keyboard frames it."""
    return (
        _event(EV_MSC, MSC_SCAN, 0x70000 + code, t)
        + _event(EV_KEY, code, value, t)
        + _event(EV_SYN, 0, 0, t)
    )


def tap(code: int) -> bytes:
    """Press and release."""
    return key(code, 1) + key(code, 0)


def typed(text: str, *, enter: bool = True) -> bytes:
    """The events of a scanner typing ``text`` (then Enter)."""
    out = b""
    for char in text:
        if char in _PLAIN:
            out += tap(_PLAIN[char])
        else:
            out += key(KEY_LEFTSHIFT, 1) + tap(_SHIFTED[char]) + key(KEY_LEFTSHIFT, 0)
    return out + (tap(KEY_ENTER) if enter else b"")
