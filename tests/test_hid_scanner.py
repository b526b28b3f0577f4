"""A QR scanner that is a USB keyboard: key events in, the token text out, Enter ends a scan.

There is no /dev/uinput on the machines these tests run on (no virtual input device can
be made), so the device is a FIFO carrying recorded-format ``struct input_event``
streams (tests/key_events.py); the grab is checked against a character device that is
not an input device.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.bus_url import BusUrlError, InputDeviceEndpoint, parse_endpoint, parse_scanner_endpoint
from drivers.qr_scanner import (
    MAX_LINE_BYTES,
    Scan,
    ScanGarbage,
    ScannerUnavailableError,
    read_scans,
)
from tests.field_cabinet import field_cabinet
from tests.key_events import KEY_CAPSLOCK, KEY_F13, key, tap, typed

TOKEN_LIKE = "CT1.eyJyIjoiUi0xIn0.Zm9v_bar-BAZ09="


@pytest.fixture
def device(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A FIFO standing in for /dev/input/eventN, held open for writing by the 'scanner'."""
    path = tmp_path / "usb-Scanner-event-kbd"
    os.mkfifo(path)
    writer = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # RDWR: open without waiting for a reader
    yield str(path), writer
    os.close(writer)


async def _scans(url: str, stream: bytes, count: int) -> list[Scan | ScanGarbage]:
    """Read ``count`` scans from the device at ``url`` while ``stream`` is typed into it."""
    path = url.removeprefix("evdev://")

    def type_it() -> None:
        # blocking: waits for the reader to open the device, and for room in the FIFO
        with Path(path).open("wb", buffering=0) as scanner:
            scanner.write(stream)

    scans = read_scans(url)
    typing = asyncio.ensure_future(asyncio.to_thread(type_it))
    try:
        received = [await asyncio.wait_for(anext(scans), 10)]
        while len(received) < count:
            received.append(await asyncio.wait_for(anext(scans), 10))
    finally:
        await scans.aclose()
        await typing
    return received


def test_an_evdev_url_names_an_input_device() -> None:
    url = "evdev:///dev/input/by-id/usb-Newland_HR22-event-kbd"
    assert parse_scanner_endpoint(url) == InputDeviceEndpoint(
        "/dev/input/by-id/usb-Newland_HR22-event-kbd"
    )
    with pytest.raises(BusUrlError, match="names an input device"):
        parse_scanner_endpoint("evdev://host/dev/input/event0")
    with pytest.raises(BusUrlError):
        parse_endpoint(url)  # a keyboard is no bus


def test_a_typed_token_is_read_as_its_text(device: tuple[str, int]) -> None:
    path, _ = device
    # the scanner types two codes; an auto-repeat of a held key types the character again
    stream = typed(TOKEN_LIKE) + typed("ab", enter=False) + key(30, 2) + typed("")
    items = asyncio.run(_scans(f"evdev://{path}", stream, 2))
    assert items == [Scan(TOKEN_LIKE), Scan("aba")]


def test_caps_lock_on_the_scanner_inverts_letters_only(device: tuple[str, int]) -> None:
    path, _ = device
    stream = tap(KEY_CAPSLOCK) + typed("aB1_") + tap(KEY_CAPSLOCK) + typed("aB")
    items = asyncio.run(_scans(f"evdev://{path}", stream, 2))
    assert items == [Scan("Ab1_"), Scan("aB")]


def test_a_key_off_the_keymap_spoils_only_its_scan(device: tuple[str, int]) -> None:
    path, _ = device
    stream = typed("AB", enter=False) + tap(KEY_F13) + typed("C") + typed("GOOD-1")
    items = asyncio.run(_scans(f"evdev://{path}", stream, 2))
    assert isinstance(items[0], ScanGarbage)
    assert items[0].reason == "key code 183 is not on the scanner keymap (US)"
    assert items[1] == Scan("GOOD-1")


def test_an_overlong_or_empty_scan_is_garbage(device: tuple[str, int]) -> None:
    path, _ = device
    stream = typed("x" * (MAX_LINE_BYTES + 5)) + typed("") + typed("OK")
    items = asyncio.run(_scans(f"evdev://{path}", stream, 3))
    assert [getattr(i, "reason", None) for i in items[:2]] == [
        f"line longer than {MAX_LINE_BYTES} bytes",
        "empty line",
    ]
    assert items[2] == Scan("OK")


def test_a_scanner_that_goes_away_ends_the_stream(tmp_path: Path) -> None:
    path = tmp_path / "usb-Scanner-event-kbd"
    os.mkfifo(path)
    writer = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    async def scenario() -> list[Scan | ScanGarbage]:
        items: list[Scan | ScanGarbage] = []
        scans = read_scans(f"evdev://{path}")
        first = asyncio.ensure_future(anext(scans))
        os.write(writer, typed("LAST") + key(30, 1)[:10])  # unplugged mid-event
        items.append(await asyncio.wait_for(first, 10))
        os.close(writer)  # the last writer gone: as the device node vanishing
        with pytest.raises(ScannerUnavailableError, match="went away"):
            await asyncio.wait_for(anext(scans), 10)
        return items

    assert asyncio.run(scenario()) == [Scan("LAST")]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/dev/input/by-id/usb-missing-event-kbd", "does not exist"),
        ("/dev/null", "/dev/null is not an input device"),  # a char device: the grab fails
    ],
)
def test_a_device_that_cannot_be_read_is_a_clear_error(path: str, message: str) -> None:
    async def scenario() -> None:
        async for _ in read_scans(f"evdev://{path}"):
            pass

    with pytest.raises(ScannerUnavailableError, match=message):
        asyncio.run(scenario())


def test_a_rider_swaps_with_a_token_typed_by_a_keyboard_scanner(
    tmp_path: Path, device: tuple[str, int]
) -> None:
    path, writer = device
    with field_cabinet(tmp_path, extra={"scanner": {"url": f"evdev://{path}"}}) as cab:
        token = cab.token("R-HID")
        os.write(writer, typed(token))
        started = cab.wait_event("swap.started", rider_id="R-HID")
        assert started["return_bay"] != started["dispense_bay"]
