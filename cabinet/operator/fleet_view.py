"""What an operator sees of the fleet: every cabinet's row, built from its MQTT topics.

``FleetView`` is sans-I/O: it is fed ``(topic, payload)`` from ``cabinets/+/status``,
``state``, ``telemetry`` and ``events`` with the wall-clock time passed in, validates
each payload once with the models of ``protocol/messages.py`` and keeps one
``CabinetRow`` per cabinet. Nothing a cabinet (or anyone with publish rights) sends
can crash it: a payload that is not the documented JSON is counted against its
cabinet and its first problem is shown.

The event stream is checked the way docs/mqtt.md §4 tells a backend to: ``seq`` is
gap-free per cabinet, so a skipped number is a loss the operator must see; a resend
(same ``seq`` and ``id``) is harmless, counted, and not applied twice (a resent
``alarm.raised`` must not resurrect a cleared alarm); the same ``seq`` with a new
``id`` means the cabinet's journal was reset or two cabinets share an id.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from cabinet.core.battery_rules import BatteryObs, DispenseRules, dispensable
from protocol import topics
from protocol.messages import SCHEMA_VERSION, BayView, Event, State, Status, Telemetry

#: The daemon's default dispensing threshold (``swap.dispense_min_soc_pct``); a cabinet's
#: own value replaces it as soon as its ``settings.changed`` event is seen.
DEFAULT_READY_SOC_PCT = DispenseRules().min_soc_pct
#: A resend after a reconnect repeats at most the publisher's in-flight batch (500 events,
#: docs/mqtt.md §4), so remembering this many ids tells every resend from a conflict.
ID_WINDOW = 1000
KINDS = ("status", "state", "telemetry", "events")


class _MalformedError(Exception):
    """A payload that is not what docs/mqtt.md documents; the message is its first problem."""


class _AlarmData(BaseModel):
    """The ``data`` of ``alarm.raised`` / ``alarm.cleared`` (extra fields ignored)."""

    kind: str
    bay: int | None = None
    detail: str | None = None


class _SwapFailedData(BaseModel):
    """The ``data`` of ``swap.failed``: only the reason matters here."""

    reason: str


class _SettingsData(BaseModel):
    """The ``data`` of ``settings.changed``: the cabinet's own dispensing threshold."""

    dispense_min_soc_pct: float | None = None


_Model = TypeVar("_Model", bound=BaseModel)


def _validate(model: type[_Model], payload: bytes) -> _Model:
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise _MalformedError(_first_problem(exc, payload)) from None


def _validate_data(model: type[_Model], data: dict[str, Any]) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _MalformedError("data." + _first_problem(exc, b"")) from None


def _first_problem(exc: ValidationError, payload: bytes) -> str:
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return "not JSON" if payload.strip() else "empty payload"
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        version = json.loads(payload).get("v")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            return f"schema v{version}, newer than this tool's v{SCHEMA_VERSION}"
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


@dataclass(frozen=True, slots=True)
class BayCounts:
    """Every bay in exactly one bucket, so the columns add up to 12.

    ``ready`` is what the daemon would hand out (cabinet/core/battery_rules.py), charging or
    not: a full pack topping up is still dispensed. ``charging`` is the rest of the
    charging packs. ``other`` is a door standing open (a swap in progress) or a pack
    that is neither ready nor charging (too hot, unidentified, waiting for power).
    """

    available: int = 0
    ready: int = 0
    charging: int = 0
    faulty: int = 0
    offline: int = 0
    other: int = 0


def _bay_bucket(bay: BayView, rules: DispenseRules) -> str:
    if not bay.online:
        return "offline"
    if not bay.in_service:
        return "faulty"
    if bay.door != "closed" or bay.battery_present is None:
        return "other"
    if not bay.battery_present:
        return "available"
    if bay.soc_pct is not None and bay.health_pct is not None and bay.cell_temp_c is not None:
        battery = BatteryObs(
            battery_id=bay.battery_id,
            plugged=True,
            soc_pct=bay.soc_pct,
            health_pct=bay.health_pct,
            cell_temp_c=bay.cell_temp_c,
        )
        if dispensable(battery, rules):
            return "ready"
    return "charging" if bay.charging else "other"


def count_bays(state: State, ready_soc_pct: float) -> BayCounts:
    """Bucket a snapshot's bays with the daemon's own dispensing rule."""
    rules = DispenseRules(min_soc_pct=ready_soc_pct)
    buckets = [_bay_bucket(bay, rules) for bay in state.bays]
    return BayCounts(**{name: buckets.count(name) for name in set(buckets)})


@dataclass(frozen=True, slots=True)
class ActiveAlarm:
    """An alarm the operator must see: raised by an event, or read off the ``state``."""

    kind: str
    bay: int | None
    detail: str | None

    @property
    def label(self) -> str:
        """Short enough for a table cell; the bay says where to send the technician."""
        return self.kind if self.bay is None else f"{self.kind}@{self.bay}"


@dataclass(frozen=True, slots=True)
class LastSwap:
    """The most recent ``swap.completed`` or ``swap.failed``."""

    ts_ms: int
    outcome: str  # "completed" or "failed"
    reason: str | None


@dataclass(frozen=True, slots=True)
class CabinetRow:
    """What the operator sees of one cabinet; ``as_json`` is one ``--json`` line."""

    cabinet: str
    online: bool | None
    version: str | None
    boot_id: str | None
    bays: BayCounts | None
    ready_soc_pct: float
    swaps_allowed: bool | None
    session_phase: str | None
    alarms: tuple[ActiveAlarm, ...]
    last_swap: LastSwap | None
    backlog: int | None
    last_seq: int | None
    missing: tuple[tuple[int, int], ...]
    duplicates: int
    seq_conflicts: int
    malformed: int
    last_malformed: str | None
    heard_ago_s: float | None
    heard_live: bool

    @property
    def missing_count(self) -> int:
        """How many events never arrived."""
        return sum(last - first + 1 for first, last in self.missing)

    def as_json(self) -> dict[str, Any]:
        """The row as plain JSON values."""
        return {
            "cabinet": self.cabinet,
            "online": self.online,
            "version": self.version,
            "boot_id": self.boot_id,
            "bays": None
            if self.bays is None
            else {
                "available": self.bays.available,
                "ready": self.bays.ready,
                "charging": self.bays.charging,
                "faulty": self.bays.faulty,
                "offline": self.bays.offline,
                "other": self.bays.other,
            },
            "ready_soc_pct": self.ready_soc_pct,
            "swaps_allowed": self.swaps_allowed,
            "session_phase": self.session_phase,
            "alarms": [{"kind": a.kind, "bay": a.bay, "detail": a.detail} for a in self.alarms],
            "last_swap": None
            if self.last_swap is None
            else {
                "ts": self.last_swap.ts_ms,
                "outcome": self.last_swap.outcome,
                "reason": self.last_swap.reason,
            },
            "backlog": self.backlog,
            "last_seq": self.last_seq,
            "missing_seqs": [list(r) for r in self.missing],
            "missing": self.missing_count,
            "duplicates": self.duplicates,
            "seq_conflicts": self.seq_conflicts,
            "malformed": self.malformed,
            "last_malformed": self.last_malformed,
            "heard_ago_s": None if self.heard_ago_s is None else round(self.heard_ago_s, 1),
            "heard_live": self.heard_live,
        }


@dataclass(slots=True)
class _SeqTracker:
    """Gap and duplicate detection on one cabinet's ``seq``/``id`` stream."""

    last: int | None = None
    ids: dict[int, str] = field(default_factory=dict)  # the last ID_WINDOW seqs seen
    missing: list[tuple[int, int]] = field(default_factory=list)  # sorted, inclusive ranges
    duplicates: int = 0
    conflicts: int = 0

    def accept(self, seq: int, event_id: str) -> bool:
        """Whether this event is new (apply it) rather than a resend (count it only)."""
        known = self.ids.get(seq)
        if known == event_id:
            self.duplicates += 1
            return False
        if known is not None:
            # same number, different event: the journal was reset (or two cabinets share an
            # id). Start over from here, or every later seq would look like a conflict too.
            self.conflicts += 1
            self.ids.clear()
            self.missing.clear()
            self.last = None
        if self.last is None or seq > self.last:
            if self.last is not None and seq > self.last + 1:
                self.missing.append((self.last + 1, seq - 1))
            self.last = seq
        elif not self._fill(seq):
            # older than anything tracked (before the watch started, or beyond the id window)
            self.duplicates += 1
            return False
        self.ids[seq] = event_id
        while len(self.ids) > ID_WINDOW:
            del self.ids[next(iter(self.ids))]
        return True

    def _fill(self, seq: int) -> bool:
        for index, (first, last) in enumerate(self.missing):
            if first <= seq <= last:
                pieces = [(first, seq - 1)] if first < seq else []
                if seq < last:
                    pieces.append((seq + 1, last))
                self.missing[index : index + 1] = pieces
                return True
        return False

    def forget_position(self) -> None:
        """Events were lost *by the watch*: the next one starts a new baseline, not a gap."""
        self.last = None
        self.ids.clear()


@dataclass(slots=True)
class _Cabinet:
    """Everything known about one cabinet; mutable, private to the view."""

    status: Status | None = None
    state: State | None = None
    ready_soc_pct: float | None = None
    alarms: dict[tuple[str, int | None], str | None] = field(default_factory=dict)
    last_swap: LastSwap | None = None
    backlog: int | None = None
    seq: _SeqTracker = field(default_factory=_SeqTracker)
    malformed: int = 0
    last_malformed: str | None = None
    heard_live_at: float | None = None
    retained_ts_ms: int | None = None


class FleetView:
    """The fleet as the broker shows it; fed messages, asked for rows. No I/O, no clock."""

    def __init__(self, *, ready_soc_pct: float = DEFAULT_READY_SOC_PCT) -> None:
        self._ready_soc_pct = ready_soc_pct
        self._cabinets: dict[str, _Cabinet] = {}

    @property
    def cabinets(self) -> list[str]:
        """Every cabinet seen, in the order rows are shown."""
        return sorted(self._cabinets)

    def feed(self, topic: str, payload: bytes, *, now: float, retained: bool = False) -> str | None:
        """Take one message; return the cabinet whose row changed, or None if not ours.

        ``now`` is wall-clock seconds. A retained message is history the broker replays on
        subscribe, so it does not count as hearing from the cabinet now.
        """
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != topics.ROOT or not parts[1] or parts[2] not in KINDS:
            return None
        cabinet_id, kind = parts[1], parts[2]
        cabinet = self._cabinets.setdefault(cabinet_id, _Cabinet())
        if not retained:
            cabinet.heard_live_at = now
        try:
            ts_ms = self._apply(cabinet_id, cabinet, kind, payload)
        except _MalformedError as exc:
            cabinet.malformed += 1
            cabinet.last_malformed = f"{kind}: {exc}"
        else:
            if retained and ts_ms is not None:
                cabinet.retained_ts_ms = max(cabinet.retained_ts_ms or 0, ts_ms)
        return cabinet_id

    def forget_positions(self) -> None:
        """The watch lost its broker session: events in between were not seen by *us*."""
        for cabinet in self._cabinets.values():
            cabinet.seq.forget_position()

    def _apply(self, cabinet_id: str, cabinet: _Cabinet, kind: str, payload: bytes) -> int | None:
        if not payload and kind in ("status", "state"):
            # an empty retained message deletes the retained one (a decommissioned cabinet)
            if kind == "status":
                cabinet.status = None
            else:
                cabinet.state = None
            return None
        if kind == "status":
            cabinet.status = _validate(Status, payload)
            return cabinet.status.ts
        if kind == "state":
            state = _validate(State, payload)
            _check_cabinet(cabinet_id, state.cabinet_id)
            cabinet.state = state
            return state.ts
        if kind == "telemetry":
            telemetry = _validate(Telemetry, payload)
            _check_cabinet(cabinet_id, telemetry.cabinet_id)
            cabinet.backlog = telemetry.outbox_depth
            return telemetry.ts
        event = _validate(Event, payload)
        _check_cabinet(cabinet_id, event.cabinet_id)
        if cabinet.seq.accept(event.seq, event.id):
            _apply_event(cabinet, event)
        return event.ts

    def row(self, cabinet_id: str, *, now: float) -> CabinetRow:
        """One cabinet's row as of ``now`` (wall-clock seconds)."""
        cabinet = self._cabinets[cabinet_id]
        status, state = cabinet.status, cabinet.state
        ready_soc = self._ready_soc_pct if cabinet.ready_soc_pct is None else cabinet.ready_soc_pct
        if cabinet.heard_live_at is not None:
            heard_ago: float | None = max(0.0, now - cabinet.heard_live_at)
        elif cabinet.retained_ts_ms is not None:
            heard_ago = max(0.0, now - cabinet.retained_ts_ms / 1000)
        else:
            heard_ago = None
        return CabinetRow(
            cabinet=cabinet_id,
            online=None if status is None else status.online,
            version=None if status is None else status.version,
            boot_id=None if status is None else status.boot_id,
            bays=None if state is None else count_bays(state, ready_soc),
            ready_soc_pct=ready_soc,
            swaps_allowed=None if state is None else state.cabinet.swaps_allowed,
            session_phase=None if state is None or state.session is None else state.session.phase,
            alarms=_active_alarms(cabinet),
            last_swap=cabinet.last_swap,
            backlog=cabinet.backlog,
            last_seq=cabinet.seq.last,
            missing=tuple(cabinet.seq.missing),
            duplicates=cabinet.seq.duplicates,
            seq_conflicts=cabinet.seq.conflicts,
            malformed=cabinet.malformed,
            last_malformed=cabinet.last_malformed,
            heard_ago_s=heard_ago,
            heard_live=cabinet.heard_live_at is not None,
        )

    def rows(self, *, now: float) -> list[CabinetRow]:
        """Every cabinet's row, sorted by id so a redrawn table does not jump around."""
        return [self.row(cabinet_id, now=now) for cabinet_id in self.cabinets]


def _check_cabinet(topic_cabinet: str, payload_cabinet: str) -> None:
    if payload_cabinet != topic_cabinet:
        raise _MalformedError(f"cabinet_id {payload_cabinet!r} does not match the topic")


def _apply_event(cabinet: _Cabinet, event: Event) -> None:
    if event.type in ("alarm.raised", "alarm.cleared"):
        alarm = _validate_data(_AlarmData, event.data)
        key = (alarm.kind, alarm.bay)
        if event.type == "alarm.raised":
            cabinet.alarms[key] = alarm.detail
        else:
            cabinet.alarms.pop(key, None)  # raised before the watch started: nothing to drop
    elif event.type in ("swap.completed", "swap.failed"):
        reason = None
        if event.type == "swap.failed":
            reason = _validate_data(_SwapFailedData, event.data).reason
        if cabinet.last_swap is None or event.ts >= cabinet.last_swap.ts_ms:
            outcome = event.type.removeprefix("swap.")
            cabinet.last_swap = LastSwap(event.ts, outcome, reason)
    elif event.type == "settings.changed":
        threshold = _validate_data(_SettingsData, event.data).dispense_min_soc_pct
        if threshold is not None:
            cabinet.ready_soc_pct = threshold


def _active_alarms(cabinet: _Cabinet) -> tuple[ActiveAlarm, ...]:
    alarms = {key: ActiveAlarm(key[0], key[1], detail) for key, detail in cabinet.alarms.items()}
    state = cabinet.state
    if state is not None:
        # The retained snapshot shows a standing condition even when its alarm.raised was
        # published before the watch started.
        derived = [
            ("smoke", state.cabinet.smoke is True, "smoke detector on (state)"),
            ("mains_lost", state.cabinet.mains_present is False, "mains absent (state)"),
            ("swaps_blocked", not state.cabinet.swaps_allowed, "swaps not allowed (state)"),
        ]
        for kind, active, detail in derived:
            if active:
                alarms.setdefault((kind, None), ActiveAlarm(kind, None, detail))
    return tuple(sorted(alarms.values(), key=lambda a: (a.kind, a.bay or 0)))


# -- rendering (pure) ------------------------------------------------------------------------

HEADERS = (
    "CABINET",
    "ONLINE",
    "VERSION",
    "AVAIL",
    "READY",
    "CHARGING",
    "FAULTY",
    "OFFLINE",
    "ALARMS",
    "LAST_SWAP",
    "BACKLOG",
    "SEQ",
    "BAD",
    "HEARD",
)


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _clock(ts_ms: int, now: float) -> str:
    stamp = time.localtime(ts_ms / 1000)
    same_day = time.strftime("%Y%m%d", stamp) == time.strftime("%Y%m%d", time.localtime(now))
    return time.strftime("%H:%M:%S" if same_day else "%m-%d %H:%M", stamp)


def _cells(row: CabinetRow, now: float) -> list[str]:
    online = {True: "yes", False: "NO", None: "?"}[row.online]
    bays = row.bays
    counts = ["-"] * 5
    if bays is not None:
        # an offline cabinet's retained snapshot is history: shown, but never as if fresh
        shape = "({})" if row.online is False else "{}"
        numbers = (bays.available, bays.ready, bays.charging, bays.faulty, bays.offline)
        counts = [shape.format(n) for n in numbers]
    swap = "-"
    if row.last_swap is not None:
        outcome = row.last_swap.reason or row.last_swap.outcome
        swap = f"{_clock(row.last_swap.ts_ms, now)} {outcome}"
    # capitals for what needs a person, lower case for what the protocol resolves by itself
    seq = "-" if row.last_seq is None else str(row.last_seq)
    if row.missing:
        seq += f" MISSING:{row.missing_count}"
    if row.seq_conflicts:
        seq += f" CONFLICT:{row.seq_conflicts}"
    if row.duplicates:
        seq += f" dup:{row.duplicates}"
    heard = "-"
    if row.heard_ago_s is not None:
        heard = ("" if row.heard_live else "~") + _ago(row.heard_ago_s)
    return [
        row.cabinet,
        online,
        row.version or "-",
        *counts,
        ",".join(a.label for a in row.alarms) or "-",
        swap,
        "-" if row.backlog is None else str(row.backlog),
        seq,
        str(row.malformed) if row.malformed else "-",
        heard,
    ]


def render_table(rows: Sequence[CabinetRow], *, now: float) -> str:
    """The human table: one line per cabinet, columns padded to the widest cell."""
    lines = [list(HEADERS)] + [_cells(row, now) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def render_problems(rows: Sequence[CabinetRow]) -> list[str]:
    """The details a table cell has no room for, one line each."""
    lines: list[str] = []
    for row in rows:
        if row.missing:
            spans = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in row.missing[:5])
            more = ", ..." if len(row.missing) > 5 else ""
            lines.append(
                f"{row.cabinet}: {row.missing_count} event(s) never arrived: seq {spans}{more}"
            )
        if row.seq_conflicts:
            lines.append(
                f"{row.cabinet}: a seq came again with a different id "
                f"({row.seq_conflicts}x): journal reset, or two cabinets with one id?"
            )
        if row.malformed:
            lines.append(
                f"{row.cabinet}: {row.malformed} malformed payload(s), last: {row.last_malformed}"
            )
    return lines


def render_screen(view: FleetView, *, now: float, title: str) -> str:
    """Title, table and problems: what the human outputs print."""
    rows = view.rows(now=now)
    parts = [title, render_table(rows, now=now)]
    if not rows:
        parts.append("(no cabinet seen yet)")
    problems = render_problems(rows)
    if problems:
        parts += ["", *problems]
    return "\n".join(parts) + "\n"
