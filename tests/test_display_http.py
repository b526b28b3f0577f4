"""The rider's page over HTTP/1.1, as browsers - and broken or vanishing clients - speak it.

Against the real daemon: raw sockets for what no browser sends (a malformed request, an
oversized header, a request never finished), ``http.client`` for the routes on one
keep-alive connection. In-process, a ``DisplayServer`` on a free port (port 0) for what
only the server can tell: a page that goes away leaves no event stream behind, and a
stop is not held up by the streams still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.config import DisplaySection
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.display.challenges import ChallengeBook
from cabinet.daemon.display.server import KEEPALIVE_S, SHUTDOWN_S, DisplayServer
from cabinet.daemon.journal import Journal
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus
from tests.daemon_harness import Cabinet
from tests.display_helpers import ScreenWatcher, cabinet_with_screen, get_json

EVENTS = b"GET /events HTTP/1.1\r\nHost: kiosk\r\n\r\n"


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cabinet, str]]:
    """The real daemon with its screen on; (cabinet, page URL)."""
    with cabinet_with_screen(tmp_path_factory.mktemp("http"), seed=51) as (cab, _, url):
        yield cab, url


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _exchange(url: str, raw: bytes) -> bytes:
    """Send ``raw``, then read what the server answers until it closes."""
    answer = b""
    with socket.create_connection(_address(url), timeout=5) as sock:
        with contextlib.suppress(ConnectionError):  # it may close before taking it all
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):  # a server that stalls: recv times out
                answer += chunk
    return answer


def test_a_malformed_or_oversized_request_is_refused_and_the_page_still_serves(
    page: tuple[Cabinet, str],
) -> None:
    cab, url = page
    # a client that never finishes its request holds up nobody else
    with socket.create_connection(_address(url), timeout=5) as unfinished:
        unfinished.sendall(b"GET / HTTP/1.1\r\nHost: kiosk\r\n")
        for raw in (
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: kiosk\r\nNo colon here\r\n\r\n",
            b"GET /\x00 HTTP/1.1\r\nHost: kiosk\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # https:// typed at the kiosk
            b"GET / HTTP/1.1\r\nHost: kiosk\r\n",  # the client gave up mid-request
            b"GET http://[::1/ HTTP/1.1\r\nHost: kiosk\r\n\r\n",  # a target that is no URL
        ):
            answer = _exchange(url, raw)
            assert answer.startswith(b"HTTP/1.1 400 "), (raw, answer)
        huge = b"GET / HTTP/1.1\r\nHost: kiosk\r\nX-Junk: " + b"j" * 100_000 + b"\r\n\r\n"
        answer = _exchange(url, huge)
        assert answer.split(b"\r\n")[0] in {
            b"HTTP/1.1 400 Bad Request",
            b"HTTP/1.1 431 Request Header Fields Too Large",
        }, answer[:200]
        assert "EventSource" in _page_text(url)
        assert get_json(url + "screen.json")["kind"] == "idle"
    assert cab.daemon is not None and cab.daemon.poll() is None


def _page_text(url: str) -> str:
    connection = http.client.HTTPConnection(*_address(url), timeout=5)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        connection.close()


def test_the_routes_on_one_keep_alive_connection(page: tuple[Cabinet, str]) -> None:
    _, url = page
    connection = http.client.HTTPConnection(*_address(url), timeout=5)
    try:
        connection.request("GET", "/?orientation=portrait")
        first = connection.getresponse()
        html = first.read()
        sock = connection.sock  # every request below must come on this same connection
        assert first.status == 200
        assert first.getheader("Content-Type") == "text/html; charset=utf-8"
        assert first.getheader("Cache-Control") == "no-store"
        assert b'<body class="portrait">' in html

        connection.request("GET", "/?orientation=sideways")
        assert b'<body class="landscape">' in connection.getresponse().read()

        connection.request("HEAD", "/?orientation=portrait")
        head = connection.getresponse()
        assert (head.status, head.read()) == (200, b"")
        assert head.getheader("Content-Length") == str(len(html))

        connection.request("GET", "/screen.json")
        shown = connection.getresponse()
        assert shown.getheader("Content-Type") == "application/json; charset=utf-8"
        assert json.loads(shown.read())["qr_svg"].startswith("<svg")

        connection.request("GET", "/challenge")
        challenge = connection.getresponse()
        assert challenge.getheader("Cache-Control") == "no-store"
        body = json.loads(challenge.read())
        assert body.keys() == {"cabinet_id", "challenge", "payload", "issued_at", "rotates_at"}
        assert body["payload"].endswith(":" + body["challenge"])

        connection.request("GET", "/nowhere")
        missing = connection.getresponse()
        assert (missing.status, missing.read()) == (404, b"404: Not Found")

        connection.request("POST", "/screen.json", body=b"{}")
        refused = connection.getresponse()
        refused.read()
        assert refused.status == 405

        assert connection.sock is sock
    finally:
        connection.close()


def test_a_page_that_went_away_holds_up_no_other(page: tuple[Cabinet, str]) -> None:
    cab, url = page
    with socket.create_connection(_address(url), timeout=5) as gone:
        gone.sendall(EVENTS)
        assert b"data: " in _until(gone, b"data: ")
    with socket.create_connection(_address(url), timeout=5) as reset:
        reset.sendall(EVENTS)
        assert b"data: " in _until(reset, b"data: ")
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    watcher = ScreenWatcher(url)
    try:
        watcher.wait_for("the idle screen", lambda s: s["kind"] == "idle")
        cab.ctl("fault", "smoke")
        started = time.monotonic()
        watcher.wait_for("the smoke screen", lambda s: s["kind"] == "safety")
        assert time.monotonic() - started < 2.0
    finally:
        cab.ctl("heal", "smoke")
        watcher.stop()
    watcher = ScreenWatcher(url)  # and back, for the next test
    try:
        watcher.wait_for("the idle screen again", lambda s: s["kind"] == "idle")
    finally:
        watcher.stop()


def _until(sock: socket.socket, needle: bytes) -> bytes:
    got = b""
    while needle not in got:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {needle!r}: {got!r}"
        got += chunk
    return got


# In-process: the server object itself.


@contextlib.asynccontextmanager
async def serving(tmp: Path) -> AsyncIterator[tuple[DisplayServer, asyncio.Task[None]]]:
    """A DisplayServer on a free port, over a controller whose bus is not there."""
    journal = Journal(tmp / "journal.db")
    controller = CabinetController(
        cabinet_id="cab-http",
        journal=journal,
        scheduler=BusScheduler(ModbusBus(parse_endpoint("tcp://127.0.0.1:9"))),
    )
    challenges = ChallengeBook(journal, "cab-http", controller.clock)
    server = DisplayServer(controller, DisplaySection(enabled=True, port=0), challenges)
    task = asyncio.create_task(server.run())
    try:
        await _eventually("the server listening", lambda: server.port is not None)
        assert server.port != 0  # the port it was given, not the 0 it asked for
        yield server, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        journal.close()


async def _eventually(what: str, ok: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _follow(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A page's event stream, once its first screen has come."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(EVENTS)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"text/event-stream" in head and b"no-store" in head.lower()
    await reader.readuntil(b"retry: 1000\n\n")
    await reader.readuntil(b"data: ")
    return reader, writer


def test_a_page_that_goes_away_leaves_no_stream_behind(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as (server, _):
            assert server.port is not None
            pages = [await _follow(server.port) for _ in range(3)]
            assert server.event_streams == 3
            pages[0][1].close()  # a tab closed
            sock = pages[1][1].get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            pages[1][1].close()  # a kiosk browser killed: a reset
            # at once, not at the next keepalive (the next write to a dead page)
            await _eventually("two streams gone", lambda: server.event_streams == 1, 2.0)
            assert KEEPALIVE_S > 2.0
            pages[2][1].close()
            await _eventually("the last stream gone", lambda: server.event_streams == 0, 2.0)

    asyncio.run(scenario())


def test_a_stop_is_not_held_up_by_open_streams(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as (server, task):
            assert server.port is not None
            troubles: list[dict[str, object]] = []  # what the loop would log as an error
            asyncio.get_running_loop().set_exception_handler(lambda _, ctx: troubles.append(ctx))
            pages = [await _follow(server.port) for _ in range(2)]
            started = time.monotonic()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert time.monotonic() - started < SHUTDOWN_S + 0.5
            for reader, writer in pages:  # each page sees the end (and reconnects by itself)
                async with asyncio.timeout(1.0):
                    while await reader.read(65536):
                        pass
                writer.close()
            assert server.event_streams == 0
            assert troubles == []  # a stop is no error: no traceback in the journal

    asyncio.run(scenario())
