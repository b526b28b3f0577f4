"""The rider's QR code: drawn as segno's own SVG writer draws it, without loading that writer."""

from __future__ import annotations

import importlib
import textwrap

from hypothesis import given, settings
from hypothesis import strategies as st

from cabinet.daemon.display.challenges import payload
from cabinet.daemon.display.qr_code import qr_svg
from tests.conftest import fresh_python

#: the payload's alphabet: cabinet ids and ``secrets.token_urlsafe`` challenges
URL_SAFE = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=40
)


def _segnos_own(data: str) -> str:
    """What the daemon drew before: segno's writer (loaded here, in the test process)."""
    importlib.import_module("segno.writers")  # the real one, now that a test wants it
    import segno  # noqa: PLC0415

    return str(segno.make(data, error="m", micro=False).svg_inline(border=4, omitsize=True))


# the first example pays segno's import and tables: no per-example deadline (a loaded CI)
@settings(max_examples=150, deadline=None)
@given(cabinet_id=URL_SAFE.filter(bool), challenge=URL_SAFE)
def test_the_code_is_segnos_own_svg_byte_for_byte(cabinet_id: str, challenge: str) -> None:
    data = payload(cabinet_id, challenge)
    assert qr_svg(data) == _segnos_own(data)


@settings(deadline=None)
@given(st.text(max_size=120))
def test_any_text_is_drawn_as_segno_draws_it(data: str) -> None:
    assert qr_svg(data) == _segnos_own(data)


def test_drawing_the_code_loads_no_file_writer() -> None:
    """In a fresh interpreter, as in the daemon: no gzip, xml, urllib.request or email."""
    script = textwrap.dedent(
        """
        import sys
        from cabinet.daemon.display.qr_code import qr_svg
        assert qr_svg("swapcab:1:cab:abc").startswith('<svg viewBox="0 0 ')
        print(sorted(m for m in sys.modules if m.split(".")[0] in
              {"gzip", "xml", "email", "urllib", "http"} or m == "segno.writers"))
        """
    )
    out = fresh_python(script)
    assert out.strip() in {"['urllib', 'urllib.parse']", "[]"}, out


def test_segnos_own_writers_still_work_after_the_daemon_drew_a_code() -> None:
    """A save or a terminal code later in the same process (a test, the demo) gets the writer."""
    script = textwrap.dedent(
        """
        import sys
        from cabinet.daemon.display.qr_code import qr_svg
        qr_svg("swapcab:1:cab:abc")
        assert "segno.writers" not in sys.modules and "gzip" not in sys.modules
        import segno
        from segno import writers
        assert segno.make("x").svg_inline().startswith("<svg")
        assert callable(writers.save) and "gzip" in sys.modules
        print("ok")
        """
    )
    out = fresh_python(script)
    assert out.strip() == "ok"
