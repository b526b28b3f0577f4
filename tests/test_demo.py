"""`cabinet demo` walks a newcomer through the bus and ends with a summary."""

from __future__ import annotations

import re

from tests.conftest import cabinet_cmd


def test_the_demo_opens_a_door_finds_a_dead_bay_and_summarises() -> None:
    result = cabinet_cmd("demo", "--duration", "1", timeout=90)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"bay \d+: door open, latch released", out)
    assert re.search(r"bay \d+ reads: BAT-DEMO-0001, 12 % SoC", out)
    assert "11/12 bays (isolated)" in out
    assert "found again by a re-probe" in out
    match = re.search(r"summary: (\d+) poll cycles, mean \d+ ms = ([\d.]+) x", out)
    assert match and int(match.group(1)) >= 1
    assert "Traceback" not in result.stderr
