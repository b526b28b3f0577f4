"""The one catalogue of event types, alarm kinds, failure reasons and reply error codes.

DESIGN.md §4.3: the docs' tables and the JSON Schemas' enums are generated from here
(``make schemas``), so a name the code emits, a name the docs list and a name the schema
accepts cannot drift apart. Pure data: no I/O.

**Adding an entry** (keep each table sorted by topic, not alphabetically):

* an event type: add ``"type.name": Ev(DataModel, "what it means")`` to :data:`EVENTS`,
  with a ``_Data`` subclass naming the fields the emitter always sets (extra fields are
  allowed, so adding a field to an emit site never breaks a consumer's validation);
* an alarm kind, a swap failure reason, a deposit-rejection reason or a reply error code:
  add ``"name": "when"`` to the matching dict below;

then run ``make schemas`` (the committed schemas and docs tables are tested for staleness).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

# -- value sets shared by the state snapshot and the events -------------------------------

#: The swap machine's phases (cabinet.core.swap_machine.Phase; a test keeps the two equal).
PhaseName = Literal[
    "idle",
    "opening_return",
    "awaiting_deposit",
    "rejecting",
    "opening_dispense",
    "awaiting_pickup",
    "giving_back",
]
#: What an authorisation allows (cabinet.core.swap_machine.Mode).
ModeName = Literal["swap", "pickup", "return"]
#: A bay door as the board reports it (None in ``state`` when the board was never read).
DoorName = Literal["open", "closed"]
PHASES: tuple[str, ...] = get_args(PhaseName)
MODES: tuple[str, ...] = get_args(ModeName)
DOORS: tuple[str, ...] = get_args(DoorName)

# -- names with a meaning --------------------------------------------------------------------

ALARM_KINDS: dict[str, str] = {
    "smoke": "the smoke detector is on: every charger off, contactor open, no new swaps",
    "mains_lost": "no mains power: every charger off, contactor open, no new swaps",
    "bay_overtemp": "a bay's cell over temperature or rising fast: charger off, bay isolated",
    "safety_write_failed": "a charger-off or contactor-open write is not confirmed by read-back",
    "heartbeat_unheard": "a bay's board misses the heartbeat broadcast; the daemon writes it"
    " the heartbeat directly until it hears one again",
    "board_silent": "a bay's board stayed silent `bus.offline_alarm_s`",
    "cabinet_board_silent": "the cabinet board stayed silent `bus.offline_alarm_s`",
    "meter_silent": "the energy meter stayed silent `bus.offline_alarm_s`",
    "door_left_open": "a session's door was left open when its timer ran out",
    "battery_retained": "a refused battery was left inside the return bay",
    "rider_stranded": "a battery was deposited but none was dispensed",
    "dispense_uncertain": "the dispense bay went silent while its door was being opened",
    "battery_missing": "a battery left its bay without a session, or its bay's pack stayed"
    " unreadable for swap.identity_grace_s",
    "journal_unwritable": "the journal cannot be written (disk full?): no new swaps",
    "outbox_backlog": "events are waiting for the broker longer than the alarm threshold",
    "publish_refused": "the broker refused a publish (PUBACK reason code >= 0x80)",
}

SWAP_FAILURE_REASONS: dict[str, str] = {
    "no_dispensable_battery": "at start: no battery may be handed out",
    "no_empty_bay": "at start: no empty bay for the rider's battery",
    "door_failed": "a door failed to open and no other candidate is left",
    "nothing_deposited": "the return door was shut with nothing detected",
    "deposit_timeout": "the deposit timer ran out",
    "deposit_rejected": "the rider took a refused battery back (or left it)",
    "not_collected": "the dispense door was shut without the battery being taken",
    "bay_offline": "a session bay's board went silent",
    "dispense_failed": "no battery could be handed out after a deposit",
    "smoke": "smoke aborted the session",
}

DEPOSIT_REJECTION_REASONS: dict[str, str] = {
    "not_plugged": "the battery is not plugged in",
    "unidentified": "the BMS does not report a battery id",
    "foreign": "the battery does not belong to the fleet",
    "faulted": "the BMS reports a fault",
    "too_hot": "above the deposit temperature window",
    "too_cold": "below the deposit temperature window",
}

#: ``auth.refused`` reasons. Documented, not an enum in the schema yet: issue 15 is adding
#: token rules in parallel, and a refusal must never be invalid for naming a new reason.
AUTH_REFUSAL_REASONS: dict[str, str] = {
    "malformed": "not a token: bad prefix, parts, length, base64url or claims",
    "bad_signature": "no key in `auth.public_keys` verifies the signature",
    "clock_unset": "the cabinet's clock is before 2025-01-01: expiry cannot be judged",
    "expired": "`now > exp`",
    "not_yet_valid": "`iat` is more than the allowed skew in the future",
    "wrong_cabinet": "the token's `cab` is another cabinet",
    "no_cabinet_claim": "the token has no `cab` and `auth.require_cabinet_claim` is on",
    "replayed": "the token's nonce was already used",
    "unknown_challenge": "`swap.start`: a challenge this cabinet never showed",
    "challenge_used": "`swap.start`: the challenge was already used",
    "stale_challenge": "`swap.start`: the challenge is past its validity window",
}

#: ``error.code`` of a reply (docs/mqtt.md §3): the only values a backend has to handle.
REPLY_ERROR_CODES: dict[str, str] = {
    "malformed_json": "the payload is not JSON (or not UTF-8, or holds a lone surrogate,"
    " an integer over 4,300 digits or nesting too deep to parse)",
    "invalid_command": "the envelope breaks the `command` schema",
    "wrong_cabinet": "`cabinet_id` is given and is not this cabinet",
    "unknown_command": "`<name>` is not a known command",
    "duplicate_request": "this `request_id` was handled before; `result` is the first reply",
    "invalid_args": "`args` break the command's schema (strict types, unknown fields)",
    "not_ready": "the daemon has not finished recovery",
    "busy": "a session (or a firmware update, its download included) is running",
    "maintenance": "a technician's self-test is running",
    "safety_lockout": "safety forbids swaps (smoke, mains lost, ...)",
    "journal_unwritable": "the journal cannot be written: the command did nothing",
    "refused": "`swap.start`: the session ended as it started (see `swap.failed`)",
    "unknown_challenge": "`swap.start`: the challenge was never shown by this cabinet",
    "challenge_used": "`swap.start`: the challenge was already used",
    "stale_challenge": "`swap.start`: the challenge is past its validity window",
    "unavailable": "this daemon does not offer the command (e.g. no firmware service)",
    "invalid_source": "`firmware.update`: not a path, `file://`, `http://` or `https://` source"
    " (or a URL with credentials in it)",
    "host_not_allowed": "`firmware.update`: the URL's host is not in `firmware.allowed_hosts`"
    " (empty: URL sources are off)",
    "too_large": "`firmware.update`: the image is over the size cap",
    "bad_source": "`firmware.update`: the source is not a regular file under the allowed directory",
    "unreadable": "`firmware.update`: the file cannot be read (no such file, no permission)",
    "malformed": "`firmware.update`: not a `CFW1` image, or corrupted",
    "unsigned": "`firmware.update`: an all-zero signature (a development build)",
    "bad_signature": "`firmware.update`: no key in `firmware.public_keys` verifies it",
    "no_keys": "`firmware.update`: the cabinet has no firmware keys configured",
    "wrong_target": "`firmware.update`: the image is for another board type",
    "downgrade": "`firmware.update`: the image is not newer (send `force: true`)",
    "rate_limited": "too many commands from this source: try again later",
    "payload_too_large": "the payload is over the size cap",
}

# -- event data --------------------------------------------------------------------------------


class _Data(BaseModel):
    """An event's ``data``: the fields its emitter always sets; more may follow."""

    model_config = ConfigDict(extra="allow", frozen=True)


class _Session(_Data):
    """The session and rider every swap event names."""

    session_id: str
    rider_id: str


class SwapStarted(_Session):
    """``swap.started``: the bays chosen and the battery reserved."""

    mode: str = Field(json_schema_extra={"enum": list(MODES)})
    return_bay: int | None
    dispense_bay: int | None
    reserved: str | None


class SwapDoorOpened(_Session):
    """``swap.door_opened``: which door, for what."""

    bay: int = Field(ge=1, le=12)
    purpose: str = Field(json_schema_extra={"enum": ["return", "dispense"]})


class SwapBatteryDeposited(_Session):
    """``swap.battery_deposited``: the accepted battery."""

    bay: int = Field(ge=1, le=12)
    battery_id: str | None
    soc_pct: float | None = Field(ge=0, le=100)


class SwapDepositRejected(_Session):
    """``swap.deposit_rejected``: why the battery was refused."""

    bay: int = Field(ge=1, le=12)
    reason: str = Field(json_schema_extra={"enum": list(DEPOSIT_REJECTION_REASONS)})
    battery_id: str | None


class SwapBatteryMoved(_Session):
    """``swap.battery_dispensed`` / ``swap.dispense_returned``."""

    bay: int = Field(ge=1, le=12)
    battery_id: str | None


class SwapDispenseReassigned(_Session):
    """``swap.dispense_reassigned``: the reserved battery tripped before its door opened."""

    from_bay: int = Field(ge=1, le=12)
    to_bay: int | None = Field(ge=1, le=12)  # None: nothing left, the rider's own goes back
    reserved: str | None
    reason: str = Field(json_schema_extra={"enum": ["not_dispensable"]})


class SwapCompleted(_Session):
    """``swap.completed``: which battery went in and which came out."""

    mode: str = Field(json_schema_extra={"enum": list(MODES)})
    deposited: str | None
    dispensed: str | None


class SwapFailed(_Session):
    """``swap.failed``: the failure reason (docs/swap.md)."""

    reason: str = Field(json_schema_extra={"enum": list(SWAP_FAILURE_REASONS)})


class SwapRefused(_Data):
    """``swap.refused``: no session now (``not_ready``, ``busy``, ...)."""

    rider_id: str | None
    reason: str
    source: str


class AuthRefused(_Data):
    """``auth.refused``: a token or challenge refused (``clock_unset`` among them)."""

    reason: str
    detail: str
    rider_id: str | None


class AuthRefusedBurst(_Data):
    """``auth.refused_burst``: refused scans past the rate, summarised."""

    source: str
    count: int = Field(ge=0)
    first_ts: int
    last_ts: int
    reasons: dict[str, int]


class BayReason(_Data):
    """A bay and why."""

    bay: int = Field(ge=1, le=12)
    reason: str


class BayBy(_Data):
    """A bay and who acted."""

    bay: int = Field(ge=1, le=12)
    by: str


class BayService(_Data):
    """A bay going out of / back in service."""

    bay: int = Field(ge=1, le=12)
    reason: str
    by: str


class BayOffline(_Data):
    """``bay.offline``: the bay whose board stopped answering."""

    bay: int = Field(ge=1, le=12)


class BayOnline(_Data):
    """``bay.online``: the bay answers again after ``offline_s``."""

    bay: int = Field(ge=1, le=12)
    offline_s: float = Field(ge=0)


class UnitOffline(_Data):
    """``unit.offline``: the cabinet board or the meter stopped answering."""

    unit: int
    role: str


class UnitOnline(UnitOffline):
    """``unit.online``: it answers again after ``offline_s``."""

    offline_s: float = Field(ge=0)


class BusLost(_Data):
    """``bus.lost``: the adapter cannot be opened."""

    error: str


class BusRestored(_Data):
    """``bus.restored``: the adapter is back after ``outage_s``."""

    outage_s: float = Field(ge=0)


class AlarmData(_Data):
    """``alarm.raised`` / ``alarm.cleared``: the kind (ALARM_KINDS) and the bay or null."""

    kind: str = Field(json_schema_extra={"enum": list(ALARM_KINDS)})
    bay: int | None
    detail: str


class CustodyChanged(_Data):
    """``custody.changed``: where a battery was and is."""

    battery_id: str
    from_: str | None = Field(alias="from")
    to: str


class SettingsChanged(_Data):
    """``settings.changed``: the new threshold and who set it."""

    dispense_min_soc_pct: float
    by: str


class CommandHandled(_Data):
    """``command.handled``: a command's outcome."""

    command: str
    request_id: str | None
    ok: bool
    error: str | None = Field(json_schema_extra={"enum": [*REPLY_ERROR_CODES, None]})


class CommandRateLimited(_Data):
    """``command.rate_limited``: commands past a source's rate, refused and summarised."""

    source: str
    count: int = Field(ge=0)
    first_ts: int
    last_ts: int
    commands: dict[str, int]


class CabinetStarted(_Data):
    """``cabinet.started``: the daemon is ready."""

    version: str
    boot_id: str


class SelftestStarted(_Data):
    """``selftest.started``: which bays, who asked."""

    bays: list[int]
    by: str


class SelftestFinished(_Data):
    """``selftest.finished``: the results."""

    passed: Any
    failed: Any
    skipped: Any


class BusWritten(_Data):
    """``bus.written``: a technician's raw write."""

    unit: int
    address: int
    values: list[int]
    by: str


class FirmwareBay(_Data):
    """``firmware.started`` / ``firmware.updated``: which bay."""

    bay: int = Field(ge=1, le=12)


class FirmwareProgress(FirmwareBay):
    """``firmware.progress``: how far."""

    percent: int = Field(ge=0, le=100)


class FirmwareFailed(FirmwareBay):
    """``firmware.failed``: why."""

    reason: str
    detail: str


class FirmwareRejected(_Data):
    """``firmware.rejected``: why the update never began."""

    reason: str
    detail: str
    by: str


@dataclass(frozen=True)
class Ev:
    """One event type: the model of its ``data`` and a line for the docs."""

    data: type[_Data]
    doc: str


EVENTS: dict[str, Ev] = {
    "cabinet.started": Ev(CabinetStarted, "the daemon is ready (after recovery)"),
    "swap.started": Ev(SwapStarted, "a session started"),
    "swap.door_opened": Ev(SwapDoorOpened, "a session's door was seen open"),
    "swap.battery_deposited": Ev(SwapBatteryDeposited, "the rider's battery was accepted"),
    "swap.deposit_rejected": Ev(SwapDepositRejected, "the rider's battery was refused"),
    "swap.battery_dispensed": Ev(SwapBatteryMoved, "the rider took the full battery"),
    "swap.dispense_returned": Ev(SwapBatteryMoved, "the rider put the dispensed battery back"),
    "swap.dispense_reassigned": Ev(
        SwapDispenseReassigned, "the reserved battery tripped before its door opened"
    ),
    "swap.completed": Ev(SwapCompleted, "the session ended well"),
    "swap.failed": Ev(SwapFailed, "the session ended with a reason"),
    "swap.refused": Ev(SwapRefused, "no session could start now"),
    "auth.refused": Ev(AuthRefused, "a token or challenge was refused"),
    "auth.refused_burst": Ev(AuthRefusedBurst, "refused scans past the rate, summarised"),
    "bay.fault": Ev(BayReason, "a door failed to open, or a remote open failed"),
    "bay.opened": Ev(BayBy, "an operator or technician opened a bay"),
    "bay.disabled": Ev(BayService, "a bay went out of service"),
    "bay.enabled": Ev(BayService, "a bay went back in service"),
    "bay.offline": Ev(BayOffline, "a bay's board stopped answering"),
    "bay.online": Ev(BayOnline, "a bay's board answers again, after `offline_s`"),
    "unit.offline": Ev(UnitOffline, "the cabinet board or meter stopped answering"),
    "unit.online": Ev(UnitOnline, "the cabinet board or meter answers again"),
    "bus.lost": Ev(BusLost, "the bus adapter or gateway cannot be opened"),
    "bus.restored": Ev(BusRestored, "the bus adapter is back, after `outage_s`"),
    "alarm.raised": Ev(AlarmData, "an alarm (kind below) became active"),
    "alarm.cleared": Ev(AlarmData, "an alarm cleared"),
    "custody.changed": Ev(CustodyChanged, "a battery moved in the custody ledger"),
    "settings.changed": Ev(SettingsChanged, "a runtime setting changed"),
    "command.handled": Ev(CommandHandled, "a command was answered (its error code or null)"),
    "command.rate_limited": Ev(
        CommandRateLimited, "commands past a source's rate, refused and summarised"
    ),
    "selftest.started": Ev(SelftestStarted, "a technician's self-test started"),
    "selftest.finished": Ev(SelftestFinished, "a technician's self-test finished"),
    "bus.written": Ev(BusWritten, "a technician's raw bus write through the daemon"),
    "firmware.started": Ev(FirmwareBay, "a bay's firmware update started"),
    "firmware.progress": Ev(FirmwareProgress, "a bay's firmware update progress"),
    "firmware.updated": Ev(FirmwareBay, "a bay runs its new firmware"),
    "firmware.failed": Ev(FirmwareFailed, "a bay's firmware update failed"),
    "firmware.rejected": Ev(FirmwareRejected, "a firmware update was refused before it began"),
}
