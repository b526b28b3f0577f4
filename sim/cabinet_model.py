"""The simulated cabinet: 12 bay boards, the cabinet board and the meter, as one world.

Theory of operation: the world is plain state advanced by ``sync()`` to the
injected clock's time. The Modbus server asks it for register images (after
syncing, so every read is fresh) and hands it every write; riders and fate act
through ``insert``/``close``/``take`` and ``inject``/``heal``. Each board also
implements its own first-layer protections, because the daemon is meant to be
the *second* layer: a bay board cuts its charger without a heartbeat, on its own
over-temperature, on a BMS fault or with the door open, and refuses to unlock
while in heartbeat fail-safe.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol import bay_map, cabinet_map, firmware_map, meter_map
from protocol.units import BAY_UNITS, CABINET_BOARD_UNIT, ENERGY_METER_UNIT
from sim.bootloader import FIRMWARE_VERSION, Bootloader
from sim.faults import (
    CABINET_FAULTS,
    DEVICE_BUSY,
    DEVICE_FAILURE,
    ILLEGAL_ADDRESS,
    ILLEGAL_VALUE,
    UNIT_FAULTS,
    FaultKind,
    SimCommandError,
    WriteRefusedError,
)
from sim.physics import Battery

AMBIENT_C = 25.0
BOARD_OVER_TEMP_C = 70.0  # the board's own cut-off, above the daemon's alarm threshold
MAINS_VOLTAGE_V = 230.0
CHARGER_EFFICIENCY = 0.92
BASE_LOAD_W = 12.0  # boards, scanner, screen
FAN_LOAD_W = 15.0
TIMELINE_LENGTH = 500
MAX_STEP_S = 0.5  # physics sub-step: small against every thermal time constant we model
DEFAULT_CURRENT_LIMIT_A = 5.0


@dataclass(slots=True)
class SimBay:
    """One bay: its board's outputs and switches, and the battery inside if any."""

    number: int
    battery: Battery | None = None
    boot: Bootloader = field(default_factory=Bootloader)
    door_closed: bool = True
    locked: bool = True
    door_open_count: int = 0
    charger_enabled: bool = False
    current_limit_a: float = DEFAULT_CURRENT_LIMIT_A
    charger_current_a: float = 0.0
    heartbeat_counter: int = 0
    last_heartbeat: float | None = None
    lock_jammed_latched: bool = False
    faults: set[FaultKind] = field(default_factory=set)
    stuck_door_reading: bool | None = None

    def heartbeat_ok(self, now: float) -> bool:
        """Whether the daemon's heartbeat is recent enough for the board to act."""
        return (
            self.last_heartbeat is not None
            and now - self.last_heartbeat <= bay_map.HEARTBEAT_TIMEOUT_S
        )

    def bay_temp_c(self) -> float:
        """Bay air temperature: ambient, pulled towards the battery's temperature."""
        if self.battery is None:
            return AMBIENT_C
        return AMBIENT_C + 0.5 * (self.battery.cell_temp_c - AMBIENT_C)


@dataclass(slots=True)
class SimCabinetBoard:
    """The cabinet board's switches and outputs."""

    fan_on: bool = False
    contactor_closed: bool = False
    service_door_closed: bool = True


class SimulatedCabinet:
    """The whole simulated cabinet, advanced in time by an injected clock."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        seed: int = 0,
        populate: bool = True,
        charge_speedup: float = 1.0,
    ) -> None:
        self._clock = clock
        self.charge_speedup = charge_speedup
        self._rng = random.Random(seed)
        self._t = clock()
        self.bays: dict[int, SimBay] = {n: SimBay(n) for n in BAY_UNITS}
        self.board = SimCabinetBoard()
        self.cabinet_faults: set[FaultKind] = set()
        self.silent_units: set[int] = set()
        self.crc_units: dict[int, float] = {}
        self.energy_kwh = 0.0
        # What happened when (wall clock, so other processes can line it up with their own
        # timestamps): the swap-latency benchmark reads it, technicians can too.
        self.timeline: deque[dict[str, Any]] = deque(maxlen=TIMELINE_LENGTH)
        if populate:
            self._populate()

    # -- time ---------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """The world's current time on the injected clock."""
        return self._t

    def sync(self) -> None:
        """Advance the physics to the clock's present."""
        target = self._clock()
        while self._t < target:
            dt = min(MAX_STEP_S, target - self._t)
            self._step(dt)
            self._t += dt
        for bay in self.bays.values():
            bay.boot.tick(self._t)

    def unit_silent(self, unit: int) -> bool:
        """Whether ``unit`` answers nothing now: a bus fault, a reboot, no power."""
        if unit in self.silent_units:
            return True
        bay = self.bays.get(unit)
        return bay is not None and bay.boot.silent(self._t)

    def hears_broadcasts(self, unit: int) -> bool:
        """Whether ``unit`` acts on a broadcast frame (answering nothing, as every board)."""
        if self.unit_silent(unit):
            return False
        bay = self.bays.get(unit)
        return bay is None or FaultKind.BROADCAST_DEAF not in bay.faults

    def board_failing(self, unit: int) -> bool:
        """Whether ``unit`` answers every request with exception 0x04 (device failure)."""
        bay = self.bays.get(unit)
        return bay is not None and FaultKind.BOARD_FAILURE in bay.faults

    def _chargers_powered(self) -> bool:
        return self.board.contactor_closed and FaultKind.MAINS_LOSS not in self.cabinet_faults

    def _charger_output_allowed(self, bay: SimBay) -> bool:
        battery = bay.battery
        return (
            bay.charger_enabled
            and self._chargers_powered()
            and bay.heartbeat_ok(self._t)
            and bay.door_closed
            and battery is not None
            and battery.plugged
            and not battery.faults
            and bay.bay_temp_c() < BOARD_OVER_TEMP_C
        )

    def _step(self, dt: float) -> None:
        charger_power_w = 0.0
        for bay in self.bays.values():
            battery = bay.battery
            if battery is None:
                bay.charger_current_a = 0.0
                continue
            current = 0.0
            if self._charger_output_allowed(bay):
                current = battery.charge_current(bay.current_limit_a)
            bay.charger_current_a = current
            charger_power_w += battery.pack_voltage(current) * current / CHARGER_EFFICIENCY
            battery.step(dt, current, AMBIENT_C, self.charge_speedup)
        self.energy_kwh += self._load_w(charger_power_w) * dt / 3_600_000.0

    def _load_w(self, charger_power_w: float) -> float:
        if FaultKind.MAINS_LOSS in self.cabinet_faults:
            return 0.0
        return charger_power_w + BASE_LOAD_W + (FAN_LOAD_W if self.board.fan_on else 0.0)

    def _charger_power_w(self) -> float:
        total = 0.0
        for bay in self.bays.values():
            if bay.battery is not None:
                current = bay.charger_current_a
                total += bay.battery.pack_voltage(current) * current / CHARGER_EFFICIENCY
        return total

    # -- the register images the boards serve ------------------------------------------------

    def bay_status(self, number: int) -> bay_map.BayStatus:
        """What bay board ``number`` reports right now."""
        bay = self.bays[number]
        io = bay_map.IoFlag(0)
        door_reading = (
            bay.stuck_door_reading if bay.stuck_door_reading is not None else bay.door_closed
        )
        if door_reading:
            io |= bay_map.IoFlag.DOOR_CLOSED
        if bay.locked:
            io |= bay_map.IoFlag.LOCK_ENGAGED
        heartbeat_ok = bay.heartbeat_ok(self._t)
        if heartbeat_ok:
            io |= bay_map.IoFlag.HEARTBEAT_OK
        if bay.charger_current_a > 0.0:
            io |= bay_map.IoFlag.CHARGER_ON
        faults = bay_map.BoardFault(0)
        if bay.lock_jammed_latched:
            faults |= bay_map.BoardFault.LOCK_JAMMED
        if not heartbeat_ok:
            faults |= bay_map.BoardFault.HEARTBEAT_LOST
        if bay.bay_temp_c() >= BOARD_OVER_TEMP_C:
            faults |= bay_map.BoardFault.OVER_TEMP
        info: bay_map.BatteryInfo | None = None
        battery = bay.battery
        voltage = 0.0
        if battery is not None:
            io |= bay_map.IoFlag.BATTERY_PRESENT
            if battery.plugged:
                io |= bay_map.IoFlag.BMS_LINK
                voltage = battery.pack_voltage(bay.charger_current_a)
                info = bay_map.BatteryInfo(
                    battery_id=battery.battery_id if battery.identified else "",
                    soc_pct=round(battery.soc_pct, 1),
                    health_pct=battery.health_pct,
                    pack_voltage_v=voltage,
                    cell_temp_c=battery.cell_temp_c,
                    cycle_count=battery.cycle_count,
                    faults=battery.faults,
                )
        return bay_map.BayStatus(
            map_version=bay_map.MAP_VERSION,
            firmware_version=bay.boot.active_version,
            board_faults=faults,
            io=io,
            bay_temp_c=bay.bay_temp_c(),
            charger_voltage_v=voltage if bay.charger_current_a > 0.0 else 0.0,
            charger_current_a=bay.charger_current_a,
            charger_limit_a=bay.current_limit_a,
            battery=info if info is not None and info.battery_id else None,
            door_open_count=bay.door_open_count & 0xFFFF,
        )

    def cabinet_status(self) -> cabinet_map.CabinetStatus:
        """What the cabinet board reports right now."""
        io = cabinet_map.IoFlag(0)
        if FaultKind.SMOKE in self.cabinet_faults:
            io |= cabinet_map.IoFlag.SMOKE
        if FaultKind.MAINS_LOSS not in self.cabinet_faults:
            io |= cabinet_map.IoFlag.MAINS_PRESENT
        if self.board.service_door_closed:
            io |= cabinet_map.IoFlag.SERVICE_DOOR_CLOSED
        if self.board.fan_on:
            io |= cabinet_map.IoFlag.FAN_ON
        if self.board.contactor_closed:
            io |= cabinet_map.IoFlag.CONTACTOR_CLOSED
        bay_temps = [bay.bay_temp_c() for bay in self.bays.values()]
        warmth = sum(t - AMBIENT_C for t in bay_temps) / len(bay_temps)
        return cabinet_map.CabinetStatus(
            map_version=cabinet_map.MAP_VERSION,
            firmware_version=FIRMWARE_VERSION,
            board_faults=cabinet_map.BoardFault(0),
            io=io,
            cabinet_temp_c=AMBIENT_C + 0.5 * warmth - (1.0 if self.board.fan_on else 0.0),
        )

    def meter_reading(self) -> meter_map.MeterReading:
        """What the energy meter measures right now."""
        if FaultKind.MAINS_LOSS in self.cabinet_faults:
            return meter_map.MeterReading(0.0, 0.0, 0.0, self.energy_kwh)
        power = self._load_w(self._charger_power_w())
        voltage = MAINS_VOLTAGE_V + self._rng.uniform(-0.5, 0.5)
        return meter_map.MeterReading(voltage, power / voltage, power, self.energy_kwh)

    def input_image(self, unit: int) -> dict[int, int]:
        """Input registers unit ``unit`` serves now, by address."""
        if unit in self.bays:
            image = dict(enumerate(bay_map.encode_status(self.bay_status(unit))))
            boot = self.bays[unit].boot.status().encode()
            image.update(enumerate(boot, firmware_map.STATUS_START))
            return image
        if unit == CABINET_BOARD_UNIT:
            return dict(enumerate(cabinet_map.encode_status(self.cabinet_status())))
        if unit == ENERGY_METER_UNIT:
            reading = self.meter_reading()
            image = dict(enumerate(meter_map.encode_instant(reading), meter_map.INSTANT_START))
            image.update(enumerate(meter_map.encode_energy(reading), meter_map.ENERGY_START))
            return image
        raise KeyError(unit)

    def holding_image(self, unit: int) -> dict[int, int]:
        """Holding registers unit ``unit`` serves now, by address."""
        if unit in self.bays:
            bay = self.bays[unit]
            return {
                bay_map.CommandReg.HEARTBEAT: bay.heartbeat_counter,
                bay_map.CommandReg.UNLOCK: 0,
                bay_map.CommandReg.CHARGER_ENABLE: int(bay.charger_enabled),
                bay_map.CommandReg.CHARGER_CURRENT_LIMIT: bay_map.encode_current_limit(
                    bay.current_limit_a
                ),
            }
        if unit == CABINET_BOARD_UNIT:
            return {
                cabinet_map.CommandReg.FAN: int(self.board.fan_on),
                cabinet_map.CommandReg.MAIN_CONTACTOR: int(self.board.contactor_closed),
            }
        return {}

    # -- register writes -----------------------------------------------------------------

    def write_holding(self, unit: int, address: int, values: list[int]) -> None:
        """Apply a write the way the addressed board would, or raise WriteRefusedError."""
        if unit in self.bays and address >= firmware_map.COMMAND_REG:
            self.bays[unit].boot.write(self._t, address, values)
            self.note(f"firmware write {address}", unit)
            return
        for offset, value in enumerate(values):
            if unit in self.bays:
                self._write_bay(self.bays[unit], address + offset, value)
            elif unit == CABINET_BOARD_UNIT:
                self._write_cabinet(address + offset, value)
            else:
                raise WriteRefusedError(ILLEGAL_ADDRESS, "unit has no writable registers")

    def _write_bay(self, bay: SimBay, address: int, value: int) -> None:
        if address == bay_map.CommandReg.HEARTBEAT:
            bay.heartbeat_counter = value
            bay.last_heartbeat = self._t
        elif address == bay_map.CommandReg.UNLOCK:
            if value != bay_map.UNLOCK_MAGIC:
                raise WriteRefusedError(ILLEGAL_VALUE, "unlock needs the magic value")
            if FaultKind.LOCK_FAILURE in bay.faults:
                raise WriteRefusedError(DEVICE_FAILURE, "lock driver failed: door stays locked")
            if not bay.heartbeat_ok(self._t):
                raise WriteRefusedError(DEVICE_BUSY, "heartbeat fail-safe: door stays locked")
            self._unlock(bay)
        elif address == bay_map.CommandReg.CHARGER_ENABLE:
            if value not in (0, 1):
                raise WriteRefusedError(ILLEGAL_VALUE, "charger enable is 0 or 1")
            if FaultKind.CHARGER_STUCK in bay.faults and not value:
                return  # acknowledged on the wire, never applied: only a read-back tells
            bay.charger_enabled = bool(value)
        elif address == bay_map.CommandReg.CHARGER_CURRENT_LIMIT:
            amps = value * bay_map.AMP_SCALE
            if amps > bay_map.MAX_CHARGE_CURRENT_A:
                raise WriteRefusedError(ILLEGAL_VALUE, "current limit above the charger's rating")
            bay.current_limit_a = amps
        else:
            raise WriteRefusedError(ILLEGAL_ADDRESS, f"no writable register {address}")

    def note(self, what: str, bay: int | None = None) -> None:
        """Record a moment on the timeline."""
        self.timeline.append({"t": time.time(), "what": what, "bay": bay})

    def _unlock(self, bay: SimBay) -> None:
        self.note("unlock", bay.number)
        if FaultKind.LOCK_STUCK in bay.faults:
            bay.lock_jammed_latched = True
            return
        bay.lock_jammed_latched = False
        bay.locked = False
        if bay.door_closed:
            bay.door_closed = False  # the door springs open on the pulse
            bay.door_open_count += 1

    def _write_cabinet(self, address: int, value: int) -> None:
        if value not in (0, 1):
            raise WriteRefusedError(ILLEGAL_VALUE, "cabinet outputs are 0 or 1")
        if address == cabinet_map.CommandReg.FAN:
            self.board.fan_on = bool(value)
        elif address == cabinet_map.CommandReg.MAIN_CONTACTOR:
            if FaultKind.CONTACTOR_STUCK in self.cabinet_faults and not value:
                return  # welded contacts: the write is acknowledged, nothing opens
            self.board.contactor_closed = bool(value)
        else:
            raise WriteRefusedError(ILLEGAL_ADDRESS, f"no writable register {address}")

    # -- riders ---------------------------------------------------------------------------

    def _bay(self, number: int) -> SimBay:
        if number not in self.bays:
            raise SimCommandError(f"there is no bay {number} (bays are 1-{len(self.bays)})")
        return self.bays[number]

    def insert(
        self,
        number: int,
        battery_id: str,
        soc_pct: float,
        *,
        temp_c: float = AMBIENT_C,
        health_pct: float = 95.0,
        plugged: bool = True,
        identified: bool = True,
    ) -> None:
        """A rider puts a battery into an open bay."""
        self.sync()
        bay = self._bay(number)
        if bay.door_closed:
            raise SimCommandError(f"bay {number}'s door is shut: nothing can be put in")
        if bay.battery is not None:
            raise SimCommandError(f"bay {number} already holds {bay.battery.battery_id}")
        if not 0.0 <= soc_pct <= 100.0:
            raise SimCommandError("--soc must be within 0..100")
        if len(battery_id) > 2 * bay_map.BATTERY_ID_REGS or not battery_id.isprintable():
            raise SimCommandError("a battery id is up to 16 printable ASCII characters")
        bay.battery = Battery(
            battery_id=battery_id,
            soc_pct=soc_pct,
            health_pct=health_pct,
            cell_temp_c=temp_c,
            plugged=plugged,
            identified=identified,
            cycle_count=self._rng.randint(20, 400),
        )
        self.note("insert", number)

    def close(self, number: int) -> None:
        """A rider shuts a bay's door; the latch engages as it closes."""
        self.sync()
        bay = self._bay(number)
        bay.door_closed = True
        bay.locked = True
        self.note("close", number)

    def take(self, number: int) -> Battery:
        """A rider takes the battery out of an open bay."""
        self.sync()
        bay = self._bay(number)
        if bay.door_closed:
            raise SimCommandError(f"bay {number}'s door is shut: nothing can be taken")
        if bay.battery is None:
            raise SimCommandError(f"bay {number} is empty")
        battery, bay.battery = bay.battery, None
        bay.charger_current_a = 0.0
        self.note("take", number)
        return battery

    # -- fate -----------------------------------------------------------------------------

    def inject(
        self, kind: FaultKind, *, bay: int | None = None, unit: int | None = None, rate: float = 1.0
    ) -> None:
        """Inject a fault; bus faults name a unit (or a bay), bay faults a bay."""
        self.sync()
        if kind in UNIT_FAULTS:
            target = unit if unit is not None else bay
            if target is None:
                raise SimCommandError(f"fault {kind} needs --bay N or --unit N")
            if kind is FaultKind.SILENT:
                self.silent_units.add(target)
            else:
                if not 0.0 < rate <= 1.0:
                    raise SimCommandError("--rate must be within (0, 1]")
                self.crc_units[target] = rate
            return
        if kind in CABINET_FAULTS:
            self.cabinet_faults.add(kind)
            return
        if bay is None:
            raise SimCommandError(f"fault {kind} needs --bay N")
        target_bay = self._bay(bay)
        needs_battery = {FaultKind.OVERHEAT, FaultKind.THERMAL_RUNAWAY, FaultKind.BMS_FAULT}
        if kind in needs_battery and target_bay.battery is None:
            raise SimCommandError(f"bay {bay} holds no battery to {kind}")
        target_bay.faults.add(kind)
        self._apply_bay_faults(target_bay)

    def heal(self, kind: FaultKind | None = None, *, bay: int | None = None) -> None:
        """Clear faults: all of them, one kind, and/or only those of one bay (or unit)."""
        self.sync()
        kinds = set(FaultKind) if kind is None else {kind}

        def kept(unit: int) -> bool:
            return bay is not None and unit != bay

        if FaultKind.SILENT in kinds:
            self.silent_units = {u for u in self.silent_units if kept(u)}
        if FaultKind.CRC in kinds:
            self.crc_units = {u: r for u, r in self.crc_units.items() if kept(u)}
        if bay is None:
            self.cabinet_faults -= kinds
        for number, target in self.bays.items():
            if not kept(number):
                target.faults -= kinds
                self._apply_bay_faults(target)

    def _apply_bay_faults(self, bay: SimBay) -> None:
        powered = FaultKind.POWER_CUT not in bay.faults
        if not powered and bay.boot.powered:  # RAM is lost with the power: no heartbeat,
            bay.heartbeat_counter, bay.last_heartbeat = 0, None  # no charging
            bay.charger_enabled = False
        bay.boot.power(on=powered, now=self._t)
        bay.boot.set_faults(bay.faults)
        if FaultKind.DOOR_SENSOR_STUCK in bay.faults:
            if bay.stuck_door_reading is None:
                bay.stuck_door_reading = bay.door_closed
        else:
            bay.stuck_door_reading = None
        battery = bay.battery
        if battery is not None:
            battery.overheating = FaultKind.OVERHEAT in bay.faults
            battery.runaway = FaultKind.THERMAL_RUNAWAY in bay.faults
            if FaultKind.BMS_FAULT in bay.faults:
                battery.faults |= bay_map.BmsFault.INTERNAL
            else:
                battery.faults &= ~bay_map.BmsFault.INTERNAL

    # -- set-up and reporting ---------------------------------------------------------------

    def _populate(self) -> None:
        """Fill most bays with batteries at varied charge; leave three empty for returns."""
        empty = set(self._rng.sample(sorted(self.bays), 3))
        for number, bay in self.bays.items():
            if number in empty:
                continue
            bay.battery = Battery(
                battery_id=f"BAT-{self._rng.getrandbits(32):08X}",
                soc_pct=round(self._rng.uniform(30.0, 100.0), 1),
                health_pct=round(self._rng.uniform(80.0, 100.0), 1),
                cycle_count=self._rng.randint(20, 600),
                cell_temp_c=AMBIENT_C + round(self._rng.uniform(-1.0, 3.0), 1),
            )

    def snapshot(self) -> dict[str, Any]:
        """The whole simulated state as JSON-ready data (``cabinet sim ctl state``)."""
        self.sync()
        bays = []
        for number, bay in self.bays.items():
            battery = bay.battery
            bays.append(
                {
                    "bay": number,
                    "door": "closed" if bay.door_closed else "open",
                    "locked": bay.locked,
                    "door_open_count": bay.door_open_count,
                    "heartbeat_ok": bay.heartbeat_ok(self._t),
                    "firmware": {
                        "version": bay_map.firmware_version_str(bay.boot.active_version),
                        "bootloader": bay.boot.state.name.lower(),
                        "bytes_received": bay.boot.bytes_received,
                        "answering": not bay.boot.silent(self._t),
                    },
                    "bay_temp_c": round(bay.bay_temp_c(), 2),
                    "charger": {
                        "enabled": bay.charger_enabled,
                        "on": bay.charger_current_a > 0.0,
                        "current_a": round(bay.charger_current_a, 3),
                        "limit_a": bay.current_limit_a,
                    },
                    "battery": None
                    if battery is None
                    else {
                        "id": battery.battery_id,
                        "soc_pct": round(battery.soc_pct, 2),
                        "health_pct": battery.health_pct,
                        "cell_temp_c": round(battery.cell_temp_c, 2),
                        "cycle_count": battery.cycle_count,
                        "plugged": battery.plugged,
                        "identified": battery.identified,
                        "bms_faults": [f.name for f in bay_map.BmsFault if f in battery.faults],
                    },
                    "faults": sorted(bay.faults),
                }
            )
        cabinet = self.cabinet_status()
        meter = self.meter_reading()
        return {
            "time": round(self._t, 3),
            "bays": bays,
            "cabinet": {
                "smoke": cabinet.smoke,
                "mains_present": cabinet.mains_present,
                "fan_on": self.board.fan_on,
                "contactor_closed": self.board.contactor_closed,
                "service_door_closed": self.board.service_door_closed,
                "cabinet_temp_c": round(cabinet.cabinet_temp_c, 2),
            },
            "meter": {
                "voltage_v": round(meter.voltage_v, 2),
                "current_a": round(meter.current_a, 3),
                "power_w": round(meter.power_w, 1),
                "energy_kwh": round(meter.energy_kwh, 6),
            },
            "timeline": list(self.timeline),
            "faults": {
                "cabinet": sorted(self.cabinet_faults),
                "silent_units": sorted(self.silent_units),
                "crc_units": {str(u): r for u, r in sorted(self.crc_units.items())},
            },
        }
