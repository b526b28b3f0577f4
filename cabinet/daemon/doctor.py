"""``cabinet doctor``: one report a technician can read top to bottom, a verdict per line.

Every check answers "is this part of the cabinet doing its job right now?" from
what the running daemon already knows (bus counters, the fleet link, the
journal), so the doctor costs the bus nothing and can run during a swap.
Verdicts: ``ok``; ``warn`` (works, but a person should look); ``fail`` (riders or
operators are affected now).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cabinet.daemon.clock import clock_is_set, unset_clock_detail
from cabinet.daemon.config import CabinetConfig, ConfigError, load, secret_problems
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.task_health import TaskHealth
from protocol.units import ALL_UNITS, unit_name

Verdict = Literal["ok", "warn", "fail"]

POLL_STALE_S = 10.0  # a full cycle takes ~1 s at 19200 baud: ten is clearly stuck
ERROR_RATE_WARN = 0.05  # one exchange in twenty failing: the line or a board needs a look
OUTBOX_WARN_DEPTH = 100  # a few minutes of a busy cabinet: the broker is not taking events
DISK_FAIL_BYTES = 50 * 1024 * 1024  # the journal needs room for its WAL to commit at all
DISK_WARN_BYTES = 500 * 1024 * 1024
NTP_SYNC_FLAG = Path("/run/systemd/timesync/synchronized")


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report."""

    name: str
    verdict: Verdict
    detail: str

    def as_json(self) -> dict[str, str]:
        """Render for ``--json``."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class FleetFacts:
    """What the doctor needs from the fleet link (None when ``[mqtt]`` is not configured)."""

    url: str
    connected: bool


def _daemon(tasks: TaskHealth, started_at: float, now: float) -> Check:
    """``started_at`` and ``now`` are the injected clock's monotonic seconds."""
    failing = tasks.failing()
    uptime = int(now - started_at)
    if failing:
        names = ", ".join(f"{n} ({s.last_error})" for n, s in sorted(failing.items()))
        return Check("daemon", "fail", f"tasks failing: {names}")
    restarts = sum(s.restarts for s in tasks.tasks.values())
    return Check(
        "daemon", "ok", f"up {uptime} s, {len(tasks.tasks)} tasks running, {restarts} restarts"
    )


def _poll(c: CabinetController) -> Check:
    if c.last_cycle_at is None:
        return Check("poll", "warn", "no full poll cycle finished yet")
    age = c.clock.monotonic() - c.last_cycle_at
    if age > POLL_STALE_S:
        return Check("poll", "fail", f"last full poll cycle {age:.0f} s ago: the bus is stuck")
    return Check("poll", "ok", f"last full poll cycle {age:.1f} s ago")


def _bus(c: CabinetController) -> Check:
    """Whether anybody answers: a poll loop that runs against silence is not healthy."""
    silence = c.poller.unit_silence_s()
    cycles = f"{c.poll_cycles} poll cycles"
    if c.bus_lost is not None:
        return Check("bus", "fail", f"bus lost ({c.bus_lost.error}); reopening; {cycles}")
    if silence > c.settings.silence_unhealthy_s:
        return Check("bus", "fail", f"no unit has answered for {silence:.0f} s; {cycles}")
    return Check("bus", "ok", f"a unit answered {silence:.1f} s ago; {cycles}")


def _bus_units(c: CabinetController) -> Iterable[Check]:
    bus = c.scheduler.bus
    for unit in ALL_UNITS:
        name = f"bus unit {unit} ({unit_name(unit)})"
        stats = bus.unit_stats(unit)
        errors = stats.timeouts + stats.crc_errors
        counts = (
            f"{stats.requests} requests, {errors} failed "
            f"({stats.timeouts} timeouts, {stats.crc_errors} CRC)"
        )
        if stats.isolated:
            yield Check(name, "fail", f"isolated after repeated silence; {counts}")
        elif stats.requests == 0:
            yield Check(name, "warn", "not polled yet")
        elif errors / stats.requests >= ERROR_RATE_WARN:
            yield Check(name, "warn", f"{100 * errors / stats.requests:.1f}% errors; {counts}")
        else:
            latency = stats.latency_mean_s * 1000
            yield Check(name, "ok", f"{counts}; mean latency {latency:.1f} ms")


def _mqtt(c: CabinetController, fleet: FleetFacts | None) -> Iterable[Check]:
    depth = c.journal.outbox_depth()
    if fleet is None:
        yield Check("mqtt", "warn", f"no [mqtt] section: {depth} events kept in the journal")
        return
    elif fleet.connected:
        yield Check("mqtt", "ok", f"connected to {fleet.url}")
    else:
        yield Check("mqtt", "fail", f"not connected to {fleet.url}")
    verdict: Verdict = "ok" if depth < OUTBOX_WARN_DEPTH else "warn"
    yield Check("outbox", verdict, f"{depth} events waiting for the broker")


def _clock(c: CabinetController) -> Check:
    """The daemon's injected clock: unset (an RTC at 1970) fails, since tokens are refused."""
    now = c.clock.wall()
    if not clock_is_set(now):
        return Check("clock", "fail", unset_clock_detail(now))
    last = c.journal.last_event()
    if last is not None and last["ts"] / 1000 > now + 1:
        behind = last["ts"] / 1000 - now
        return Check("clock", "fail", f"clock is {behind:.0f} s behind the last journaled event")
    sync = "NTP synchronised" if NTP_SYNC_FLAG.exists() else "NTP sync not confirmed"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
    return Check("clock", "ok", f"{stamp} UTC, {sync}")


def _disk(state_dir: Path) -> Check:
    try:  # shutil.disk_usage's own arithmetic; shutil (bz2, lzma: ~0.5 MB) would stay loaded
        vfs = os.statvfs(state_dir)
    except OSError as exc:
        return Check("disk", "fail", f"cannot look at {state_dir}: {exc}")
    free, total = vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize
    detail = f"{free / 1024 / 1024:.0f} MB free of {total / 1024 / 1024:.0f} MB at {state_dir}"
    if free < DISK_FAIL_BYTES:
        return Check("disk", "fail", detail + ": the journal may fail to commit")
    if free < DISK_WARN_BYTES:
        return Check("disk", "warn", detail)
    return Check("disk", "ok", detail)


def _config(running: CabinetConfig, path: Path | None) -> Iterable[Check]:
    if path is None:
        yield Check("config", "ok", "running configuration (no file)")
        return
    try:
        on_disk = load(path)
    except ConfigError as exc:
        for key, message in exc.problems:
            yield Check("config", "fail", f"{path}: {key}: {message}")
        return
    if on_disk != running:
        yield Check("config", "warn", f"{path} changed since the daemon started: restart to apply")
    problems = secret_problems(on_disk, path)
    for key, message in problems:
        yield Check("config", "warn", f"{key}: {message}")
    if on_disk == running and not problems:
        yield Check("config", "ok", f"{path} valid and in effect")


def _alarms(c: CabinetController) -> Iterable[Check]:
    found = False
    if c.safety.smoke:
        found = True
        yield Check("alarm", "fail", "smoke detected: charging cut, swaps refused")
    if c.safety.mains_lost:
        found = True
        yield Check("alarm", "fail", "mains power lost: chargers off")
    for bay, reason in sorted(c.safety.tripped.items()):
        found = True
        yield Check("alarm", "fail", f"bay {bay} over temperature ({reason}); `cabinet bay enable`")
    for unit in sorted(c.presence.outages):
        found = True
        yield Check("alarm", "warn", f"{unit_name(unit)} not answering on the bus")
    for kind, target_bay in sorted(c.safety_writes, key=str):
        found = True
        what = "charger off" if kind == "charger" else "main contactor open"
        where = f" (bay {target_bay})" if target_bay is not None else ""
        yield Check("alarm", "fail", f"{what}{where} not confirmed by the board")
    for bay in sorted(c.poller.heartbeats.unheard):
        found = True
        yield Check(
            "alarm", "warn", f"bay {bay} misses the heartbeat broadcast (written to it directly)"
        )
    for bay, reason in sorted(c.out_of_service.items()):
        if bay not in c.safety.tripped:
            found = True
            yield Check("alarm", "warn", f"bay {bay} out of service: {reason}")
    if not found:
        yield Check("alarms", "ok", "none active")


def run_checks(
    c: CabinetController,
    *,
    config: CabinetConfig,
    config_path: Path | None,
    fleet: FleetFacts | None,
    tasks: TaskHealth,
    started_at: float,
) -> list[Check]:
    """The whole report, in the order a technician reads it."""
    return [
        _daemon(tasks, started_at, c.clock.monotonic()),
        _poll(c),
        _bus(c),
        *_bus_units(c),
        *_mqtt(c, fleet),
        _clock(c),
        _disk(Path(config.cabinet.state_dir)),
        *_config(config, config_path),
        *_alarms(c),
    ]
