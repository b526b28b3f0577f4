"""Parsing of ``bus.url`` / ``scanner.url``: a serial port or an RTU-over-TCP gateway."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

VALID_BAUDS = frozenset({1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200})
DEFAULT_BAUD = 19200
DEFAULT_PARITY = "E"  # Modbus over serial line: 8E1 is the default framing


class BusUrlError(ValueError):
    """A bus or scanner URL that cannot name a port; the message says which part is wrong."""


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    """An RS-485<->Ethernet gateway (or the simulator) carrying raw RTU frames over TCP."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SerialEndpoint:
    """A local serial port (RS-485 adapter, USB-CDC scanner or a pseudo-terminal)."""

    path: str
    baud: int = DEFAULT_BAUD
    parity: str = DEFAULT_PARITY
    stopbits: int = 1

    def __str__(self) -> str:
        return f"serial://{self.path}?baud={self.baud}&parity={self.parity}"


Endpoint = TcpEndpoint | SerialEndpoint


def parse_endpoint(url: str) -> Endpoint:
    """Parse ``tcp://host:port`` or ``serial:///dev/tty...?baud=19200&parity=E&stopbits=1``."""
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError as exc:
            raise BusUrlError(f"{url!r}: the port is not a number in 1-65535") from exc
        if not parts.hostname or port is None:
            raise BusUrlError(
                f"{url!r}: a tcp URL needs a host and a port, e.g. tcp://10.0.0.5:502"
            )
        return TcpEndpoint(parts.hostname, port)
    if parts.scheme == "serial":
        if not parts.path or parts.netloc:
            raise BusUrlError(
                f"{url!r}: a serial URL names a device path, e.g. serial:///dev/ttyUSB0"
            )
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(query) - {"baud", "parity", "stopbits"}
        if unknown:
            raise BusUrlError(f"{url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        try:
            baud = int(query.get("baud", DEFAULT_BAUD))
            stopbits = int(query.get("stopbits", 1))
        except ValueError as exc:
            raise BusUrlError(f"{url!r}: baud and stopbits are whole numbers") from exc
        if baud not in VALID_BAUDS:
            raise BusUrlError(f"{url!r}: baud {baud} is not one of {sorted(VALID_BAUDS)}")
        parity = query.get("parity", DEFAULT_PARITY).upper()
        if parity not in {"N", "E", "O"}:
            raise BusUrlError(f"{url!r}: parity is N, E or O")
        if stopbits not in {1, 2}:
            raise BusUrlError(f"{url!r}: stopbits is 1 or 2")
        return SerialEndpoint(parts.path, baud, parity, stopbits)
    raise BusUrlError(
        f"{url!r}: use tcp://host:port or serial:///dev/... (got scheme {parts.scheme!r})"
    )
