"""What `cabinet run` carries for the rest of its life: only the daemon's own code.

DESIGN.md §6 keeps the daemon's resident memory under 60 MB, issue 14 under 40 MB
(bench/daemon_resources.py measures it). Most of it is modules, so these tests pin down
the modules: the real daemon, started as systemd starts it, reports every module it
loads (Python's ``-v``, on stderr) while it starts, answers a technician and begins a
swap; none of them may belong only to another command or to the optional web display,
and a cabinet without TLS (no fleet link, or one on mqtt://) loads no OpenSSL - while one
configured for TLS still speaks it. A daemon with the rider's screen loads the screen's
own two libraries (h11, segno's encoder) and no web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import sys
import urllib.request
from pathlib import Path

import pytest

from cabinet.console.cli import _parser_for, build_parser
from cabinet.daemon.firmware_download import DownloadFailedError, download
from cabinet.daemon.journal import Journal
from cabinet.demo.backend import Backend
from tests.conftest import cabinet_cmd
from tests.daemon_harness import Cabinet, running_cabinet, wait_until
from tests.display_helpers import ScreenWatcher, cabinet_with_screen, get_json
from tests.mqtt_broker import Mosquitto, client_cert_broker
from tests.tls_certs import make_pki

#: Loaded only by other commands (demo, sim, watch, fleet sim, firmware and technician
#: commands), or by nobody at run time (rich: structlog renders tracebacks with it on a
#: terminal; the daemon logs JSON lines). Ed25519 is
#: PyNaCl's everywhere (cabinet/daemon/tokens.py): ``cryptography``, ~5 MB more resident
#: for the same signatures, is only the tests' certificate maker (tests/tls_certs.py).
#: ``TypeAdapter`` and ``create_model`` build the per-type event schemas for the schema
#: files, never in the daemon (protocol/messages.py). pymodbus is the simulator's Modbus
#: stack: the daemon has its own master, and its own errors (drivers/bus_client.py).
#: ``urllib.request`` (with ``http.client``) is read by paho's proxy support only, which the
#: daemon leaves off (drivers/paho_without_proxy_support.py); ``importlib.metadata`` by
#: pydantic's plugin scan only, which the daemon skips (console/pydantic_without_plugin_scan.py).
OTHER_COMMANDS = (
    "shutil",
    "ctypes",
    "urllib.request",
    "http.client",
    "importlib.metadata",
    "socks",
    "pymodbus",
    "amqtt",
    "rich",
    "pygments",
    "sim",
    "cabinet.demo",
    "cabinet.operator",
    "cabinet.console.firmware_cli",
    "cabinet.console.technician_cli",
    "cryptography",
    "pydantic.type_adapter",
)

#: The rider's screen's own code: only a daemon with ``[display] enabled`` loads it.
DISPLAY_ONLY = (
    "segno",
    "h11",
    "cabinet.daemon.display.server",
    "cabinet.daemon.display.http_server",
    "cabinet.daemon.display.qr_code",
)

#: Not even a daemon with the rider's screen loads these. A web framework and what it brings
#: (~10 MB resident: aiohttp's C parser, multidict, yarl, ``http.cookies``, ``email``...): the
#: page is served by h11 on asyncio's own streams (display/http_server.py). segno's file
#: writers and theirs (``gzip``, ``xml.sax``, and through it ``urllib.request`` and
#: ``email``: ~3 MB): the QR code is drawn by display/qr_code.py.
NOT_FOR_THE_SCREEN = (
    "aiohttp",
    "multidict",
    "yarl",
    "propcache",
    "aiohappyeyeballs",
    "aiosignal",
    "frozenlist",
    "email",
    "http.cookies",
    "segno.writers",
    "xml",
    "gzip",
)

NOT_IN_THE_DAEMON = (*OTHER_COMMANDS, *NOT_FOR_THE_SCREEN, *DISPLAY_ONLY)

#: OpenSSL (libcrypto and libssl, ~4 MB resident): only in a daemon whose configuration may
#: need it (mqtts://, firmware downloads), though asyncio, http.client, paho and pydantic
#: (through hashlib) would each load it (cabinet/console/cli.py).
OPENSSL = ("ssl", "_ssl", "_hashlib")
CAB = "cab-test"  # the cabinet tests.daemon_harness configures

#: ``python -v`` says this once a module is loaded (not when an import fails: structlog
#: tries, and must fail, to import rich).
_LOADED = re.compile(r"^import '([\w.]+)' # <", re.MULTILINE)


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _loaded(cab: Cabinet, packages: tuple[str, ...]) -> list[str]:
    """The modules of ``packages`` the daemon has loaded (run it with PYTHONVERBOSE=1)."""
    imported = _LOADED.findall((cab.tmp / "daemon.log").read_text())
    assert {"cabinet.daemon.run", "structlog", "cabinet.daemon.control_server"} <= set(imported)
    return sorted(m for m in imported if any(_is_under(m, package) for package in packages))


def _publishes(backend: Backend) -> None:
    """The backend sees the cabinet online and its start event: the fleet link works."""
    status = wait_until("status online", lambda: backend.status.get(CAB))
    assert status["online"] is True
    wait_until(
        "cabinet.started at the backend",
        lambda: any(e["type"] == "cabinet.started" for e in backend.event_list(CAB)),
    )


def test_a_running_daemon_loads_no_other_commands_code(tmp_path: Path) -> None:
    with running_cabinet(tmp_path, seed=41, env={"PYTHONVERBOSE": "1"}) as cab:
        status = cabinet_cmd("status", "-c", str(cab.config), "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)  # the daemon answered
        cab.swap_begins("R-footprint")  # verifies a token, opens a door
    loaded = _loaded(cab, NOT_IN_THE_DAEMON)
    assert loaded == [], f"`cabinet run` loaded {loaded}"
    # no [mqtt]: no fleet link, and nothing that speaks TLS
    assert _loaded(cab, ("paho", *OPENSSL)) == []


def test_a_daemon_with_the_riders_screen_loads_no_web_framework(tmp_path: Path) -> None:
    """The page, its event stream and its JSON served, by h11 and segno alone."""
    with cabinet_with_screen(tmp_path, seed=42, env={"PYTHONVERBOSE": "1"}) as (cab, _, url):
        with urllib.request.urlopen(url, timeout=5) as page:
            assert "EventSource" in page.read().decode()
        assert get_json(url + "screen.json")["qr_svg"].startswith("<svg")
        watcher = ScreenWatcher(url)
        try:
            watcher.wait_for("a screen pushed", lambda s: s["kind"] == "idle")
        finally:
            watcher.stop()
    assert _loaded(cab, NOT_FOR_THE_SCREEN + OTHER_COMMANDS) == []
    assert {"h11", "segno"} <= set(_loaded(cab, DISPLAY_ONLY))
    assert _loaded(cab, OPENSSL) == []  # the page is plain HTTP, the fleet link mqtt://


def _answers_commands(backend: Backend) -> None:
    """The cabinet takes commands over the link, and goes on taking them."""
    asked = iter(range(1_000_000))

    def answered() -> bool:
        request = {"request_id": f"footprint-{next(asked)}"}
        try:
            backend.command(CAB, "state.get", request, timeout_s=2)
        except TimeoutError:
            return False
        return True

    wait_until("the cabinet to take commands", answered)
    for _ in range(3):
        assert answered()


def _outbox_depth(cab: Cabinet) -> int:
    journal = Journal(cab.journal_path)
    try:
        return journal.outbox_depth()
    finally:
        journal.close()


def test_a_daemon_on_a_plain_broker_works_without_openssl(tmp_path: Path) -> None:
    """mqtt:// loads no OpenSSL (drivers/paho_without_openssl.py), and the link works.

    Everything paho does on a plain socket: events published and acknowledged (the outbox
    empties only on PUBACK), commands answered, a broker restart survived with the backlog
    delivered, and a clean stop that the broker hears as the daemon's own.
    """
    broker = Mosquitto(tmp_path, persistent=True)  # keeps the backend's session over a restart
    broker.start()
    backend = Backend("127.0.0.1", broker.port, client_id="backend-ssl", persistent=True)
    try:
        (tmp_path / "cab").mkdir()
        extra = {"mqtt": {"url": broker.url}}
        with running_cabinet(tmp_path / "cab", extra=extra, env={"PYTHONVERBOSE": "1"}) as cab:
            _publishes(backend)
            wait_until("every event acknowledged", lambda: _outbox_depth(cab) == 0)
            _answers_commands(backend)
            broker.stop()
            cab.swap_begins("R-plain")  # journaled while the broker is away
            assert _outbox_depth(cab) > 0
            backlog = cab.events()[-1]["seq"]
            broker.start()
            wait_until("the backlog acknowledged", lambda: _outbox_depth(cab) == 0, timeout=40)
            wait_until(
                "the backlog at the backend",
                lambda: [e["seq"] for e in backend.event_list(CAB)][-1] >= backlog,
            )
            assert backend.gaps(CAB) == []
            _answers_commands(backend)
            cab.stop()  # SIGTERM, as systemd stops it
            # a clean DISCONNECT: the retained status is the daemon's own offline, not the will
            wait_until("offline at the backend", lambda: backend.status[CAB]["online"] is False)
    finally:
        backend.close()
        broker.stop()
    assert _loaded(cab, OPENSSL) == []
    assert _loaded(cab, NOT_IN_THE_DAEMON) == []
    log = (tmp_path / "cab" / "daemon.log").read_text()
    said = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    disconnects = [line for line in said if line.get("event") == "mqtt_disconnected"]
    assert len(disconnects) == 2  # the broker's restart, then our stop: no others
    assert disconnects[-1].get("by") == "us"
    for noise in ("AttributeError", "Traceback", "paho_not_audited"):
        assert noise not in log, noise


def test_a_daemon_configured_for_tls_publishes_over_it(tmp_path: Path) -> None:
    """mqtts:// with the cabinet's client certificate, to a broker that requires one."""
    pki = make_pki(tmp_path, client_cn=CAB)
    with client_cert_broker(tmp_path, pki.ca, pki.server_cert, pki.server_key) as (
        broker,
        tls_port,
    ):
        backend = Backend("127.0.0.1", broker.port)  # the backend on the plain test listener
        mqtt = pki.cabinet_mqtt(tls_port)
        try:
            (tmp_path / "cab").mkdir()
            with running_cabinet(
                tmp_path / "cab", extra={"mqtt": mqtt}, env={"PYTHONVERBOSE": "1"}
            ) as cab:
                _publishes(backend)
        finally:
            backend.close()
    assert "ssl" in _loaded(cab, OPENSSL)
    assert _loaded(cab, NOT_IN_THE_DAEMON) == []


def test_an_https_download_without_openssl_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where OpenSSL was held back, a download that needs it says so, never a traceback."""
    monkeypatch.setitem(sys.modules, "ssl", None)  # as cabinet/console/cli.py holds it back
    with pytest.raises(DownloadFailedError, match=r"^https needs TLS, which this process left out"):
        asyncio.run(
            download("https://127.0.0.1:9/bay.cfw", ["127.0.0.1"], deadline_s=5, max_bytes=1024)
        )


def _outcome(argv: list[str], parser_argv: list[str] | None = None) -> tuple[str, str, object]:
    """stdout, stderr and the exit code (or parsed arguments) of parsing ``argv``."""
    parser = build_parser() if parser_argv is None else _parser_for(parser_argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result: object = vars(parser.parse_args(argv))
        except SystemExit as exc:
            result = exc.code
    return out.getvalue(), err.getvalue(), result


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["run", "-c", "/etc/cabinet/x.toml"],
        ["run", "--config=y.toml"],
        ["run", "--help"],
        ["run", "-c"],
        ["run", "--nope"],
        ["run", "extra"],
    ],
)
def test_cabinet_run_parses_exactly_as_the_whole_command_tree(argv: list[str]) -> None:
    """The daemon builds only its own parser; help, errors and arguments stay the same."""
    assert _outcome(argv, parser_argv=argv) == _outcome(argv)


def test_every_other_command_line_gets_the_whole_tree() -> None:
    whole = build_parser().format_help()
    assert all(f"\n    {command} " in whole for command in ("run", "watch", "firmware", "demo"))
    for argv in (["--help"], ["-h", "run"], ["status"], [], ["runs"]):
        assert _parser_for(argv).format_help() == whole
