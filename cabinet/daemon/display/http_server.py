"""A small HTTP/1.1 server for the rider's page: h11's parser on asyncio's own streams.

Why not a web framework: aiohttp cost the daemon ~10 MB resident (issue 14: multidict,
yarl, ``http.cookies``, ``email``, its C parser) for four GET routes. h11 (python-hyper)
is the sans-I/O HTTP/1.1 state machine - parsing, message framing, keep-alive, chunked
bodies, the protocol's rules - and this module is only its I/O: read bytes, feed h11,
answer its events. It runs on the caller's loop (no thread).

Theory of operation. One task per connection reads one request at a time:

* a route's handler (a plain function: everything it answers is already in memory)
  returns a ``Reply`` - the whole body; the connection stays open for the next request
  when h11 says both sides keep it alive - or a ``Stream``, whose coroutine writes the
  body piece by piece until it returns or the client goes (server-sent events); h11 frames
  it chunked, and the connection closes after it;
* only GET and HEAD are served (HEAD: the same headers, no body); any other method gets
  405, an unknown path 404, a handler's bug 500 (logged); a malformed request gets h11's
  4xx (400, or 431 for a head over ``MAX_HEAD_BYTES``) and the connection closes;
* nothing waits unbounded: a request must arrive within ``REQUEST_S``; a write stuck for
  ``WRITE_S`` (a client that stopped reading) drops that client; a stream notices its
  client closing at once (it watches the socket for end of file), not at its next write;
* ``close()`` stops listening and cancels every connection - an event stream never ends
  by itself - waiting at most ``shutdown_s`` for them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

import h11
import structlog

log = structlog.get_logger(__name__)

#: a request's line and headers: a kiosk browser's are under 1 KiB
MAX_HEAD_BYTES = 16 * 1024
#: a GET has no body; one that comes anyway is read (to keep the connection usable) up to this
MAX_BODY_BYTES = 16 * 1024
READ_BYTES = 16 * 1024
#: from connecting (or the previous response) to a whole request: an idle keep-alive
#: connection or a trickling client is closed after this (browsers reconnect by themselves)
REQUEST_S = 30.0
#: one write reaching the socket: longer means the client stopped reading
WRITE_S = 10.0
#: how long the rest of a refused request is read and dropped before closing (``_refuse``)
LINGER_S = 1.0

Send = Callable[[bytes], Awaitable[None]]
Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Request:
    """What a handler is told: the path and its query (the last value of each name)."""

    method: str
    path: str
    query: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole response."""

    body: bytes
    content_type: str
    status: int = 200
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class Stream:
    """A response written by ``write(send)`` until it returns or the client goes."""

    write: Callable[[Send], Awaitable[None]]
    content_type: str
    headers: Headers = ()


Handler = Callable[[Request], Reply | Stream]


class _RequestTooLargeError(Exception):
    """A body over ``MAX_BODY_BYTES``."""


class HttpServer:
    """Serves ``routes`` (path -> handler) over HTTP/1.1 until closed."""

    def __init__(self, routes: Mapping[str, Handler], *, shutdown_s: float) -> None:
        self.routes = dict(routes)
        self.shutdown_s = shutdown_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[object]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host``:``port``; the bound port (``port`` 0: one the system chose)."""
        self._server = await asyncio.start_server(self._connection, host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and drop every client, waiting at most ``shutdown_s``."""
        if self._server is not None:
            self._server.close()
        tasks = set(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.shutdown_s)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            await self._serve(conn, reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went, or stalled: nothing to answer
        except asyncio.CancelledError:
            # close() drops the client: end quietly (Python 3.11's start_server logs a
            # connection task that ends cancelled as an error, with a traceback)
            pass
        except Exception as exc:  # noqa: BLE001 - a bug here costs one connection, not the daemon
            log.error("display_http_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()

    async def _serve(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer requests on one connection until either side ends it."""
        while True:
            try:
                async with asyncio.timeout(REQUEST_S):
                    request = await _read_request(conn, reader)
            except h11.RemoteProtocolError as exc:
                await _refuse(conn, reader, writer, exc.error_status_hint)
                return
            except _RequestTooLargeError:
                await _refuse(conn, reader, writer, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                return
            if request is None:
                return  # closed by the client between requests
            answer = self._answer(request)
            head = request.method == "HEAD"
            if isinstance(answer, Stream):
                await _send(conn, writer, _response(200, answer.content_type, answer.headers))
                if not head:
                    await _stream(conn, reader, writer, answer)
                    return
                await _send(conn, writer, h11.EndOfMessage())
            else:
                await _send_reply(conn, writer, answer, head=head)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # h11 says close (HTTP/1.0, "Connection: close")
            conn.start_next_cycle()

    def _answer(self, request: Request) -> Reply | Stream:
        handler = self.routes.get(request.path)
        if handler is None:
            return _plain(HTTPStatus.NOT_FOUND)
        if request.method not in ("GET", "HEAD"):
            return _plain(HTTPStatus.METHOD_NOT_ALLOWED, (("Allow", "GET, HEAD"),))
        try:
            return handler(request)
        except Exception as exc:  # noqa: BLE001 - one page's 500, not a dead server
            log.error(
                "display_handler_failed", path=request.path, error=f"{type(exc).__name__}: {exc}"
            )
            return _plain(HTTPStatus.INTERNAL_SERVER_ERROR)


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
    """The next request, its body read and dropped; None if the client closed first."""
    event = await _next_event(conn, reader)
    if isinstance(event, h11.ConnectionClosed):
        return None
    if not isinstance(event, h11.Request):  # h11 yields a Request first, or raises
        raise h11.RemoteProtocolError("expected a request", error_status_hint=400)
    body = 0
    while not isinstance(done := await _next_event(conn, reader), h11.EndOfMessage):
        if isinstance(done, h11.Data):
            body += len(done.data)
            if body > MAX_BODY_BYTES:
                raise _RequestTooLargeError
    try:
        target = urlsplit(event.target.decode("ascii"))
    except ValueError as exc:  # "http://[::1/": no URL at all
        raise h11.RemoteProtocolError(f"bad target: {exc}", error_status_hint=400) from exc
    return Request(
        method=event.method.decode("ascii"),
        path=target.path,
        query=dict(parse_qsl(target.query)),
    )


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
    """h11's next event, reading from the socket as long as it needs more."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_BYTES))  # b"": end of file
            continue
        if event is h11.PAUSED:  # only after a whole request, which we never read past
            raise h11.RemoteProtocolError("request while a response is due", 400)
        assert isinstance(event, h11.Event)
        return event


async def _stream(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    answer: Stream,
) -> None:
    """Write ``answer``'s body until it ends or the client closes, whichever is first."""

    async def send(data: bytes) -> None:
        await _send(conn, writer, h11.Data(data=data))

    body = asyncio.ensure_future(answer.write(send))
    gone = asyncio.ensure_future(_until_closed(reader))
    try:
        await asyncio.wait((body, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (body, gone):
            task.cancel()
        # the body's own cleanup (a stream's queue) runs before this connection ends
        await asyncio.wait((body, gone))
    if body.done() and not body.cancelled():
        body.result()  # a write error, or a bug, surfaces here
        await _send(conn, writer, h11.EndOfMessage())


async def _until_closed(reader: asyncio.StreamReader) -> None:
    """Returns once the client closes its side (anything it sends meanwhile is dropped)."""
    while await reader.read(READ_BYTES):
        pass


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        writer.write(data)
        async with asyncio.timeout(WRITE_S):
            await writer.drain()


async def _send_reply(
    conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, *, head: bool = False
) -> None:
    """A whole response: its head with the body's length, the body (not for HEAD), its end."""
    headers = (*reply.headers, ("Content-Length", str(len(reply.body))))
    await _send(conn, writer, _response(reply.status, reply.content_type, headers))
    if not head:
        await _send(conn, writer, h11.Data(data=reply.body))
    await _send(conn, writer, h11.EndOfMessage())


async def _refuse(
    conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int
) -> None:
    """Answer a request we cannot serve with ``status`` (if h11 still lets us), then close.

    The rest of the request is read and dropped for up to ``LINGER_S`` first: a socket
    closed with unread input resets the connection, which may destroy the answer on its
    way to the client.
    """
    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
        with contextlib.suppress(h11.LocalProtocolError):
            await _send_reply(conn, writer, _plain(status, (("Connection", "close"),)))
    with contextlib.suppress(TimeoutError):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            await _until_closed(reader)


def _plain(status: int, headers: Headers = ()) -> Reply:
    """An error's reply: its status as text (as aiohttp wrote it: "404: Not Found")."""
    body = f"{status}: {HTTPStatus(status).phrase}".encode()
    return Reply(body, "text/plain; charset=utf-8", status=status, headers=headers)


def _response(status: int, content_type: str, headers: Headers) -> h11.Response:
    return h11.Response(
        status_code=status,
        reason=HTTPStatus(status).phrase,
        headers=[("Content-Type", content_type), *headers],
    )
