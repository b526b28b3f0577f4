"""paho-mqtt imported without ``urllib.request``, which only its proxy support reads.

Why: paho 2.2 imports ``urllib.request`` at its top, and with it ``http.client`` and most of
``email``: ~0.65 MB resident in a daemon that never sends an HTTP request (~1.7 MB where
nothing else loads ``email``: console/pydantic_without_plugin_scan.py). paho reads it in
one place, ``Client._get_proxy``, and only after ``if socks is None: return None``: without
PySocks (paho's optional ``proxy`` extra) paho has no proxy support and never touches it.
PySocks is no dependency of ours, and ``cabinet run`` keeps it out where something else
installed it (selenium, in a development install: console/cli.py), so the daemon's
proxy-less link is the same everywhere.

``importing_paho`` lets paho's ``import urllib.request`` succeed with a module that stays
empty, and takes it out of ``sys.modules`` again afterwards: whatever imports
``urllib.request`` later gets the real one, and so would paho's ``urllib.request`` (it reads
the attribute off the ``urllib`` package at call time). It does so only where paho will
have no ``socks``; tests/test_paho_without_openssl.py checks that ``_get_proxy`` is still
the only reader (``URLLIB_READERS``).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from drivers.module_stand_in import standing_in

#: What reads paho's ``urllib`` (qualified names in ``paho.mqtt.client``).
URLLIB_READERS: Final = frozenset({"Client._get_proxy"})
_NAME = "urllib.request"


def proxy_support_possible() -> bool:
    """Whether paho will find PySocks (then it may read ``urllib.request``)."""
    if "socks" in sys.modules:
        return sys.modules["socks"] is not None  # None: held back (console/cli.py)
    return importlib.util.find_spec("socks") is not None


@contextmanager
def importing_paho() -> Iterator[bool]:
    """Around paho's import: ``urllib.request`` not loaded for it; yields whether it was not."""
    if _NAME in sys.modules or proxy_support_possible():
        yield False  # loaded already (nothing to save), or paho's proxy support may need it
        return
    empty = types.ModuleType(_NAME, "Never read: paho's proxy support is off (no socks).")
    with standing_in(_NAME, empty):
        yield True
