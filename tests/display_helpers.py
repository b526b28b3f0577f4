"""Watching the rider's screen from a test: the page's event stream, read as the page does."""

from __future__ import annotations

import json
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cabinet.demo.backend import Backend
from tests.daemon_harness import Cabinet, running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto, free_port

Screen = dict[str, Any]


class ScreenWatcher:
    """Every screen the page was pushed, in order, with its arrival time (a thread)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.screens: list[tuple[float, Screen]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url + "events", timeout=2) as stream:
                    for raw in stream:
                        line = raw.decode().strip()
                        if line.startswith("data: "):
                            with self._lock:
                                self.screens.append((time.monotonic(), json.loads(line[6:])))
                        if self._stop.is_set():
                            return
            except OSError:
                time.sleep(0.1)  # the daemon restarting: reconnect, as EventSource does

    def stop(self) -> None:
        self._stop.set()

    def seen(self) -> list[Screen]:
        with self._lock:
            return [s for _, s in self.screens]

    def wait_for(self, what: str, predicate: Callable[[Screen], bool]) -> Screen:
        """The first screen (seen so far or to come) that ``predicate`` accepts."""
        return wait_until(  # type: ignore[no-any-return]
            what, lambda: next((s for s in self.seen() if predicate(s)), None)
        )


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def text_of(screen: Screen) -> str:
    return " ".join([screen["title"], *screen["lines"]])


@contextmanager
def cabinet_with_screen(
    tmp: Path,
    *,
    seed: int = 3,
    display: dict[str, Any] | None = None,
    require: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[Cabinet, Backend, str]]:
    """Broker + simulator + daemon with the display on; yields (cabinet, backend, page URL)."""
    with screen_and_broker(tmp, seed=seed, display=display, require=require, env=env) as (
        cab,
        backend,
        url,
        _,
    ):
        yield cab, backend, url


@contextmanager
def screen_and_broker(
    tmp: Path,
    *,
    seed: int = 3,
    display: dict[str, Any] | None = None,
    require: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[Cabinet, Backend, str, Mosquitto]]:
    """``cabinet_with_screen``, and its broker (to stop and start it)."""
    broker = Mosquitto(tmp)
    broker.start()
    try:
        port = free_port()
        extra: dict[str, dict[str, Any]] = {
            "mqtt": {"url": broker.url},
            "auth": {"require_challenge": require},
            "display": {"enabled": True, "port": port, **(display or {})},
        }
        backend = Backend("127.0.0.1", broker.port)
        try:
            with running_cabinet(tmp, seed=seed, extra=extra, env=env) as cab:
                url = f"http://127.0.0.1:{port}/"
                wait_until("the screen to answer", lambda: _answers(url))
                wait_online(cab, backend)
                # the screen follows within its tick: its code is up once the link is
                wait_until("the code on the screen", lambda: _shows_code(url))
                yield cab, backend, url, broker
        finally:
            backend.close()
    finally:
        broker.stop()


def wait_online(cab: Cabinet, backend: Backend) -> None:
    """Until the backend sees this run of the cabinet online, as a backend sends commands.

    The screen comes up before the fleet link, and a command sent to a cabinet that is
    not online is not delivered (docs/mqtt.md §3.1): a loaded run lost a ``swap.start``
    sent as soon as a restarted cabinet's screen showed its new code.
    """
    cabinet_id = tomllib.loads(cab.config.read_text())["cabinet"]["id"]
    boot_id = cab.events("cabinet.started")[-1]["boot_id"]

    def online() -> bool:
        status = backend.status.get(cabinet_id, {})
        return bool(status.get("online")) and status.get("boot_id") == boot_id

    wait_until("the cabinet online", online)


def _shows_code(url: str) -> bool:
    return bool(get_json(url + "screen.json")["qr_svg"])


def _answers(url: str) -> bool:
    try:
        get_json(url + "screen.json")
    except OSError:
        return False
    return True
