"""Where the simulator listens: ``tcp://host:port`` (port 0 picks a free one) or ``pty:///path``."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


class EndpointError(ValueError):
    """A simulator endpoint URL that cannot be listened on."""


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """A parsed listen URL: a TCP address, or the path of a pseudo-terminal symlink."""

    kind: str  # "tcp" or "pty"
    host: str = "127.0.0.1"
    port: int = 0
    path: str = ""


def parse_listen(url: str, *, allow_pty: bool = True) -> ListenSpec:
    """Parse a listen URL, refusing forms the endpoint cannot serve."""
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError as exc:
            raise EndpointError(f"{url!r}: the port is not a number") from exc
        return ListenSpec("tcp", parts.hostname or "127.0.0.1", port or 0)
    if parts.scheme == "pty" and allow_pty:
        if not parts.path:
            raise EndpointError(
                f"{url!r}: a pty URL names the symlink to create, e.g. pty:///tmp/bus"
            )
        return ListenSpec("pty", path=parts.path)
    forms = "tcp://host:port or pty:///path" if allow_pty else "tcp://host:port"
    raise EndpointError(f"{url!r}: use {forms}")
