"""Where the simulator listens: ``tcp://`` or ``modbus-tcp://host:port`` (port 0: a free one) or ``pty:///path``.

``tcp://`` serves RTU frames over TCP (an RTU-over-TCP gateway); ``modbus-tcp://`` serves
Modbus/TCP (MBAP), as a serial-to-Ethernet gateway in Modbus/TCP mode does.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


class EndpointError(ValueError):
    """A simulator endpoint URL that cannot be listened on."""


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """A parsed listen URL: a TCP address, or the path of a pseudo-terminal symlink."""

    kind: str  # "tcp", "modbus-tcp" or "pty"
    host: str = "127.0.0.1"
    port: int = 0
    path: str = ""


def parse_listen(url: str, *, allow_pty: bool = True, allow_mbap: bool = False) -> ListenSpec:
    """Parse a listen URL, refusing forms the endpoint cannot serve."""
    parts = urlsplit(url)
    if parts.scheme == "tcp" or (parts.scheme == "modbus-tcp" and allow_mbap):
        try:
            port = parts.port
        except ValueError as exc:
            raise EndpointError(f"{url!r}: the port is not a number") from exc
        return ListenSpec(parts.scheme, parts.hostname or "127.0.0.1", port or 0)
    if parts.scheme == "pty" and allow_pty:
        if not parts.path:
            raise EndpointError(
                f"{url!r}: a pty URL names the symlink to create, e.g. pty:///tmp/bus"
            )
        return ListenSpec("pty", path=parts.path)
    forms = ["tcp://host:port"]
    forms += ["modbus-tcp://host:port"] if allow_mbap else []
    forms += ["pty:///path"] if allow_pty else []
    raise EndpointError(f"{url!r}: use {' or '.join(forms)}")
