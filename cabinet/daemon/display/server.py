"""The kiosk page's HTTP server: the page, its server-sent events, the current challenge.

The HTTP is ``http_server`` (h11 on asyncio's streams), on the daemon's own loop (no
thread, no second process); the QR code is ``qr_code`` (segno's encoder). h11 and segno
are imported only from here, which the daemon imports only when ``[display]`` is enabled.
One loop re-reads the controller every ``TICK_S`` (well inside the 200 ms the screen may
lag a change), rotates the QR challenge, and pushes a screen to every page only when it
changed; the voice speaks each new prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from cabinet.daemon.display.facts import FactsReader
from cabinet.daemon.display.http_server import HttpServer, Reply, Request, Send, Stream
from cabinet.daemon.display.page import render
from cabinet.daemon.display.qr_code import qr_svg
from cabinet.daemon.display.view import Screen, screen

if TYPE_CHECKING:
    from cabinet.daemon.config import DisplaySection
    from cabinet.daemon.controller import CabinetController
    from cabinet.daemon.display.challenges import ChallengeBook
    from cabinet.daemon.display.voice import Voice

log = structlog.get_logger(__name__)

TICK_S = 0.1
KEEPALIVE_S = 15.0
#: a kiosk's event stream never ends by itself: it may hold up a daemon stop this long
SHUTDOWN_S = 0.5
#: screens a page may be behind before the oldest is dropped (it gets the newest, not a backlog)
BACKLOG = 4
NO_STORE = (("Cache-Control", "no-store"),)
JSON = "application/json; charset=utf-8"


class DisplayServer:
    """Serves the rider's page and keeps it live."""

    def __init__(
        self,
        controller: CabinetController,
        settings: DisplaySection,
        challenges: ChallengeBook,
        voice: Voice | None = None,
        *,
        app_online: Callable[[], bool] = lambda: True,
    ) -> None:
        self.controller = controller
        #: whether the fleet link is up: without it the app's swap.start cannot arrive,
        #: so the screen shows no code to scan (a rider would wait for nothing)
        self.app_online = app_online
        self.settings = settings
        self.challenges = challenges
        self.voice = voice
        self.reader = FactsReader(controller, settings.language)
        self.current: Screen | None = None
        self._clients: set[asyncio.Queue[str]] = set()  # one per open event stream
        self._qr: tuple[str, str] = ("", "")
        self.port: int | None = None

    def _qr_for(self, payload: str) -> str:
        if self._qr[0] != payload:
            self._qr = (payload, qr_svg(payload))
        return self._qr[1]

    def refresh(self) -> Screen:
        """Recompute the screen; push it (and speak its prompt) if it changed."""
        shown = self.challenges.shown()
        qr = self._qr_for(shown.payload)  # drawn once per challenge, shown or not (view)
        new = screen(self.reader.read(qr, app_online=self.app_online()))
        if new != self.current:
            spoken = self.current.prompt_code if self.current else None
            self.current = new
            data = json.dumps(new.to_json(), ensure_ascii=False)
            for queue in self._clients:
                if queue.full():
                    with contextlib.suppress(asyncio.QueueEmpty):
                        queue.get_nowait()  # a slow page gets the newest screen, not a backlog
                queue.put_nowait(data)
            if self.voice is not None and new.prompt_code != spoken:
                self.voice.say(new.prompt_code, new.language, new.lines)
        return new

    @property
    def event_streams(self) -> int:
        """Pages following the screen now (one per open ``/events`` stream)."""
        return len(self._clients)

    async def run(self) -> None:
        """Serve until cancelled (supervised by the daemon)."""
        http = HttpServer(
            {
                "/": self._page,
                "/events": self._events,
                "/screen.json": self._screen,
                "/challenge": self._challenge,
            },
            shutdown_s=SHUTDOWN_S,
        )
        try:
            self.port = await http.start(self.settings.bind, self.settings.port)
            log.info("display_listening", url=f"http://{self.settings.bind}:{self.port}/")
            while True:
                self.refresh()
                # an event (door, deposit, failure) wakes us at once; the tick catches the rest
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.controller.next_event(), TICK_S)
        finally:
            await http.close()

    def _page(self, request: Request) -> Reply:
        # ?orientation= previews the other layout (a technician's laptop, the screenshots)
        wanted = request.query.get("orientation", self.settings.orientation)
        orientation = wanted if wanted in ("landscape", "portrait") else "landscape"
        return Reply(render(orientation).encode(), "text/html; charset=utf-8", headers=NO_STORE)

    def _screen(self, _request: Request) -> Reply:
        return _json((self.current or self.refresh()).to_json())

    def _challenge(self, _request: Request) -> Reply:
        """What the QR code encodes now: for the backend stand-in playing the app."""
        shown = self.challenges.shown()
        body: dict[str, Any] = {
            "cabinet_id": self.controller.cabinet_id,
            "challenge": shown.challenge,
            "payload": shown.payload,
            "issued_at": shown.issued_at,
            "rotates_at": shown.rotates_at,
        }
        return _json(body, headers=NO_STORE)

    def _events(self, _request: Request) -> Stream:
        return Stream(self._follow, "text/event-stream; charset=utf-8", headers=NO_STORE)

    async def _follow(self, send: Send) -> None:
        """One page's event stream: the screen now, then each change, until it goes."""
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=BACKLOG)
        self._clients.add(queue)
        try:
            await send(b"retry: 1000\n\n")
            current = self.current or self.refresh()
            await send(_sse(json.dumps(current.to_json(), ensure_ascii=False)))
            while True:
                try:
                    data = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await send(b": keepalive\n\n")
                    continue
                await send(_sse(data))
        finally:
            self._clients.discard(queue)  # the page went (it reconnects by itself)


def _json(body: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(json.dumps(body).encode(), JSON, headers=headers)


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()
