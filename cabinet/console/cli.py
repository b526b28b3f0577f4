"""The ``cabinet`` command line: one console script for the daemon, the simulator and technicians.

Errors are one line on stderr and a non-zero exit, never a traceback; the exit
codes are listed in ``cli_output``.

What this module imports at its top is what ``cabinet run`` (the daemon, under systemd)
loads besides the daemon itself: every other command's code is imported inside its
handler or parser builder, and ``cabinet run`` builds only its own parser (DESIGN.md §6,
resident memory; tests/test_daemon_footprint.py). Nothing here imports asyncio, structlog
or pydantic at the top either: the daemon decides whether it needs OpenSSL from its
configuration, and that must happen before they are loaded (``_run_daemon``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cabinet import __version__
from cabinet.console import pydantic_without_plugin_scan
from cabinet.console.cli_output import (
    EXIT_ERROR,
    EXIT_NO_DAEMON,
    EXIT_OK,
    EXIT_PROBLEM,
    CliError,
    print_json,
    table,
)
from drivers.bus_url import BusUrlError, parse_endpoint

if TYPE_CHECKING:
    from cabinet.daemon.config import CabinetConfig
    from drivers.modbus_bus import ModbusBus

T = TypeVar("T")


def _await(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, asyncio imported by the commands that run something only."""
    import asyncio  # noqa: PLC0415 - see the module's docstring

    return asyncio.run(coroutine)


def _configure_logs(level: str) -> None:
    from cabinet.console import log_setup  # noqa: PLC0415 - first: structlog without rich

    log_setup.configure(level)


# -- bus diagnostics -------------------------------------------------------------------------


def _bus_for(args: argparse.Namespace) -> ModbusBus:
    from cabinet.daemon.config import BusSection, load_section  # noqa: PLC0415
    from drivers.modbus_bus import ModbusBus  # noqa: PLC0415

    if args.bus:
        url, timeout_ms = args.bus, 250
        isolate_after, reprobe = 3, 5.0
    else:
        section = load_section(Path(args.config), "bus", BusSection)
        url, timeout_ms = section.url, section.timeout_ms
        isolate_after, reprobe = section.isolate_after, section.reprobe_interval_s
    if args.timeout_ms is not None:
        timeout_ms = args.timeout_ms
    # Direct diagnostics never isolate a unit: the technician asked about it explicitly.
    return ModbusBus(
        parse_endpoint(url),
        timeout_s=timeout_ms / 1000.0,
        isolate_after=max(isolate_after, 10**6),
        reprobe_interval_s=reprobe,
    )


def _parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (decimal or 0x hex)") from None


def _on_daemon(args: argparse.Namespace, verb: str, request_args: dict[str, Any]) -> Any:
    """The daemon's answer when it owns the bus (and no --bus was given), else None."""
    if args.bus:
        return None  # an explicit URL: a bus the daemon does not own (or a bench)
    from cabinet.console.technician_cli import run_on_daemon  # noqa: PLC0415

    return run_on_daemon(args, verb, request_args)


def _bus_scan(args: argparse.Namespace) -> int:
    from cabinet.daemon.bus_diagnostics import (  # noqa: PLC0415 - keeps `cabinet --help` fast
        scan_summary,
        summary_line,
        survey,
    )

    answer = _on_daemon(args, "bus.scan", {})
    if answer is not None:
        units = answer["units"]
    else:

        async def direct() -> list[dict[str, Any]]:
            async with _bus_for(args) as bus:
                return [r.as_json() for r in await survey(bus)]

        units = _await(direct())
    summary = scan_summary(units)
    if args.json:
        via_key = "daemon" if answer is not None else "bus"
        print_json({"units": units, "summary": summary, "via": via_key})
    else:
        rows = [
            (u["unit"], u["name"], u["map_version"], u["firmware"], u["latency_ms"], u["health"])
            for u in units
        ]
        print(table(rows, ["UNIT", "NAME", "MAP", "FIRMWARE", "LATENCY_MS", "HEALTH"]))
        via = "through the running daemon" if answer is not None else "directly on the bus"
        print(f"{summary_line(summary)} ({via})")
    return EXIT_OK if all(u["answered"] and u["health"] == "ok" for u in units) else EXIT_PROBLEM


def _bus_read(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= 125:
        raise CliError("COUNT is 1-125 registers (the Modbus limit for one read)")
    request = {
        "unit": args.unit,
        "address": args.address,
        "count": args.count,
        "holding": args.holding,
    }
    answer = _on_daemon(args, "bus.read", request)
    if answer is not None:
        regs = answer["registers"]
    else:

        async def direct() -> list[int]:
            async with _bus_for(args) as bus:
                read = bus.read_holding if args.holding else bus.read_input
                return await read(args.unit, args.address, args.count)

        regs = _await(direct())
    table_name = "holding" if args.holding else "input"
    if args.json:
        print_json(
            {"unit": args.unit, "table": table_name, "address": args.address, "registers": regs}
        )
    else:
        rows = [(args.address + i, value, f"0x{value:04x}") for i, value in enumerate(regs)]
        print(table(rows, ["ADDRESS", "VALUE", "HEX"]))
    return EXIT_OK


def _bus_write(args: argparse.Namespace) -> int:
    if any(not 0 <= v <= 0xFFFF for v in args.values):
        raise CliError("register values are 0-65535")
    request = {"unit": args.unit, "address": args.address, "values": list(args.values)}
    if _on_daemon(args, "bus.write", request) is None:

        async def direct() -> None:
            async with _bus_for(args) as bus:
                if len(args.values) == 1:
                    await bus.write_register(args.unit, args.address, args.values[0])
                else:
                    await bus.write_registers(args.unit, args.address, list(args.values))

        _await(direct())
    if args.json:
        print_json({"unit": args.unit, "address": args.address, "written": args.values})
    else:
        print(f"wrote {len(args.values)} register(s) to unit {args.unit} at {args.address}")
    return EXIT_OK


# -- config ------------------------------------------------------------------------------------


def _config_check(args: argparse.Namespace) -> int:
    from cabinet.daemon.config import (  # noqa: PLC0415
        ConfigError,
        device_name_problems,
        gateway_speed_problems,
        load,
        secret_problems,
    )

    try:
        config = load(Path(args.config))
    except ConfigError as exc:
        if args.json:
            print_json(
                {"ok": False, "problems": [{"key": k, "message": m} for k, m in exc.problems]}
            )
        else:
            for key, message in exc.problems:
                print(f"{key}: {message}")
            print(f"{len(exc.problems)} problem(s) in {args.config}")
        return EXIT_PROBLEM
    warnings = secret_problems(config, Path(args.config))
    # advice, not a failure: the cabinet works with /dev/ttyUSB0 until the names move
    unstable = device_name_problems(config)
    gateway = gateway_speed_problems(config)
    if args.json:
        print_json(
            {
                "ok": not warnings,
                "problems": [],
                "warnings": [{"key": k, "message": m} for k, m in warnings],
                "unstable_device_names": [{"key": k, "message": m} for k, m in unstable],
                "gateway_line_speed": [{"key": k, "message": m} for k, m in gateway],
                "cabinet_id": config.cabinet.id,
            }
        )
    else:
        for key, message in warnings:
            print(f"warning: {key}: {message}")
        for key, message in unstable + gateway:
            print(f"note: {key}: {message}")
        print(f"{args.config}: valid (cabinet {config.cabinet.id})", end="")
        print(f", {len(warnings)} warning(s)" if warnings else "")
    return EXIT_PROBLEM if warnings else EXIT_OK


# -- daemon, keys, tokens, events ----------------------------------------------------------------


#: OpenSSL's modules: libcrypto and libssl mapped, ~4 MB resident (DESIGN.md §6). asyncio,
#: http.client and paho import ``ssl``, and pydantic ``_hashlib`` (through secrets, hmac and
#: hashlib), whether or not anything speaks TLS; each carries on without them: hashlib with
#: Python's own hashes, hmac with ``_operator``'s compare_digest, paho with a stand-in
#: (drivers/paho_without_openssl.py), the others without TLS.
OPENSSL_MODULES = ("_hashlib", "ssl", "_ssl")
#: hashlib's own implementations, what it falls back to without ``_hashlib``
_BUILTIN_HASHES = ("_md5", "_sha1", "_sha256", "_sha512", "_blake2", "_sha3")


def _hold_back_openssl() -> None:
    """Make OpenSSL's modules unimportable until the daemon has read its configuration.

    ``None`` in ``sys.modules`` is Python's "not importable" marker. Only modules not yet
    loaded are held back (a test calling ``main`` in-process has them already), and
    ``_hashlib`` only where hashlib has every hash without it.
    """
    held: tuple[str, ...] = OPENSSL_MODULES
    if not all(importlib.util.find_spec(name) for name in _BUILTIN_HASHES):
        held = tuple(name for name in held if name != "_hashlib")
    for name in held:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def _hold_back_proxy_support() -> None:
    """No PySocks for paho: the daemon has no proxy setting, and its link has no proxy.

    PySocks is no dependency of ours (a development install has it for selenium); where
    paho finds it, it honours an ``mqtt_proxy`` environment variable and reads
    ``urllib.request``, which the daemon otherwise never loads (drivers/
    paho_without_proxy_support.py). Held back, every cabinet's link is the same.
    """
    sys.modules.setdefault("socks", None)  # type: ignore[arg-type]


def _release_openssl() -> None:
    for name in OPENSSL_MODULES:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


def _needs_openssl(config: CabinetConfig) -> bool:
    """Whether the daemon this configuration describes may need OpenSSL.

    A fleet link on ``mqtts://`` does, and so do firmware downloads (``[firmware]
    allowed_hosts``: a URL may be https). A link on ``mqtt://`` does not: paho's plain socket
    reads get the names they expect from ``drivers.paho_without_openssl``. The web display
    serves plain HTTP (h11 on asyncio's streams, no ``ssl``), and nothing else speaks TLS.
    """
    mqtts = config.mqtt is not None and config.mqtt.url.startswith("mqtts:")
    return mqtts or bool(config.firmware.allowed_hosts)


def _run_daemon(args: argparse.Namespace) -> int:
    """The daemon; OpenSSL only if its configuration needs it (``_hold_back_openssl``).

    Already imported by then, with OpenSSL held back: pydantic (without plugins) and hashlib
    (with Python's own hashes, in every daemon); asyncio, structlog and the daemon come
    after the choice.
    """
    from cabinet.daemon.config import load  # noqa: PLC0415

    config = load(Path(args.config))
    if _needs_openssl(config):
        _release_openssl()
    _configure_logs(config.log_level)
    from cabinet.daemon.run import run_daemon  # noqa: PLC0415 - only the daemon needs it

    return _await(run_daemon(config, Path(args.config)))


def _keys_generate(args: argparse.Namespace) -> int:
    from cabinet.daemon.tokens import KeyFileError, generate_keys  # noqa: PLC0415

    try:
        pair = generate_keys(args.prefix)
    except KeyFileError as exc:
        raise CliError(str(exc)) from exc
    print(f"wrote {pair.private} (keep secret, mode 0600) and {pair.public}")
    return EXIT_OK


def _token_issue(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    from cabinet.daemon.tokens import KeyFileError, issue, load_private_key  # noqa: PLC0415

    try:
        key = load_private_key(Path(args.key))
    except KeyFileError as exc:
        raise CliError(str(exc)) from exc
    if args.ttl <= 0:
        raise CliError("--ttl must be a positive number of seconds")
    print(
        issue(
            key,
            args.rider,
            now=int(time.time()),
            ttl_s=args.ttl,
            mode=args.mode,
            cabinet=args.cabinet,
        )
    )
    return EXIT_OK


def _token_verify(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    from cabinet.daemon.tokens import (  # noqa: PLC0415
        KeyFileError,
        TokenRefusedError,
        load_public_key,
        verify,
    )

    try:
        keys = [load_public_key(Path(p)) for p in args.pub]
        claims = verify(args.token, keys, now=int(time.time()), cabinet_id=args.cabinet)
    except KeyFileError as exc:
        raise CliError(str(exc)) from exc
    except TokenRefusedError as exc:
        if args.json:
            print_json({"valid": False, "reason": exc.reason, "message": str(exc)})
        else:
            print(f"refused ({exc.reason}): {exc}")
        return EXIT_PROBLEM
    if args.json:
        print_json({"valid": True, "claims": claims.model_dump(exclude_none=True)})
    else:
        print(
            f"valid: rider {claims.rider}, {claims.mode}, expires in "
            f"{claims.exp - int(time.time())} s"
        )
    return EXIT_OK


# -- simulator ---------------------------------------------------------------------------------


def _sim(args: argparse.Namespace) -> int:
    from sim.runner import SimOptions, serve  # noqa: PLC0415 - the daemon never imports sim

    given = {
        key: getattr(args, key)
        for key in ("bus", "scanner", "control", "baud", "seed", "reply_ms", "charge_speedup")
        if getattr(args, key) is not None
    }
    options = SimOptions(**given)
    _await(serve(options))
    return EXIT_OK


MAX_FLEET = 5000  # cabinets in one `sim fleet` run
MAX_BACKEND_CONSUMERS = 64  # `sim backend` consumers: each is a connection and two threads


def _sim_fleet(args: argparse.Namespace) -> int:
    from cabinet.demo.fleet_sim import main as fleet_main  # noqa: PLC0415 - loads the simulator

    if not 1 <= args.cabinets <= MAX_FLEET:
        raise CliError(f"--cabinets is 1-{MAX_FLEET}")
    if args.processes is not None and not 1 <= args.processes <= 64:
        raise CliError("--processes is 1-64")
    if not 1.0 <= args.pace <= 100.0:
        raise CliError("--pace is 1-100")
    return fleet_main(
        args.cabinets,
        args.broker,
        args.duration,
        args.seed,
        processes=args.processes,
        pace=args.pace,
    )


def _sim_backend(args: argparse.Namespace) -> int:
    """The backend stand-in: N consumers of one shared-subscription group, events printed."""
    from cabinet.demo.backend import run_consumers  # noqa: PLC0415 - the demo's backend
    from drivers.mqtt_link import parse_broker_url  # noqa: PLC0415

    address = parse_broker_url(args.broker)
    if address.tls:
        raise CliError("cabinet sim backend speaks mqtt:// only (a stand-in, not a backend)")
    if not 1 <= args.consumers <= MAX_BACKEND_CONSUMERS:
        raise CliError(f"--consumers is 1-{MAX_BACKEND_CONSUMERS}")
    if args.consumers > 1 and args.group is None:
        raise CliError("--consumers N needs --group NAME: without a group each gets every event")
    if args.dedup_window_s <= 0:
        raise CliError("--dedup-window-s must be positive")
    run_consumers(
        address.host,
        address.port,
        group=args.group,
        consumers=args.consumers,
        client_id=args.client_id or (f"backend-{args.group}" if args.group else "backend"),
        state_dir=Path(args.state_dir),
        seen_window_s=args.dedup_window_s,
        duration_s=args.duration,
        as_json=args.json,
    )
    return EXIT_OK


def _sim_ctl(args: argparse.Namespace) -> int:
    from sim.control import ControlError, call  # noqa: PLC0415
    from sim.endpoints import parse_listen  # noqa: PLC0415
    from sim.runner import DEFAULT_CONTROL  # noqa: PLC0415

    spec = parse_listen(args.control or DEFAULT_CONTROL, allow_pty=False)
    request: dict[str, Any] = {"verb": args.verb}
    for key in ("text", "bay", "battery", "soc", "temp", "kind", "unit", "rate"):
        if getattr(args, key, None) is not None:
            request[key] = getattr(args, key)
    for flag in ("unplugged", "unidentified"):
        if getattr(args, flag, False):
            request[flag] = True
    try:
        result = _await(call(spec.host, spec.port, request))
    except ControlError as exc:
        raise CliError(str(exc)) from exc
    if args.verb == "state" or args.json:
        print_json(result)
    else:
        print(" ".join(f"{k}={v}" for k, v in result.items()))
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------------


def _config_arg(parser: argparse.ArgumentParser) -> None:
    from cabinet.daemon.config import DEFAULT_CONFIG_PATH  # noqa: PLC0415 - loads pydantic

    parser.add_argument(
        "-c", "--config", default=os.environ.get("CABINET_CONFIG", str(DEFAULT_CONFIG_PATH))
    )


def _add_bus_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bus",
        help="bus URL (tcp://host:port, modbus-tcp://host:port or serial:///dev/...); "
        "default: bus.url from the config file",
    )
    _config_arg(parser)
    parser.add_argument("--timeout-ms", type=int, help="reply timeout per request")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _add_sim_parser(commands: Any) -> None:
    # Defaults live in sim.runner.SimOptions; the parser must not import sim, because the
    # daemon (`cabinet run`) builds this same parser and never loads the simulator.
    sim = commands.add_parser("sim", help="run the hardware simulator, or act on one (ctl)")
    sim.add_argument(
        "--bus",
        help="tcp://host:port, modbus-tcp://host:port or pty:///path "
        "(default tcp://127.0.0.1:5020)",
    )
    sim.add_argument(
        "--scanner", help="tcp://host:port or pty:///path (default tcp://127.0.0.1:5022)"
    )
    sim.add_argument("--control", help="tcp://host:port (default tcp://127.0.0.1:5021)")
    sim.add_argument("--baud", type=int, help="modelled line speed (default 19200)")
    sim.add_argument("--seed", type=int, help="makes the run reproducible (default 0)")
    sim.add_argument("--reply-ms", type=float, help="modelled slave turnaround (default 2 ms)")
    sim.add_argument(
        "--charge-speedup", type=float, help="batteries fill N times faster (demos; default 1)"
    )
    sim.set_defaults(handler=_sim)
    sim_commands = sim.add_subparsers(dest="sim_command", metavar="ctl | fleet | backend")
    ctl = sim_commands.add_parser("ctl", help="act on a running simulator")
    ctl.add_argument("--control", default=os.environ.get("CABINET_SIM_CONTROL"))
    ctl.add_argument("--json", action="store_true")
    ctl.set_defaults(handler=_sim_ctl)
    verbs = ctl.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("scan", help="the scanner reads TEXT").add_argument("text")
    insert = verbs.add_parser("insert", help="a rider puts a battery into an open bay")
    insert.add_argument("bay", type=int)
    insert.add_argument("--battery", required=True)
    insert.add_argument("--soc", type=float, required=True)
    insert.add_argument("--temp", type=float)
    insert.add_argument("--unplugged", action="store_true", help="connector not mated")
    insert.add_argument("--unidentified", action="store_true", help="BMS reports no id")
    verbs.add_parser("close", help="a rider shuts a door").add_argument("bay", type=int)
    verbs.add_parser("take", help="a rider takes the battery").add_argument("bay", type=int)
    fault = verbs.add_parser("fault", help="inject a fault")
    fault.add_argument("kind")
    fault.add_argument("--bay", type=int)
    fault.add_argument("--unit", type=int)
    fault.add_argument("--rate", type=float, help="share of replies corrupted (crc)")
    heal = verbs.add_parser("heal", help="clear faults (all, or one kind)")
    heal.add_argument("kind", nargs="?")
    heal.add_argument("--bay", type=int)
    verbs.add_parser("state", help="print the simulated state as JSON")
    fleet = sim_commands.add_parser(
        "fleet", help="N simulated cabinets with their daemon logic, over P processes, one broker"
    )
    fleet.add_argument("--cabinets", type=int, default=10, metavar="N")
    fleet.add_argument("--broker", required=True, help="mqtt://host:port")
    fleet.add_argument("--duration", type=float, default=60.0, metavar="S")
    fleet.add_argument("--seed", type=int, default=1)
    fleet.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="P",
        help="worker processes the cabinets are split over (default: one per core; "
        "at least one per 150 cabinets: paho's select() takes fds < 1024 only)",
    )
    fleet.add_argument(
        "--pace",
        type=float,
        default=1.0,
        metavar="F",
        help="each cabinet F times cheaper: bus transactions F x the 19200-baud wire time, "
        "riders and telemetry F x rarer (for a large N on a small machine)",
    )
    fleet.set_defaults(handler=_sim_fleet)
    _add_sim_backend_parser(sim_commands)


def _add_sim_backend_parser(sim_commands: Any) -> None:
    backend = sim_commands.add_parser(
        "backend",
        help="the backend stand-in: N consumers of one MQTT 5 shared-subscription group, "
        "each event printed once with the consumer that processed it",
    )
    backend.add_argument("--broker", required=True, help="mqtt://host:port")
    backend.add_argument(
        "--group",
        metavar="NAME",
        help="share cabinets/+/events as $share/NAME/...: each event to one consumer",
    )
    backend.add_argument(
        "--consumers", type=int, default=1, metavar="N", help="consumers in the group (default 1)"
    )
    backend.add_argument(
        "--client-id",
        metavar="PREFIX",
        help="consumer i is PREFIX-i, its broker session kept across restarts "
        "(default backend-NAME)",
    )
    backend.add_argument(
        "--state-dir",
        default="backend-state",
        metavar="DIR",
        help="the group's seen-ids file (de-duplication across restarts; default ./backend-state)",
    )
    backend.add_argument(
        "--dedup-window-s",
        type=float,
        default=7 * 24 * 3600.0,
        metavar="S",
        help="how long an event id is remembered (default a week)",
    )
    backend.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    backend.add_argument("--json", action="store_true", help="one JSON object per event")
    backend.set_defaults(handler=_sim_backend)


def _demo(args: argparse.Namespace) -> int:
    from cabinet.demo.run import main as demo_main  # noqa: PLC0415 - the demo loads the simulator

    if args.seed is None:
        return demo_main(args.duration)
    return demo_main(args.duration, args.seed)


def _add_bus_parser(commands: Any) -> None:
    bus = commands.add_parser("bus", help="raw bus diagnostics").add_subparsers(
        dest="bus_command", required=True, metavar="SUBCOMMAND"
    )
    scan = bus.add_parser("scan", help="find every unit: map/firmware version, health")
    _add_bus_target(scan)
    scan.set_defaults(handler=_bus_scan)
    read = bus.add_parser("read", help="read registers: UNIT ADDR COUNT")
    read.add_argument("unit", type=_parse_int)
    read.add_argument("address", type=_parse_int)
    read.add_argument("count", type=_parse_int)
    read.add_argument(
        "--holding",
        action="store_true",
        help="holding registers (FC03); default input registers (FC04)",
    )
    _add_bus_target(read)
    read.set_defaults(handler=_bus_read)
    write = bus.add_parser("write", help="write holding registers: UNIT ADDR VALUE...")
    write.add_argument("unit", type=_parse_int)
    write.add_argument("address", type=_parse_int)
    write.add_argument("values", type=_parse_int, nargs="+", metavar="VALUE")
    _add_bus_target(write)
    write.set_defaults(handler=_bus_write)


def _add_run_parser(commands: Any) -> None:
    run = commands.add_parser(
        "run", help="the daemon (what systemd starts)", formatter_class=_HelpFormatter
    )
    _config_arg(run)
    run.set_defaults(handler=_run_daemon)


def _add_daemon_parsers(commands: Any) -> None:
    _add_run_parser(commands)
    keys = commands.add_parser("keys", help="signing keys").add_subparsers(
        dest="keys_command", required=True, metavar="SUBCOMMAND"
    )
    generate = keys.add_parser("generate", help="write PREFIX.key and PREFIX.pub (Ed25519)")
    generate.add_argument("prefix")
    generate.set_defaults(handler=_keys_generate)

    token = commands.add_parser("token", help="rider QR tokens").add_subparsers(
        dest="token_command", required=True, metavar="SUBCOMMAND"
    )
    issue = token.add_parser("issue", help="sign a token, as the backend would")
    issue.add_argument("--key", required=True, help="PREFIX.key")
    issue.add_argument("--rider", required=True)
    issue.add_argument("--ttl", type=int, default=300, help="seconds (default 300)")
    issue.add_argument("--mode", choices=["swap", "pickup", "return"], default="swap")
    audience = issue.add_mutually_exclusive_group(required=True)
    audience.add_argument("--cabinet", help="only this cabinet may honour it")
    audience.add_argument(
        "--fleet-wide",
        action="store_true",
        help="no cab claim: refused unless the cabinet sets auth.require_cabinet_claim = false",
    )
    issue.set_defaults(handler=_token_issue)
    verify = token.add_parser("verify", help="check a token (does not use it up)")
    verify.add_argument("token")
    verify.add_argument("--pub", required=True, action="append", help="PREFIX.pub (repeatable)")
    verify.add_argument("--cabinet", help="check the token's audience against this cabinet id")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=_token_verify)


def _add_config_parser(commands: Any) -> None:
    config = commands.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="SUBCOMMAND"
    )
    check = config.add_parser("check", help="validate a config file, every problem with its key")
    _config_arg(check)
    check.add_argument("--json", action="store_true")
    check.set_defaults(handler=_config_check)


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, without importing shutil.

    argparse's help formatter asks shutil for the width whenever it is made, and every
    ``add_argument`` makes one: shutil (with bz2 and lzma, ~0.5 MB resident) would stay in
    the daemon for its lifetime for a width it never prints (DESIGN.md §6). Same rule:
    ``COLUMNS`` if a positive number, else the terminal on stdout, else 80.
    """
    with contextlib.suppress(KeyError, ValueError):
        if (columns := int(os.environ["COLUMNS"])) > 0:
            return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own, its width found without shutil (``_terminal_columns``)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _terminal_columns() - 2 if width is None else width  # argparse's own margin
        super().__init__(prog, indent_increment, max_help_position, width)


def _top_parser() -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(
        prog="cabinet", description=__doc__.splitlines()[0], formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"cabinet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, commands


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    # Imported here, not at the top: these commands' modules (with the fleet view and the
    # MQTT watcher) are loaded when the whole tree is built, which `cabinet run` never does.
    from cabinet.console.firmware_cli import add_firmware_parser  # noqa: PLC0415
    from cabinet.console.technician_cli import add_technician_parsers  # noqa: PLC0415
    from cabinet.console.watch_cli import add_watch_parser  # noqa: PLC0415

    parser, commands = _top_parser()
    _add_daemon_parsers(commands)
    _add_sim_parser(commands)
    demo = commands.add_parser(
        "demo", help="broker, simulator, daemon and riders on this machine, with a live view"
    )
    demo.add_argument(
        "--duration", type=float, help="run headless for S seconds, then print a summary"
    )
    demo.add_argument("--seed", type=int, help="the simulated cabinet's stock and riders' pace")
    demo.set_defaults(handler=_demo)
    _add_bus_parser(commands)
    _add_config_parser(commands)
    add_technician_parsers(commands)
    add_watch_parser(commands)
    add_firmware_parser(commands)
    return parser


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The whole tree, except for ``cabinet run ...``: the daemon's own command only.

    Both parse ``run ...`` the same way (same usage, help and errors: argparse hands
    everything after ``run`` to its subparser), but the whole tree would import every
    other command's module into the daemon for the rest of its life.
    """
    if argv[:1] != ["run"]:
        return build_parser()
    parser, commands = _top_parser()
    _add_run_parser(commands)
    return parser


def _run(handler: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    result = handler(args)
    if inspect.iscoroutine(result):
        result = _await(result)
    return int(result)


def _default_ctrl_c() -> None:
    """Ctrl-C (SIGINT) ends a follow or a live view even when we were started with it ignored.

    A shell starts a background job (``&``) with SIGINT ignored, its children inherit that,
    and Python then never raises KeyboardInterrupt: ``cabinet events --follow`` started from
    such a job (a script, a test runner in the background) could not be stopped by SIGINT.
    Only the main thread may set a handler (tests call ``main`` on threads of their own).
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cabinet`` console script."""
    _default_ctrl_c()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:
        _hold_back_openssl()  # before the parser, which loads pydantic: see _run_daemon
        pydantic_without_plugin_scan.skip_plugin_scan()  # before its first model, likewise
        _hold_back_proxy_support()
    else:
        # Diagnostics print their findings; the bus log lines would only repeat them.
        _configure_logs("error" if argv[:1] != ["sim"] else "info")
    args = _parser_for(argv).parse_args(argv)
    try:
        return _run(args.handler, args)
    except KeyboardInterrupt:
        # Ctrl-C is how a person ends a follow or a live view: that is success
        follows = args.command in {"sim", "demo", "watch"} or getattr(args, "follow", False)
        return EXIT_OK if follows else EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a trace
        return _failed(exc)


def _failed(exc: Exception) -> int:
    """Say why a command failed in one line on stderr, never a traceback; its exit code.

    The classes are imported here, not at the top (see the module's docstring).
    """
    from cabinet.daemon.config import ConfigError  # noqa: PLC0415
    from cabinet.daemon.control_client import DaemonNotRunningError  # noqa: PLC0415
    from drivers.modbus_bus import BusError  # noqa: PLC0415

    if isinstance(exc, DaemonNotRunningError):
        print(f"cabinet: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    if isinstance(exc, ConfigError):
        for key, message in exc.problems:
            print(f"cabinet: config {key}: {message}", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(exc, CliError | BusError | BusUrlError | ValueError | OSError):
        print(f"cabinet: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"cabinet: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
