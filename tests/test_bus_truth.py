"""The daemon tells the truth about the bus: silent units are news, a lost bus is paced.

Real ``cabinet run`` against a real ``cabinet sim``; what a technician or an operator
sees (the journal's events, ``cabinet bays``, ``cabinet doctor``, the process's CPU).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from cabinet.daemon.bay_poller import MIN_POLL_CYCLE_S
from tests.conftest import cabinet_cmd, start_sim_process, stop_sim_process
from tests.daemon_harness import Cabinet, running_cabinet, wait_until

MEASURE_S = 3.0  # the window over which the daemon's pace is measured
CPU_SHARE_LIMIT = 0.25  # of one core; a busy loop takes ~1.0, a paced daemon a few percent


def tech_json(cab: Cabinet, *args: str) -> Any:
    result = cabinet_cmd(*args, "-c", str(cab.config), "--json")
    assert result.returncode in (0, 3), result.stderr  # 3: the report found a problem
    return json.loads(result.stdout)


def doctor(cab: Cabinet) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in tech_json(cab, "doctor")["checks"]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def poll_cycles(cab: Cabinet) -> int:
    match = re.search(r"(\d+) poll cycles", doctor(cab)["bus"]["detail"])
    assert match, doctor(cab)["bus"]
    return int(match.group(1))


def assert_paced(cab: Cabinet) -> None:
    """Over a few seconds: at most one poll cycle per MIN_POLL_CYCLE_S, and little CPU."""
    assert cab.daemon is not None
    cycles0, cpu0, t0 = poll_cycles(cab), cpu_seconds(cab.daemon.pid), time.monotonic()
    time.sleep(MEASURE_S)  # a measurement window, not a synchronisation
    cycles1, cpu1, t1 = poll_cycles(cab), cpu_seconds(cab.daemon.pid), time.monotonic()
    elapsed = t1 - t0
    assert cycles1 - cycles0 <= elapsed / MIN_POLL_CYCLE_S + 2, (cycles0, cycles1, elapsed)
    assert cpu1 - cpu0 <= CPU_SHARE_LIMIT * elapsed, f"{cpu1 - cpu0:.2f} s CPU in {elapsed:.1f} s"


def test_a_silent_board_on_an_idle_cabinet_is_news_an_alarm_and_news_again(
    tmp_path: Path,
) -> None:
    with running_cabinet(tmp_path, extra={"bus": {"offline_alarm_s": 1.5}}) as cab:
        cab.ctl("fault", "silent", "--bay", "5")
        cab.ctl("fault", "silent", "--unit", "20")  # the cabinet board
        cab.wait_event("bay.offline", bay=5)
        cab.wait_event("unit.offline", unit=20, role="cabinet_board")
        bay5 = tech_json(cab, "bays")[4]
        assert bay5["online"] is False and bay5["offline_since"] is not None
        cab.wait_event("alarm.raised", kind="board_silent", bay=5)
        cab.wait_event("alarm.raised", kind="cabinet_board_silent", bay=None)
        checks = doctor(cab)
        assert checks["alarm"]["verdict"] in ("warn", "fail")
        cab.ctl("heal", "silent")
        back = cab.wait_event("bay.online", bay=5)
        assert back["offline_s"] > 0
        assert cab.wait_event("unit.online", unit=20, role="cabinet_board")["offline_s"] > 0
        cab.wait_event("alarm.cleared", kind="board_silent", bay=5)
        cab.wait_event("alarm.cleared", kind="cabinet_board_silent", bay=None)
        assert tech_json(cab, "bays")[4]["offline_since"] is None
        # once when it went bad, once when it came back: not once per poll
        assert len(cab.events("bay.offline")) == 1
        assert len(cab.events("unit.offline")) == 1
        assert len([e for e in cab.events("alarm.raised") if e["kind"] == "board_silent"]) == 1


def test_a_lost_bus_is_reported_reopened_with_back_off_and_restored(tmp_path: Path) -> None:
    with running_cabinet(tmp_path) as cab:
        bus, scanner = cab.sim.bus, cab.sim.scanner
        stop_sim_process(cab.sim)  # the gateway is gone: every call fails at once
        lost = cab.wait_event("bus.lost")
        assert lost["error"]
        assert_paced(cab)
        assert doctor(cab)["bus"]["verdict"] == "fail"
        assert len(cab.events("bus.lost")) == 1  # news once, not once per try
        again = start_sim_process("--baud", "115200", "--reply-ms", "0", bus=bus, scanner=scanner)
        try:
            restored = cab.wait_event("bus.restored")
            assert restored["outage_s"] >= MEASURE_S
            wait_until("the bus to be healthy", lambda: doctor(cab)["bus"]["verdict"] == "ok")
        finally:
            stop_sim_process(again)


def test_an_outage_spanning_a_daemon_restart_is_reported_once_with_its_full_length(
    tmp_path: Path,
) -> None:
    with running_cabinet(tmp_path) as cab:
        cab.ctl("fault", "silent", "--bay", "3")
        went = cab.wait_event("bay.offline", bay=3)
        cab.kill9()
        cab.start()
        wait_until("the restarted daemon to poll", lambda: poll_cycles(cab) > 20)
        cab.ctl("heal", "silent")
        back = cab.wait_event("bay.online", bay=3)
        assert back["offline_s"] >= (back["ts"] - went["ts"]) / 1000 - 1  # not since the restart
        assert len(cab.events("bay.offline")) == 1  # the restart is not a second outage
