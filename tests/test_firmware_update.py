"""`cabinet firmware` and `cmd/firmware.update` end to end: daemon + simulator (+ mosquitto)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from cabinet.daemon.tokens import load_private_key
from cabinet.demo.backend import Backend
from firmware_bridge.image import build_image
from protocol import firmware_map as fw
from tests.conftest import cabinet_cmd, cabinet_popen
from tests.daemon_harness import Cabinet, running_cabinet, wait_until
from tests.mqtt_broker import Mosquitto

EXIT_PROBLEM = 3


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("vendor") / "vendor"
    assert cabinet_cmd("keys", "generate", str(prefix)).returncode == 0
    return prefix


def signed(vendor: Path, tmp: Path, version: str, size: int = 16 * 1024) -> Path:
    payload, image = tmp / f"fw-{version}-{size}.bin", tmp / f"fw-{version}-{size}.cfw"
    payload.write_bytes(os.urandom(size))
    result = cabinet_cmd(
        "firmware", "sign", str(payload), "--key", f"{vendor}.key", "--version", version,
        "-o", str(image),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return image


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(tmp_path_factory.mktemp("broker"))
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture(scope="module")
def cab(
    tmp_path_factory: pytest.TempPathFactory, vendor: Path, broker: Mosquitto
) -> Iterator[Cabinet]:
    extra: dict[str, dict[str, Any]] = {
        # the test's own image server; URL sources are off without an allowlist
        "firmware": {"public_keys": [f"{vendor}.pub"], "allowed_hosts": ["127.0.0.1"]},
        "mqtt": {"url": broker.url},
    }
    with running_cabinet(tmp_path_factory.mktemp("fw"), seed=9, extra=extra) as cabinet:
        yield cabinet


def image_dir(cab: Cabinet) -> Path:
    """``firmware.image_dir`` by default: where an operator's images by path must be."""
    path = cab.tmp / "state" / "firmware"
    path.mkdir(exist_ok=True)
    return path


def fw_cmd(cab: Cabinet, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return cabinet_cmd("firmware", *args, "-c", str(cab.config), timeout=timeout)


def board(cab: Cabinet, bay: int) -> dict[str, Any]:
    return cab.bay(bay)["firmware"]  # type: ignore[no-any-return]


def test_status_shows_every_board(cab: Cabinet) -> None:
    result = fw_cmd(cab, "status", "--json")
    assert result.returncode == 0, result.stderr
    bays = json.loads(result.stdout)["bays"]
    assert len(bays) == 12
    assert all(b["online"] and b["map_version"] == fw.FIRMWARE_MAP_VERSION for b in bays)
    assert {b["bootloader"] for b in bays} == {"idle"}
    human = fw_cmd(cab, "status")
    assert human.stdout.splitlines()[0].split()[:4] == ["BAY", "ONLINE", "MAP", "VERSION"]


def test_a_signed_image_is_flashed_and_the_bay_returns_to_service(
    cab: Cabinet, vendor: Path, tmp_path: Path
) -> None:
    before = board(cab, 3)["version"]
    result = fw_cmd(cab, "update", str(signed(vendor, tmp_path, "1.4")), "--bay", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bay 3: updated" in result.stdout
    assert "bay  3 sending    [" in result.stdout  # the progress bar (every 10 % off a TTY)
    assert board(cab, 3)["version"] == "1.4" and board(cab, 3)["bootloader"] == "idle"
    updated = cab.wait_event("firmware.updated", bay=3)
    assert updated["previous"] == before and updated["version"] == "1.4"
    print(f"16 KiB image on bay 3: {updated['duration_s']} s")
    # the bay is back in service a moment after the CLI says "updated": wait for it first
    assert cab.wait_event("bay.enabled", bay=3, reason="firmware updated")
    # presence news (docs/mqtt.md) is not part of the update's sequence: a board that
    # reboots longer than announced is still reported offline/online around it
    # (tests/test_firmware_reboot_probe.py: one that keeps to its reboot time is not)
    presence = {"bay.opened", "bay.offline", "bay.online"}
    types = [e["type"] for e in cab.events() if e.get("bay") == 3 and e["type"] not in presence]
    flash = types[len(types) - 1 - types[::-1].index("bay.disabled") :]
    progress = flash[2:-2]
    assert flash[:2] == ["bay.disabled", "firmware.started"]
    assert flash[-2:] == ["firmware.updated", "bay.enabled"]
    assert progress and set(progress) == {"firmware.progress"}


def test_bad_images_are_refused_before_touching_a_board(
    cab: Cabinet, vendor: Path, tmp_path: Path
) -> None:
    payload = os.urandom(4096)
    cases = {
        "unsigned": build_image(payload, version=0x0109, board_type=fw.BAY_BOARD_TYPE, key=None),
        "bad_signature": build_image(
            payload, version=0x0109, board_type=fw.BAY_BOARD_TYPE, key=SigningKey.generate()
        ),
        "malformed": b"CFW1" + os.urandom(500),
    }
    for reason, data in cases.items():
        path = tmp_path / f"{reason}.cfw"
        path.write_bytes(data)
        result = fw_cmd(cab, "update", str(path), "--bay", "4")
        assert result.returncode == 1, (reason, result.stdout)
        assert f"({reason})" in result.stderr and "Traceback" not in result.stderr
        cab.wait_event("firmware.rejected", reason=reason)
    assert board(cab, 4)["bytes_received"] == 0  # nothing reached the board
    missing = fw_cmd(cab, "update", str(tmp_path / "nope.cfw"), "--bay", "4")
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    unsaid = fw_cmd(cab, "update", str(path))
    assert unsaid.returncode == 1 and "--bay N" in unsaid.stderr


def test_wrong_target_and_downgrade_skip_the_bay_unless_forced(
    cab: Cabinet, vendor: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-board.cfw"
    other.write_bytes(
        build_image(
            os.urandom(2048),
            version=0x0200,
            board_type=0x0C01,
            key=load_private_key(Path(f"{vendor}.key")),
        )
    )
    result = fw_cmd(cab, "update", str(other), "--bay", "8")
    assert result.returncode == EXIT_PROBLEM
    assert "bay 8: skipped (image is for 0x0c01" in result.stdout
    old = signed(vendor, tmp_path, "1.2", size=2048)
    result = fw_cmd(cab, "update", str(old), "--bay", "8")
    assert result.returncode == EXIT_PROBLEM and "not newer" in result.stdout
    assert board(cab, 8)["version"] == "1.3"
    forced = fw_cmd(cab, "update", str(old), "--bay", "8", "--force")
    assert forced.returncode == 0, forced.stdout
    assert board(cab, 8)["version"] == "1.2"


def test_a_power_cut_mid_transfer_resumes(cab: Cabinet, vendor: Path, tmp_path: Path) -> None:
    image = signed(vendor, tmp_path, "1.5", size=64 * 1024)
    proc = cabinet_popen("firmware", "update", str(image), "--bay", "5", "-c", str(cab.config))
    try:
        assert proc.stdout is not None
        while " 30%" not in proc.stdout.readline():
            pass
        cab.ctl("fault", "power_cut", "--bay", "5")
        wait_until("the board to go silent", lambda: not board(cab, 5)["answering"])
        cab.ctl("heal", "power_cut", "--bay", "5")
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    updated = cab.wait_event("firmware.updated", bay=5)
    assert updated["resumes"] >= 1
    assert board(cab, 5)["version"] == "1.5"
    assert board(cab, 5)["bytes_received"] < 1.2 * 64 * 1024  # resumed, not restarted


def test_an_image_that_does_not_boot_is_rolled_back(
    cab: Cabinet, vendor: Path, tmp_path: Path
) -> None:
    cab.ctl("fault", "firmware_bad", "--bay", "6")
    try:
        result = fw_cmd(cab, "update", str(signed(vendor, tmp_path, "1.6", 4096)), "--bay", "6")
    finally:
        cab.ctl("heal", "firmware_bad", "--bay", "6")
    assert result.returncode == EXIT_PROBLEM, result.stdout
    assert "bay 6: failed (rolled_back" in result.stdout
    assert board(cab, 6)["version"] == "1.3"
    cab.wait_event("firmware.failed", bay=6, reason="rolled_back")
    wait_until("bay 6 back in service", lambda: cab.events("bay.enabled")[-1]["bay"] == 6)


def complete_swap(cab: Cabinet, started: dict[str, Any], battery: str) -> None:
    ret, out = started["return_bay"], started["dispense_bay"]
    cab.wait_door(ret, "open")
    cab.ctl("insert", str(ret), "--battery", battery, "--soc", "20")
    cab.ctl("close", str(ret))
    cab.wait_door(out, "open")
    cab.ctl("take", str(out))
    cab.ctl("close", str(out))
    cab.wait_event("swap.completed", session_id=started["session_id"])


def test_a_bay_in_a_swap_is_skipped(cab: Cabinet, vendor: Path, tmp_path: Path) -> None:
    started = cab.swap_begins("R-fw1")
    ret = started["return_bay"]
    idle = next(b for b in (11, 12, 9, 7) if b not in (ret, started["dispense_bay"]))
    image = signed(vendor, tmp_path, "1.7", 2048)
    result = fw_cmd(cab, "update", str(image), "--bay", str(ret), "--bay", str(idle))
    assert result.returncode == EXIT_PROBLEM, result.stdout  # a bay asked for was skipped
    assert f"bay {ret}: skipped (a swap is using it)" in result.stdout
    assert f"bay {idle}: updated" in result.stdout
    complete_swap(cab, started, "BAT-FW1")


def test_the_cabinet_keeps_swapping_while_a_bay_is_flashed(
    cab: Cabinet, vendor: Path, tmp_path: Path
) -> None:
    image = signed(vendor, tmp_path, "1.9", 64 * 1024)
    proc = cabinet_popen("firmware", "update", str(image), "--bay", "2", "-c", str(cab.config))
    try:
        cab.wait_event("firmware.started", bay=2, to="1.9")
        started = cab.swap_begins("R-fw2")
        assert 2 not in (started["return_bay"], started["dispense_bay"])  # out of service
        complete_swap(cab, started, "BAT-FW2")
        flashing = not any(e.get("version") == "1.9" for e in cab.events("firmware.updated"))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert flashing, "the swap should have finished while bay 2 was still being flashed"
    assert proc.returncode == 0, stdout + stderr
    assert board(cab, 2)["version"] == "1.9"


def test_an_operator_updates_over_mqtt(
    cab: Cabinet, broker: Mosquitto, vendor: Path, tmp_path: Path
) -> None:
    backend = Backend("127.0.0.1", broker.port)
    try:
        image = image_dir(cab) / "bay-board-1.8.cfw"
        shutil.copy(signed(vendor, tmp_path, "1.8", 8192), image)
        reply = backend.command(
            "cab-test",
            "firmware.update",
            {"request_id": "fw-1", "args": {"source": str(image), "bays": [10]}},
        )
        assert reply["ok"] is True and reply["result"]["accepted"] is True
        cab.wait_event("firmware.started", bay=10, to="1.8")
        cab.wait_event("firmware.updated", bay=10, timeout=60)
        assert board(cab, 10)["version"] == "1.8"
        bad = backend.command(
            "cab-test",
            "firmware.update",
            {"request_id": "fw-2", "args": {"source": str(image_dir(cab) / "missing.cfw")}},
        )
        assert bad["ok"] is False and bad["error"]["code"] == "unreadable"
        outside = backend.command(  # anywhere else on the device is not the operator's to read
            "cab-test",
            "firmware.update",
            {"request_id": "fw-3", "args": {"source": str(tmp_path / image.name)}},
        )
        assert outside["ok"] is False and outside["error"]["code"] == "bad_source"
        escape = backend.command(
            "cab-test",
            "firmware.update",
            {"request_id": "fw-4", "args": {"source": f"{image_dir(cab)}/../journal.db"}},
        )
        assert escape["ok"] is False and escape["error"]["code"] == "bad_source"
        wait_until(
            "the events at the backend",
            lambda: any(e["type"] == "firmware.updated" for e in backend.event_list("cab-test")),
        )
    finally:
        backend.close()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    """A plain HTTP server for the images, as a fleet's firmware store would be."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_an_operator_updates_from_a_url(
    cab: Cabinet, broker: Mosquitto, vendor: Path, tmp_path: Path, web: str
) -> None:
    image = signed(vendor, tmp_path, "2.1", 4096)
    backend = Backend("127.0.0.1", broker.port)
    try:
        reply = backend.command(
            "cab-test",
            "firmware.update",
            {"request_id": "fw-url-1", "args": {"source": f"{web}/{image.name}", "bays": [1]}},
        )
        assert reply["ok"] is True and reply["result"]["accepted"] is True
        cab.wait_event("firmware.updated", bay=1, version="2.1", timeout=60)
        missing = backend.command(
            "cab-test",
            "firmware.update",
            {"request_id": "fw-url-2", "args": {"source": f"{web}/nothing.cfw", "bays": [1]}},
        )
        assert missing["ok"] is True  # accepted: the download happens afterwards
        rejected = cab.wait_event("firmware.rejected", reason="download_failed")
        assert "404" not in rejected["detail"]  # the operator learns nothing of the network
        assert "HTTP 404" in (cab.tmp / "daemon.log").read_text()  # the technician does
    finally:
        backend.close()


def test_no_firmware_keys_means_no_update(vendor: Path, tmp_path: Path) -> None:
    with running_cabinet(tmp_path, seed=4) as cab:
        result = fw_cmd(cab, "update", str(signed(vendor, tmp_path, "1.4", 1024)), "--bay", "1")
        assert result.returncode == 1
        assert "no firmware signing keys configured" in result.stderr


@contextlib.contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """A named pipe nobody writes to; closed with a writer at the end so no reader hangs."""
    os.mkfifo(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):  # a reader stuck in open/read gets its EOF
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        path.unlink()


def bus_requests(cab: Cabinet) -> int:
    return sum(u["requests"] for u in cab.state()["bus"]["units"].values())


def test_a_fifo_or_a_device_as_source_is_refused_and_the_cabinet_keeps_running(
    cab: Cabinet, broker: Mosquitto
) -> None:
    """A path naming a FIFO froze the whole daemon: no polls, no heartbeats, no CLI."""
    to_kmsg = image_dir(cab) / "kmsg.cfw"
    to_kmsg.symlink_to("/dev/kmsg")
    backend = Backend("127.0.0.1", broker.port)
    with fifo(image_dir(cab) / "pipe.cfw") as pipe:
        try:
            for n, source in enumerate([str(pipe), f"file://{pipe}", "/dev/kmsg", str(to_kmsg)]):
                reply = backend.command(
                    "cab-test",
                    "firmware.update",
                    {"request_id": f"fw-fifo-{n}", "args": {"source": source, "bays": [7]}},
                )
                assert reply["ok"] is False, (source, reply)
                assert reply["error"]["code"] == "bad_source", (source, reply)
            fifo_reply = backend.command(
                "cab-test",
                "firmware.update",
                {"request_id": "fw-fifo-m", "args": {"source": str(pipe)}},
            )
            assert "is a FIFO, not a regular file" in fifo_reply["error"]["message"]
            # still alive: it polls, heartbeats every board and answers the technician
            before = bus_requests(cab)
            wait_until("the daemon to keep polling", lambda: bus_requests(cab) > before + 24)
            assert all(cab.bay(n)["heartbeat_ok"] for n in range(1, 13))
            status = cabinet_cmd("status", "--json", "-c", str(cab.config), timeout=10)
            assert status.returncode == 0 and json.loads(status.stdout)["ready"] is True
        finally:
            backend.close()
            to_kmsg.unlink()


def test_the_technician_cli_refuses_a_fifo_instead_of_hanging(cab: Cabinet, tmp_path: Path) -> None:
    with fifo(tmp_path / "pipe.cfw") as pipe:
        result = fw_cmd(cab, "update", str(pipe), "--bay", "4", timeout=20)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().endswith("is a FIFO, not a regular file")
    assert "Traceback" not in result.stderr
