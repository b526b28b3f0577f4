"""The `cabinet watch` command line: its arguments here, the operator tool loaded only to run it.

The console owns every command's name and arguments (the outside contract); the fleet view
itself is a laptop tool in ``cabinet.operator`` that a cabinet's `cabinet run` never loads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cabinet.core.battery_rules import DispenseRules

#: Where `cabinet watch` takes the broker password from, so it stays out of the process list.
PASSWORD_ENV = "CABINET_WATCH_PASSWORD"  # noqa: S105
#: The daemon's default dispensing threshold, until a cabinet's ``settings.changed`` says more.
_DEFAULT_READY_SOC_PCT = DispenseRules().min_soc_pct


def _run_watch(args: argparse.Namespace) -> int:
    from cabinet.operator.fleet_watch import run_watch  # noqa: PLC0415 - operator tool only

    return run_watch(args)


def add_watch_parser(commands: Any) -> None:
    """Add ``watch`` to the ``cabinet`` subcommands."""
    parser = commands.add_parser(
        "watch",
        help="live view of every cabinet on a broker (operator)",
        description="Subscribe to cabinets/+/{status,state,telemetry,events} and show one row "
        "per cabinet: online, bays, alarms, last swap, outbox backlog, event-stream gaps.",
    )
    parser.add_argument(
        "--broker", required=True, metavar="URL", help="mqtt://host[:1883] or mqtts://host[:8883]"
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per line: a cabinet's row on change"
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="stop after S seconds, print the final table, exit 0 (default: until Ctrl-C)",
    )
    parser.add_argument(
        "--ready-soc",
        type=float,
        default=_DEFAULT_READY_SOC_PCT,
        metavar="PCT",
        help="dispensing threshold until a cabinet's settings.changed says otherwise "
        f"(default {_DEFAULT_READY_SOC_PCT:g})",
    )
    parser.add_argument("--username", metavar="USER")
    parser.add_argument(
        "--password",
        metavar="PASS",
        default=os.environ.get(PASSWORD_ENV),
        help=f"default: ${PASSWORD_ENV} (keeps it out of the process list)",
    )
    parser.add_argument(
        "--ca-file", type=Path, metavar="FILE", help="CA bundle (default: the system's)"
    )
    parser.add_argument("--client-cert", type=Path, metavar="FILE", help="client certificate (PEM)")
    parser.add_argument(
        "--client-key", type=Path, metavar="FILE", help="its key, if not inside --client-cert"
    )
    parser.set_defaults(handler=_run_watch)
