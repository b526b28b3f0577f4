"""Technician bus diagnostics: survey every unit, read and write raw registers.

Direct mode opens the bus itself, for a cabinet whose daemon is stopped; while the
daemon runs, the same survey runs inside it, one unit per scheduler turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from drivers.boards import BayBoard, CabinetBoard, EnergyMeter
from drivers.modbus_bus import (
    BusError,
    ExceptionReplyError,
    ModbusBus,
    UnitGarbledError,
    UnitIsolatedError,
    UnitNoAnswerError,
    UnitRestartingError,
)
from protocol import bay_map, cabinet_map
from protocol.errors import ProtocolError
from protocol.units import ALL_UNITS, BAY_UNITS, CABINET_BOARD_UNIT, unit_name


@dataclass(frozen=True, slots=True)
class UnitReport:
    """One line of ``cabinet bus scan``."""

    unit: int
    name: str
    answered: bool
    map_version: int | None = None
    firmware: str | None = None
    health: str = "ok"
    latency_ms: float | None = None
    exception: bool = False  # it answered, but with a Modbus exception instead of data

    def as_json(self) -> dict[str, Any]:
        """Render for ``--json``."""
        return {
            "unit": self.unit,
            "name": self.name,
            "answered": self.answered,
            "map_version": self.map_version,
            "firmware": self.firmware,
            "health": self.health,
            "latency_ms": self.latency_ms,
            "exception": self.exception,
        }


def _flag_names(flags: Any) -> list[str]:
    return [member.name for member in type(flags) if member in flags and member.name]


def _bay_health(status: bay_map.BayStatus) -> str:
    # HEARTBEAT_LOST is the normal state of a board while no daemon runs: not a fault here.
    faults = status.board_faults & ~bay_map.BoardFault.HEARTBEAT_LOST
    problems = _flag_names(faults)
    if status.battery is not None and status.battery.faults:
        problems += [f"BMS_{name}" for name in _flag_names(status.battery.faults)]
    return "ok" if not problems else "faults: " + ",".join(problems)


def _cabinet_health(status: cabinet_map.CabinetStatus) -> str:
    problems = _flag_names(status.board_faults)
    if status.smoke:
        problems.append("SMOKE")
    if not status.mains_present:
        problems.append("MAINS_LOST")
    return "ok" if not problems else "faults: " + ",".join(problems)


async def survey_unit(bus: ModbusBus, unit: int) -> UnitReport:
    """Identify one unit and judge its health from its status block."""
    name = unit_name(unit)
    try:
        if unit in BAY_UNITS:
            bay = await BayBoard(bus, unit).read_status()
            report = UnitReport(
                unit,
                name,
                True,
                bay.map_version,
                bay_map.firmware_version_str(bay.firmware_version),
                _bay_health(bay),
            )
        elif unit == CABINET_BOARD_UNIT:
            cab = await CabinetBoard(bus).read_status()
            report = UnitReport(
                unit,
                name,
                True,
                cab.map_version,
                bay_map.firmware_version_str(cab.firmware_version),
                _cabinet_health(cab),
            )
        else:
            reading = await EnergyMeter(bus, unit).read()
            health = "ok" if reading.voltage_v > 0 else "no mains voltage"
            report = UnitReport(unit, name, True, health=health)
    except UnitIsolatedError:
        return UnitReport(unit, name, False, health="isolated by the daemon (silent; re-probed)")
    except UnitRestartingError:
        return UnitReport(unit, name, False, health="restarting (a firmware update rebooted it)")
    except UnitGarbledError:
        return UnitReport(unit, name, False, health="garbled replies (CRC errors)")
    except UnitNoAnswerError:
        return UnitReport(unit, name, False, health="no answer")
    except ExceptionReplyError as exc:
        return UnitReport(unit, name, True, health=f"refused: {exc}", exception=True)
    except ProtocolError as exc:
        return UnitReport(unit, name, True, health=f"bad data: {exc}")
    stats = bus.unit_stats(unit)
    return UnitReport(**{**report.as_json(), "latency_ms": round(stats.latency_last_s * 1000, 1)})


async def survey(bus: ModbusBus, units: tuple[int, ...] = ALL_UNITS) -> list[UnitReport]:
    """Survey every expected unit; a silent one costs one timeout, the rest carry on."""
    return [await survey_unit(bus, unit) for unit in units]


def scan_summary(units: list[dict[str, Any]]) -> dict[str, int]:
    """Counts of a scan: answered with data, answered with an exception, silent (they add up).

    An exception reply proves the wiring and the unit id but not the unit's health, so it
    is not counted as "answered"; ``units`` are ``UnitReport.as_json()`` dicts (the
    daemon's scan sends the same).
    """
    exception = sum(bool(u.get("exception")) for u in units)
    silent = sum(not u["answered"] for u in units)
    return {
        "units": len(units),
        "answered": len(units) - exception - silent,
        "exception": exception,
        "silent": silent,
    }


def summary_line(summary: dict[str, int]) -> str:
    """The last line of the human ``bus scan`` output (without where it ran)."""
    line = f"{summary['answered']} of {summary['units']} units answered"
    if summary["exception"]:
        line += f", {summary['exception']} answered with an exception"
    if summary["silent"]:
        line += f", {summary['silent']} silent"
    return line


__all__ = ["BusError", "UnitReport", "scan_summary", "summary_line", "survey", "survey_unit"]
