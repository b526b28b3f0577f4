"""pydantic in the daemon without its plugin scan, and without what the scan would import.

Why: the first model pydantic builds asks ``pydantic.plugin._loader.get_plugins`` for
plugins, which reads the entry points of every installed distribution; the daemon uses no
pydantic plugin. ``PYDANTIC_DISABLE_PLUGINS`` is pydantic's documented switch for that, but
it saves little (~0.1 MB): the loader module imports ``importlib.metadata`` at its top
whether it scans or not, and with it ``zipfile``, ``csv``, ``email``, ``importlib.resources``
and ``tempfile`` - ~0.7 MB resident, ~1.8 MB where paho's ``urllib.request`` does not
load ``email`` too (drivers/paho_without_proxy_support.py) - for one function that,
switched off, is never called.

``skip_plugin_scan`` sets the switch (unless the user set it) and imports pydantic's
loader with an ``entry_points`` that imports the real ``importlib.metadata`` the first time
it is called: pydantic behaves as before in every case, a call only comes later than it
would. The stand-in module is in ``sys.modules`` only while the loader is imported; if the
loader is not where it was or asks for anything else, nothing is changed and pydantic
imports ``importlib.metadata`` as it always did.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

SWITCH = "PYDANTIC_DISABLE_PLUGINS"
#: pydantic's values for "no plugins at all" (``get_plugins`` returns before looking)
NO_PLUGINS = ("__all__", "1", "true")
LOADER = "pydantic.plugin._loader"
_METADATA = "importlib.metadata"


def entry_points(**params: Any) -> Any:
    """``importlib.metadata.entry_points``, imported the first time it is called."""
    from importlib.metadata import entry_points as real  # noqa: PLC0415 - the point

    return real(**params)


def _real(name: str) -> Any:
    """Any other name of the stand-in: the real module's, imported now.

    A loader of another shape (``import importlib.metadata as m``, then
    ``m.distributions()``, as some pydantic 2.x releases do) keeps the stand-in for good:
    it must still answer as the real module would.
    """
    if name.startswith("__"):  # the import system's questions (``__path__``...): a module's answer
        raise AttributeError(name)
    if getattr(sys.modules.get(_METADATA), "__getattr__", None) is _real:
        del sys.modules[_METADATA]  # asked while the loader is imported: the real one now
    return getattr(importlib.import_module(_METADATA), name)


def skip_plugin_scan() -> bool:
    """No pydantic plugins in this process; whether ``importlib.metadata`` was kept out.

    Call before the first model is built (``cabinet run`` does, before its parser).
    """
    os.environ.setdefault(SWITCH, NO_PLUGINS[0])  # a value the user set stays
    if os.environ[SWITCH] not in NO_PLUGINS or LOADER in sys.modules or _METADATA in sys.modules:
        return False  # plugins may be looked for, or it is too late: as pydantic does it
    stand_in = types.ModuleType(_METADATA, "importlib.metadata, imported when first used.")
    stand_in.entry_points = entry_points  # type: ignore[attr-defined]
    stand_in.__getattr__ = _real  # type: ignore[method-assign]
    sys.modules[_METADATA] = stand_in
    try:
        importlib.import_module(LOADER)
    except ImportError:
        return False  # another pydantic: its loader imports on first use, the real module
    finally:
        if sys.modules.get(_METADATA) is stand_in:
            del sys.modules[_METADATA]
    return True
