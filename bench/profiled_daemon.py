"""``cabinet run`` under cProfile (CPU time), switched on and off by signals from the bench.

SIGUSR1 starts profiling the main thread (the event loop), SIGUSR2 stops it and writes
the statistics to the file named first on the command line; the rest of the command
line is ``cabinet``'s. The profile then covers the measurement window only, not the
imports and the start-up, and counts CPU time, not waiting.

    python bench/profiled_daemon.py OUT.prof run -c cabinet.toml
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
import time
from types import FrameType

profile = cProfile.Profile(time.process_time)
out = sys.argv[1]


def start(_signum: int, _frame: FrameType | None) -> None:
    profile.enable()


def stop(_signum: int, _frame: FrameType | None) -> None:
    profile.disable()
    profile.dump_stats(out)


signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
sys.argv = ["cabinet", *sys.argv[2:]]
runpy.run_module("cabinet.console.cli", run_name="__main__")
