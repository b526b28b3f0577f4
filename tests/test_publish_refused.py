"""A PUBACK that refuses (reason code >= 0x80) is not a delivery: on a real mosquitto.

The broker's ACL first refuses the cabinet's ``events``; the events must stay in the
outbox and an alarm must name the refusal. Once the ACL is fixed (SIGHUP reloads it)
every event arrives once and in order, the alarm's raising and clearing included.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cabinet.demo.backend import Backend
from tests.conftest import REPO
from tests.daemon_harness import running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto, client_cert_broker
from tests.tls_certs import Pki, make_pki

ACL = REPO / "docs" / "mosquitto.acl"
CAB = "cab-test"


@pytest.fixture
def refusing_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Pki, int, Path]]:
    """The documented ACL minus the cabinets' right to publish ``events``."""
    pki = make_pki(tmp_path, client_cn="cab-a", more_clients=("backend", CAB))
    acl = tmp_path / "refusing.acl"
    acl.write_text(ACL.read_text().replace("pattern write cabinets/%u/events\n", ""))
    assert "cabinets/%u/events" not in acl.read_text()
    with client_cert_broker(
        tmp_path, pki.ca, pki.server_cert, pki.server_key, f"acl_file {acl}\n"
    ) as (broker, tls_port):
        yield broker, pki, tls_port, acl


def test_refused_events_stay_in_the_outbox_until_the_broker_accepts_them(
    tmp_path: Path, refusing_broker: tuple[Mosquitto, Pki, int, Path]
) -> None:
    broker, pki, port, acl = refusing_broker
    cert, key = pki.clients[CAB]
    b_cert, b_key = pki.clients["backend"]
    mqtt = {
        "url": f"mqtts://127.0.0.1:{port}",
        "ca_file": str(pki.ca),
        "client_cert": str(cert),
        "client_key": str(key),
    }
    backend = Backend(
        "127.0.0.1", port, client_id="backend", tls=(str(pki.ca), str(b_cert), str(b_key))
    )
    try:
        (tmp_path / "cab").mkdir()
        with running_cabinet(tmp_path / "cab", extra={"mqtt": mqtt}) as cab:
            wait_until("status online", lambda: backend.status.get(CAB, {}).get("online"))
            raised = cab.wait_event("alarm.raised", kind="publish_refused")
            assert "0x87" in raised["detail"] and "events" in raised["detail"]
            assert backend.event_list(CAB) == []  # refused: nothing reached a subscriber
            # the operator fixes the ACL; mosquitto reloads it on SIGHUP
            acl.write_text(ACL.read_text())
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGHUP)
            cleared = cab.wait_event("alarm.cleared", kind="publish_refused")
            wait_until(
                "every event up to the clearing",
                lambda: any(e["id"] == cleared["id"] for e in backend.event_list(CAB)),
            )
            events = backend.event_list(CAB)
            seqs = [e["seq"] for e in events]
            assert seqs == list(range(1, len(seqs) + 1))  # from 1, no gap
            assert backend.duplicates[CAB] == 0
            assert [e["data"]["kind"] for e in events if e["type"].startswith("alarm.")].count(
                "publish_refused"
            ) == 2
    finally:
        backend.close()
