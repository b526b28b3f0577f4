"""``cabinet run`` with its garbage collector watched (and optionally frozen) by the bench.

Why: callgrind counts fewer user-space instructions per transaction for the daemon than
for a plain pymodbus client, yet the daemon spends more CPU per transaction. One
suspect is the cyclic garbage collector: a full collection walks every object of the
daemon's large heap (cache misses, few instructions each). This wrapper measures the
collector's own share and can take the start-up heap out of its reach.

SIGUSR1 starts the window: if ``GC_DAEMON_FREEZE=1`` is in the environment it first
calls ``gc.freeze()`` (everything alive after start-up moves to a permanent generation
no collection walks). SIGUSR2 ends it and writes JSON to the file named first on the
command line: collections per generation in the window, the CPU time inside collections
(``gc.callbacks``, ``time.process_time``) and the objects tracked. The rest of the
command line is ``cabinet``'s.

    GC_DAEMON_FREEZE=1 python bench/gc_daemon.py OUT.json run -c cabinet.toml
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

out = Path(sys.argv[1])
state: dict[str, Any] = {"on": False, "started": 0.0, "gc_cpu_s": [0.0, 0.0, 0.0]}
stats0: list[dict[str, int]] = []


def watch(phase: str, info: dict[str, int]) -> None:
    """``gc.callbacks`` hook: CPU time inside each collection, by generation."""
    if not state["on"]:
        return
    if phase == "start":
        state["started"] = time.process_time()
    else:
        state["gc_cpu_s"][info["generation"]] += time.process_time() - state["started"]


def start(_signum: int, _frame: FrameType | None) -> None:
    if os.environ.get("GC_DAEMON_FREEZE") == "1":
        gc.collect()
        gc.freeze()
    stats0[:] = gc.get_stats()
    state["cpu0"] = time.process_time()
    state["on"] = True


def stop(_signum: int, _frame: FrameType | None) -> None:
    state["on"] = False
    stats = gc.get_stats()
    out.write_text(
        json.dumps(
            {
                "frozen": gc.get_freeze_count(),
                "tracked": len(gc.get_objects()),
                "collections": [
                    b["collections"] - a["collections"] for a, b in zip(stats0, stats, strict=True)
                ],
                "gc_cpu_s": state["gc_cpu_s"],
                "cpu_s": time.process_time() - state["cpu0"],
            }
        )
    )


gc.callbacks.append(watch)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
sys.argv = ["cabinet", *sys.argv[2:]]
runpy.run_module("cabinet.console.cli", run_name="__main__")
