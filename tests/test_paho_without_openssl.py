"""paho on a plain socket in a process without OpenSSL: the stand-in, and its audit.

The daemon on mqtt:// runs without OpenSSL (tests/test_daemon_footprint.py runs one through
a broker restart); these pin down why that is safe for the installed paho, and that a paho
of another shape makes itself known (the audit fails here) and still works (OpenSSL is
loaded for it after all).
"""

from __future__ import annotations

import dis
import inspect
import itertools
import socket
import ssl
import sys
import textwrap
import types
from pathlib import Path

import paho.mqtt.client
import pytest

from drivers import paho_without_openssl, paho_without_proxy_support
from drivers.paho_without_openssl import AUDITED_SSL_READERS, STAND_IN, PahoShapeError
from tests.conftest import fresh_python

#: What each reader of paho's ``ssl`` reads from it, per the docstring's audit.
AUDITED_NAMES = {
    "Client._sock_recv": {"SSLWantReadError", "SSLWantWriteError"},
    "Client._sock_send": {"SSLWantReadError", "SSLWantWriteError"},
    "Client.tls_set_context": {"create_default_context"},
    "Client.tls_set": {
        "SSLContext",
        "CERT_NONE",
        "CERT_REQUIRED",
        "PROTOCOL_TLS",
        "PROTOCOL_TLS_CLIENT",
        "PROTOCOL_TLSv1_2",
    },
    "Client._ssl_wrap_socket": {"CertificateError", "match_hostname"},
}


def _code_objects(code: types.CodeType) -> list[types.CodeType]:
    inner = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return [code, *(d for c in inner for d in _code_objects(c))]


def _names_read_from_ssl(source: str, filename: str) -> dict[str, set[str]]:
    """Per function, every ``ssl.NAME`` its bytecode reads (the global, not ``self._ssl``)."""
    read: dict[str, set[str]] = {}
    for code in _code_objects(compile(source, filename, "exec")):
        instructions = list(dis.get_instructions(code))
        for here, following in itertools.pairwise(instructions):
            if here.opname in {"LOAD_GLOBAL", "LOAD_NAME"} and here.argval == "ssl":
                names = read.setdefault(code.co_qualname, set())
                if following.opname in {"LOAD_ATTR", "LOAD_METHOD"}:
                    names.add(following.argval)
    return read


def test_the_installed_paho_reads_ssl_only_where_audited() -> None:
    """A paho that reads ``ssl`` anywhere else, or other names, fails here: audit it again."""
    path = paho.mqtt.client.__file__
    read = _names_read_from_ssl(Path(path).read_text(encoding="utf-8"), path)
    assert read == AUDITED_NAMES
    assert set(read) == AUDITED_SSL_READERS
    # what a plain socket's path reads, the stand-in has, as exceptions nothing raises
    for reader, names in paho_without_openssl.PLAIN_PATH_NAMES.items():
        assert set(names) == AUDITED_NAMES[reader]
        for name in names:
            assert issubclass(getattr(STAND_IN, name), Exception)
    assert paho_without_openssl.ssl_readers(paho.mqtt.client).keys() == AUDITED_SSL_READERS


def test_the_installed_paho_reads_urllib_only_for_its_proxy_support() -> None:
    """``_get_proxy`` alone, and it returns before that without socks (its first lines)."""
    path = paho.mqtt.client.__file__
    code = compile(Path(path).read_text(encoding="utf-8"), path, "exec")
    readers = {
        inner.co_qualname
        for inner in _code_objects(code)
        for instruction in dis.get_instructions(inner)
        if instruction.opname in {"LOAD_GLOBAL", "LOAD_NAME"} and instruction.argval == "urllib"
    }
    assert readers == paho_without_proxy_support.URLLIB_READERS
    first_lines = inspect.getsource(paho.mqtt.client.Client._get_proxy).splitlines()[1:3]
    assert [line.strip() for line in first_lines] == ["if socks is None:", "return None"]


def test_paho_gets_urllib_request_only_where_its_proxy_support_may_read_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "urllib.request", raising=False)
    monkeypatch.setitem(sys.modules, "socks", types.ModuleType("socks"))  # PySocks found
    with paho_without_proxy_support.importing_paho() as left_out:
        assert left_out is False
        assert "urllib.request" not in sys.modules  # paho would import the real one
    monkeypatch.setitem(sys.modules, "socks", None)  # held back, as `cabinet run` does
    with paho_without_proxy_support.importing_paho() as left_out:
        assert left_out is True
        assert sys.modules["urllib.request"].__dict__.keys() <= {
            "__name__",
            "__doc__",
            "__package__",
            "__loader__",
            "__spec__",
        }
    assert "urllib.request" not in sys.modules  # only while paho is imported


_WITHOUT_OPENSSL = textwrap.dedent(
    """
    import socket, sys
    for name in ("ssl", "_ssl", "_hashlib", "socks"):  # as `cabinet run` holds them back
        sys.modules[name] = None
    import drivers.mqtt_link as link
    import paho.mqtt.client as paho

    assert link.PAHO_SSL == "stand_in" and paho.ssl is link.paho_without_openssl.STAND_IN
    assert sys.modules["ssl"] is None and sys.modules["_ssl"] is None
    assert "urllib.request" not in sys.modules and "http.client" not in sys.modules
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    assert client._get_proxy() is None  # no socks: returns before reading urllib.request
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours
    try:  # nothing to read yet: paho's "try later", not an AttributeError
        client._sock_recv(1)
    except BlockingIOError:
        pass
    theirs.send(b"x")
    assert client._sock_recv(1) == b"x"
    try:  # a full send buffer: paho's "try later" too
        while True:
            client._sock_send(b"x" * 65536)
    except BlockingIOError:
        pass
    import urllib.request  # whoever needs it later gets the real one, paho too
    assert paho.urllib.request is urllib.request and urllib.request.urlopen
    print("plain socket ok")
    """
)


def test_a_plain_socket_works_in_paho_without_openssl() -> None:
    """The reads and writes that broke the link (AttributeError) are paho's own again.

    And paho came without ``urllib.request`` (drivers/paho_without_proxy_support.py).
    """
    assert fresh_python(_WITHOUT_OPENSSL).strip() == "plain socket ok"


def _fake_paho(
    *,
    send_reads: str = "ssl.SSLWantWriteError",
    recv_also: str = "",
    extra: str = "",
    ssl_module: object = None,
) -> types.ModuleType:
    """A module shaped like paho's client: the audited ``ssl`` readers, changed as asked.

    ``recv_also``: one more exception the plain read names (``except recv_also:``).
    """
    module = types.ModuleType("fake_paho_client")
    module.ssl = ssl_module  # type: ignore[attr-defined]
    recv_clause = ""
    if recv_also:
        recv_clause = f"        except {recv_also}:\n            raise ConnectionError\n"
    body = f"""
class Client:
    def _sock_recv(self, n):
        try:
            return self._sock.recv(n)
        except ssl.SSLWantReadError:
            raise BlockingIOError
        except ssl.SSLWantWriteError:
            raise BlockingIOError
{recv_clause}    def _sock_send(self, buf):
        try:
            return self._sock.send(buf)
        except ssl.SSLWantReadError:
            raise BlockingIOError
        except {send_reads}:
            raise BlockingIOError
    def tls_set_context(self): return ssl.create_default_context()
    def tls_set(self): return ssl.SSLContext
    def _ssl_wrap_socket(self): return ssl.CertificateError
{extra}
"""
    exec(body, module.__dict__)  # the test's own source
    return module


def test_the_stand_in_goes_where_paho_has_no_ssl_and_nowhere_else() -> None:
    module = _fake_paho()
    assert paho_without_openssl.fill_in(module) is True
    assert module.ssl is STAND_IN
    assert paho_without_openssl.fill_in(module) is True  # once is enough: left as it is
    with_tls = _fake_paho(ssl_module=ssl)
    assert paho_without_openssl.fill_in(with_tls) is False
    assert with_tls.ssl is ssl  # TLS configured: paho keeps the real thing


@pytest.mark.parametrize(
    "change",
    [
        # a new reader, on a path nobody audited
        {"extra": "    def _loop(self): return ssl.SSLZeroReturnError"},
        # a plain write that stopped naming what the stand-in supplies
        {"send_reads": "OSError"},
    ],
)
def test_a_paho_of_another_shape_gets_openssl_instead(change: dict[str, str]) -> None:
    """The link must work: an unaudited paho costs memory (OpenSSL), never the link."""
    module = _fake_paho(**change)
    with pytest.raises(PahoShapeError):
        paho_without_openssl.fill_in(module)
    assert module.ssl is None
    assert paho_without_openssl.fit(module) == "openssl"
    assert module.ssl is ssl


# -- a paho whose plain-socket read names one more ssl exception (review of 512f459) --


def a_paho_reading_one_more_ssl_name() -> types.ModuleType:
    """paho's shape, but ``_sock_recv`` also names ``ssl.SSLZeroReturnError``.

    A plausible paho 2.x change: the audited functions are the same, the two names are still
    there, and one more would raise AttributeError on a plain socket.
    """
    return _fake_paho(recv_also="ssl.SSLZeroReturnError")


def test_a_plain_read_naming_another_ssl_name_is_refused_the_stand_in() -> None:
    module = a_paho_reading_one_more_ssl_name()
    with pytest.raises(PahoShapeError):
        paho_without_openssl.fill_in(module)


def test_the_daemon_loads_openssl_for_a_paho_reading_another_ssl_name() -> None:
    module = a_paho_reading_one_more_ssl_name()
    assert paho_without_openssl.fit(module) == "openssl", "stand-in fitted to an unaudited read"


def test_that_paho_still_says_try_later_on_a_plain_socket() -> None:
    module = a_paho_reading_one_more_ssl_name()
    paho_without_openssl.fit(module)
    client = module.Client()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        client._sock = ours
        with pytest.raises(BlockingIOError):  # paho's "try later"
            client._sock_recv(1)
