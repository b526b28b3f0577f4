"""MQTT payloads (DESIGN.md §4.3) as pydantic models; JSON Schemas are generated from these.

Every payload carries ``v`` (this schema version) and ``ts`` (UTC, milliseconds).
Commands are validated strictly: an unknown field is an error, so a backend typo is
answered with a precise reply instead of being silently ignored, and command arguments
are *strict* types (pydantic strict mode): ``true`` is not bay 1 and ``"3"`` is not bay 3,
exactly as the shipped JSON Schemas say (issue 15).

The schemas are strict enough for an independent validator to enforce what docs/mqtt.md
promises: ``v`` is required and ``const 1``, ``state.bays`` has exactly 12 entries, SoC
and health are 0-100, phases/modes/doors/error codes are the catalogue's
(protocol/catalogue.py), a reply carries ``result`` and ``error`` together only for
``duplicate_request``, and each event type has its own ``data`` schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from protocol.catalogue import EVENTS, REPLY_ERROR_CODES, DoorName, ModeName, PhaseName

SCHEMA_VERSION: Final = 1

#: a state of charge or health: the BMS reports 0-100, anything else is a bad reading
Percent = Annotated[float, Field(ge=0.0, le=100.0)]


def _require_v(schema: dict[str, Any]) -> None:
    """``v`` has a default in Python but is required on the wire (consumers dispatch on it)."""
    required = schema.setdefault("required", [])
    if "v" not in required:
        required.insert(0, "v")


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_require_v)

    v: Literal[1] = SCHEMA_VERSION
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
    door: DoorName | None
    locked: bool | None
    battery_id: str | None
    battery_present: bool | None
    soc_pct: Percent | None
    health_pct: Percent | None
    cell_temp_c: float | None
    bay_temp_c: float | None
    charging: bool | None
    in_service: bool
    out_of_service_reason: str | None = None
    offline_since: int | None = Field(
        default=None, description="UTC ms since when the bay's board does not answer"
    )


class CabinetView(BaseModel):
    """Cabinet-wide sensors in the ``state`` snapshot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    smoke: bool | None
    mains_present: bool | None
    swaps_allowed: bool
    board_online: bool | None = Field(
        default=None, description="the cabinet board answers on the bus (None: not yet asked)"
    )
    meter_online: bool | None = Field(
        default=None, description="the energy meter answers on the bus (None: not yet asked)"
    )
    refusal: str | None = Field(
        default=None,
        description="why no swap can start now (e.g. journal_unwritable, safety_lockout, busy)",
    )


class SessionView(BaseModel):
    """The running swap session, if any."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: str
    rider_id: str
    mode: ModeName
    phase: PhaseName
    return_bay: int | None
    dispense_bay: int | None


class State(_Message):
    """``state`` (retained): the full snapshot an operator's dashboard shows."""

    cabinet_id: str
    cabinet: CabinetView
    bays: list[BayView] = Field(min_length=12, max_length=12, description="bays 1-12, in order")
    session: SessionView | None


class Event(_Message):
    """``events``: one entry of the outbox. ``seq`` is gap-free per cabinet; ``id`` is unique."""

    cabinet_id: str
    seq: int = Field(ge=1)
    id: str
    type: str = Field(description="one of protocol/catalogue.py EVENTS; the schema is per type")
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

    bay: int = Field(ge=1, le=12)
    soc_pct: Percent | None
    cell_temp_c: float | None
    bay_temp_c: float | None
    charging: bool | None


class Telemetry(_Message):
    """``telemetry`` (QoS 1, held through a broker outage): periodic measurements and the outbox."""

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


class _Args(BaseModel):
    """Command arguments: unknown fields are errors and types are strict (no coercion)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SwapStartArgs(_Args):
    """``cmd/swap.start``: the backend authorises a swap for a rider (online path)."""

    rider_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
    mode: ModeName = "swap"
    #: the cabinet screen's QR challenge the rider's app scanned (docs/mqtt.md)
    challenge: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{8,64}$")
    #: the rider's language for the screen and voice during this session
    lang: Literal["en", "zh-CN"] | None = None


class BayArgs(_Args):
    """``cmd/bay.open``, ``bay.enable``: which bay."""

    bay: int = Field(ge=1, le=12)


class BayDisableArgs(BayArgs):
    """``cmd/bay.disable``: which bay, and why (shown to technicians)."""

    reason: str = Field(min_length=1, max_length=200)


class SettingsArgs(_Args):
    """``cmd/settings.set``: the runtime settings a backend may change."""

    telemetry_interval_s: float | None = Field(default=None, ge=5.0, le=3600.0)
    dispense_min_soc_pct: float | None = Field(default=None, ge=50.0, le=100.0)


class FirmwareUpdateArgs(_Args):
    """``cmd/firmware.update``: a signed image by path on the device or http(s) URL."""

    source: str = Field(min_length=1, max_length=2048, description="path, file:// or http(s)://")
    bays: list[Annotated[int, Field(ge=1, le=12)]] | None = Field(
        default=None, min_length=1, max_length=12, description="default: every bay"
    )
    force: bool = Field(default=False, description="flash even if not newer")


class NoArgs(_Args):
    """Commands that take no arguments (``state.get``)."""


class ReplyError(BaseModel):
    """Why a command failed: a stable ``code`` for programs, a ``message`` for people."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: not a Literal at run time: a reply must always go out, even with a code the
    #: catalogue forgot; the schema's enum (and the traffic test) catch that instead
    code: str = Field(json_schema_extra={"enum": list(REPLY_ERROR_CODES)})
    message: str


def _reply_rule(schema: dict[str, Any]) -> None:
    """docs/mqtt.md §2: ``result`` or ``error``, the other null; both only for a duplicate.

    ``ok: true`` has no error; ``ok: false`` has one; a refusal carries a ``result`` only
    when its code is ``duplicate_request`` (the first attempt's reply, §3.1).
    """
    _require_v(schema)
    null = {"const": None}
    schema["allOf"] = [
        {
            "if": {"properties": {"ok": {"const": True}}, "required": ["ok"]},
            "then": {"properties": {"error": null}},
            "else": {"properties": {"error": {"type": "object"}}, "required": ["error"]},
        },
        {
            "if": {
                "properties": {"error": {"type": "object"}},
                "required": ["error"],
                "not": {
                    "properties": {
                        "error": {"properties": {"code": {"const": "duplicate_request"}}}
                    }
                },
            },
            "then": {"properties": {"result": null}},
        },
    ]


class Reply(_Message):
    """The answer to a command (to the MQTT 5 response topic, else ``reply``)."""

    model_config = ConfigDict(json_schema_extra=_reply_rule)

    request_id: str | None
    command: str | None
    ok: bool
    result: Any = None
    error: ReplyError | None = None


def _typed_event(type_: str) -> type[Event]:
    """The envelope with ``type`` fixed to one catalogue entry and ``data`` its model.

    Built only for the schema files (tools/gen_schemas.py, the contract tests): the daemon
    never validates its own events, so it neither builds these models nor imports
    ``create_model``/``TypeAdapter`` (DESIGN.md §6, resident memory).
    """
    from pydantic import create_model  # noqa: PLC0415 - schema generation only

    name = "".join(part.capitalize() for part in type_.replace("_", ".").split(".")) + "Event"
    fixed_type: Any = Literal[type_]  # built at run time: one literal per catalogue entry
    return create_model(
        name,
        __base__=Event,
        __doc__=f"``{type_}``: {EVENTS[type_].doc}",
        type=(fixed_type, ...),
        data=(EVENTS[type_].data, ...),
    )


def event_schema() -> dict[str, Any]:
    """``events``: one schema per event type (a ``oneOf`` discriminated by ``type``).

    An event whose ``data`` does not match its type, or whose type is not in the
    catalogue, is invalid.
    """
    from pydantic import TypeAdapter  # noqa: PLC0415 - schema generation only

    union: Any = Union[tuple(_typed_event(type_) for type_ in EVENTS)]  # noqa: UP007
    adapter: TypeAdapter[Any] = TypeAdapter(Annotated[union, Field(discriminator="type")])
    schema = adapter.json_schema()
    schema["title"] = "Event"
    schema["description"] = Event.__doc__
    return schema


#: Every message with a generated schema under protocol/schemas/.
SCHEMAS: dict[str, type[BaseModel]] = {
    "status": Status,
    "state": State,
    "command": Command,
    "telemetry": Telemetry,
    "cmd.swap.start.args": SwapStartArgs,
    "cmd.bay.args": BayArgs,
    "cmd.bay.disable.args": BayDisableArgs,
    "cmd.settings.set.args": SettingsArgs,
    "cmd.firmware.update.args": FirmwareUpdateArgs,
    "reply": Reply,
}
