"""Parsing of ``bus.url`` / ``scanner.url``: a serial port, a TCP gateway or an input device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, urlsplit

VALID_BAUDS = frozenset({1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200})
DEFAULT_BAUD = 19200
DEFAULT_PARITY = "E"  # Modbus over serial line: 8E1 is the default framing
MAX_RS485_DELAY_MS = 100  # a driver-enable settling time is microseconds to a few ms, never more
_SERIAL_OPTIONS = frozenset(
    {"baud", "parity", "stopbits", "rs485", "rs485_rts", "rs485_delay_before_ms"}
    | {"rs485_delay_after_ms"}
)


class BusUrlError(ValueError):
    """A bus or scanner URL that cannot name a port; the message says which part is wrong."""


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    """An RS-485<->Ethernet gateway (or the simulator) reached over TCP.

    ``framing`` is what the gateway speaks on the TCP side: ``rtu`` carries the RTU frames
    unchanged (``tcp://``, "RTU over TCP"); ``mbap`` is Modbus/TCP (``modbus-tcp://``),
    where the gateway strips the 7-byte MBAP header, adds the CRC and keeps the line's
    timing itself - the common mode of off-the-shelf serial-to-Ethernet gateways.
    """

    host: str
    port: int
    framing: Literal["rtu", "mbap"] = "rtu"
    #: the gateway's serial line speed (``?baud=``), if given: the master cannot see that
    #: line, and a broadcast's quiet must count from the frame's end there (docs/hardware.md)
    baud: int | None = None

    def __str__(self) -> str:
        scheme = "modbus-tcp" if self.framing == "mbap" else "tcp"
        line = f"?baud={self.baud}" if self.baud is not None else ""
        return f"{scheme}://{self.host}:{self.port}{line}"


@dataclass(frozen=True, slots=True)
class Rs485Settings:
    """The kernel's RS-485 mode for an on-board UART that drives the transceiver's DE pin.

    USB adapters switch direction in hardware and need none of this (their drivers refuse
    it); a UART wired to a transceiver needs the kernel to raise RTS (DE) while sending.
    """

    rts_level_for_tx: bool = True  # RTS high while sending: DE active-high, the common wiring
    delay_before_tx_ms: int = 0
    delay_after_tx_ms: int = 0


@dataclass(frozen=True, slots=True)
class SerialEndpoint:
    """A local serial port (RS-485 adapter, USB-CDC scanner or a pseudo-terminal)."""

    path: str
    baud: int = DEFAULT_BAUD
    parity: str = DEFAULT_PARITY
    stopbits: int = 1
    rs485: Rs485Settings | None = None  # None: leave the port's RS-485 mode as it is

    def __str__(self) -> str:
        return f"serial://{self.path}?baud={self.baud}&parity={self.parity}"


@dataclass(frozen=True, slots=True)
class InputDeviceEndpoint:
    """A Linux input device: a QR scanner that presents itself as a USB keyboard."""

    path: str

    def __str__(self) -> str:
        return f"evdev://{self.path}"


Endpoint = TcpEndpoint | SerialEndpoint
ScannerEndpoint = TcpEndpoint | SerialEndpoint | InputDeviceEndpoint


def _tcp(url: str, framing: Literal["rtu", "mbap"]) -> TcpEndpoint:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise BusUrlError(f"{url!r}: the port is not a number in 1-65535") from exc
    if not parts.hostname or port is None:
        raise BusUrlError(
            f"{url!r}: a {parts.scheme} URL needs a host and a port, "
            f"e.g. {parts.scheme}://10.0.0.5:502"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - {"baud"}
    if unknown:
        raise BusUrlError(
            f"{url!r}: unknown option(s) {', '.join(sorted(unknown))}; a {parts.scheme} URL "
            "takes only baud, the gateway's serial line speed"
        )
    baud = None
    if "baud" in query:
        baud = _whole(url, query, "baud", DEFAULT_BAUD)
        if baud not in VALID_BAUDS:
            raise BusUrlError(f"{url!r}: baud {baud} is not one of {sorted(VALID_BAUDS)}")
    return TcpEndpoint(parts.hostname, port, framing, baud)


def _whole(url: str, query: dict[str, str], key: str, default: int) -> int:
    try:
        return int(query.get(key, default))
    except ValueError as exc:
        raise BusUrlError(f"{url!r}: {key} is a whole number") from exc


def _rs485(url: str, query: dict[str, str]) -> Rs485Settings | None:
    enabled = query.get("rs485", "off").lower()
    if enabled not in {"on", "off", "1", "0"}:
        raise BusUrlError(f"{url!r}: rs485 is on or off")
    extra = {k for k in query if k.startswith("rs485_")}
    if enabled in {"off", "0"}:
        if extra:
            raise BusUrlError(f"{url!r}: {', '.join(sorted(extra))} need(s) rs485=on")
        return None
    rts = query.get("rs485_rts", "high").lower()
    if rts not in {"high", "low"}:
        raise BusUrlError(f"{url!r}: rs485_rts (the RTS level while sending) is high or low")
    delays = [
        _whole(url, query, key, 0) for key in ("rs485_delay_before_ms", "rs485_delay_after_ms")
    ]
    if not all(0 <= d <= MAX_RS485_DELAY_MS for d in delays):
        raise BusUrlError(f"{url!r}: RS-485 delays are 0-{MAX_RS485_DELAY_MS} ms")
    return Rs485Settings(rts == "high", delays[0], delays[1])


def _serial(url: str) -> SerialEndpoint:
    parts = urlsplit(url)
    if not parts.path or parts.netloc:
        raise BusUrlError(
            f"{url!r}: a serial URL names a device path, e.g. serial:///dev/serial/by-id/usb-..."
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - _SERIAL_OPTIONS
    if unknown:
        raise BusUrlError(f"{url!r}: unknown option(s) {', '.join(sorted(unknown))}")
    baud = _whole(url, query, "baud", DEFAULT_BAUD)
    stopbits = _whole(url, query, "stopbits", 1)
    if baud not in VALID_BAUDS:
        raise BusUrlError(f"{url!r}: baud {baud} is not one of {sorted(VALID_BAUDS)}")
    parity = query.get("parity", DEFAULT_PARITY).upper()
    if parity not in {"N", "E", "O"}:
        raise BusUrlError(f"{url!r}: parity is N, E or O")
    if stopbits not in {1, 2}:
        raise BusUrlError(f"{url!r}: stopbits is 1 or 2")
    return SerialEndpoint(parts.path, baud, parity, stopbits, _rs485(url, query))


def parse_endpoint(url: str) -> Endpoint:
    """Parse a bus URL: RTU over TCP, a Modbus/TCP gateway or a serial port.

    ``tcp://host:port``, ``modbus-tcp://host:port`` or
    ``serial:///dev/...?baud=19200&parity=E&stopbits=1&rs485=on``.
    """
    scheme = urlsplit(url).scheme
    if scheme == "tcp":
        return _tcp(url, "rtu")
    if scheme == "modbus-tcp":
        return _tcp(url, "mbap")
    if scheme == "serial":
        return _serial(url)
    raise BusUrlError(
        f"{url!r}: use tcp://host:port or serial:///dev/... (or modbus-tcp://host:port for "
        f"a Modbus/TCP gateway; got scheme {scheme!r})"
    )


def parse_scanner_endpoint(url: str) -> ScannerEndpoint:
    """Parse a scanner URL: a serial port, a TCP byte stream or ``evdev:///dev/input/...``."""
    parts = urlsplit(url)
    if parts.scheme == "evdev":
        if not parts.path or parts.netloc or parts.query:
            raise BusUrlError(
                f"{url!r}: an evdev URL names an input device, "
                "e.g. evdev:///dev/input/by-id/usb-...-event-kbd"
            )
        return InputDeviceEndpoint(parts.path)
    if parts.scheme == "tcp":
        return _tcp(url, "rtu")
    if parts.scheme == "serial":
        endpoint = _serial(url)
        if endpoint.rs485 is not None:
            raise BusUrlError(f"{url!r}: a scanner is not on RS-485: drop the rs485 options")
        return endpoint
    raise BusUrlError(
        f"{url!r}: use serial:///dev/..., tcp://host:port or evdev:///dev/input/... "
        f"(got scheme {parts.scheme!r})"
    )


# Names the kernel hands out in plugging order: after a reboot or a replug the RS-485
# adapter may be ttyUSB1 and the scanner ttyUSB0. /dev/serial/by-id/ names do not move.
UNSTABLE_DEVICE_PREFIXES = ("/dev/ttyUSB", "/dev/ttyACM", "/dev/input/event")


def unstable_device_name(path: str) -> bool:
    """Whether ``path`` is a kernel-enumerated name that can change across boots and replugs."""
    return any(
        path.startswith(prefix) and path[len(prefix) :].isdigit()
        for prefix in UNSTABLE_DEVICE_PREFIXES
    )
