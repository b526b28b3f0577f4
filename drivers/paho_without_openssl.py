"""paho-mqtt's plain-socket reads and writes in a daemon that left OpenSSL out.

Why: ``cabinet run`` keeps OpenSSL (libcrypto and libssl, ~4 MB resident) unimportable
unless its configuration speaks TLS (cabinet/console/cli.py, ``_needs_openssl``), and a
fleet link on ``mqtt://`` speaks none. paho-mqtt then binds its module global ``ssl`` to
``None``, yet its plain socket reads and writes still name ``ssl.SSLWantReadError`` and
``ssl.SSLWantWriteError`` in their ``except`` clauses. Python evaluates such a clause when
the call raises - a read that would block, every few packets - and ``None.SSLWantReadError``
is an AttributeError: the link drops and reconnects, again and again.

The stand-in gives that global the names paho reads on a plain socket, as exception
classes that nothing raises (no code in the process can: there is no OpenSSL), so those
clauses never match and the clauses after them handle the socket as before. It goes into
paho only where paho's ``ssl`` is ``None`` - OpenSSL held back, no TLS configured - and
only into the paho it was audited against (``fill_in``); any other shape and the caller
loads the real ``ssl`` instead (drivers/mqtt_link.py), trading memory for certainty.

Audit, paho-mqtt 2.2.0 ``paho/mqtt/client.py``: every function that reads the module
global ``ssl`` (``AUDITED_SSL_READERS``; tests/test_paho_without_openssl.py checks the
installed paho's bytecode against it, tests/test_daemon_footprint.py the daemon's link):

* ``Client._sock_recv``, ``Client._sock_send``: ``SSLWantReadError``, ``SSLWantWriteError``
  - every read and write, plain sockets too: the names the stand-in supplies;
* ``Client.tls_set_context`` (``create_default_context``), ``Client.tls_set``
  (``SSLContext``, ``CERT_*``, ``PROTOCOL_*``) - TLS set-up, which a plain link never calls;
* ``Client._ssl_wrap_socket`` (``CertificateError``, ``match_hostname``) - called by
  ``_create_socket`` only ``if self._ssl``, i.e. after a TLS set-up.

Nothing else does: connect, reconnect (``_create_socket``), ``loop_start``/``loop_stop``,
the network loop (which asks ``hasattr(sock, "pending")``, not ``ssl``), ``disconnect`` and
``_sock_close`` read no ``ssl.`` name, and the annotations that name ``ssl`` types are
strings (``from __future__ import annotations``), never evaluated. ``CertificateError``
and ``SSLError`` are supplied too, so a clause naming them on a plain path would not fail.
"""

from __future__ import annotations

import dis
import itertools
import sys
import types
from collections.abc import Iterator
from typing import Final, Literal

import structlog

log = structlog.get_logger("mqtt")

#: What reads paho's module global ``ssl`` (qualified names in ``paho.mqtt.client``).
AUDITED_SSL_READERS: Final = frozenset(
    {
        "Client._sock_recv",
        "Client._sock_send",
        "Client.tls_set_context",
        "Client.tls_set",
        "Client._ssl_wrap_socket",
    }
)
#: The readers on a plain socket's path and the names they read: what the stand-in supplies.
PLAIN_PATH_NAMES: Final = {
    "Client._sock_recv": ("SSLWantReadError", "SSLWantWriteError"),
    "Client._sock_send": ("SSLWantReadError", "SSLWantWriteError"),
}


class PahoShapeError(RuntimeError):
    """The installed paho reads ``ssl`` elsewhere or otherwise than audited above."""


class SSLError(OSError):
    """Raised by nothing: this process has no OpenSSL to raise it."""


class SSLWantReadError(SSLError):
    """Raised by nothing: a plain socket's would-block is BlockingIOError, handled by paho."""


class SSLWantWriteError(SSLError):
    """Raised by nothing: see ``SSLWantReadError``."""


class CertificateError(ValueError):
    """Raised by nothing: no certificate is ever looked at without TLS."""


def _stand_in() -> types.ModuleType:
    module = types.ModuleType("ssl", "paho's ssl in a process without OpenSSL (no TLS).")
    for cls in (SSLError, SSLWantReadError, SSLWantWriteError, CertificateError):
        setattr(module, cls.__name__, cls)
    return module


#: The one stand-in (never in ``sys.modules``: nothing but paho's global refers to it).
STAND_IN: Final = _stand_in()


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _functions(client_module: types.ModuleType) -> Iterator[types.FunctionType]:
    """The module's functions and its classes' (methods, static and class methods, properties).

    Classes nested in them, and the functions a decorator wraps (``__wrapped__``), too: a
    reader the audit cannot see is a stand-in fitted where it was never checked.
    """
    classes: list[type] = []
    pending: list[object] = list(vars(client_module).values())
    while pending:
        value = pending.pop()
        if isinstance(value, type):
            if value.__module__ == client_module.__name__ and value not in classes:
                classes.append(value)
                pending.extend(vars(value).values())
            continue
        parts = (
            (value.fget, value.fset, value.fdel)
            if isinstance(value, property)
            else (getattr(value, "__func__", value),)
        )
        for part in parts:
            function = part
            while isinstance(function, types.FunctionType):
                yield function
                function = getattr(function, "__wrapped__", None)


def ssl_readers(client_module: types.ModuleType) -> dict[str, frozenset[str]]:
    """Every function of ``client_module`` whose code names ``ssl``, and the names it uses.

    ``co_names`` holds a function's globals and attribute names together, so this may name
    more than the functions that read the global (never fewer): a refusal, never a miss.
    """
    readers: dict[str, frozenset[str]] = {}
    for function in _functions(client_module):
        if function.__module__ != client_module.__name__:
            continue  # imported from elsewhere (typing's, enum's): not paho's reads
        for code in _code_objects(function.__code__):
            if "ssl" in code.co_names:
                readers[code.co_qualname] = frozenset(code.co_names)
    return readers


def names_read_from_ssl(client_module: types.ModuleType) -> dict[str, frozenset[str]]:
    """Per function naming ``ssl``, exactly what it reads off it (``""``: ``ssl`` used otherwise).

    ``co_names`` (``ssl_readers``) mixes every object's attributes, so it cannot tell an
    added ``ssl.NAME`` from another name; the bytecode can. ``dis`` is loaded in the daemon
    already (``inspect``, for asyncio and structlog): no memory.
    """
    read: dict[str, frozenset[str]] = {}
    for function in _functions(client_module):
        if function.__module__ != client_module.__name__:
            continue
        for code in _code_objects(function.__code__):
            if "ssl" not in code.co_names:
                continue
            instructions = list(dis.get_instructions(code))
            names = {
                following.argval if following.opname in {"LOAD_ATTR", "LOAD_METHOD"} else ""
                for here, following in itertools.pairwise(instructions)
                if here.opname in {"LOAD_GLOBAL", "LOAD_NAME"} and here.argval == "ssl"
            }
            read[code.co_qualname] = frozenset(names)
    return read


def fill_in(client_module: types.ModuleType) -> bool:
    """Give paho's ``ssl`` the stand-in if it is ``None``; whether the stand-in is in place.

    False: paho has the real ``ssl`` (TLS configured, or nothing held it back) and needs
    nothing. Raises ``PahoShapeError`` if paho is not the shape audited above; the caller
    then loads OpenSSL (``load_openssl``).
    """
    current = getattr(client_module, "ssl", STAND_IN)
    if current is STAND_IN:
        return True
    if current is not None:
        return False
    readers = ssl_readers(client_module)
    if set(readers) != AUDITED_SSL_READERS:
        raise PahoShapeError(
            f"{client_module.__name__} reads ssl in {sorted(readers)}, "
            f"audited: {sorted(AUDITED_SSL_READERS)}"
        )
    read = names_read_from_ssl(client_module)
    for reader, names in PLAIN_PATH_NAMES.items():
        # exactly these: a name more is a clause the stand-in cannot answer (AttributeError)
        if read.get(reader) != frozenset(names):
            raise PahoShapeError(f"{reader} reads ssl.{sorted(read.get(reader, ()))}, not {names}")
    vars(client_module)["ssl"] = STAND_IN  # paho's module global, as its import would
    return True


def fit(client_module: types.ModuleType) -> Literal["openssl", "stand_in"]:
    """Fit paho for a plain socket: the stand-in if audited (``fill_in``), else OpenSSL."""
    try:
        if fill_in(client_module):
            return "stand_in"
    except PahoShapeError as exc:
        # the link must work: OpenSSL's ~4 MB are the price of a paho nobody audited
        log.warning("paho_not_audited_without_openssl_loading_it", detail=str(exc))
        load_openssl(client_module)
    return "openssl"


def load_openssl(client_module: types.ModuleType) -> None:
    """Let OpenSSL in after all and give paho the real ``ssl`` it would have imported."""
    for name in ("ssl", "_ssl"):
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]  # the hold-back's "not importable" marker
    import ssl  # noqa: PLC0415 - only here, where paho's shape was not the audited one

    vars(client_module)["ssl"] = ssl
