"""``cabinet firmware status | update | sign``: bay-board firmware for technicians and vendors.

``status`` and ``update`` go through the running daemon (it owns the bus and knows
which bays are idle); the CLI reads the image file itself and sends its bytes, so
the daemon never needs to read a technician's files. ``sign`` is the vendor's side:
it wraps a payload into a signed image (docs/firmware.md).
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

from cabinet.console.cli_output import (
    EXIT_OK,
    EXIT_PROBLEM,
    CliError,
    print_json,
    print_json_line,
    table,
)
from cabinet.console.technician_cli import ask, bay_number, common_options
from cabinet.daemon.tokens import KeyFileError, load_private_key
from firmware_bridge.image import HEADER_BYTES, build_image, parse_version
from firmware_bridge.image_file import ImageSourceError, load_image_file
from protocol.firmware_map import BOARD_TYPES, MAX_IMAGE_BYTES
from protocol.units import BAY_UNITS

BAR = 30
UPDATE_LINE_TIMEOUT_S = 180.0  # between two progress lines: a reboot plus a slow line


def _status(args: argparse.Namespace) -> int:
    bays = ask(args, "firmware.status")["bays"]
    if args.json:
        print_json({"bays": bays})
        return EXIT_OK
    rows = [
        (
            b["bay"],
            "yes" if b["online"] else "NO",
            b.get("map_version"),
            b.get("version"),
            b.get("bootloader") or ("no window (map 1)" if b["online"] else None),
            b.get("staged_bytes") or None,
        )
        for b in bays
    ]
    print(table(rows, ["BAY", "ONLINE", "MAP", "VERSION", "BOOTLOADER", "STAGED_BYTES"]))
    return EXIT_OK


class _Bar:
    """One progress line per bay, redrawn in place on a terminal, every 10 % otherwise."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = sys.stdout.isatty()
        self._last: tuple[int, str, int] | None = None

    def __call__(self, item: dict[str, Any]) -> None:
        if self.as_json:
            print_json_line(item)
            return
        if "result" in item:
            r = item["result"]
            end = "\n" if self.tty and self._last is not None else ""
            print(f"{end}bay {r['bay']}: {r['outcome']} ({r['detail']})", flush=True)
            self._last = None
            return
        p = item["progress"]
        percent = 100 * p["sent"] // p["total"]
        key = (p["bay"], p["phase"], percent // (1 if self.tty else 10))
        if key == self._last:
            return
        self._last = key
        filled = BAR * percent // 100
        line = (
            f"bay {p['bay']:>2} {p['phase']:<10} [{'#' * filled}{'.' * (BAR - filled)}] "
            f"{percent:3d}%  {p['sent'] / 1024:6.1f}/{p['total'] / 1024:.1f} KiB"
        )
        if self.tty:
            print(f"\r{line}", end="", flush=True)
        else:
            print(line, flush=True)


def _update(args: argparse.Namespace) -> int:
    if not args.all and not args.bay:
        raise CliError("say which bays: --bay N (repeatable) or --all")
    try:  # a regular file only: a FIFO or a device would hang the command (docs/firmware.md)
        data = load_image_file(Path(args.image), MAX_IMAGE_BYTES + HEADER_BYTES)
    except ImageSourceError as exc:
        if exc.reason == "too_large":
            raise CliError(f"{args.image} is too large for a bay board") from None
        raise CliError(str(exc)) from None
    request = {
        "image_b64": base64.b64encode(data).decode(),
        "bays": list(BAY_UNITS) if args.all else args.bay,
        "force": args.force,
    }
    answer = ask(
        args,
        "firmware.update",
        request,
        timeout_s=UPDATE_LINE_TIMEOUT_S,
        on_progress=_Bar(args.json),
    )
    results = answer["results"]
    if args.json:
        print_json_line({"summary": answer})
    else:
        counts = {
            o: sum(r["outcome"] == o for r in results) for o in ("updated", "skipped", "failed")
        }
        print(
            f"firmware {answer['version']}: {counts['updated']} updated, "
            f"{counts['skipped']} skipped, {counts['failed']} failed"
        )
    failed = any(r["outcome"] == "failed" for r in results)
    skipped_asked = not args.all and any(r["outcome"] == "skipped" for r in results)
    return EXIT_PROBLEM if failed or skipped_asked else EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    try:
        payload = Path(args.payload).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {args.payload}: {exc.strerror or exc}") from None
    try:
        key = load_private_key(Path(args.key))
    except KeyFileError as exc:
        raise CliError(str(exc)) from exc
    image = build_image(
        payload, version=parse_version(args.version), board_type=BOARD_TYPES[args.target], key=key
    )
    Path(args.output).write_bytes(image)
    print(
        f"wrote {args.output}: {args.target} firmware {args.version}, {len(payload)} bytes, signed"
    )
    return EXIT_OK


def add_firmware_parser(commands: Any) -> None:
    """``firmware status``, ``firmware update``, ``firmware sign``."""
    firmware = commands.add_parser("firmware", help="bay-board firmware").add_subparsers(
        dest="firmware_command", required=True, metavar="SUBCOMMAND"
    )
    status = firmware.add_parser("status", help="every bay board's map, version, bootloader")
    common_options(status)
    status.set_defaults(handler=_status)

    update = firmware.add_parser("update", help="flash a signed image onto idle bays")
    update.add_argument("image", help="a signed image (cabinet firmware sign)")
    update.add_argument("--bay", type=bay_number, action="append", help="this bay (repeatable)")
    update.add_argument("--all", action="store_true", help="every bay (busy ones are skipped)")
    update.add_argument("--force", action="store_true", help="flash even if not newer")
    common_options(update)
    update.set_defaults(handler=_update)

    sign = firmware.add_parser("sign", help="wrap a payload into a signed image (vendor)")
    sign.add_argument("payload")
    sign.add_argument("--key", required=True, help="PREFIX.key (cabinet keys generate)")
    sign.add_argument("--version", required=True, help="MAJOR.MINOR, e.g. 1.4")
    sign.add_argument("--target", choices=sorted(BOARD_TYPES), default="bay-board")
    sign.add_argument("-o", "--output", required=True)
    sign.set_defaults(handler=_sign)
