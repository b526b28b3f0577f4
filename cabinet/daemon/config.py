"""The cabinet's configuration: one TOML file, every key overridable by the environment.

``CABINET_<SECTION>__<KEY>=value`` overrides ``[section] key``; the value is read as
a TOML value when it parses as one (numbers, booleans, lists) and as a string
otherwise. Validation reports every problem with its dotted key, so ``cabinet
config check`` lists them all at once instead of one per run.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cabinet.core.custody import IDENTITY_GRACE_S
from drivers.bus_url import (
    BusUrlError,
    InputDeviceEndpoint,
    ScannerEndpoint,
    SerialEndpoint,
    TcpEndpoint,
    parse_endpoint,
    parse_scanner_endpoint,
    unstable_device_name,
)

DEFAULT_CONFIG_PATH = Path("/etc/cabinet/cabinet.toml")
ENV_PREFIX = "CABINET_"
_ENV_KEY = re.compile(r"^CABINET_([A-Z0-9_]+?)__([A-Z0-9_]+)$")


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists ``(key, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _endpoint_url(value: str) -> str:
    try:
        parse_endpoint(value)
    except BusUrlError as exc:
        raise ValueError(str(exc)) from exc
    return value


class CabinetSection(_Section):
    """``[cabinet]``: who this cabinet is and where it keeps its state."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    state_dir: Path = Path("/var/lib/cabinet")
    #: the technician CLI's way in; default ``<state_dir>/control.sock``
    control_socket: Path | None = None
    #: the journal never grows past this; at the cap (or a full disk) the cabinet refuses
    #: riders with ``journal_unwritable`` until there is room again. Unset: the disk's size
    journal_max_mb: float | None = Field(default=None, gt=0)

    @property
    def control_socket_path(self) -> Path:
        """Where the daemon listens for the technician CLI."""
        return self.control_socket or self.state_dir / "control.sock"


class BusSection(_Section):
    """``[bus]``: the RS-485 line (or a TCP gateway: RTU over TCP, Modbus/TCP) and its patience."""

    url: str
    timeout_ms: int = Field(default=250, ge=20, le=2000)
    isolate_after: int = Field(default=3, ge=1, le=100)
    reprobe_interval_s: float = Field(default=5.0, gt=0, le=600)
    #: a unit isolated for this long raises its alarm (``board_silent``, ``meter_silent``, ...)
    offline_alarm_s: float = Field(default=60.0, ge=0, le=86400)
    #: no unit answering for this long makes the daemon unhealthy: the systemd watchdog
    #: goes hungry and ``cabinet doctor`` fails, so a cabinet talking to nobody is restarted
    silence_unhealthy_s: float = Field(default=30.0, ge=1, le=3600)
    #: the cabinet board (smoke, mains, contactor read-back) is read this often, checked
    #: between bay reads: smoke is seen within this + one transaction at any baud, and a
    #: fast line does not spend a read on it every 12-bay cycle (docs/hardware.md)
    cabinet_board_interval_s: float = Field(default=1.0, ge=0.1, le=10)

    _check_url = field_validator("url")(_endpoint_url)


class ScannerSection(_Section):
    """``[scanner]``: the QR scanner's serial port, TCP stream or input device (USB keyboard)."""

    url: str | None = None
    #: refused scans journaled one by one per minute; the rest are counted into one
    #: ``auth.refused_burst`` event per burst (a forged-QR flood must not fill the journal)
    refused_scans_per_minute: int = Field(default=10, ge=1, le=600)

    @field_validator("url")
    @classmethod
    def _check(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse_scanner_endpoint(value)
        except BusUrlError as exc:
            raise ValueError(str(exc)) from exc
        return value


class MqttSection(_Section):
    """``[mqtt]``: the fleet broker. No default credentials: unset means none are sent."""

    url: str = Field(pattern=r"^mqtts?://[^/\s:]+(:\d{1,5})?/?$")
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    telemetry_interval_s: float = Field(default=60.0, ge=5.0, le=3600.0)
    #: telemetry held while the broker is away, as time at ``telemetry_interval_s`` (an
    #: hour: 60 samples at 60 s, ~70 KB); the oldest go first. A day is the most kept.
    telemetry_backlog_s: float = Field(default=3600.0, ge=0.0, le=86400.0)
    #: retained ``state`` and ``status`` sent again after this long without a change, for
    #: brokers that replay retained messages to exact-topic subscriptions only (RabbitMQ):
    #: a ``cabinets/+/state`` subscriber then sees a quiet cabinet within this period. An
    #: idle cabinet pays ~3.5 KB per period (13.8 KB/h at 900 s); 0 = off (docs/mqtt.md)
    state_republish_s: float = Field(default=900.0, ge=0.0, le=86400.0)


class AuthSection(_Section):
    """``[auth]``: public keys whose holders may sign rider QR tokens."""

    public_keys: list[Path] = Field(default_factory=list)
    #: app swaps (``cmd/swap.start``) must carry a challenge the cabinet's screen showed
    #: within its validity window, once (DESIGN.md §4.4); off: a challenge is checked if given
    require_challenge: bool = False
    #: QR tokens must name this cabinet (``cab``): a token without is refused with
    #: ``no_cabinet_claim``. Off: fleet-wide tokens, single-use per cabinet only
    require_cabinet_claim: bool = True


class DisplaySection(_Section):
    """``[display]``: the rider's kiosk page (cabinet/daemon/display/), off unless enabled.

    Off, the web server is not even imported: a cabinet without a screen stays lean.
    """

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    language: Literal["en", "zh-CN"] = "en"
    orientation: Literal["landscape", "portrait"] = "landscape"
    #: the QR code's challenge is replaced this often; a scanned one stays valid one more period
    challenge_rotate_s: float = Field(default=30.0, ge=1.0, le=600.0)
    #: spoken prompts: ``{file}`` is replaced by a WAV clip; unset: silent
    audio_command: str | None = None
    volume: int = Field(default=80, ge=0, le=100)
    #: ``"22:00-07:00"``: no voice in these local hours (the screen still shows everything)
    quiet_hours: str | None = Field(default=None, pattern=r"^\d{2}:\d{2}-\d{2}:\d{2}$")


class FirmwareSection(_Section):
    """``[firmware]``: public keys whose holders may sign bay-board firmware images."""

    public_keys: list[Path] = Field(default_factory=list)
    #: ``cmd/firmware.update`` by URL or path: larger images are refused
    max_download_bytes: int = Field(default=2 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    #: ``cmd/firmware.update`` by path: only regular files in here; default
    #: ``<state_dir>/firmware`` (a path names a FIFO or a device just as easily)
    image_dir: Path | None = None
    #: ``cmd/firmware.update`` by URL: the only hosts (``host`` or ``host:port``) the
    #: cabinet downloads from, redirects included; empty (the default): URLs are refused
    allowed_hosts: list[str] = Field(default_factory=list)
    #: the whole download (connect, redirects, body) must finish within this
    download_timeout_s: float = Field(default=120.0, ge=1.0, le=3600.0)
    #: a board silent this long during an update (its reboot after ACTIVATE, a power cut)
    #: is given up on: ``firmware.failed{reason: board_lost}``, the bay left out of service
    #: (the default is firmware_bridge.updater.BOARD_WAIT_S, not imported: config stays light)
    board_wait_s: float = Field(default=60.0, ge=5.0, le=3600.0)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        """``host`` or ``host:port``, stored lower-case: what a URL's host is compared with."""
        normalised = []
        for entry in value:
            parts = urllib.parse.urlsplit(f"//{entry.strip()}")
            try:
                _ = parts.port  # raises on a port that is not a number in 0-65535
            except ValueError:
                raise ValueError(f"{entry!r}: bad port") from None
            if not parts.hostname or parts.path or parts.query or parts.username is not None:
                raise ValueError(f"{entry!r} is not a host or host:port (no scheme, no path)")
            normalised.append(entry.strip().lower())
        return normalised


class SwapSection(_Section):
    """``[swap]``: what may be handed out, what is accepted, how long riders get."""

    dispense_min_soc_pct: float = Field(default=90.0, ge=50.0, le=100.0)
    battery_id_pattern: str = r"^BAT-[A-Z0-9-]{1,12}$"
    unlock_timeout_s: float = Field(default=3.0, ge=0.5, le=30.0)
    deposit_timeout_s: float = Field(default=90.0, ge=1.0, le=600.0)
    take_back_timeout_s: float = Field(default=90.0, ge=1.0, le=600.0)
    pickup_timeout_s: float = Field(default=60.0, ge=1.0, le=600.0)
    close_timeout_s: float = Field(default=30.0, ge=1.0, le=600.0)
    #: how long a bay's unreadable pack may hide the battery last seen there (docs/swap.md §5)
    identity_grace_s: float = Field(default=IDENTITY_GRACE_S, ge=1.0, le=3600.0)

    @field_validator("battery_id_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
        return value


class ChargingSection(_Section):
    """``[charging]``: the cabinet's power budget and the chargers' limit."""

    max_current_a: float = Field(default=5.0, ge=0.5, le=10.0)
    power_budget_w: float = Field(default=1500.0, ge=100.0, le=20000.0)


SectionT = TypeVar("SectionT", bound=_Section)


class CabinetConfig(_Section):
    """The whole configuration file."""

    cabinet: CabinetSection
    bus: BusSection
    scanner: ScannerSection = ScannerSection()
    mqtt: MqttSection | None = None
    auth: AuthSection = AuthSection()
    firmware: FirmwareSection = FirmwareSection()
    swap: SwapSection = SwapSection()
    charging: ChargingSection = ChargingSection()
    display: DisplaySection = DisplaySection()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def firmware_image_dir(self) -> Path:
        """Where ``cmd/firmware.update`` may take an image by path."""
        return self.firmware.image_dir or self.cabinet.state_dir / "firmware"


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``CABINET_<SECTION>__<KEY>`` variables onto the file's data."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for name, raw in environ.items():
        match = _ENV_KEY.match(name)
        if not match:
            continue
        section, key = match.group(1).lower(), match.group(2).lower()
        target = merged.setdefault(section, {})
        if isinstance(target, dict):
            target[key] = _parse_env_value(raw)
    return merged


def read_raw(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read the TOML file and overlay the environment; raise ConfigError if unreadable."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([("file", f"{path} does not exist")]) from None
    except PermissionError:
        raise ConfigError([("file", f"permission denied reading {path}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("file", f"{path} is not valid TOML: {exc}")]) from None
    return apply_env(data, os.environ if environ is None else environ)


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "file"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append((key, message))
    return problems


def validate(data: dict[str, Any]) -> CabinetConfig:
    """Validate raw data into a config, collecting every problem."""
    try:
        return CabinetConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc)) from None


def load(path: Path, environ: Mapping[str, str] | None = None) -> CabinetConfig:
    """Read, overlay and validate the configuration."""
    return validate(read_raw(path, environ))


def load_section(
    path: Path, name: str, model: type[SectionT], environ: Mapping[str, str] | None = None
) -> SectionT:
    """One section, validated alone.

    Bus diagnostics and the technician CLI must keep working when, say, the MQTT
    section is wrong.
    """
    raw = read_raw(path, environ).get(name)
    if not isinstance(raw, dict):
        raise ConfigError([(name, "section missing")])
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([(f"{name}.{key}", msg) for key, msg in _problems(exc)]) from None


def _world_readable(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False  # a missing file is the TLS code's error to report, with its own message


def secret_problems(config: CabinetConfig, path: Path) -> list[tuple[str, str]]:
    """Secrets anyone on the device could read: the config holding a password, a private key.

    Not fatal (the cabinet works), but a technician's shell or a compromised service
    must not be able to walk off with the fleet's credentials.
    """
    problems = []
    mqtt = config.mqtt
    if mqtt is not None and mqtt.password and _world_readable(path):
        problems.append(
            ("mqtt.password", f"{path} holds a password and is world-readable (chmod 640)")
        )
    if mqtt is not None and mqtt.client_key is not None and _world_readable(mqtt.client_key):
        problems.append(
            ("mqtt.client_key", f"{mqtt.client_key} is world-readable (chmod 600 or 640)")
        )
    return problems


def device_name_problems(config: CabinetConfig) -> list[tuple[str, str]]:
    """Device paths the kernel numbers in plugging order (``/dev/ttyUSB0``, ``eventN``).

    Not fatal (the cabinet works today), but after a reboot or a replug the RS-485
    adapter and a USB-serial scanner can swap names, and the daemon then talks Modbus to
    the scanner. ``/dev/serial/by-id/`` and ``/dev/input/by-id/`` names stay put.
    """
    problems = []
    endpoints: list[tuple[str, ScannerEndpoint]] = [("bus.url", parse_endpoint(config.bus.url))]
    if config.scanner.url is not None:
        endpoints.append(("scanner.url", parse_scanner_endpoint(config.scanner.url)))
    for key, endpoint in endpoints:
        if isinstance(endpoint, InputDeviceEndpoint):
            stable = "/dev/input/by-id/"
        elif isinstance(endpoint, SerialEndpoint):
            stable = "/dev/serial/by-id/"
        else:
            continue
        if unstable_device_name(endpoint.path):
            problems.append(
                (
                    key,
                    f"{endpoint.path} is numbered in plugging order and can change across "
                    f"boots: use its stable name under {stable} (ls -l {stable})",
                )
            )
    return problems


def gateway_speed_problems(config: CabinetConfig) -> list[tuple[str, str]]:
    """A gateway URL without the gateway's serial line speed (``?baud=``).

    Not fatal: a gateway that keeps the line's timing itself needs none. A transparent
    one does: the master cannot see its line, so without the speed it counts the quiet
    after the heartbeat broadcast from handing the frame over, and at 9600 baud the next
    request reaches the line during that quiet; the boards then miss every heartbeat and
    go fail-safe (no charging, doors locked) a few seconds later. docs/hardware.md.
    """
    endpoint = parse_endpoint(config.bus.url)
    if not isinstance(endpoint, TcpEndpoint) or endpoint.baud is not None:
        return []
    return [
        (
            "bus.url",
            f"the gateway's serial line speed is not given: write it as {endpoint}?baud=N "
            "(the gateway's own setting), or a transparent gateway's line may lose the "
            "heartbeat broadcast (docs/hardware.md, Gateways)",
        )
    ]
