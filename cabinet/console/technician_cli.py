"""The technician's commands that go through the running daemon's control socket.

``status``, ``bays``, ``events``, ``doctor``, ``selftest`` and ``bay open|disable|enable``
ask the daemon; when it is not running they say so in one line and exit 4 —
except ``events``, which then reads the journal directly (the history is most
wanted exactly when the daemon is down). ``bus scan|read|write`` use the same
routing through ``run_on_daemon`` and fall back to the bus itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cabinet.console.cli_output import (
    EXIT_NO_DAEMON,
    EXIT_OK,
    EXIT_PROBLEM,
    CliError,
    print_json,
    print_json_line,
    table,
)
from cabinet.daemon.config import DEFAULT_CONFIG_PATH, CabinetSection, load_section
from cabinet.daemon.control_client import (
    ControlProtocolError,
    ControlRefusedError,
    DaemonNotRunningError,
    request,
)

SELFTEST_LINE_TIMEOUT_S = 700.0  # longer than the longest door wait the daemon accepts


def socket_path(args: argparse.Namespace) -> Path:
    """The daemon's control socket, from ``[cabinet]`` of the config file."""
    return load_section(Path(args.config), "cabinet", CabinetSection).control_socket_path


def ask(
    args: argparse.Namespace,
    verb: str,
    request_args: dict[str, Any] | None = None,
    **options: Any,
) -> Any:
    """One request to the daemon; its refusals become one-line errors."""
    try:
        return asyncio.run(request(socket_path(args), verb, request_args, **options))
    except ControlRefusedError as exc:
        raise CliError(f"{exc} ({exc.code})") from None
    except ControlProtocolError as exc:
        raise CliError(str(exc)) from None


def _when(ts_ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts_ms / 1000))


def _yes_no(value: bool | None, yes: str, no: str) -> str | None:
    return None if value is None else (yes if value else no)


# -- status and bays ------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    status = ask(args, "status")
    if args.json:
        print_json(status)
        return EXIT_OK
    ready = "ready" if status["ready"] else "starting (reconciling with the boards)"
    print(
        f"cabinet {status['cabinet_id']}  version {status['version']}  "
        f"up {status['uptime_s']} s  {ready}"
    )
    session = status["session"]
    if session is None:
        accepting = "accepting riders" if status["refusal"] is None else status["refusal"]
        print(f"session   none ({accepting})")
    else:
        print(
            f"session   {session['session_id']}  rider {session['rider_id']}  {session['mode']}  "
            f"{session['phase']}  return bay {session['return_bay'] or '-'}  "
            f"dispense bay {session['dispense_bay'] or '-'}"
        )
    if status["prompt"]:
        print(f"prompt    {status['prompt']}")
    bays = status["bays"]
    print(
        f"bays      {bays['online']}/12 online, {bays['empty']} empty, {bays['ready']} ready, "
        f"{bays['charging']} charging, {bays['out_of_service']} out of service"
    )
    cabinet = status["cabinet"]
    safety = []
    if cabinet["smoke"]:
        safety.append("SMOKE")
    if cabinet["mains_present"] is False:
        safety.append("MAINS LOST")
    print(f"safety    {', '.join(safety) or 'ok'}")
    mqtt = status["mqtt"]
    link = (
        "not configured"
        if mqtt is None
        else (f"{'connected to' if mqtt['connected'] else 'NOT connected to'} {mqtt['url']}")
    )
    print(f"mqtt      {link}; outbox {status['outbox_depth']} waiting")
    if status["tasks_failing"]:
        print(f"tasks     FAILING: {', '.join(status['tasks_failing'])} (see `cabinet doctor`)")
    return EXIT_OK


def _bays(args: argparse.Namespace) -> int:
    bays = ask(args, "bays")
    if args.json:
        print_json(bays)
        return EXIT_OK
    rows: list[tuple[object, ...]] = []
    for b in bays:
        if not b["online"]:
            rows.append((b["bay"], "offline", None, None, None, None, None, None, _service(b)))
            continue
        battery = b["battery_id"] or ("unidentified" if b["battery_present"] else None)
        rows.append(
            (
                b["bay"],
                b["door"],
                _yes_no(b["locked"], "locked", "open"),
                battery,
                None if b["soc_pct"] is None else f"{b['soc_pct']:.0f}%",
                None if b["cell_temp_c"] is None else f"{b['cell_temp_c']:.1f}",
                None if b["bay_temp_c"] is None else f"{b['bay_temp_c']:.1f}",
                _yes_no(b["charging"], "yes", "no"),
                _service(b),
            )
        )
    headers = ["BAY", "DOOR", "LOCK", "BATTERY", "SOC", "CELL_C", "AIR_C", "CHARGING", "SERVICE"]
    print(table(rows, headers))
    return EXIT_OK


def _service(bay: dict[str, Any]) -> str:
    return "in service" if bay["in_service"] else f"OUT: {bay['out_of_service_reason']}"


# -- events ---------------------------------------------------------------------------------


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json_line(event)
        return
    detail = " ".join(f"{k}={v}" for k, v in event.items() if k not in {"seq", "id", "type", "ts"})
    print(f"{event['seq']:>6}  {_when(event['ts'])}  {event['type']:<24} {detail}", flush=True)


#: the largest page the control socket serves (``EventsArgs.limit``)
EVENT_PAGE_MAX = 10_000


def _newest(fetch: Callable[[int, int], list[dict[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` events, oldest first: without ``--after`` the log ends "now".

    The journal keeps a bounded history, so paging to its end is a few requests at most.
    """
    newest: list[dict[str, Any]] = []
    after = 0
    while True:
        page = fetch(after, EVENT_PAGE_MAX)
        newest = (newest + page)[-limit:]
        if len(page) < EVENT_PAGE_MAX:
            return newest
        after = page[-1]["seq"]


def _events(args: argparse.Namespace) -> int:
    try:
        if args.after is None:  # the newest events (then follow on from them)
            newest = _newest(
                lambda after, limit: ask(args, "events", {"after": after, "limit": limit}),
                args.limit,
            )
            for event in newest:
                _print_event(event, args.json)
            args.after = newest[-1]["seq"] if newest else 0
            if not args.follow:
                return EXIT_OK
        if args.follow:
            ask(
                args,
                "events",
                {"after": args.after, "follow": True},
                timeout_s=None,
                on_progress=lambda e: _print_event(e, args.json),
            )
        else:
            events = ask(args, "events", {"after": args.after, "limit": args.limit})
            for event in events:
                _print_event(event, args.json)
    except DaemonNotRunningError:
        print("cabinet: the daemon is not running: reading its journal", file=sys.stderr)
        return _events_from_journal(args)
    return EXIT_OK


def _events_from_journal(args: argparse.Namespace) -> int:
    from cabinet.daemon.journal import Journal  # noqa: PLC0415
    from cabinet.daemon.run import JOURNAL_FILE  # noqa: PLC0415 - only this fallback needs it

    state_dir = load_section(Path(args.config), "cabinet", CabinetSection).state_dir
    path = state_dir / JOURNAL_FILE
    if not path.exists():
        raise CliError(f"no journal at {path} (has the daemon run with this config?)")
    journal = Journal(path)
    after = args.after
    try:
        if after is None:  # the newest events, as through the daemon
            newest = _newest(lambda a, n: journal.events(after_seq=a, limit=n), args.limit)
            for event in newest:
                _print_event(event, args.json)
            if not args.follow:
                return EXIT_OK
            after = newest[-1]["seq"] if newest else 0
        while True:
            for event in journal.events(after_seq=after, limit=args.limit):
                after = event["seq"]
                _print_event(event, args.json)
            if not args.follow:
                return EXIT_OK
            time.sleep(0.5)  # another process writes this file: polling is the only way
    finally:
        journal.close()


# -- doctor and selftest ----------------------------------------------------------------------


def _doctor(args: argparse.Namespace) -> int:
    checks = ask(args, "doctor")["checks"]
    failed = sum(c["verdict"] == "fail" for c in checks)
    if args.json:
        print_json({"checks": checks, "failed": failed})
    else:
        for check in checks:
            print(f"{check['verdict'].upper():<5} {check['name']:<28} {check['detail']}")
        warned = sum(c["verdict"] == "warn" for c in checks)
        print(f"{len(checks) - failed - warned} ok, {warned} warn, {failed} fail")
    return EXIT_PROBLEM if failed else EXIT_OK


def _selftest_progress(item: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json_line(item)
    elif "prompt" in item:
        print(f">>> {item['prompt']}", flush=True)
    elif "result" in item:
        r = item["result"]
        where = "" if r["bay"] is None else f" bay {r['bay']}"
        print(f"{r['outcome'].upper():<4}  {r['part'] + where:<16} {r['detail']}", flush=True)


def _selftest(args: argparse.Namespace) -> int:
    request_args: dict[str, Any] = {"close_timeout_s": args.close_timeout}
    if args.bay:
        request_args["bays"] = args.bay
    result = ask(
        args,
        "selftest",
        request_args,
        timeout_s=SELFTEST_LINE_TIMEOUT_S,
        on_progress=lambda item: _selftest_progress(item, args.json),
    )
    results = result["results"]
    failed = [r for r in results if r["outcome"] == "fail"]
    if args.json:
        print_json_line({"summary": {"results": len(results), "failed": len(failed)}})
    else:
        passed = sum(r["outcome"] == "pass" for r in results)
        skipped = len(results) - passed - len(failed)
        print(f"self-test: {passed} passed, {len(failed)} failed, {skipped} skipped")
    return EXIT_PROBLEM if failed else EXIT_OK


# -- bay actions ----------------------------------------------------------------------------


def _bay_action(args: argparse.Namespace) -> int:
    request_args: dict[str, Any] = {"bay": args.bay}
    if args.bay_command == "disable":
        request_args["reason"] = args.reason
    result = ask(args, f"bay.{args.bay_command}", request_args)
    if args.json:
        print_json(result)
    elif args.bay_command == "open":
        print(f"bay {args.bay}: unlock sent")
    else:
        state = "in service" if result["in_service"] else f"out of service ({args.reason})"
        print(f"bay {args.bay}: {state}")
    return EXIT_OK


# -- the parser -----------------------------------------------------------------------------


def common_options(parser: argparse.ArgumentParser) -> None:
    """``-c`` and ``--json``, as every daemon-facing command takes them."""
    parser.add_argument(
        "-c", "--config", default=os.environ.get("CABINET_CONFIG", str(DEFAULT_CONFIG_PATH))
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def bay_number(text: str) -> int:
    """An argparse type: a bay number 1-12."""
    try:
        bay = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bay number") from None
    if not 1 <= bay <= 12:
        raise argparse.ArgumentTypeError("bays are numbered 1-12")
    return bay


def add_technician_parsers(commands: Any) -> None:
    """``status``, ``bays``, ``events``, ``doctor``, ``selftest`` and ``bay``."""
    status = commands.add_parser("status", help="the cabinet at a glance (through the daemon)")
    common_options(status)
    status.set_defaults(handler=_status)

    bays = commands.add_parser("bays", help="every bay: door, lock, battery, charging, service")
    common_options(bays)
    bays.set_defaults(handler=_bays)

    events = commands.add_parser("events", help="the cabinet's event log")
    common_options(events)
    events.add_argument("--follow", action="store_true", help="keep printing new events")
    events.add_argument(
        "--after",
        type=int,
        default=None,
        metavar="SEQ",
        help="events after this seq, oldest first (default: the newest --limit events)",
    )
    events.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    events.set_defaults(handler=_events)

    doctor = commands.add_parser("doctor", help="health report with a verdict per line")
    common_options(doctor)
    doctor.set_defaults(handler=_doctor)

    selftest = commands.add_parser(
        "selftest", help="exercise every lock, door sensor, charger and the meter (idle cabinet)"
    )
    common_options(selftest)
    selftest.add_argument(
        "--bay", type=bay_number, action="append", help="test only this bay (repeatable)"
    )
    selftest.add_argument(
        "--close-timeout", type=float, default=60.0, metavar="S", help="wait for a door (60 s)"
    )
    selftest.set_defaults(handler=_selftest)

    bay = commands.add_parser("bay", help="open a bay, take it out of service, put it back")
    actions = bay.add_subparsers(dest="bay_command", required=True, metavar="ACTION")
    for name, text in (
        ("open", "unlock a bay's door (no session needed)"),
        ("disable", "take a bay out of service"),
        ("enable", "put a bay back in service (also lifts an over-temperature trip)"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("bay", type=bay_number)
        if name == "disable":
            action.add_argument("--reason", required=True, help="shown to operators")
        common_options(action)
        action.set_defaults(handler=_bay_action)


def run_on_daemon(args: argparse.Namespace, verb: str, request_args: dict[str, Any]) -> Any:
    """Ask the daemon, or return None when it is not running (the caller goes direct)."""
    try:
        return ask(args, verb, request_args)
    except DaemonNotRunningError:
        return None


__all__ = ["EXIT_NO_DAEMON", "add_technician_parsers", "run_on_daemon"]
