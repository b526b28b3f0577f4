"""The cabinet board on its own period (``bus.cabinet_board_interval_s``), end to end.

The cabinet board (smoke, mains, contactor read-back) used to be read once every 12-bay
cycle: at 115200 baud that is ~9 reads a second of a board whose news is needed within
a second. Now it is read when its interval is due, checked between bay reads. What a
user notices: the simulator's own counters show the board read about once per interval
(not once per cycle), and smoke is still acted on with a long interval
(``tests/test_safety_end_to_end.py``, parametrized with a 2 s period).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocol.units import BAY_UNITS, CABINET_BOARD_UNIT
from tests.conftest import cabinet_cmd
from tests.daemon_harness import running_cabinet, wait_until

WINDOW_S = 3.0  # on the simulator's clock: ~27 cycles at 115200 baud on an idle machine
#: "Not once per cycle" can only be seen while a cycle is well shorter than the interval.
#: A cycle is mostly the daemon's and the simulator's CPU time, so load stretches it: a CI
#: run with the suite on 6 workers made 11 cycles in 3 s, and a 0.4 s period then read the
#: board at 7 of them, as often as it should and yet more than every other cycle. The
#: configured period is therefore longer than the default (docs/hardware.md allows up to
#: 10 s), and its window four periods, so the count still tells it from the default's.
CONFIGURED_S = 2.0


def reads(state: dict[str, Any], unit: int) -> int:
    return int(state["bus"]["units"][str(unit)]["reads"])


@pytest.mark.parametrize("interval_s", [None, CONFIGURED_S], ids=["default", "configured"])
def test_the_cabinet_board_is_read_once_per_interval_not_once_per_cycle(
    tmp_path: Path, interval_s: float | None
) -> None:
    extra = {} if interval_s is None else {"bus": {"cabinet_board_interval_s": interval_s}}
    interval = 1.0 if interval_s is None else interval_s
    window_s = max(WINDOW_S, 4 * interval)
    with running_cabinet(tmp_path, extra=extra) as cab:
        # steady state: recovery done, contactor closed (its close is read back at once)
        wait_until("the contactor to close", lambda: cab.state()["cabinet"]["contactor_closed"])
        before = cab.state()
        after = wait_until(
            "a window on the simulator's clock",
            lambda: (
                s if (s := cab.state())["bus"]["now"] - before["bus"]["now"] >= window_s else None
            ),
        )
    elapsed = after["bus"]["now"] - before["bus"]["now"]
    cycles = min(reads(after, bay) - reads(before, bay) for bay in BAY_UNITS)
    board = reads(after, CABINET_BOARD_UNIT) - reads(before, CABINET_BOARD_UNIT)
    # read when due, at the next bay boundary: once per interval, give or take the window's edges
    assert board <= elapsed / interval + 2, (board, elapsed, cycles)
    assert board >= elapsed / (1.5 * interval) - 1, (board, elapsed, cycles)
    assert board < cycles / 2, (board, elapsed, cycles)  # not once per 12-bay cycle


@pytest.mark.parametrize("value", ["0", "11"])
def test_config_check_refuses_an_interval_out_of_range(tmp_path: Path, value: str) -> None:
    path = tmp_path / "cabinet.toml"
    path.write_text(
        '[cabinet]\nid = "cab-0042"\n'
        f'[bus]\nurl = "tcp://127.0.0.1:5020"\ncabinet_board_interval_s = {value}\n'
    )
    result = cabinet_cmd("config", "check", "-c", str(path), "--json")
    assert result.returncode == 3, result.stdout
    problems = {p["key"] for p in json.loads(result.stdout)["problems"]}
    assert problems == {"bus.cabinet_board_interval_s"}
