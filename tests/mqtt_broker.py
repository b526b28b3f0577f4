"""A real mosquitto on a free port, owned by the test (so it can be stopped and restarted)."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """Read ``port``/``url`` after ``start()``: a port taken between choosing and binding it
    (parallel test workers start brokers side by side) is replaced on the first start."""

    def __init__(self, workdir: Path, extra_config: str = "", *, persistent: bool = False) -> None:
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self._workdir = workdir
        self._extra_config = extra_config
        self._persistent = persistent
        self._started_once = False
        self._write_conf()
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_conf(self) -> None:
        self.conf.write_text(
            # stay the invoking user: the test keys live in a private temp dir
            f"user {getpass.getuser()}\nper_listener_settings false\n"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            + (
                f"persistence true\npersistence_location {self._workdir}/\n"
                if self._persistent
                else "persistence false\n"
            )
            + "max_inflight_messages 0\nmax_queued_messages 100000\n"
            # its own log says when every listener is open, or why one could not be
            + "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
            + "log_type information\n"
            + self._extra_config
        )

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        for _ in range(3):
            if self._start_once():
                self._started_once = True
                return
            if self._started_once:
                break  # a restart keeps its port: the clients know it
            self.port = free_port()
            self._write_conf()
        raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-500:]}")

    def _start_once(self) -> bool:
        """Whether mosquitto says it runs (not merely that something answers on the port)."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.log.open("rb") as log:
                log.seek(offset)
                said = log.read()
            if b" running" in said:
                return True
            if self.proc.poll() is not None:
                self.proc = None
                return False
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@contextmanager
def running_broker(workdir: Path) -> Iterator[Mosquitto]:
    """A mosquitto of its own on a free port, stopped whatever happens."""
    broker = Mosquitto(workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def tls_listener(port: int, ca: Path, cert: Path, key: Path) -> str:
    """Config lines of a listener that requires a client certificate (its CN is the user)."""
    return (
        f"listener {port} 127.0.0.1\n"
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        "require_certificate true\nuse_identity_as_username true\n"
    )


@contextmanager
def client_cert_broker(
    workdir: Path, ca: Path, cert: Path, key: Path, extra: str = ""
) -> Iterator[tuple[Mosquitto, int]]:
    """A mosquitto with a plain test listener and one that requires client certificates."""
    tls_port = free_port()
    broker = Mosquitto(workdir, extra_config=extra + tls_listener(tls_port, ca, cert, key))
    broker.start()
    try:
        yield broker, tls_port
    finally:
        broker.stop()
