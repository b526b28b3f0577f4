"""mqtts:// with client certificates against a real mosquitto that requires them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cabinet.demo.backend import Backend
from tests.daemon_harness import running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto, client_cert_broker
from tests.tls_certs import Pki, make_pki

CAB = "cab-test"


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Pki, int]]:
    pki = make_pki(tmp_path, client_cn=CAB)
    with client_cert_broker(tmp_path, pki.ca, pki.server_cert, pki.server_key) as (
        broker,
        tls_port,
    ):
        yield broker, pki, tls_port


def test_a_cabinet_with_its_client_certificate_publishes_over_tls(
    tmp_path: Path, tls_broker: tuple[Mosquitto, Pki, int]
) -> None:
    broker, pki, tls_port = tls_broker
    backend = Backend("127.0.0.1", broker.port)  # the backend on the plain test listener
    mqtt = pki.cabinet_mqtt(tls_port)
    try:
        (tmp_path / "cab").mkdir()
        with running_cabinet(tmp_path / "cab", extra={"mqtt": mqtt}):
            status = wait_until("status online over TLS", lambda: backend.status.get(CAB))
            assert status["online"] is True
            wait_until(
                "cabinet.started over TLS",
                lambda: any(e["type"] == "cabinet.started" for e in backend.event_list(CAB)),
            )
    finally:
        backend.close()


def test_a_cabinet_without_a_client_certificate_is_refused(
    tmp_path: Path, tls_broker: tuple[Mosquitto, Pki, int]
) -> None:
    broker, pki, tls_port = tls_broker
    backend = Backend("127.0.0.1", broker.port)
    mqtt = {"url": f"mqtts://127.0.0.1:{tls_port}", "ca_file": str(pki.ca)}
    try:
        (tmp_path / "cab").mkdir()
        with running_cabinet(tmp_path / "cab", extra={"mqtt": mqtt}) as cab:
            cab.swap_begins("R-1")  # the cabinet works offline all the same
            assert CAB not in backend.status
            assert backend.event_list(CAB) == []
    finally:
        backend.close()
