"""A module stood in for during one import, so a library's import of it loads nothing.

Why: several libraries the daemon uses import, at their top, a module they read only
in code the daemon never runs (paho's ``urllib.request`` for proxies, segno's file
writers); each such import costs resident memory for nothing (issue 14). The stand-in
is in ``sys.modules`` only while the library is imported, and taken out after unless
something replaced it meanwhile: whatever imports the real module later gets it.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def standing_in(name: str, stand_in: types.ModuleType) -> Iterator[None]:
    """``stand_in`` is ``sys.modules[name]`` for the ``with`` block, and not after it."""
    sys.modules[name] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
