"""A cabinet stopped on purpose says so calmly: no warning an operator would chase.

Operators watch a cabinet's warnings (journald's priority, the JSON logs' ``level``). A
daemon stopped by systemd for an update disconnects from the broker on its own accord;
that disconnect is not the broker's or the network's doing and must not read like one.
"""

from __future__ import annotations

import json
from pathlib import Path

from cabinet.demo.backend import Backend
from tests.daemon_harness import running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto

CAB = "cab-test"  # the cabinet tests.daemon_harness configures


def _log_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(raw) for raw in path.read_text().splitlines() if raw.startswith("{")]


def test_a_clean_stop_disconnects_without_a_warning(tmp_path: Path, broker: Mosquitto) -> None:
    backend = Backend("127.0.0.1", broker.port)
    try:
        with running_cabinet(tmp_path, extra={"mqtt": {"url": broker.url}}) as cab:
            wait_until(
                "online at the backend", lambda: (backend.status.get(CAB) or {}).get("online")
            )
            cab.stop()  # SIGTERM, as systemd stops it
            # the broker saw a clean DISCONNECT: the retained status is the daemon's own
            # "offline", not the last will's
            wait_until("offline at the backend", lambda: backend.status[CAB]["online"] is False)
    finally:
        backend.close()
    lines = _log_lines(tmp_path / "daemon.log")
    events = [(line.get("event"), line.get("level")) for line in lines]
    assert ("stopped", "info") in events
    assert ("mqtt_disconnected", "info") in events  # said, as what it is
    assert ("mqtt_disconnected", "warning") not in events
    # mqtt:// runs without OpenSSL (drivers/paho_without_openssl.py): paho's stop is clean too
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()
