"""The kiosk page's HTTP server: the page, its server-sent events, the current challenge.

aiohttp runs on the daemon's own asyncio loop (no thread, no second process) and is
imported only from here, which the daemon imports only when ``[display]`` is enabled.
One loop re-reads the controller every ``TICK_S`` (well inside the 200 ms the screen
may lag a change), rotates the QR challenge, and pushes a screen to every page only
when it changed; the voice speaks each new prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

import segno
import structlog
from aiohttp import web

from cabinet.daemon.display.facts import FactsReader
from cabinet.daemon.display.page import render
from cabinet.daemon.display.view import Screen, screen

if TYPE_CHECKING:
    from cabinet.daemon.config import DisplaySection
    from cabinet.daemon.controller import CabinetController
    from cabinet.daemon.display.challenges import ChallengeBook
    from cabinet.daemon.display.voice import Voice

log = structlog.get_logger(__name__)

TICK_S = 0.1
KEEPALIVE_S = 15.0
SHUTDOWN_S = 0.5


def qr_svg(data: str) -> str:
    """The QR code as inline SVG (black on white, quiet zone kept for phone cameras)."""
    return str(segno.make(data, error="m", micro=False).svg_inline(border=4, omitsize=True))


class DisplayServer:
    """Serves the rider's page and keeps it live."""

    def __init__(
        self,
        controller: CabinetController,
        settings: DisplaySection,
        challenges: ChallengeBook,
        voice: Voice | None = None,
    ) -> None:
        self.controller = controller
        self.settings = settings
        self.challenges = challenges
        self.voice = voice
        self.reader = FactsReader(controller, settings.language)
        self.current: Screen | None = None
        self._clients: set[asyncio.Queue[str]] = set()
        self._qr: tuple[str, str] = ("", "")
        self.port: int | None = None

    def _qr_for(self, payload: str) -> str:
        if self._qr[0] != payload:
            self._qr = (payload, qr_svg(payload))
        return self._qr[1]

    def refresh(self) -> Screen:
        """Recompute the screen; push it (and speak its prompt) if it changed."""
        shown = self.challenges.shown()
        new = screen(self.reader.read(self._qr_for(shown.payload)))
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

    async def run(self) -> None:
        """Serve until cancelled (supervised by the daemon)."""
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/events", self._events)
        app.router.add_get("/screen.json", self._screen)
        app.router.add_get("/challenge", self._challenge)
        # a kiosk's event stream never ends by itself: don't let it hold up a daemon stop
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_S
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.settings.bind, self.settings.port, reuse_address=True)
            await site.start()
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1] if sockets else self.settings.port
            log.info("display_listening", url=f"http://{self.settings.bind}:{self.port}/")
            while True:
                self.refresh()
                # an event (door, deposit, failure) wakes us at once; the tick catches the rest
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.controller.next_event(), TICK_S)
        finally:
            await runner.cleanup()

    async def _page(self, request: web.Request) -> web.Response:
        # ?orientation= previews the other layout (a technician's laptop, the screenshots)
        wanted = request.query.get("orientation", self.settings.orientation)
        orientation = wanted if wanted in ("landscape", "portrait") else "landscape"
        return web.Response(
            text=render(orientation),
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )

    async def _screen(self, _request: web.Request) -> web.Response:
        return web.json_response((self.current or self.refresh()).to_json())

    async def _challenge(self, _request: web.Request) -> web.Response:
        """What the QR code encodes now: for the backend stand-in playing the app."""
        shown = self.challenges.shown()
        body: dict[str, Any] = {
            "cabinet_id": self.controller.cabinet_id,
            "challenge": shown.challenge,
            "payload": shown.payload,
            "issued_at": shown.issued_at,
            "rotates_at": shown.rotates_at,
        }
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-store",
            }
        )
        await response.prepare(request)
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=4)
        self._clients.add(queue)
        try:
            await response.write(b"retry: 1000\n\n")
            current = self.current or self.refresh()
            await response.write(_sse(json.dumps(current.to_json(), ensure_ascii=False)))
            while True:
                try:
                    data = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                await response.write(_sse(data))
        except ConnectionResetError:
            pass  # the page went away; it reconnects by itself
        finally:
            self._clients.discard(queue)
        return response


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()
