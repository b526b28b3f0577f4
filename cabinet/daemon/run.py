"""``cabinet run``: the daemon — bus master, poller, timers and the QR scanner, supervised.

Start-up order matters for safety: journal first (nothing is decided without it),
then the bus, then ``recover`` (the boards' picture reconciled with the journal),
and only then the scanner, so no rider can start a session against a stale view.
Every long-running task is supervised: it is restarted if it dies, its failure
logged once and its recovery once. The field bus never waits on the cloud link.

What a cabinet does not use is not imported (DESIGN.md §6, resident memory): the fleet
link (paho, ~1.3 MB) only with ``[mqtt]``, the web display only with ``[display]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from nacl.signing import VerifyKey

from cabinet.core.battery_rules import DepositRules, DispenseRules
from cabinet.core.charging_policy import ChargingRules
from cabinet.core.refusal_limit import Burst, RefusalLimit
from cabinet.core.swap_machine import Mode, SwapMachine, Timeouts
from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.config import CabinetConfig
from cabinet.daemon.control_server import AlreadyRunningError, ControlServer
from cabinet.daemon.controller import CabinetController, ControllerSettings
from cabinet.daemon.display.challenges import ChallengeBook
from cabinet.daemon.doctor import FleetFacts
from cabinet.daemon.firmware_service import FirmwareFetcher, FirmwareService
from cabinet.daemon.journal import Journal, JournalError
from cabinet.daemon.state_lock import StateDirLock, StateDirLockedError
from cabinet.daemon.systemd_notify import Notifier
from cabinet.daemon.task_health import TaskHealth
from cabinet.daemon.tokens import KeyFileError, TokenRefusedError, load_public_key, verify
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import BusUnavailableError, ModbusBus
from drivers.qr_scanner import Scan, ScanGarbage, ScannerUnavailableError, read_scans

if TYPE_CHECKING:
    from cabinet.daemon.fleet_link import FleetLink
    from drivers.mqtt_link import MqttLink

log = structlog.get_logger("daemon")

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # a crash loop must not hammer the bus
HEALTHY_RUN_S = 60.0  # a task that ran this long before dying had recovered
JOURNAL_FILE = "journal.db"
POLL_STALL_S = 20.0  # a cycle is ~1 s; every unit timing out is ~3.5 s at 250 ms each


def settings_from(config: CabinetConfig) -> ControllerSettings:
    """The decision rules, from the configuration."""
    swap = config.swap
    machine = SwapMachine(
        timeouts=Timeouts(
            unlock=swap.unlock_timeout_s,
            deposit=swap.deposit_timeout_s,
            take_back=swap.take_back_timeout_s,
            pickup=swap.pickup_timeout_s,
            close=swap.close_timeout_s,
        ),
        rules=DepositRules(id_pattern=swap.battery_id_pattern),
    )
    return ControllerSettings(
        machine=machine,
        dispense=DispenseRules(min_soc_pct=swap.dispense_min_soc_pct),
        charging=ChargingRules(
            max_current_a=config.charging.max_current_a,
            power_budget_w=config.charging.power_budget_w,
            ready_soc_pct=swap.dispense_min_soc_pct,
        ),
        offline_alarm_s=config.bus.offline_alarm_s,
        silence_unhealthy_s=config.bus.silence_unhealthy_s,
        cabinet_board_interval_s=config.bus.cabinet_board_interval_s,
        identity_grace_s=swap.identity_grace_s,
    )


async def supervise(
    name: str, task: Callable[[], Awaitable[None]], health: TaskHealth | None = None
) -> None:
    """Run ``task`` forever: restart it when it dies, with backoff, logging each state once."""
    health = health if health is not None else TaskHealth()
    while True:
        started = time.monotonic()
        health.started(name)
        try:
            await task()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a supervisor's whole job
            error = f"{type(exc).__name__}: {exc}"
            # a task that ran a while before dying had recovered: a new episode, worth a line
            failures = health.failed(
                name, error, recovered_before=time.monotonic() - started > HEALTHY_RUN_S
            )
            delay = RESTART_BACKOFF_S[min(failures - 1, len(RESTART_BACKOFF_S) - 1)]
            if failures == 1:
                log.error("task_failed", task=name, error=error)
            elif failures == 2:
                log.error("task_failing_repeatedly", task=name, restart_delay_s=delay)
            await asyncio.sleep(delay)
        else:
            return


async def _connect_bus(bus: ModbusBus) -> None:
    failures = 0
    while True:
        try:
            await bus.connect()
        except BusUnavailableError as exc:
            if failures == 0:
                log.error("bus_unavailable", error=str(exc))
            failures += 1
            await asyncio.sleep(RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)])
        else:
            if failures:
                log.info("bus_available", after_attempts=failures)
            return


SCAN_SOURCE = "qr"


class ScanRefusals:
    """The scanner's refusals: a few journaled one by one, the rest summarised per burst.

    The decision is ``RefusalLimit``'s (sans-I/O); this journals the summaries when they
    fall due, from a task of their own so that a burst that simply stops is reported too.
    """

    def __init__(self, controller: CabinetController, per_minute: int) -> None:
        self.controller = controller
        self.limit = RefusalLimit(per_minute)
        self._wakeup = asyncio.Event()

    def admit(self, reason: str) -> bool:
        """True: journal this refusal; False: it was counted into the burst's summary."""
        clock = self.controller.clock
        admitted = self.limit.admit(
            SCAN_SOURCE, reason, now=clock.monotonic(), ts_ms=int(clock.wall() * 1000)
        )
        if not admitted:
            self._wakeup.set()
        return admitted

    async def summarise_forever(self) -> None:
        """Journal each burst's ``auth.refused_burst`` once it went quiet or its minute ended."""
        clock = self.controller.clock
        while True:
            self._wakeup.clear()
            due_at = self.limit.next_due()
            if due_at is None:
                await self._wakeup.wait()
                continue
            await asyncio.sleep(max(0.0, due_at - clock.monotonic()))
            for burst in self.limit.due(clock.monotonic()):
                self._journal(burst)

    def _journal(self, burst: Burst) -> None:
        summary = {
            "source": burst.source,
            "count": burst.count,
            "first_ts": burst.first_ts,
            "last_ts": burst.last_ts,
            "reasons": burst.reasons,
        }
        log.info("scans_refused_burst", **summary)
        # journal_unwritable: the log line above has the figures
        with contextlib.suppress(JournalError):
            self.controller.record(("auth.refused_burst", summary))


async def scanner_loop(config: CabinetConfig, controller: CabinetController) -> None:
    """Read scans forever; verify each token offline and start a session for its rider."""
    url = config.scanner.url
    if url is None:
        return
    keys = [load_public_key(path) for path in config.auth.public_keys]
    refusals = ScanRefusals(controller, config.scanner.refused_scans_per_minute)
    summaries = asyncio.create_task(refusals.summarise_forever())
    failures = 0
    try:
        while True:
            try:
                async for item in read_scans(url):
                    failures = 0
                    if isinstance(item, ScanGarbage):
                        if refusals.admit("garbage"):
                            log.info("scan_garbage", reason=item.reason)
                        continue
                    handle_scan(
                        item,
                        keys,
                        config.cabinet.id,
                        controller,
                        refusals,
                        require_cabinet_claim=config.auth.require_cabinet_claim,
                    )
            except ScannerUnavailableError as exc:
                if failures == 0:
                    log.warning("scanner_unavailable", error=str(exc))
                failures += 1
                await asyncio.sleep(RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)])
    finally:
        summaries.cancel()


def handle_scan(
    scan: Scan,
    keys: list[VerifyKey],
    cabinet_id: str,
    controller: CabinetController,
    refusals: ScanRefusals | None = None,
    *,
    require_cabinet_claim: bool = True,
) -> None:
    """Verify a scanned token and start the session it authorises, or record the refusal.

    Refusals are rate-limited (``refusals``); a valid token never waits for anything.
    With the journal unwritable the rider is refused (``journal_unwritable``) and the
    scanner carries on: nothing here may take the scanner task down.
    """

    def refuse(reason: str, detail: str, rider: str | None, *, session: bool) -> None:
        if refusals is not None and not refusals.admit(reason):
            return
        log.info("scan_refused", reason=reason, detail=detail, rider_id=rider)
        try:
            if session and rider is not None:
                controller.refuse_session(rider, reason, "qr")
            else:
                controller.refuse_authorisation(reason, detail, rider)
        except JournalError:
            pass  # logged once by the journal; status and state show journal_unwritable

    now = int(controller.clock.wall())  # the injected clock; unset -> clock_unset refusal
    try:
        claims = verify(
            scan.text,
            keys,
            now=now,
            cabinet_id=cabinet_id,
            require_cabinet_claim=require_cabinet_claim,
        )
    except TokenRefusedError as exc:
        refuse(exc.reason, str(exc), None, session=False)
        return
    try:
        spent = controller.journal.token_spent(claims.nonce)
    except JournalError as exc:
        refuse("journal_unwritable", str(exc), claims.rider, session=True)
        return
    if spent:  # said before busy & co: a replay is a replay whatever the cabinet is doing
        refuse("replayed", "token was already used", claims.rider, session=False)
        return
    refusal = controller.refusal()
    if refusal is not None:  # the token stays good: the rider can scan again in a moment
        refuse(refusal, f"cannot start a session now: {refusal}", claims.rider, session=True)
        return
    try:  # the token is spent in the transaction that starts its session, not before
        token = (claims.nonce, claims.exp)
        why = controller.request_session(claims.rider, Mode(claims.mode), "qr", token=token)
        if why == "replayed":  # any other refusal is recorded by the controller
            refuse("replayed", "token was already used", claims.rider, session=False)
    except JournalError as exc:
        refuse("journal_unwritable", str(exc), claims.rider, session=True)


def health_problem(tasks: TaskHealth, controller: CabinetController) -> str | None:
    """Why the daemon is unhealthy (the watchdog goes hungry), or None."""
    failing = tasks.failing()
    if failing:
        return "tasks failing: " + ", ".join(sorted(failing))
    if controller.last_cycle_at is not None:
        age = controller.clock.monotonic() - controller.last_cycle_at
        if age > POLL_STALL_S:
            return f"no full poll cycle for {age:.0f} s"
    silence = controller.poller.unit_silence_s()
    if silence > controller.settings.silence_unhealthy_s:  # a loop that runs is not enough
        return f"no unit has answered on the bus for {silence:.0f} s"
    return None


def mqtt_link_for(config: CabinetConfig, **callbacks: Any) -> MqttLink:
    """The broker connection described by ``[mqtt]``."""
    from drivers.mqtt_link import MqttLink, TlsFiles  # noqa: PLC0415 - only with [mqtt]

    mqtt = config.mqtt
    assert mqtt is not None
    return MqttLink(
        mqtt.url,
        client_id=f"cabinet-{config.cabinet.id}",
        username=mqtt.username,
        password=mqtt.password,
        tls=TlsFiles(mqtt.ca_file, mqtt.client_cert, mqtt.client_key),
        **callbacks,
    )


def _firmware_keys(config: CabinetConfig) -> list[VerifyKey] | None:
    """Check every configured key file up front; the firmware keys, or None if one is bad."""
    try:
        for path in config.auth.public_keys:
            load_public_key(path)
        return [load_public_key(path) for path in config.firmware.public_keys]
    except KeyFileError as exc:
        log.error("config_problem", error=str(exc))
        return None


def _stop_on_signals() -> asyncio.Event:
    """Set by SIGTERM (systemd) or SIGINT (a person at a terminal)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _journal_cap(megabytes: float | None) -> int | None:
    return None if megabytes is None else int(megabytes * 1024 * 1024)


def controller_for(config: CabinetConfig) -> CabinetController:
    """The journal, the bus and the controller described by the configuration."""
    bus = ModbusBus(
        parse_endpoint(config.bus.url),
        timeout_s=config.bus.timeout_ms / 1000.0,
        isolate_after=config.bus.isolate_after,
        reprobe_interval_s=config.bus.reprobe_interval_s,
    )
    return CabinetController(
        cabinet_id=config.cabinet.id,
        journal=Journal(
            Path(config.cabinet.state_dir) / JOURNAL_FILE,
            max_bytes=_journal_cap(config.cabinet.journal_max_mb),
        ),
        scheduler=BusScheduler(bus),
        settings=settings_from(config),
    )


def rider_side(
    config: CabinetConfig,
    controller: CabinetController,
    start: Callable[[str, Callable[[], Awaitable[None]]], None],
    app_online: Callable[[], bool],
) -> None:
    """The QR challenges (when shown or required) and the rider's kiosk page (when enabled).

    h11 and segno are imported only here, only with ``[display] enabled``: a
    cabinet without a screen stays lean.
    """
    settings = config.display
    if settings.enabled or config.auth.require_challenge:
        controller.challenges = ChallengeBook(
            controller.journal,
            config.cabinet.id,
            controller.clock,
            rotate_s=settings.challenge_rotate_s,
            required=config.auth.require_challenge,
        )
    if not settings.enabled or controller.challenges is None:
        return
    try:
        from cabinet.daemon.display.server import DisplayServer  # noqa: PLC0415 - lean when off
    except ImportError as exc:
        log.error("display_unavailable", error=f"{exc}: pip install 'swap-cabinet[display]'")
        return
    from cabinet.daemon.display.voice import Voice  # noqa: PLC0415

    voice = Voice(
        settings.audio_command,
        config.cabinet.state_dir / "voice",
        volume=settings.volume,
        quiet_hours=settings.quiet_hours,
    )
    server = DisplayServer(
        controller, settings, controller.challenges, voice, app_online=app_online
    )
    start("display", server.run)


async def run_daemon(config: CabinetConfig, config_path: Path | None = None) -> int:  # noqa: PLR0915
    """Run until SIGTERM/SIGINT; return the exit code."""
    structlog.contextvars.bind_contextvars(cabinet_id=config.cabinet.id)
    firmware_keys = _firmware_keys(config)
    if firmware_keys is None:
        return 1
    if config.mqtt is not None:  # imported now: once the bus runs, an import would stall it
        from cabinet.daemon.fleet_link import FleetLink  # noqa: PLC0415 - only with [mqtt]
    try:  # before the journal, the bus or MQTT: one daemon per state directory
        state_lock = StateDirLock.acquire(config.cabinet.state_dir)
    except StateDirLockedError as exc:
        log.error("cannot_start", error=str(exc))
        return 1
    controller = controller_for(config)
    journal, scheduler, bus = controller.journal, controller.scheduler, controller.scheduler.bus
    health = TaskHealth()
    fleet: FleetLink | None = None

    def fleet_facts() -> FleetFacts | None:
        if fleet is None or config.mqtt is None:
            return None
        return FleetFacts(url=config.mqtt.url, connected=fleet.link.connected.is_set())

    def fleet_connected() -> bool:
        facts = fleet_facts()
        return facts is not None and facts.connected

    firmware = FirmwareService(controller, firmware_keys, board_wait_s=config.firmware.board_wait_s)
    control = ControlServer(
        controller,
        config=config,
        config_path=config_path,
        tasks=health,
        fleet=fleet_facts,
        firmware=firmware,
    )
    try:
        await control.claim()
    except (AlreadyRunningError, ValueError) as exc:
        log.error("cannot_start", error=str(exc))
        journal.close()
        state_lock.release()
        return 1
    stop = _stop_on_signals()
    tasks: list[asyncio.Task[None]] = []

    def start(name: str, task: Callable[[], Awaitable[None]]) -> None:
        tasks.append(asyncio.create_task(supervise(name, task, health)))

    notifier = Notifier()
    try:
        start("control_socket", control.run)
        notifier.notify(status="connecting to the bus")
        await _connect_bus(bus)
        start("bus_master", scheduler.run)
        start("heartbeat", controller.poller.heartbeat_forever)
        start("safety_writes", controller.poller.safety_writes_forever)
        notifier.notify(status="reconciling the journal with the boards")
        await controller.recover()
        notifier.notify(ready="1", status="running")
        start(
            "watchdog", lambda: notifier.feed_watchdog(lambda: health_problem(health, controller))
        )
        log.info(
            "ready",
            bays_known=len(controller.snapshots),
            resumed_session=controller.state.session_id or None,
        )
        start("poller", controller.poller.poll_forever)
        start("timers", controller.timers_forever)
        start("scanner", lambda: scanner_loop(config, controller))
        if config.mqtt is not None:
            fleet = FleetLink(
                controller,
                lambda **kw: mqtt_link_for(config, **kw),
                telemetry_interval_s=config.mqtt.telemetry_interval_s,
                telemetry_backlog_s=config.mqtt.telemetry_backlog_s,
                state_republish_s=config.mqtt.state_republish_s,
                firmware=FirmwareFetcher(
                    firmware,
                    config.firmware.max_download_bytes,
                    config.firmware_image_dir,
                    allowed_hosts=config.firmware.allowed_hosts,
                    download_timeout_s=config.firmware.download_timeout_s,
                ),
            )
            start("fleet_link", fleet.run)
        # the app's swap.start comes over the fleet link: no link, no code to scan
        rider_side(config, controller, start, app_online=fleet_connected)
        await stop.wait()
        notifier.notify(stopping="1", status="stopping")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        bus.close()
        journal.close()
        state_lock.release()
    log.info("stopped")
    return 0
