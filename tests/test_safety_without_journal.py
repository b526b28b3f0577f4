"""Making a bay safe needs no record: a journal that cannot be written never keeps a charger on.

Found in review of the full-disk work (issue 15): a hot reading whose journal commit
failed rolled its safety actions back with it, so the confirmed charger-off was never
started and only the routine charging plan turned the charger off a cycle later.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cabinet.core.battery_rules import BatteryObs
from cabinet.core.bay_tracker import BaySnapshot
from cabinet.daemon.bus_scheduler import BusScheduler
from cabinet.daemon.clock import SystemClock
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.journal import Journal, JournalUnwritableError
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus

BAY = 4


def _reading(cell_temp_c: float) -> BaySnapshot:
    pack = BatteryObs(
        "BAT-0004", plugged=True, soc_pct=50.0, health_pct=95.0, cell_temp_c=cell_temp_c
    )
    return BaySnapshot(online=True, battery_present=True, battery=pack, charging=True)


def test_a_hot_bay_is_made_safe_even_when_the_journal_cannot_record_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        bus = ModbusBus(parse_endpoint("tcp://127.0.0.1:9"))  # never connected: nothing polls
        journal = Journal(tmp_path / "journal.db")
        ctl = CabinetController(
            cabinet_id="cab-1", journal=journal, scheduler=BusScheduler(bus), clock=SystemClock()
        )
        ctl.observe_bay(BAY, _reading(30.0))
        assert not ctl.safety_writes  # a healthy pack: nothing to make safe
        journal._db.execute("PRAGMA query_only = 1")  # every write now fails: SQLITE_READONLY
        with pytest.raises(JournalUnwritableError):
            ctl.observe_bay(BAY, _reading(75.0))  # over the 60 °C cell limit
        assert ("charger", BAY) in ctl.safety_writes  # the confirmed charger-off is under way
        assert not ctl.safety.charging_allowed(BAY)
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        journal.close()

    asyncio.run(scenario())
