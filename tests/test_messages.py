"""Message models: committed JSON Schemas are current, and state is reported by exception."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from cabinet.core.swap_machine import Mode, Phase
from cabinet.daemon.fleet_link import significant
from protocol import catalogue, messages
from protocol.schema_files import SCHEMA_DIR, render, render_docs

REPO = Path(__file__).resolve().parent.parent


def test_committed_schemas_match_the_models() -> None:
    rendered = render()
    on_disk = {p.name for p in SCHEMA_DIR.glob("*.schema.json")}
    assert on_disk == set(rendered), "run `make schemas`"
    for name, text in rendered.items():
        assert (SCHEMA_DIR / name).read_text() == text, f"{name} is stale: run `make schemas`"


def _state(soc: float | None, door: str = "closed") -> messages.State:
    bay = messages.BayView(
        bay=1,
        online=True,
        door=door,
        locked=True,
        battery_id="BAT-1",
        battery_present=True,
        soc_pct=soc,
        health_pct=90,
        cell_temp_c=25,
        bay_temp_c=25,
        charging=True,
        in_service=True,
    )
    cabinet = messages.CabinetView(smoke=False, mains_present=True, swaps_allowed=True)
    bays = [bay, *(bay.model_copy(update={"bay": n}) for n in range(2, 13))]
    return messages.State(ts=0, cabinet_id="c", cabinet=cabinet, bays=bays, session=None)


def test_state_is_republished_only_on_significant_change() -> None:
    assert not significant(_state(50.0), _state(50.6))  # inside the SoC deadband
    assert significant(_state(50.0), _state(51.0))
    assert significant(_state(50.0), _state(50.0, door="open"))  # doors always count
    assert significant(_state(50.0), _state(None))


def test_the_catalogue_knows_the_swap_machine_s_phases_and_modes() -> None:
    assert set(catalogue.PHASES) == {p.value for p in Phase}
    assert set(catalogue.MODES) == {m.value for m in Mode}


#: ``emit(db, "x.y"``, ``Emit("x.y"``, ``self.event("x.y"``, over line breaks too
_EMITTED = re.compile(r'(?:emit|Emit|event)\(\s*(?:db,\s*)?"([a-z_]+\.[a-z_]+)"')
_ALARM = re.compile(r'(?:"kind":\s*|Alarm\(\s*|_alarm\(\s*"alarm\.[a-z]+",\s*)"([a-z_]+)"')


def _source() -> str:
    files = [*REPO.glob("cabinet/**/*.py"), *REPO.glob("firmware_bridge/**/*.py")]
    return "\n".join(f.read_text() for f in files)


def test_every_event_type_and_alarm_kind_the_code_emits_is_in_the_catalogue() -> None:
    """A new emit site without a catalogue entry would be rejected by the event schema."""
    source = _source()
    emitted = set(_EMITTED.findall(source))
    assert emitted, "the pattern found no emit site: fix the test"
    assert emitted - set(catalogue.EVENTS) == set(), "add them to protocol/catalogue.py"
    kinds = set(_ALARM.findall(source))
    assert kinds and kinds - set(catalogue.ALARM_KINDS) == set(), "add to ALARM_KINDS"


def test_command_arguments_are_strict() -> None:
    for bad in (True, "3", 3.5):
        with pytest.raises(ValidationError):
            messages.BayArgs.model_validate({"bay": bad})
    with pytest.raises(ValidationError):
        messages.FirmwareUpdateArgs.model_validate({"source": "x", "bays": ["1"]})
    assert messages.SettingsArgs.model_validate({"telemetry_interval_s": 5}).telemetry_interval_s


def test_a_state_has_exactly_twelve_bays() -> None:
    with pytest.raises(ValidationError):
        messages.State.model_validate({**_state(50.0).model_dump(), "bays": []})


def test_the_docs_catalogue_tables_are_current() -> None:
    for path, text in render_docs().items():
        assert path.read_text() == text, f"{path.name}'s catalogue tables are stale: make schemas"


def test_every_error_code_the_code_can_reply_with_is_in_the_catalogue() -> None:
    """A reply with an uncatalogued code would break the `reply` schema's enum."""
    source = _source()
    codes = set(re.findall(r'(?:CommandError|FirmwareRefusedError)\(\s*"([a-z_]+)"', source))
    codes |= {"not_ready", "busy", "maintenance", "safety_lockout", "journal_unwritable"}
    images = [REPO / "firmware_bridge" / "image.py", REPO / "firmware_bridge" / "image_file.py"]
    image_source = "\n".join(p.read_text() for p in images if p.exists())
    codes |= set(re.findall(r'Error\(\s*"([a-z_]+)"', image_source))  # firmware.update refusals
    assert "invalid_args" in codes, "the pattern found no raise site: fix the test"
    assert codes - set(catalogue.REPLY_ERROR_CODES) == set(), "add to REPLY_ERROR_CODES"
