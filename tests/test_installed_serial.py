"""Serial lines as installed: RS-485 mode, stable device names, an adapter unplugged and back."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from drivers.bus_url import BusUrlError, Rs485Settings, parse_endpoint, parse_scanner_endpoint
from drivers.modbus_bus import BusUnavailableError, ModbusBus
from tests.conftest import SimProcess, cabinet_cmd
from tests.daemon_harness import wait_until
from tests.field_cabinet import field_cabinet
from tests.test_bus_truth import poll_cycles
from tests.unpluggable_adapter import UnpluggableAdapter

CONFIG = """
[cabinet]
id = "cab-0042"

[bus]
url = "{bus}"

[scanner]
url = "{scanner}"
"""


def test_rs485_mode_is_set_from_the_bus_url() -> None:
    endpoint = parse_endpoint(
        "serial:///dev/ttymxc2?baud=19200&rs485=on&rs485_rts=low&rs485_delay_before_ms=1"
    )
    assert endpoint.rs485 == Rs485Settings(  # type: ignore[union-attr]
        rts_level_for_tx=False, delay_before_tx_ms=1, delay_after_tx_ms=0
    )
    assert parse_endpoint("serial:///dev/ttyUSB0").rs485 is None  # type: ignore[union-attr]
    for url, message in (
        ("serial:///dev/ttyS1?rs485=maybe", "rs485 is on or off"),
        ("serial:///dev/ttyS1?rs485_rts=high", "need\\(s\\) rs485=on"),
        ("serial:///dev/ttyS1?rs485=on&rs485_delay_after_ms=500", "0-100 ms"),
        ("serial:///dev/ttyS1?rs485=on&rs485_rts=up", "high or low"),
    ):
        with pytest.raises(BusUrlError, match=message):
            parse_endpoint(url)
    with pytest.raises(BusUrlError, match="not on RS-485"):
        parse_scanner_endpoint("serial:///dev/ttyACM0?rs485=on")


def test_a_port_whose_driver_has_no_rs485_mode_is_named(sim_pty: SimProcess) -> None:
    # a pty, like a USB adapter that switches direction in hardware, refuses TIOCSRS485
    path = sim_pty.bus.removeprefix("serial://").split("?")[0]

    async def scenario() -> None:
        bus = ModbusBus(parse_endpoint(f"serial://{path}?baud=115200&parity=N&rs485=on"))
        with pytest.raises(BusUnavailableError, match=f"serial port {path} refuses RS-485 mode"):
            await bus.connect()

    asyncio.run(scenario())


def _check(tmp_path: Path, bus: str, scanner: str) -> tuple[int, dict[str, object], str]:
    path = tmp_path / "cabinet.toml"
    path.write_text(CONFIG.format(bus=bus, scanner=scanner))
    as_json = cabinet_cmd("config", "check", "-c", str(path), "--json")
    text = cabinet_cmd("config", "check", "-c", str(path))
    return as_json.returncode, json.loads(as_json.stdout), text.stdout


def test_config_check_notes_device_names_that_move_across_boots(tmp_path: Path) -> None:
    code, report, text = _check(
        tmp_path, "serial:///dev/ttyUSB0?baud=19200", "evdev:///dev/input/event3"
    )
    unstable = {w["key"]: w["message"] for w in report["unstable_device_names"]}  # type: ignore[attr-defined]
    assert set(unstable) == {"bus.url", "scanner.url"}
    assert "/dev/serial/by-id/" in unstable["bus.url"]
    assert "/dev/input/by-id/" in unstable["scanner.url"]
    assert "note: bus.url: /dev/ttyUSB0 is numbered in plugging order" in text
    assert code == 0  # advice: the cabinet works today; the check does not fail over it
    by_id = "serial:///dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0"
    _, report, text = _check(tmp_path, by_id, "evdev:///dev/input/by-id/usb-Scan-event-kbd")
    assert report["unstable_device_names"] == []
    assert "note:" not in text


@pytest.mark.parametrize("scheme", ["tcp", "modbus-tcp"])
def test_config_check_notes_a_gateway_whose_line_speed_is_not_given(
    tmp_path: Path, scheme: str
) -> None:
    """Without ``?baud=`` a transparent gateway at 9600 loses every heartbeat broadcast."""
    scanner = "evdev:///dev/input/by-id/usb-Scan-event-kbd"
    code, report, text = _check(tmp_path, f"{scheme}://10.0.0.5:502", scanner)
    notes = {w["key"]: w["message"] for w in report["gateway_line_speed"]}  # type: ignore[attr-defined]
    assert set(notes) == {"bus.url"}
    assert f"{scheme}://10.0.0.5:502?baud=" in notes["bus.url"]  # the fix, spelled out
    assert "heartbeat" in notes["bus.url"]
    assert f"note: bus.url: {notes['bus.url']}" in text
    assert code == 0  # a gateway that keeps the line's timing itself works without it
    _, report, text = _check(tmp_path, f"{scheme}://10.0.0.5:502?baud=9600", scanner)
    assert report["gateway_line_speed"] == []
    assert "note:" not in text
    _, report, _ = _check(tmp_path, "serial:///dev/serial/by-id/usb-FTDI-if00-port0", scanner)
    assert report["gateway_line_speed"] == []  # a serial line's speed is in its URL anyway


def test_an_adapter_that_vanishes_and_comes_back_is_reopened_with_events(tmp_path: Path) -> None:
    link = str(tmp_path / "usb-FTDI_RS485-if00-port0")  # the stable by-id name
    adapters: list[UnpluggableAdapter] = []

    def through_a_usb_adapter(sim: SimProcess) -> str:
        host, port = sim.bus.removeprefix("tcp://").rsplit(":", 1)
        adapters.append(UnpluggableAdapter(link, host, int(port)))
        adapters[0].plug_in()
        return f"serial://{link}?baud=115200&parity=N"

    try:
        with field_cabinet(tmp_path, bus_url=through_a_usb_adapter) as cab:
            adapter = adapters[0]
            cycles = poll_cycles(cab)
            wait_until("the daemon to poll through the adapter", lambda: poll_cycles(cab) > cycles)
            adapter.unplug()
            lost = cab.wait_event("bus.lost")
            assert lost["error"]
            assert not os.path.lexists(link)
            # meanwhile another device takes the freed node number, so the adapter comes
            # back re-enumerated as a different node behind the same stable name
            squatter = os.openpty()
            adapter.plug_in()
            assert adapter.plugged_devices[0] != adapter.plugged_devices[1]
            restored = cab.wait_event("bus.restored")
            assert restored["outage_s"] >= 0
            assert len(cab.events("bus.lost")) == 1  # news once, not once per reopen try
            cycles = poll_cycles(cab)
            wait_until("polling through the new node", lambda: poll_cycles(cab) > cycles + 3)
            # the daemon was never restarted: one cabinet.started
            assert len(cab.events("cabinet.started")) == 1
            for fd in squatter:
                os.close(fd)
    finally:
        for adapter in adapters:
            adapter.close()
