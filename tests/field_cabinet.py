"""A real `cabinet run` against a real `cabinet sim` wired as field installations are.

``running_cabinet`` (daemon_harness) wires the daemon to the simulator over RTU over
TCP; here the bus can be a Modbus/TCP gateway or a serial port and the scanner an
input device, while the rest (journal, events, rider tokens) is the same harness.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sim.launcher import FREE
from tests.conftest import SimProcess, cabinet_cmd, start_sim_process, stop_sim_process
from tests.daemon_harness import Cabinet, write_config


@contextmanager
def field_cabinet(
    tmp: Path,
    *,
    sim_bus: str = FREE,
    bus_url: Callable[[SimProcess], str] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    seed: int = 3,
) -> Iterator[Cabinet]:
    """Simulator listening at ``sim_bus``; the daemon's bus URL is ``bus_url(sim)``.

    ``bus_url`` may wire something between the two first (an adapter); by default the
    daemon uses the URL the simulator announced.
    """
    sim = start_sim_process("--baud", "115200", "--reply-ms", "0", "--seed", str(seed), bus=sim_bus)
    try:
        result = cabinet_cmd("keys", "generate", str(tmp / "backend"))
        assert result.returncode == 0, result.stderr
        url = sim.bus if bus_url is None else bus_url(sim)
        sections = {"bus": {"url": url}, **(extra or {})}
        config = write_config(tmp, sim, sections)
        cab = Cabinet(sim, tmp, config, tmp / "backend.key")
        cab.start()
        try:
            yield cab
        finally:
            cab.stop()
            log = tmp / "daemon.log"
            if log.exists() and os.environ.get("CABINET_TEST_SHOW_LOG"):
                sys.stderr.write(log.read_text())
    finally:
        stop_sim_process(sim)
