"""``cabinet watch``: the operator's live view of every cabinet on a broker.

``FleetSubscriber`` is the same ``drivers.mqtt_link.MqttLink`` the cabinets use (one TLS
set-up, one reconnection back-off); messages and link changes become queue items on the
asyncio loop and feed a ``fleet_view.FleetView``. It keeps a
broker session across its own reconnects so a network blip of the watching laptop
is not mistaken for a gap in a cabinet's stream. The outputs (a screen redrawn in
place, a table printed on change, JSON lines) only decide *when* to render what the
view holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from cabinet.operator.fleet_view import DEFAULT_READY_SOC_PCT, FleetView, render_screen
from drivers.mqtt_link import (
    BrokerAddress,
    BrokerRefusedError,
    Message,
    MqttLink,
    SessionTimeoutError,
    TlsFiles,
    TlsSetupError,
    parse_broker_url,
)
from protocol import topics

#: A watch that cannot reach its broker says so instead of showing an empty fleet forever.
#: The fall-back from MQTT 5 to 3.1.1 fits in it many times over: at start-up the link
#: retries and switches at once (milliseconds on RabbitMQ, bench/first_session.py).
CONNECT_TIMEOUT_S = 10.0
#: The broker keeps our subscriptions and queues QoS 1 events this long while the watch
#: itself is disconnected, and forgets them this long after a watch dies without a goodbye.
SESSION_EXPIRY_S = 300
PRINT_INTERVAL_S = 1.0  # a table printed to a file or pipe at most this often
REDRAW_MIN_S = 0.2  # a busy fleet must not make the screen flicker
REDRAW_MAX_S = 1.0  # the "heard ago" column keeps counting on a quiet fleet
# keeps the password out of `ps`; S105: this is the variable's name, not a password
CLEAR_SCREEN = "\x1b[H\x1b[2J"
#: The four subscriptions, at QoS 1 so no event is lost between the broker and the watch.
FILTERS = tuple(
    topic("+") for topic in (topics.status, topics.state, topics.telemetry, topics.events)
)


class BrokerUnreachableError(ConnectionError):
    """The watch could not get a session with the broker; the message says what to check."""


# -- the view (sans-I/O) ---------------------------------------------------------------------


# -- outputs: when to render -----------------------------------------------------------------


class Output(Protocol):
    """Decides when the view is rendered, and how."""

    def changed(self, view: FleetView, cabinets: set[str], *, now: float, mono: float) -> None:
        """Cabinets whose rows changed in the last batch of messages."""

    def due_in(self, mono: float) -> float | None:
        """Seconds until ``tick`` has something to do, or None."""

    def tick(self, view: FleetView, *, now: float, mono: float) -> None:
        """Render if due."""

    def finish(self, view: FleetView, *, now: float) -> None:
        """The last render before the watch exits."""


class JsonLines:
    """``--json``: one object per changed cabinet per batch of messages, at once."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def changed(self, view: FleetView, cabinets: set[str], *, now: float, mono: float) -> None:
        """Write the changed rows (a batch coalesces a backlog drain into one row each)."""
        del mono
        for cabinet_id in sorted(cabinets):
            self._out.write(json.dumps(view.row(cabinet_id, now=now).as_json()) + "\n")
        self._out.flush()

    def due_in(self, mono: float) -> float | None:
        """Never: rows are written as they change."""
        del mono
        return None

    def tick(self, view: FleetView, *, now: float, mono: float) -> None:
        """Nothing to do between changes."""

    def finish(self, view: FleetView, *, now: float) -> None:
        """Every row was written when it changed."""


class TablePrinter:
    """stdout is a file or a pipe: the table again after a change, at most once a second."""

    def __init__(self, out: TextIO, title: Callable[[], str], *, interval_s: float) -> None:
        self._out = out
        self._title = title
        self._interval = interval_s
        self._dirty = False
        self._printed_at: float | None = None

    def changed(self, view: FleetView, cabinets: set[str], *, now: float, mono: float) -> None:
        """Remember that the table is out of date."""
        self._dirty = True
        self.tick(view, now=now, mono=mono)

    def due_in(self, mono: float) -> float | None:
        """Until the next print is allowed, if one is pending."""
        if not self._dirty:
            return None
        if self._printed_at is None:
            return 0.0
        return max(0.0, self._printed_at + self._interval - mono)

    def tick(self, view: FleetView, *, now: float, mono: float) -> None:
        """Print if something changed and the last print is old enough."""
        wait = self.due_in(mono)
        if wait is not None and wait <= 0:
            self._print(view, now, mono)

    def finish(self, view: FleetView, *, now: float) -> None:
        """The final table, unless the last one printed is already it."""
        if self._dirty or self._printed_at is None:
            self._print(view, now, None)

    def _print(self, view: FleetView, now: float, mono: float | None) -> None:
        self._out.write(render_screen(view, now=now, title=self._title()) + "\n")
        self._out.flush()
        self._dirty = False
        self._printed_at = mono


class LiveScreen:
    """stdout is a terminal: the table redrawn in place (ANSI home + clear)."""

    def __init__(self, out: TextIO, title: Callable[[], str]) -> None:
        self._out = out
        self._title = title
        self._dirty = True
        self._drawn_at: float | None = None

    def changed(self, view: FleetView, cabinets: set[str], *, now: float, mono: float) -> None:
        """Redraw soon, but not faster than the eye can read."""
        self._dirty = True
        self.tick(view, now=now, mono=mono)

    def due_in(self, mono: float) -> float | None:
        """Soon after a change; otherwise once a second so the ages keep counting."""
        if self._drawn_at is None:
            return 0.0
        return max(0.0, self._drawn_at + (REDRAW_MIN_S if self._dirty else REDRAW_MAX_S) - mono)

    def tick(self, view: FleetView, *, now: float, mono: float) -> None:
        """Redraw if due."""
        wait = self.due_in(mono)
        if wait is not None and wait <= 0:
            self._out.write(CLEAR_SCREEN + render_screen(view, now=now, title=self._title()))
            self._out.flush()
            self._dirty = False
            self._drawn_at = mono

    def finish(self, view: FleetView, *, now: float) -> None:
        """The final state stays on the screen."""
        self._out.write(CLEAR_SCREEN + render_screen(view, now=now, title=self._title()))
        self._out.flush()


# -- the MQTT side ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message, as the view needs it."""

    topic: str
    payload: bytes
    retained: bool


@dataclass(frozen=True, slots=True)
class LinkChange:
    """The watch's own connection went up or down."""

    up: bool
    detail: str
    session_lost: bool = False


def _describe(exc: BaseException, address: BrokerAddress) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the broker's TLS certificate is not trusted ({exc.verify_message}); see --ca-file"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused: is a broker listening on {address.host}:{address.port}?"
    if isinstance(exc, socket.gaierror):
        return f"unknown host {address.host!r}"
    if isinstance(exc, TimeoutError):
        return "no answer"
    return str(exc) or type(exc).__name__


def _tls_problem(exc: TlsSetupError, tls: TlsFiles) -> str:
    """The TLS set-up's complaint, in the names of this command's own options."""
    if exc.part == "ca":
        return f"--ca-file {tls.ca_file}: {exc.detail}"
    return f"--client-cert {tls.cert_file} / --client-key {tls.key_file}: {exc.detail}"


class FleetSubscriber:
    """The fleet's four topic trees over an ``MqttLink``; reconnects by itself.

    MQTT 5 first, with a session that outlives the watch's own blips (the broker queues
    what it misses meanwhile); a 3.1.1-only broker (the demo's) gets 3.1.1, which the
    link falls back to. Everything the link reports becomes an item in ``inbox``.
    """

    def __init__(
        self,
        address: BrokerAddress,
        *,
        username: str | None,
        password: str | None,
        tls: TlsFiles,
    ) -> None:
        self.address = address
        self.inbox: asyncio.Queue[Incoming | LinkChange] = asyncio.Queue()
        self._had_session = False  # before the first session, open() reports what goes wrong
        try:
            self._link = MqttLink(
                self._where(),
                client_id=f"cabinet-watch-{uuid.uuid4().hex[:12]}",
                username=username,
                password=password,
                tls=tls,
                on_connected=self._up,
                on_disconnected=self._down,
                on_message=self._message,
                session_expiry_s=SESSION_EXPIRY_S,
            )
        except TlsSetupError as exc:
            raise ValueError(_tls_problem(exc, tls)) from exc
        for topic_filter in FILTERS:
            self._link.subscribe(topic_filter)

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Get a session or raise ``BrokerUnreachableError``; the link keeps it up afterwards."""
        try:
            await self._link.open(timeout_s)
        except BrokerRefusedError as exc:
            raise BrokerUnreachableError(
                f"the broker at {self._where()} refused the session: {exc}"
            ) from None
        except SessionTimeoutError:
            raise BrokerUnreachableError(
                f"the broker at {self._where()} did not accept a session within {timeout_s:g} s"
            ) from None
        except OSError as exc:  # refused, unknown host, TLS, no answer (TimeoutError)
            raise BrokerUnreachableError(
                f"cannot reach the broker at {self._where()}: {_describe(exc, self.address)}"
            ) from exc

    def _where(self) -> str:
        scheme = "mqtts" if self.address.tls else "mqtt"
        return f"{scheme}://{self.address.host}:{self.address.port}"

    def close(self) -> None:
        """Leave without leaving a session behind on the broker."""
        self._link.stop(forget_session=True)

    # the link's callbacks, on the loop

    def _up(self) -> None:
        if not self._had_session:
            self._had_session = True  # the first session: connect() returns, nothing to say
            return
        lost = not self._link.session_present
        self.inbox.put_nowait(LinkChange(up=True, detail="reconnected", session_lost=lost))

    def _down(self, reason: str) -> None:
        if self._had_session:  # before it, a protocol fallback may close a connection
            self.inbox.put_nowait(LinkChange(up=False, detail=reason))

    def _message(self, message: Message) -> None:
        self.inbox.put_nowait(Incoming(message.topic, message.payload, message.retain))


# -- the command ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchOptions:
    """What ``cabinet watch`` was asked to do, checked."""

    broker: str
    username: str | None = None
    password: str | None = None
    tls: TlsFiles = field(default_factory=TlsFiles)
    json_lines: bool = False
    duration_s: float | None = None
    ready_soc_pct: float = DEFAULT_READY_SOC_PCT

    def __post_init__(self) -> None:
        address = parse_broker_url(self.broker)  # MqttUrlError is a ValueError: one line
        if not address.tls and any((self.tls.ca_file, self.tls.cert_file, self.tls.key_file)):
            raise ValueError("--ca-file/--client-cert/--client-key need an mqtts:// broker URL")
        if self.tls.key_file is not None and self.tls.cert_file is None:
            raise ValueError("--client-key needs --client-cert")
        if self.password is not None and self.username is None:
            raise ValueError("a password needs --username")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("--duration must be a positive number of seconds")
        if not 0 <= self.ready_soc_pct <= 100:
            raise ValueError("--ready-soc is a percentage, 0-100")


async def watch(options: WatchOptions, out: TextIO, err: TextIO, *, tty: bool) -> int:
    """Connect, then feed the view and render until ``--duration`` ends (or Ctrl-C)."""
    address = parse_broker_url(options.broker)
    subscriber = FleetSubscriber(
        address, username=options.username, password=options.password, tls=options.tls
    )
    view = FleetView(ready_soc_pct=options.ready_soc_pct)
    link = _LinkStatus(err)

    def title() -> str:
        stamp = time.strftime("%H:%M:%S")
        cabinets = len(view.cabinets)
        return f"cabinet watch {options.broker}  {cabinets} cabinet(s)  {link.text}  {stamp}"

    output: Output
    if options.json_lines:
        output = JsonLines(out)
    elif tty:
        output = LiveScreen(out, title)
    else:
        output = TablePrinter(out, title, interval_s=PRINT_INTERVAL_S)
    loop = asyncio.get_running_loop()
    try:
        await subscriber.connect()
        end = None if options.duration_s is None else loop.time() + options.duration_s
        while True:
            mono = loop.time()
            waits = [
                w
                for w in (output.due_in(mono), None if end is None else end - mono)
                if w is not None
            ]
            try:
                first = await asyncio.wait_for(
                    subscriber.inbox.get(), timeout=max(0.0, min(waits)) if waits else None
                )
            except TimeoutError:
                batch: list[Incoming | LinkChange] = []
            else:
                batch = [first]
                while not subscriber.inbox.empty():  # coalesce a backlog into one render
                    batch.append(subscriber.inbox.get_nowait())
            now, mono = time.time(), loop.time()
            changed: set[str] = set()
            for item in batch:
                if isinstance(item, LinkChange):
                    link.apply(item, view)
                    continue
                cabinet_id = view.feed(item.topic, item.payload, now=now, retained=item.retained)
                if cabinet_id is not None:
                    changed.add(cabinet_id)
            if changed:
                output.changed(view, changed, now=now, mono=mono)
            if end is not None and mono >= end:
                break
            output.tick(view, now=now, mono=mono)
        output.finish(view, now=time.time())
    finally:
        subscriber.close()
    return 0


@dataclass(slots=True)
class _LinkStatus:
    """The watch's own link, as the title shows it; each change is also one line on stderr."""

    err: TextIO
    up: bool = True
    text: str = "link up"

    def apply(self, change: LinkChange, view: FleetView) -> None:
        if change.up == self.up and not change.session_lost:
            return  # paho reports every failed retry; the operator needs the first one
        self.up = change.up
        stamp = time.strftime("%H:%M:%S")
        if change.up:
            self.text = f"link up again {stamp}"
            if change.session_lost:
                # the broker forgot our queue: what happened meanwhile is our loss, not a gap
                view.forget_positions()
                self.text += " (events while away were not seen)"
        else:
            self.text = f"LINK DOWN since {stamp} ({change.detail}), reconnecting"
        self.err.write(f"cabinet watch: {self.text}\n")
        self.err.flush()


def run_watch(args: argparse.Namespace) -> int:
    """The ``watch`` handler: Ctrl-C and a closed pipe are how a live view normally ends."""
    options = WatchOptions(
        broker=args.broker,
        username=args.username,
        password=args.password,
        tls=TlsFiles(args.ca_file, args.client_cert, args.client_key),
        json_lines=args.json,
        duration_s=args.duration,
        ready_soc_pct=args.ready_soc,
    )
    try:
        return asyncio.run(watch(options, sys.stdout, sys.stderr, tty=sys.stdout.isatty()))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # the reader (head, a pager) went away; stop Python complaining at exit as well
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
