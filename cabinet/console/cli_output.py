"""What every ``cabinet`` subcommand prints and returns: one style, one set of exit codes.

Exit codes scripts can rely on: 0 success, 1 error, 2 usage, 3 the command ran
but found a problem (a unit silent, a config problem, a self-test failure), 4 the
daemon is not running (for commands that need it). "Could not look" and "looked
and saw trouble" are different answers.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PROBLEM = 3
EXIT_NO_DAEMON = 4


class CliError(Exception):
    """An error whose message is the one line the user sees."""


def print_json(data: Any) -> None:
    """Pretty JSON for one answer."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_json_line(data: Any) -> None:
    """One JSON object per line, flushed: for streams another program reads as they come."""
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A plain aligned table; None shows as ``-``."""
    cells = [list(map(str, headers))] + [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )
