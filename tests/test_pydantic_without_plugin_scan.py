"""pydantic without its plugin scan: the daemon's models work, and nothing else changes.

Each case runs in a fresh interpreter: what is tested is what a process imports.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from tests.conftest import fresh_python

_PROCESS = textwrap.dedent(
    """
    import json, os, sys
    from cabinet.console.pydantic_without_plugin_scan import skip_plugin_scan

    kept_out = skip_plugin_scan()
    from pydantic import BaseModel
    from pydantic.plugin import _loader

    class Bay(BaseModel):
        number: int

    assert Bay.model_validate({"number": "3"}).number == 3
    report = {
        "kept_out": kept_out,
        "metadata_loaded": "importlib.metadata" in sys.modules,
        "plugins": list(_loader.get_plugins()),
        "switch": os.environ.get("PYDANTIC_DISABLE_PLUGINS"),
    }
    # called after all (a plugin list, say): the real entry points, imported then
    from importlib.metadata import entry_points
    report["same_entry_points"] = sorted(
        e.name for e in _loader.entry_points(group="console_scripts")
    ) == sorted(e.name for e in entry_points(group="console_scripts"))
    print(json.dumps(report))
    """
)


def _report(switch: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    if switch is not None:
        env["PYDANTIC_DISABLE_PLUGINS"] = switch
    report: dict[str, object] = json.loads(fresh_python(_PROCESS, env=env))
    return report


def test_models_work_without_importlib_metadata_loaded() -> None:
    report = _report(None)
    assert report == {
        "kept_out": True,
        "metadata_loaded": False,
        "plugins": [],
        "switch": "__all__",
        "same_entry_points": True,
    }


@pytest.mark.parametrize("switch", ["true", "1"])
def test_the_users_own_no_plugins_switch_stays(switch: str) -> None:
    report = _report(switch)
    assert report["switch"] == switch
    assert report["kept_out"] is True
    assert report["metadata_loaded"] is False


def test_a_user_who_wants_some_plugins_gets_pydantic_as_it_is() -> None:
    """A list of plugins to leave out means the others are looked for: nothing is changed."""
    report = _report("some_plugin")
    assert report["switch"] == "some_plugin"
    assert report["kept_out"] is False
    assert report["metadata_loaded"] is True
