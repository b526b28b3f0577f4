"""The scanner driver reads what `cabinet sim ctl scan` sends, and shrugs off garbage."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from drivers.qr_scanner import (
    MAX_LINE_BYTES,
    Scan,
    ScanGarbage,
    ScannerUnavailableError,
    classify,
    read_scans,
)
from tests.conftest import SimProcess


async def _first(url: str, count: int, send: Callable[[], None]) -> list[Scan | ScanGarbage]:
    scans = read_scans(url)
    first = asyncio.ensure_future(anext(scans))
    received = []
    await asyncio.to_thread(send)
    received.append(await asyncio.wait_for(first, 10))
    while len(received) < count:
        received.append(await asyncio.wait_for(anext(scans), 10))
    await scans.aclose()
    return received


def _scan_until_delivered(sim: SimProcess, text: str) -> None:
    # the reader connects asynchronously; the control reply says how many readers got it
    for _ in range(200):
        result = sim.ctl("--json", "scan", text)
        assert result.returncode == 0, result.stderr
        if '"delivered_to": 0' not in result.stdout:
            return
    raise AssertionError("the scanner reader never connected")


@pytest.mark.parametrize("fixture", ["sim_process", "sim_pty"])
def test_a_scan_arrives_as_one_clean_line(fixture: str, request: pytest.FixtureRequest) -> None:
    sim: SimProcess = request.getfixturevalue(fixture)
    received = asyncio.run(
        _first(sim.scanner, 1, lambda: _scan_until_delivered(sim, "RIDER-TOKEN-123"))
    )
    assert received[0] == Scan("RIDER-TOKEN-123")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\r\n", "empty line"),
        (b"\xff\xfe garbage\r\n", "not ASCII"),
        (b"abc\x07def\r\n", "unprintable characters"),
    ],
)
def test_garbage_lines_are_reported_with_a_reason(raw: bytes, reason: str) -> None:
    result = classify(raw)
    assert isinstance(result, ScanGarbage) and result.reason == reason


def test_an_overlong_line_is_garbage_and_reading_goes_on() -> None:
    async def scenario() -> list[Scan | ScanGarbage]:
        async def serve(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"x" * (MAX_LINE_BYTES * 3) + b"\r\n" + b"\xc3\x28\r\nGOOD-1\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        items: list[Scan | ScanGarbage] = []
        with pytest.raises(ScannerUnavailableError, match="stream ended"):
            async for item in read_scans(f"tcp://127.0.0.1:{port}"):
                items.append(item)  # noqa: PERF401 - items read before the error must be kept
        server.close()
        return items

    items = asyncio.run(scenario())
    assert [type(i).__name__ for i in items] == ["ScanGarbage", "ScanGarbage", "Scan"]
    assert isinstance(items[0], ScanGarbage)
    assert items[0].reason == f"line longer than {MAX_LINE_BYTES} bytes"
    assert items[2] == Scan("GOOD-1")


def test_a_missing_scanner_port_is_a_clear_error() -> None:
    async def scenario() -> None:
        async for _ in read_scans("serial:///dev/ttyACM-missing?baud=9600&parity=N"):
            pass

    with pytest.raises(ScannerUnavailableError, match="cannot open the scanner"):
        asyncio.run(scenario())
