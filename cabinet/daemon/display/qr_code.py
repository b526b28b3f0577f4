"""The dynamic QR code as inline SVG: segno's encoder, without segno's file writers.

Why: segno's ``writers`` module (PNG, PDF, EPS, terminal... 1,600 lines) and what it
imports - ``gzip``, ``xml.sax``, and through ``xml.sax.saxutils`` ``urllib.request``,
``http.client`` and most of ``email`` - cost the daemon ~3 MB resident (issue 14: with the
rider's screen on too, ``cabinet run`` must fit in 40 MB), for one SVG path. segno's package
imports ``writers`` at its top but reads it only in the methods that save, print or
serialise a code, none of which is called here.

``importing_segno`` gives that import a stand-in that loads the real module the first
time anything reads from it, and takes it out of ``sys.modules`` again afterwards (as
drivers/paho_without_proxy_support.py does for paho's ``urllib.request``): a save, a print
or ``from segno import writers`` later in the same process (a test, the demo) still works,
and the daemon, which reads nothing from it, never loads it. ``qr_svg`` draws the
matrix segno encodes as segno's own SVG writer would, byte for byte (one stroke per run of
dark modules in a row, relative moves): tests/test_display_qr.py checks it against that
writer.
"""

from __future__ import annotations

import importlib
import itertools
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

from drivers.module_stand_in import standing_in

_WRITERS = "segno.writers"
#: modules of white around the code: phone cameras need the quiet zone to find it
QUIET_ZONE = 4


@contextmanager
def importing_segno() -> Iterator[bool]:
    """Around segno's import: ``segno.writers`` not loaded for it; yields whether it was not."""
    if "segno" in sys.modules or _WRITERS in sys.modules:
        yield False  # imported already (a test, the demo): nothing to save
        return
    with standing_in(_WRITERS, _WritersOnFirstUse(_WRITERS, "loaded when first read")):
        yield True


class _WritersOnFirstUse(types.ModuleType):
    """What segno's package binds as ``writers``: the real module, once something reads it.

    segno's ``__init__`` does ``from . import writers``, so its ``writers`` name (and
    ``from segno import writers`` elsewhere) is this object for good: a save, a print or
    a terminal code (a test, the demo) reads an attribute, and gets the real module's.
    """

    def __getattr__(self, name: str) -> object:
        if sys.modules.get(_WRITERS) is self:
            del sys.modules[_WRITERS]
        real = importlib.import_module(_WRITERS)  # rebinds segno.writers to it, too
        return getattr(real, name)


with importing_segno():
    import segno


def qr_svg(data: str) -> str:
    """``data`` as a QR code (level M, never micro): inline SVG, black on no background."""
    matrix = segno.make(data, error="m", micro=False).matrix
    size = len(matrix) + 2 * QUIET_ZONE
    steps: list[str] = []
    at = (0, 0)  # where the pen is, in modules; strokes run along the middle of a row
    for row, line in enumerate(matrix, start=QUIET_ZONE):
        for column, length in _dark_runs(line, QUIET_ZONE):
            move = (column - at[0], row - at[1])
            if steps:
                steps.append(f"m{move[0]} {move[1]}h{length}")
            else:
                steps.append(f"M{move[0]} {move[1] + 0.5}h{length}")
            at = (column + length, row)
    return (
        f'<svg viewBox="0 0 {size} {size}" class="segno">'
        f'<path class="qrline" stroke="#000" d="{"".join(steps)}"/></svg>'
    )


def _dark_runs(line: bytes | bytearray, column: int) -> Iterator[tuple[int, int]]:
    """(first column, length) of each run of dark modules in one row of the matrix."""
    for dark, run in itertools.groupby(line):
        length = sum(1 for _ in run)
        if dark:
            yield column, length
        column += length
