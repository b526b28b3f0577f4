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
    def __init__(self, workdir: Path, extra_config: str = "", *, persistent: bool = False) -> None:
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            # stay the invoking user: the test keys live in a private temp dir
            f"user {getpass.getuser()}\nper_listener_settings false\n"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            + (
                f"persistence true\npersistence_location {workdir}/\n"
                if persistent
                else "persistence false\n"
            )
            + "max_inflight_messages 0\nmax_queued_messages 100000\n"
            + extra_config
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
            else:
                return
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


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
