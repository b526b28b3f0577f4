"""Fetching a firmware image over HTTP(S): allowlisted hosts, one deadline, discreet failures.

Whoever may publish ``cmd/firmware.update`` chooses the URL, so the download is
written for that person being hostile:

* **Hosts:** only those in ``firmware.allowed_hosts`` (``host`` or ``host:port``), checked
  on the name in the URL — the very host and port the connection is made to — before
  anything is resolved or sent; every redirect is checked the same way (and https never
  steps down to http). Empty list: URL sources are off.
* **Time:** one overall deadline for the whole transfer (connect, headers, body, every
  redirect). A socket timeout alone never fires against a server that trickles a byte
  a second; here the event loop waits at most the deadline, then shuts the socket down
  under the worker thread, which ends at once.
* **Size:** the cap is checked on ``Content-Length`` and on every chunk.
* **Failures say nothing about the network:** refused, timed out, no route, a TLS
  error or an HTTP status all become one :class:`DownloadFailedError` whose message is
  for the cabinet's own log; the operator gets ``download_failed`` with
  :data:`FAILED_DETAIL`. Otherwise the cabinet answers "which ports are open on which
  address" for whoever can send it commands.

The blocking work runs in a thread (``http.client``); only :func:`download`, which
never blocks, runs on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol.errors import CodedError

if TYPE_CHECKING:
    import http.client

HOST_NOT_ALLOWED = "host_not_allowed"
INVALID_SOURCE = "invalid_source"
TOO_LARGE = "too_large"
DOWNLOAD_FAILED = "download_failed"
#: the only detail an operator gets for a failed transfer, whatever went wrong
FAILED_DETAIL = "the image could not be downloaded (the cabinet's log says why)"
MAX_REDIRECTS = 3  # a store behind a CDN needs one or two; more is a loop or a game
ABORT_GRACE_S = 5.0  # a thread whose socket was shut down ends at once; DNS may not
CHUNK_BYTES = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class DownloadRefusedError(CodedError):
    """The URL (or a redirect) is not one the cabinet may fetch; ``reason`` is for programs."""


class DownloadFailedError(Exception):
    """The transfer failed; the message is for the local log only, never for the operator."""


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL: exactly the host and port the connection will be made to."""

    scheme: str
    host: str
    port: int
    path: str  # with the query

    @property
    def url(self) -> str:
        """For logs and for resolving a relative redirect."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def allowlist_entry(entry: str) -> tuple[str, int | None]:
    """``host`` or ``host:port`` (``[v6]:port``) → (lower-case host, port or None)."""
    parts = urllib.parse.urlsplit(f"//{entry.strip()}")
    if parts.path or parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"{entry!r} is not a host or host:port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{entry!r} has a bad port") from None
    if not parts.hostname:
        raise ValueError(f"{entry!r} is not a host or host:port")
    return parts.hostname, port


def _allowed(host: str, port: int, allowed_hosts: Sequence[str]) -> bool:
    for entry in allowed_hosts:
        name, entry_port = allowlist_entry(entry)
        if name == host and entry_port in (None, port):
            return True
    return False


def check_url(url: str, allowed_hosts: Sequence[str]) -> Target:
    """The target of ``url`` if the cabinet may fetch it; no I/O (nothing is resolved)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:  # "http://[", "http://[]", a port over 65535 ...
        raise DownloadRefusedError(INVALID_SOURCE, f"{url!r} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise DownloadRefusedError(INVALID_SOURCE, f"unsupported source {url!r}")
    if not host:
        raise DownloadRefusedError(INVALID_SOURCE, f"{url!r} names no host")
    if not allowed_hosts:
        raise DownloadRefusedError(
            HOST_NOT_ALLOWED, "URL sources are off: firmware.allowed_hosts is empty"
        )
    port = port or _DEFAULT_PORTS[scheme]
    if not _allowed(host, port, allowed_hosts):
        raise DownloadRefusedError(
            HOST_NOT_ALLOWED, f"{host}:{port} is not in firmware.allowed_hosts"
        )
    if parts.username is not None:
        raise DownloadRefusedError(INVALID_SOURCE, "credentials in the URL are not supported")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host, port, path)


def check_redirect(current: Target, location: str, allowed_hosts: Sequence[str]) -> Target:
    """Where a redirect from ``current`` leads, checked exactly like the first URL."""
    try:
        url = urllib.parse.urljoin(current.url, location)
    except ValueError:
        raise DownloadRefusedError(INVALID_SOURCE, "the redirect is not a valid URL") from None
    target = check_url(url, allowed_hosts)
    if current.scheme == "https" and target.scheme == "http":
        raise DownloadRefusedError(INVALID_SOURCE, "a redirect from https to http is refused")
    return target


class Download:
    """One transfer in a worker thread; :meth:`abort` (from the loop) ends it at once."""

    def __init__(
        self, target: Target, allowed_hosts: Sequence[str], *, deadline_s: float, max_bytes: int
    ) -> None:
        self.target = target
        self.allowed_hosts = tuple(allowed_hosts)
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # the raw socket, kept here: http.client drops ``conn.sock`` once an HTTP/1.0
        # response owns the connection, but the response still reads from it
        self._sock: socket.socket | None = None
        self._aborted = False

    def abort(self) -> None:
        """Cut the connection under the worker: its blocked read returns at once."""
        with self._lock:
            self._aborted = True
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # base-class call: leaves an SSL object alone
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def run(self) -> bytes:
        """The image's bytes (worker thread); every transfer failure is DownloadFailedError."""
        import http.client  # noqa: PLC0415 - loaded by the first download, not by every daemon

        try:
            return self._follow()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise DownloadFailedError(f"{type(exc).__name__}: {exc}") from None

    def _follow(self) -> bytes:
        target = self.target
        for _ in range(MAX_REDIRECTS + 1):
            conn = self._connect(target)
            try:
                conn.request(
                    "GET",
                    target.path,
                    headers={"User-Agent": "swap-cabinet", "Accept-Encoding": "identity"},
                )
                response = conn.getresponse()
                if response.status in _REDIRECTS:
                    location = response.getheader("Location")
                    if not location:
                        raise DownloadFailedError(f"HTTP {response.status} with no Location")
                    target = check_redirect(target, location, self.allowed_hosts)
                    continue
                if response.status != 200:
                    raise DownloadFailedError(
                        f"HTTP {response.status} {response.reason} from {target.url}"
                    )
                return self._body(response)
            finally:
                conn.close()
        raise DownloadFailedError(f"more than {MAX_REDIRECTS} redirects")

    def _connect(self, target: Target) -> http.client.HTTPConnection:
        import http.client  # noqa: PLC0415 - see run()

        conn: http.client.HTTPConnection
        if target.scheme == "https":
            try:  # without [firmware] allowed_hosts OpenSSL may be held back (console/cli.py)
                import ssl  # noqa: PLC0415
            except ImportError as exc:
                message = f"https needs TLS, which this process left out: {exc}"
                raise DownloadFailedError(message) from None
            context = ssl.create_default_context()
            conn = http.client.HTTPSConnection(
                target.host, target.port, timeout=self.deadline_s, context=context
            )
        else:
            conn = http.client.HTTPConnection(target.host, target.port, timeout=self.deadline_s)
        conn.connect()  # bounded by the timeout; abort() cannot reach a socket before this
        with self._lock:
            if self._aborted:
                conn.close()
                raise DownloadFailedError("aborted at the deadline")
            self._sock = conn.sock
        return conn

    def _body(self, response: http.client.HTTPResponse) -> bytes:
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise DownloadRefusedError(TOO_LARGE, f"the image is over {self.max_bytes} bytes")
        chunks: list[bytes] = []
        total = 0
        while chunk := response.read(CHUNK_BYTES):
            total += len(chunk)
            if total > self.max_bytes:
                raise DownloadRefusedError(TOO_LARGE, f"the image is over {self.max_bytes} bytes")
            chunks.append(chunk)
        with self._lock:
            if self._aborted:
                raise DownloadFailedError("aborted at the deadline")
        if declared is not None and declared.isdigit() and total != int(declared):
            raise DownloadFailedError(f"the body ended after {total} of {declared} bytes")
        return b"".join(chunks)


async def download(
    url: str, allowed_hosts: Sequence[str], *, deadline_s: float, max_bytes: int
) -> bytes:
    """The image at ``url`` within ``deadline_s``, or DownloadRefusedError/DownloadFailedError."""
    job = Download(
        check_url(url, allowed_hosts), allowed_hosts, deadline_s=deadline_s, max_bytes=max_bytes
    )
    worker = asyncio.get_running_loop().run_in_executor(None, job.run)
    try:
        done, _ = await asyncio.wait({worker}, timeout=deadline_s)
    except asyncio.CancelledError:
        job.abort()
        raise
    if done:
        return worker.result()
    job.abort()
    # "one download at a time" holds until the thread is gone, not only until we gave up
    await asyncio.wait({worker}, timeout=ABORT_GRACE_S)
    worker.add_done_callback(_forget)
    raise DownloadFailedError(f"no complete image within the {deadline_s:g} s deadline")


def _forget(worker: asyncio.Future[bytes]) -> None:
    """The aborted thread's own error is not news: the deadline was reported."""
    if not worker.cancelled():
        worker.exception()
