"""Starting ``cabinet sim`` as its own process and learning where it listens.

Tests, benchmarks and tools all need "a simulator on free ports": this is the one
place that starts it, waits for its ready line and stops it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

FREE = "tcp://127.0.0.1:0"


def start_simulator(
    *extra: str,
    bus: str = FREE,
    scanner: str = FREE,
    control: str = FREE,
    cwd: Path | None = None,
    own_session: bool = False,
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start `cabinet sim`; return the process and its ready line (the URLs it bound).

    ``own_session`` keeps a terminal's Ctrl-C away from it: the demo stops its parts
    itself, in order, after the summary has what it needs from them.
    """
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and CLI, fixed arguments
        [
            sys.executable,
            "-m",
            "cabinet.console.cli",
            "sim",
            "--bus",
            bus,
            "--scanner",
            scanner,
            "--control",
            control,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
        start_new_session=own_session,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the simulator listens (or dies)
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError("cabinet sim exited before it was ready")
    return proc, dict(json.loads(line)["ready"])


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not go within ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
