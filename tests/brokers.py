"""The brokers fleets run, each started by the tests on free ports of their own.

mosquitto (with persistence, as deployed), RabbitMQ with its MQTT plugin (a node of
our own: own node name, ports, epmd, Mnesia and log directories, plugins file; the
system RabbitMQ and its config are never touched) and NATS with JetStream's MQTT
support (a generated config: server_name, JetStream store in a temp dir, an ``mqtt``
block). Each can be stopped and started again on the same ports with what it stored,
which is how the tests make a broker restart and an outage. Starting RabbitMQ costs
seconds, so the tests hold one of each per session (``fleet_broker`` in
tests/test_broker_matrix.py); a missing binary is a skip with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import ClassVar

from tests.mqtt_broker import MOSQUITTO, Mosquitto, free_port

START_TIMEOUT_S = 60.0  # RabbitMQ boots in ~8 s here; a loaded 2-core CI box is slower
STOP_TIMEOUT_S = 30.0
RABBITMQ_HOME = sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*"))
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
EPMD = shutil.which("epmd") or "/usr/bin/epmd"

#: A minimal MQTT 3.1.1 CONNECT (clean session, client id "ready-probe", keepalive 10 s):
#: a broker is ready when it answers this with CONNACK "accepted", not when its port
#: merely accepts TCP (NATS needs JetStream up, RabbitMQ its plugin booted).
_PROBE_CONNECT = bytes([0x10, 23]) + b"\x00\x04MQTT\x04\x02\x00\x0a\x00\x0bready-probe"
_CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


class BrokerUnavailableError(Exception):
    """The broker's binary is not installed here: the tests that need it are skipped."""


def mqtt_ready(port: int) -> bool:
    """Whether a broker on ``port`` accepts an MQTT 3.1.1 session right now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(_PROBE_CONNECT)
            reply = sock.recv(4)
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT: no last will, no session left
            return reply == _CONNACK_ACCEPTED
    except OSError:
        return False


def _wait_ready(name: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log}")
        if mqtt_ready(port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not accept MQTT sessions within {START_TIMEOUT_S:g} s")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started (a broker and its helpers), then wait."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:  # the group outlives its leader (RabbitMQ's beam)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


class FleetBroker:
    """One broker of the matrix: a name, a port, start/stop/restart keeping its store."""

    name: ClassVar[str]
    port: int

    def __init__(self, workdir: Path) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Stop and start again on the same port, with whatever the broker persisted."""
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        """A test that failed mid-outage must not leave the next one without a broker."""
        if not self.running:
            self.start()

    def close(self) -> None:
        """Stop it and anything started for it."""
        self.stop()


class MosquittoBroker(FleetBroker):
    """mosquitto with persistence on, as a fleet deploys it (sessions survive restarts)."""

    name = "mosquitto"

    def __init__(self, workdir: Path) -> None:
        if not Path(MOSQUITTO).exists():
            raise BrokerUnavailableError(f"mosquitto is not installed ({MOSQUITTO})")
        workdir.mkdir(parents=True, exist_ok=True)
        self._broker = Mosquitto(workdir, persistent=True)
        self.port = self._broker.port

    @property
    def running(self) -> bool:
        return self._broker.proc is not None and self._broker.proc.poll() is None

    def start(self) -> None:
        self._broker.start()
        self.port = self._broker.port  # a first start re-picks the port if it was taken
        deadline = time.monotonic() + START_TIMEOUT_S
        while not mqtt_ready(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not accept MQTT sessions")
            time.sleep(0.05)

    def stop(self) -> None:
        self._broker.stop()


class RabbitMqBroker(FleetBroker):
    """A RabbitMQ node of our own with ``rabbitmq_mqtt`` enabled; AMQP listener off.

    Everything the node would take from the system is redirected into ``workdir``:
    node name, Erlang cookie ($HOME), distribution port, its own epmd on its own port
    (started and stopped by us), Mnesia, logs, config, the enabled-plugins file and the
    env file (the system's rabbitmq-env.conf would set the node name).
    """

    name = "rabbitmq"

    def __init__(self, workdir: Path) -> None:
        if not RABBITMQ_HOME or not Path(EPMD).exists():
            raise BrokerUnavailableError("RabbitMQ (/usr/lib/rabbitmq) is not installed")
        home = RABBITMQ_HOME[-1]
        self._server = home / "sbin" / "rabbitmq-server"
        if not (self._server.exists() and any(home.glob("plugins/rabbitmq_mqtt-*"))):
            raise BrokerUnavailableError(f"no rabbitmq-server with rabbitmq_mqtt under {home}")
        self.workdir = workdir
        for sub in ("home", "mnesia", "log"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._epmd_port = free_port()
        self._dist_port = free_port()
        self.node = f"cabinet-test-{os.getpid()}-{self.port}@localhost"
        (workdir / "rabbitmq.conf").write_text(
            "listeners.tcp = none\n"  # MQTT only: no AMQP port to collide with the system's
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (workdir / "rabbitmq-env.conf").write_text("")
        self._env = {
            **os.environ,
            "HOME": str(workdir / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(free_port()),  # unused (AMQP is off) but must be free
            "RABBITMQ_DIST_PORT": str(self._dist_port),
            "ERL_EPMD_PORT": str(self._epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(workdir / "advanced.config"),
            "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid"),
            # one scheduler, few async threads: a test node, not a production one
            "RABBITMQ_SERVER_ERL_ARGS": "+S 1:1 +A 2",
        }
        self._epmd: subprocess.Popen[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self._epmd is None:
            self._epmd = subprocess.Popen(
                [EPMD, "-port", str(self._epmd_port), "-address", "127.0.0.1"],
                env=self._env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        log = self.workdir / "log" / "startup.log"
        with log.open("ab") as out:
            self._proc = subprocess.Popen(
                [str(self._server)],
                env=self._env,
                cwd=self.workdir,
                stdout=out,
                stderr=out,
                start_new_session=True,  # its own group: stop() ends the script and beam
            )
        _wait_ready("rabbitmq", self.port, self._proc, log)

    def stop(self) -> None:
        if self._proc is not None:
            _stop_group(self._proc)
            self._proc = None

    def close(self) -> None:
        """Stop the node and the epmd we started for it."""
        self.stop()
        if self._epmd is not None:
            self._epmd.terminate()
            self._epmd.wait(timeout=STOP_TIMEOUT_S)
            self._epmd = None


class NatsBroker(FleetBroker):
    """nats-server with JetStream (store in ``workdir``) and an ``mqtt`` listener."""

    name = "nats"

    def __init__(self, workdir: Path) -> None:
        if not Path(NATS_SERVER).exists():
            raise BrokerUnavailableError(f"nats-server is not installed ({NATS_SERVER})")
        self.workdir = workdir
        (workdir / "jetstream").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = workdir / "nats.conf"
        self.conf.write_text(
            # MQTT needs JetStream, and JetStream needs a server_name
            f'server_name: "cabinet-test-{os.getpid()}-{self.port}"\n'
            f'listen: "127.0.0.1:{free_port()}"\n'
            f'jetstream {{ store_dir: "{workdir / "jetstream"}" }}\n'
            f'mqtt {{ listen: "127.0.0.1:{self.port}" }}\n'
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        log = self.workdir / "nats.log"
        self._proc = subprocess.Popen(
            [NATS_SERVER, "-c", str(self.conf), "-l", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_ready("nats-server", self.port, self._proc, log)

    def stop(self) -> None:
        if self._proc is not None:
            _stop_group(self._proc)
            self._proc = None


BROKER_KINDS: dict[str, type[FleetBroker]] = {
    "mosquitto": MosquittoBroker,
    "rabbitmq": RabbitMqBroker,
    "nats": NatsBroker,
}


def make_broker(name: str, workdir: Path) -> FleetBroker:
    """A stopped broker of kind ``name`` (raises ``BrokerUnavailableError`` if missing)."""
    return BROKER_KINDS[name](workdir)
