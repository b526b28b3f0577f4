"""Message models: committed JSON Schemas are current, and state is reported by exception."""

from __future__ import annotations

from cabinet.fleet_link import significant
from protocol import messages
from protocol.schema_files import SCHEMA_DIR, render


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
    return messages.State(ts=0, cabinet_id="c", cabinet=cabinet, bays=[bay], session=None)


def test_state_is_republished_only_on_significant_change() -> None:
    assert not significant(_state(50.0), _state(50.6))  # inside the SoC deadband
    assert significant(_state(50.0), _state(51.0))
    assert significant(_state(50.0), _state(50.0, door="open"))  # doors always count
    assert significant(_state(50.0), _state(None))
