"""``cabinet selftest``: exercise every lock, door sensor and charger, and the meter.

Run by a technician standing at an idle cabinet. Each bay's lock is pulsed and its
door sensor must see the door spring open; the technician shuts it and the sensor
and latch must report it closed and locked. A bay holding a battery that can take
charge gets its charger switched on at a low current until the board reports
current flowing; the charging policy takes the charger back on its next cycle.
While the test runs no rider session can start (``refusal`` says ``maintenance``),
and it is journaled (``selftest.started`` / ``selftest.finished``) so an operator
sees why doors opened.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from cabinet.core.bay_tracker import BaySnapshot
from cabinet.daemon.bus_scheduler import Priority
from cabinet.daemon.controller import CabinetController
from drivers.boards import BayBoard, EnergyMeter
from drivers.modbus_bus import BusError
from protocol.errors import ProtocolError

Outcome = Literal["pass", "fail", "skip"]
Report = Callable[[dict[str, Any]], Awaitable[None]]

TEST_CURRENT_A = 1.0  # enough for the board to measure, gentle on any battery
CHARGER_WAIT_S = 5.0
SENSOR_POLL_S = 0.1
MAINS_V = (180.0, 265.0)  # EN 50160 230 V +-10 %, with a little room
FULL_SOC_PCT = 99.0


class SelftestRefusedError(Exception):
    """The cabinet is not idle: a self-test would open doors under a rider."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot run the self-test now: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Result:
    """One tested part."""

    part: str
    bay: int | None
    outcome: Outcome
    detail: str


async def _wait_for(
    c: CabinetController, bay: int, want: Callable[[BaySnapshot], bool], timeout_s: float
) -> BaySnapshot | None:
    """Re-read ``bay`` until ``want`` holds; the matching snapshot, or None on timeout."""
    deadline = c.clock.monotonic() + timeout_s
    while True:
        snap = await c.poller.refresh_bay(bay)
        if snap is not None and snap.online and want(snap):
            return snap
        if c.clock.monotonic() >= deadline:
            return None
        await asyncio.sleep(SENSOR_POLL_S)


async def _meter(c: CabinetController) -> Result:
    try:
        reading = await c.scheduler.submit(Priority.ACTIVE, lambda bus: EnergyMeter(bus).read())
    except (BusError, ProtocolError) as exc:
        return Result("meter", None, "fail", f"no reading: {exc}")
    low, high = MAINS_V
    if not low <= reading.voltage_v <= high:
        return Result("meter", None, "fail", f"mains {reading.voltage_v:.0f} V is out of range")
    return Result(
        "meter", None, "pass", f"mains {reading.voltage_v:.0f} V, {reading.power_w:.0f} W drawn"
    )


async def _lock_and_door(
    c: CabinetController, bay: int, close_timeout_s: float, report: Report
) -> list[Result]:
    if await _wait_for(c, bay, lambda s: s.door_closed, 0.0) is None:
        await report({"prompt": f"bay {bay}: its door is open, shut it to test the lock"})
        if await _wait_for(c, bay, lambda s: s.door_closed, close_timeout_s) is None:
            return [Result("lock", bay, "fail", "door stayed open: lock not tested")]
    started = c.clock.monotonic()
    try:
        await c.scheduler.submit(Priority.UNLOCK, lambda bus: BayBoard(bus, bay).unlock())
    except BusError as exc:
        return [Result("lock", bay, "fail", f"unlock refused: {exc}")]
    unlock_s = c.settings.machine.timeouts.unlock
    opened = await _wait_for(c, bay, lambda s: not s.door_closed or s.lock_jammed, unlock_s)
    if opened is None or opened.door_closed:
        why = "the lock reports jammed" if opened is not None else "the door sensor saw nothing"
        return [Result("lock", bay, "fail", f"door did not open within {unlock_s:.0f} s: {why}")]
    ms = (c.clock.monotonic() - started) * 1000
    results = [Result("lock", bay, "pass", f"released; door sensor saw it open after {ms:.0f} ms")]
    await report({"prompt": f"bay {bay}: shut the door"})
    closed = await _wait_for(c, bay, lambda s: s.door_closed, close_timeout_s)
    if closed is None:
        results.append(Result("door", bay, "fail", f"not seen shut within {close_timeout_s:.0f} s"))
    elif not closed.locked:
        results.append(Result("door", bay, "fail", "shut, but the latch did not engage"))
    else:
        results.append(Result("door", bay, "pass", "sensor saw it shut; latch engaged"))
    return results


async def _charger(c: CabinetController, bay: int) -> Result:
    snap = c.snapshots.get(bay)
    battery = snap.battery if snap is not None else None
    if battery is None:
        return Result("charger", bay, "skip", "no battery to charge")
    if not battery.plugged or battery.soc_pct >= FULL_SOC_PCT:
        return Result("charger", bay, "skip", "battery unplugged or full: nothing to charge")
    if not c.safety.charging_allowed(bay) or bay in c.out_of_service:
        return Result("charger", bay, "skip", "charging is blocked on this bay (see doctor)")
    try:
        await c.scheduler.submit(
            Priority.ACTIVE,
            lambda bus: BayBoard(bus, bay).set_charger(
                enabled=True, current_limit_a=TEST_CURRENT_A
            ),
        )
        charging = await _wait_for(c, bay, lambda s: s.charging, CHARGER_WAIT_S)
    except BusError as exc:
        return Result("charger", bay, "fail", f"could not switch it on: {exc}")
    finally:
        c.poller.forget_charger_command(bay)  # the policy re-applies its own setting next cycle
    if charging is None:
        return Result("charger", bay, "fail", f"no current after {CHARGER_WAIT_S:.0f} s")
    return Result("charger", bay, "pass", f"current flowing at a {TEST_CURRENT_A:.1f} A limit")


async def _bay(
    c: CabinetController, bay: int, close_timeout_s: float, report: Report
) -> list[Result]:
    snap = await c.poller.refresh_bay(bay)
    if snap is None or not snap.online:
        return [Result("board", bay, "fail", "the bay board does not answer")]
    results = [Result("board", bay, "pass", "answers")]
    results += await _lock_and_door(c, bay, close_timeout_s, report)
    results.append(await _charger(c, bay))
    return results


async def run_selftest(
    c: CabinetController, *, bays: list[int], close_timeout_s: float, report: Report
) -> list[Result]:
    """Test the meter and ``bays``, reporting each result as it comes; all the results."""
    refusal = c.refusal()
    if refusal is not None:
        raise SelftestRefusedError(refusal)
    c.maintenance = "selftest"  # no await since refusal(): no session can slip in between
    results: list[Result] = []

    async def done(result: Result) -> None:
        results.append(result)
        await report({"result": asdict(result)})

    try:
        c.record(("selftest.started", {"bays": bays, "by": "technician"}))
        await done(await _meter(c))
        for bay in bays:
            for result in await _bay(c, bay, close_timeout_s, report):
                await done(result)
    finally:
        c.maintenance = None
        finished = {
            "passed": sum(r.outcome == "pass" for r in results),
            "failed": [asdict(r) for r in results if r.outcome == "fail"],
            "skipped": sum(r.outcome == "skip" for r in results),
        }
        c.record(("selftest.finished", finished))
    return results
