"""``cmd/firmware.update`` from a URL, tried from the attacker's side over MQTT (issue 15, 8).

Someone who can publish commands must not be able to park the cabinet on a server
that trickles a byte a second, stack downloads, make it fetch from anywhere, or use
it as a port scanner of the network it sits in: only hosts in
``firmware.allowed_hosts`` (redirects too), one download at a time under an overall
deadline, and every network failure reported alike (the real reason in the local log).
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cabinet.daemon.firmware_download import (
    DownloadRefusedError,
    check_redirect,
    check_url,
)
from cabinet.demo.backend import Backend
from tests.conftest import cabinet_cmd
from tests.daemon_harness import Cabinet, running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto

DEADLINE_S = 3.0  # firmware.download_timeout_s in these tests
UNROUTABLE = "192.0.2.1"  # TEST-NET-1: no route, or a connect that never completes
TRICKLE_BYTES = 120  # one a second: two minutes without the deadline


@dataclass
class WebServer:
    """A fleet's firmware store as an attacker would run it: routes by path, hits counted."""

    routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]
    hits: dict[str, int] = field(default_factory=dict)
    trickling: threading.Event = field(default_factory=threading.Event)
    cut: threading.Event = field(default_factory=threading.Event)
    closing: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def web() -> Iterator[WebServer]:
    server = WebServer(routes={})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.hits[self.path] = server.hits.get(self.path, 0) + 1
            route = server.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            route(self)

        def log_message(self, *_args: Any) -> None:
            return None

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.closing.set()  # a trickle still going stops at its next byte
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def serve(data: bytes) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return route


def redirect(location: str) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def trickle(server: WebServer) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    """A 2 MB promise kept at one byte a second: no socket timeout ever fires."""

    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(1024 * 1024))
        handler.end_headers()
        handler.wfile.flush()
        server.trickling.set()
        try:
            for _ in range(TRICKLE_BYTES):
                handler.wfile.write(b"C")
                handler.wfile.flush()
                if server.closing.wait(1.0):  # the trickle's pace, and the test's end
                    return
        except OSError:  # the cabinet hung up: the deadline worked
            server.cut.set()

    return route


@pytest.fixture
def cab(tmp_path: Path, broker: Mosquitto) -> Iterator[Cabinet]:
    extra: dict[str, dict[str, Any]] = {
        "firmware": {
            "allowed_hosts": ["127.0.0.1", UNROUTABLE],
            "download_timeout_s": DEADLINE_S,
        },
        "mqtt": {"url": broker.url},
    }
    with running_cabinet(tmp_path, seed=5, extra=extra) as cabinet:
        yield cabinet


@pytest.fixture
def backend(broker: Mosquitto, cab: Cabinet) -> Iterator[Backend]:
    """The attacker's MQTT client, once the cabinet listens for commands (else one is lost)."""
    client = Backend("127.0.0.1", broker.port)
    asked = iter(range(1_000_000))

    def answers() -> bool:
        try:
            client.command(
                "cab-test", "state.get", {"request_id": f"hello-{next(asked)}"}, timeout_s=1
            )
        except TimeoutError:
            return False
        return True

    wait_until("the cabinet to take commands", answers)
    yield client
    client.close()


def update(backend: Backend, request_id: str, source: str) -> dict[str, Any]:
    args = {"source": source, "bays": [5]}
    return backend.command("cab-test", "firmware.update", {"request_id": request_id, "args": args})


def rejections(backend: Backend) -> list[dict[str, Any]]:
    """``firmware.rejected`` events as the backend received them over MQTT."""
    return [e["data"] for e in backend.event_list("cab-test") if e["type"] == "firmware.rejected"]


def next_rejection(backend: Backend, seen: int, timeout: float = 20.0) -> dict[str, Any]:
    found = wait_until("a firmware.rejected event", lambda: rejections(backend)[seen:], timeout)
    return found[0]  # type: ignore[no-any-return]


def bus_requests(cab: Cabinet) -> int:
    return sum(u["requests"] for u in cab.state()["bus"]["units"].values())


# -- the allowlist, before any connection -------------------------------------------------------


def test_a_url_on_a_host_not_allowed_is_refused_at_once(
    cab: Cabinet, backend: Backend, web: WebServer
) -> None:
    web.routes["/bay.cfw"] = serve(b"CFW1")
    sources = [
        f"http://localhost:{web.port}/bay.cfw",  # the same server, by a name not on the list
        f"http://127.0.0.1:{web.port}@localhost:{web.port}/bay.cfw",  # userinfo trick
        f"http://127.0.0.2:{web.port}/bay.cfw",
        "http://169.254.169.254/latest/meta-data/",
    ]
    for n, source in enumerate(sources):
        reply = update(backend, f"deny-{n}", source)
        assert reply["ok"] is False, (source, reply)
        assert reply["error"]["code"] == "host_not_allowed", (source, reply)
    broken = update(backend, "deny-broken", "http://[/bay.cfw")  # made urlsplit raise
    assert broken["ok"] is False and broken["error"]["code"] == "invalid_source", broken
    assert web.hits == {}  # nothing was fetched


def test_an_empty_allowlist_refuses_every_url() -> None:
    with pytest.raises(DownloadRefusedError) as refused:
        check_url("https://fw.example.net/bay.cfw", ())
    assert refused.value.reason == "host_not_allowed"
    assert "firmware.allowed_hosts is empty" in str(refused.value)


def test_allowlist_entries_match_host_and_optionally_port() -> None:
    allowed = ("fw.example.net", "store.example.net:8443")
    assert check_url("https://FW.example.net/a.cfw", allowed).host == "fw.example.net"
    assert check_url("http://fw.example.net:8080/a.cfw", allowed).port == 8080
    assert check_url("https://store.example.net:8443/a.cfw", allowed).port == 8443
    for url in ("https://store.example.net/a.cfw", "https://fw.example.net.evil.io/a.cfw"):
        with pytest.raises(DownloadRefusedError, match=r"not in firmware\.allowed_hosts"):
            check_url(url, allowed)
    with pytest.raises(DownloadRefusedError) as refused:
        check_url("ftp://fw.example.net/a.cfw", allowed)
    assert refused.value.reason == "invalid_source"


def test_a_redirect_is_checked_like_the_first_url() -> None:
    allowed = ("fw.example.net", "cdn.example.net")
    first = check_url("https://fw.example.net/a.cfw", allowed)
    assert check_redirect(first, "/b.cfw", allowed).path == "/b.cfw"
    assert check_redirect(first, "https://cdn.example.net/c.cfw", allowed).host == "cdn.example.net"
    with pytest.raises(DownloadRefusedError, match=r"not in firmware\.allowed_hosts"):
        check_redirect(first, "https://10.0.0.7/c.cfw", allowed)
    with pytest.raises(DownloadRefusedError, match="from https to http"):
        check_redirect(first, "http://cdn.example.net/c.cfw", allowed)


# -- one at a time, under a deadline ---------------------------------------------------------


def test_a_trickling_server_is_cut_at_the_deadline_and_the_cabinet_keeps_working(
    cab: Cabinet, backend: Backend, web: WebServer
) -> None:
    web.routes["/slow.cfw"] = trickle(web)
    web.routes["/garbage.cfw"] = serve(b"not an image" * 100)
    seen = len(rejections(backend))
    began = time.monotonic()
    reply = update(backend, "slow-1", f"{web.url}/slow.cfw")
    assert reply["ok"] is True and reply["result"]["accepted"] is True, reply
    assert web.trickling.wait(10), "the cabinet never asked for the image"
    # while it downloads: a second update is busy, the technician gets answers, polling goes on
    second = update(backend, "slow-2", f"{web.url}/garbage.cfw")
    assert second["ok"] is False and second["error"]["code"] == "busy", second
    status = cabinet_cmd("status", "--json", "-c", str(cab.config), timeout=10)
    assert status.returncode == 0 and json.loads(status.stdout)["ready"] is True
    doctor = cabinet_cmd("doctor", "--json", "-c", str(cab.config), timeout=10)
    assert len(json.loads(doctor.stdout)["checks"]) > 0, doctor.stderr
    before = bus_requests(cab)
    wait_until("the daemon to keep polling", lambda: bus_requests(cab) > before + 24)
    assert "slow-2" not in web.hits  # the refused one fetched nothing
    # the deadline: long before the trickle would end (two minutes), the download is cut
    rejected = next_rejection(backend, seen, timeout=DEADLINE_S + 15)
    print(f"trickle cut {time.monotonic() - began:.1f} s after the command (deadline {DEADLINE_S})")
    assert rejected["reason"] == "download_failed", rejected
    assert web.cut.wait(10), "the cabinet kept the trickling connection open"
    # and the next update is no longer busy
    after = update(backend, "slow-3", f"{web.url}/garbage.cfw")
    assert after["ok"] is True, after
    assert next_rejection(backend, seen + 1)["reason"] == "malformed"


# -- failures that do not map the network ---------------------------------------------------------


def test_a_closed_port_a_silent_one_and_no_route_look_the_same(
    cab: Cabinet, backend: Backend, web: WebServer
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens: "connection refused"
    with socket.socket() as silent:  # listens, never answers: a timeout
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        sources = [
            f"http://127.0.0.1:{closed_port}/bay.cfw",
            f"http://127.0.0.1:{silent.getsockname()[1]}/bay.cfw",
            f"http://{UNROUTABLE}:81/bay.cfw",
            f"{web.url}/missing.cfw",  # an HTTP error says no more than the rest
        ]
        outcomes = []
        for n, source in enumerate(sources):
            seen = len(rejections(backend))
            reply = update(backend, f"net-{n}", source)
            assert reply["ok"] is True, (source, reply)
            assert set(reply["result"]) == {"accepted", "bays", "source"}
            outcomes.append(next_rejection(backend, seen, timeout=DEADLINE_S + 15))
    print(json.dumps(outcomes))
    assert all(o == outcomes[0] for o in outcomes), outcomes
    assert outcomes[0]["reason"] == "download_failed"
    for word in ("refused", "timed out", "route", "unreachable", "127.0.0.1", UNROUTABLE, "404"):
        assert word not in outcomes[0]["detail"]
    log = (cab.tmp / "daemon.log").read_text()  # the technician still learns the real reason
    assert "Connection refused" in log and "HTTP 404" in log


def test_a_redirect_to_a_host_not_allowed_is_refused(
    cab: Cabinet, backend: Backend, web: WebServer
) -> None:
    outsider_hits: list[str] = []

    class Outsider(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            outsider_hits.append(self.path)
            self.send_error(404)

    outsider = http.server.HTTPServer(("127.0.0.1", 0), Outsider)
    thread = threading.Thread(target=outsider.serve_forever, daemon=True)
    thread.start()
    try:
        web.routes["/out.cfw"] = redirect(f"http://localhost:{outsider.server_address[1]}/x")
        web.routes["/in.cfw"] = redirect("/garbage.cfw")
        web.routes["/garbage.cfw"] = serve(b"not an image" * 100)
        seen = len(rejections(backend))
        assert update(backend, "redir-1", f"{web.url}/out.cfw")["ok"] is True
        refused = next_rejection(backend, seen)
        assert refused["reason"] == "host_not_allowed", refused
        assert outsider_hits == []
        assert update(backend, "redir-2", f"{web.url}/in.cfw")["ok"] is True
        followed = next_rejection(backend, seen + 1)
        assert followed["reason"] == "malformed", followed  # fetched, then judged as an image
        assert web.hits.get("/garbage.cfw") == 1
    finally:
        outsider.shutdown()
        outsider.server_close()
        thread.join()


def test_config_check_names_a_bad_allowlist_entry(tmp_path: Path) -> None:
    config = tmp_path / "cabinet.toml"
    config.write_text(
        '[cabinet]\nid = "cab-1"\nstate_dir = "/tmp/x"\n[bus]\nurl = "tcp://127.0.0.1:5020"\n'
        '[firmware]\nallowed_hosts = ["fw.example.net", "https://fw.example.net/images"]\n'
        "download_timeout_s = 0.1\n"
    )
    result = cabinet_cmd("config", "check", "-c", str(config))
    assert result.returncode != 0
    said = result.stdout + result.stderr
    assert "firmware.allowed_hosts" in said and "is not a host or host:port" in said, said
    assert "firmware.download_timeout_s" in said, said
