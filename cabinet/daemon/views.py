"""What the cabinet looks like from outside: one rendering for MQTT and the technician CLI.

The operator's retained ``state``, the telemetry sample and the technician's
``cabinet bays`` must never disagree about a bay, so they are all built here
from the controller's picture, and nowhere else.
"""

from __future__ import annotations

import time

from cabinet.core.swap_machine import Phase
from cabinet.daemon.controller import CabinetController
from protocol import messages
from protocol.units import BAY_UNITS, CABINET_BOARD_UNIT, ENERGY_METER_UNIT


def now_ms() -> int:
    """UTC milliseconds, the ``ts`` of every message."""
    return int(time.time() * 1000)


def bay_views(c: CabinetController) -> list[messages.BayView]:
    """Every bay as an operator sees it; unknown values are None, never a guess."""
    bays = []
    for bay in BAY_UNITS:
        snap = c.snapshots.get(bay)
        battery = snap.battery if snap is not None else None
        online = snap is not None and snap.online
        known = battery is not None and battery.battery_id is not None
        bays.append(
            messages.BayView(
                bay=bay,
                online=online,
                door=("closed" if snap.door_closed else "open") if online and snap else None,
                locked=snap.locked if online and snap else None,
                battery_id=battery.battery_id if battery else None,
                battery_present=snap.battery_present if online and snap else None,
                soc_pct=battery.soc_pct if battery and known else None,
                health_pct=battery.health_pct if battery and known else None,
                cell_temp_c=battery.cell_temp_c if battery and known else None,
                bay_temp_c=snap.bay_temp_c if online and snap else None,
                charging=snap.charging if online and snap else None,
                in_service=bay not in c.out_of_service,
                out_of_service_reason=c.out_of_service.get(bay),
                offline_since=_ms(c.presence.offline_since(bay)),
            )
        )
    return bays


def session_view(c: CabinetController) -> messages.SessionView | None:
    """The running session, if any."""
    if c.state.phase is Phase.IDLE:
        return None
    return messages.SessionView(
        session_id=c.state.session_id,
        rider_id=c.state.rider_id,
        mode=c.state.mode.value,
        phase=c.state.phase.value,
        return_bay=c.state.return_bay,
        dispense_bay=c.state.dispense_bay,
    )


def cabinet_view(c: CabinetController) -> messages.CabinetView:
    """The cabinet-wide safety picture."""
    refusal = c.refusal()
    return messages.CabinetView(
        smoke=c.safety.smoke,
        mains_present=not c.safety.mains_lost,
        # a cabinet that cannot journal cannot swap either, whatever its sensors say
        swaps_allowed=c.safety.swaps_allowed and refusal != "journal_unwritable",
        refusal=refusal,
        board_online=_online(c, CABINET_BOARD_UNIT, c.cabinet_status is not None),
        meter_online=_online(c, ENERGY_METER_UNIT, c.meter is not None),
    )


def _ms(wall: float | None) -> int | None:
    return None if wall is None else int(wall * 1000)


def _online(c: CabinetController, unit: int, heard: bool) -> bool | None:
    """False while the unit is isolated; None until it has either answered or gone silent."""
    if c.presence.offline_since(unit) is not None:
        return False
    return True if heard else None


def state_message(c: CabinetController) -> messages.State:
    """The full snapshot of DESIGN.md §4.3."""
    return messages.State(
        ts=now_ms(),
        cabinet_id=c.cabinet_id,
        cabinet=cabinet_view(c),
        bays=bay_views(c),
        session=session_view(c),
    )


def telemetry_message(c: CabinetController, dropped: int) -> messages.Telemetry:
    """Periodic measurements, including how the outbox is doing."""
    meter = None
    # a silent unit's last reading is stale, never republished as fresh (DESIGN.md §3.7)
    if c.meter is not None and c.presence.offline_since(ENERGY_METER_UNIT) is None:
        meter = messages.MeterView(
            voltage_v=round(c.meter.voltage_v, 2),
            current_a=round(c.meter.current_a, 3),
            power_w=round(c.meter.power_w, 1),
            energy_kwh=round(c.meter.energy_kwh, 4),
        )
    bays = [
        messages.BayTelemetry(
            bay=view.bay,
            soc_pct=view.soc_pct,
            cell_temp_c=view.cell_temp_c,
            bay_temp_c=view.bay_temp_c,
            charging=view.charging,
        )
        for view in bay_views(c)
    ]
    return messages.Telemetry(
        ts=now_ms(),
        cabinet_id=c.cabinet_id,
        cabinet_temp_c=c.cabinet_status.cabinet_temp_c
        if c.cabinet_status and c.presence.offline_since(CABINET_BOARD_UNIT) is None
        else None,
        meter=meter,
        bays=bays,
        outbox_depth=c.journal.outbox_depth(),
        outbox_dropped=dropped,
    )
