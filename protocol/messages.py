"""MQTT payloads (DESIGN.md §4.3) as pydantic models; JSON Schemas are generated from these.

Every payload carries ``v`` (this schema version) and ``ts`` (UTC, milliseconds).
Commands are validated strictly: an unknown field is an error, so a backend typo is
answered with a precise reply instead of being silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = SCHEMA_VERSION
    ts: int = Field(description="UTC milliseconds")


class Status(_Message):
    """``status`` (retained, also the last will): is the cabinet's daemon connected."""

    online: bool
    version: str | None = None
    boot_id: str | None = None


class BayView(BaseModel):
    """One bay in the ``state`` snapshot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bay: int = Field(ge=1, le=12)
    online: bool
    door: Literal["open", "closed"] | None
    locked: bool | None
    battery_id: str | None
    battery_present: bool | None
    soc_pct: float | None
    health_pct: float | None
    cell_temp_c: float | None
    bay_temp_c: float | None
    charging: bool | None
    in_service: bool
    out_of_service_reason: str | None = None


class CabinetView(BaseModel):
    """Cabinet-wide sensors in the ``state`` snapshot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    smoke: bool | None
    mains_present: bool | None
    swaps_allowed: bool


class SessionView(BaseModel):
    """The running swap session, if any."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: str
    rider_id: str
    mode: str
    phase: str
    return_bay: int | None
    dispense_bay: int | None


class State(_Message):
    """``state`` (retained): the full snapshot an operator's dashboard shows."""

    cabinet_id: str
    cabinet: CabinetView
    bays: list[BayView]
    session: SessionView | None


class Event(_Message):
    """``events``: one entry of the outbox. ``seq`` is gap-free per cabinet; ``id`` is unique."""

    cabinet_id: str
    seq: int = Field(ge=1)
    id: str
    type: str
    data: dict[str, Any]


class MeterView(BaseModel):
    """The energy meter's reading."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    voltage_v: float
    current_a: float
    power_w: float
    energy_kwh: float


class BayTelemetry(BaseModel):
    """Per-bay measurements."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bay: int
    soc_pct: float | None
    cell_temp_c: float | None
    bay_temp_c: float | None
    charging: bool | None


class Telemetry(_Message):
    """``telemetry`` (QoS 0): periodic measurements and the outbox's health."""

    cabinet_id: str
    cabinet_temp_c: float | None
    meter: MeterView | None
    bays: list[BayTelemetry]
    outbox_depth: int = Field(description="events waiting for the broker's PUBACK")
    outbox_dropped: int = Field(description="telemetry samples dropped while offline")


class Command(BaseModel):
    """A command on ``cmd/<name>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(min_length=1, max_length=64)
    cabinet_id: str | None = Field(default=None, description="if given, must be this cabinet")
    args: dict[str, Any] = Field(default_factory=dict)


class SwapStartArgs(BaseModel):
    """``cmd/swap.start``: the backend authorises a swap for a rider (online path)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rider_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
    mode: Literal["swap", "pickup", "return"] = "swap"


class BayArgs(BaseModel):
    """``cmd/bay.open``, ``bay.enable``: which bay."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bay: int = Field(ge=1, le=12)


class BayDisableArgs(BayArgs):
    """``cmd/bay.disable``: which bay, and why (shown to technicians)."""

    reason: str = Field(min_length=1, max_length=200)


class SettingsArgs(BaseModel):
    """``cmd/settings.set``: the runtime settings a backend may change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    telemetry_interval_s: float | None = Field(default=None, ge=5.0, le=3600.0)
    dispense_min_soc_pct: float | None = Field(default=None, ge=50.0, le=100.0)


class FirmwareUpdateArgs(BaseModel):
    """``cmd/firmware.update``: a signed image by path on the device or http(s) URL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, max_length=2048, description="path, file:// or http(s)://")
    bays: list[Annotated[int, Field(ge=1, le=12)]] | None = Field(
        default=None, min_length=1, max_length=12, description="default: every bay"
    )
    force: bool = Field(default=False, description="flash even if not newer")


class NoArgs(BaseModel):
    """Commands that take no arguments (``state.get``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ReplyError(BaseModel):
    """Why a command failed: a stable ``code`` for programs, a ``message`` for people."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    message: str


class Reply(_Message):
    """The answer to a command (to the MQTT 5 response topic, else ``reply``)."""

    request_id: str | None
    command: str | None
    ok: bool
    result: Any = None
    error: ReplyError | None = None


#: Every message with a generated schema under protocol/schemas/.
SCHEMAS: dict[str, type[BaseModel]] = {
    "status": Status,
    "state": State,
    "event": Event,
    "command": Command,
    "telemetry": Telemetry,
    "cmd.swap.start.args": SwapStartArgs,
    "cmd.bay.args": BayArgs,
    "cmd.bay.disable.args": BayDisableArgs,
    "cmd.settings.set.args": SettingsArgs,
    "cmd.firmware.update.args": FirmwareUpdateArgs,
    "reply": Reply,
}
