"""A command that prints one JSON object per line, running; its lines collected as they come.

``cabinet watch --json`` and ``cabinet sim backend --json`` are both read this way: a
thread per pipe, so a test can poll ``rows`` while the process runs, and Ctrl-C to end it
as an operator would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from typing import Any


class JsonLinesProcess:
    """``proc`` (text pipes) read line by line: stdout as JSON rows, stderr as notices."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.rows: list[dict[str, Any]] = []
        self.notices: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_rows, daemon=True),
            threading.Thread(target=self._read_notices, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_rows(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.rows.append(json.loads(line))  # every line must be one JSON object

    def _read_notices(self) -> None:
        assert self.proc.stderr is not None
        self.notices.extend(self.proc.stderr)

    def stop(self, timeout: float = 20) -> int:
        """Ctrl-C (how an operator ends it), then its exit code once both pipes are read."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code
