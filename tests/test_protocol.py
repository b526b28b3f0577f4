"""The register maps, codec and wire-time model of ``protocol/``: pure data, tested as such.

Round trips generate values already on each field's fixed-point grid, so encode -> decode must
give back exactly what went in. Decoders fed arbitrary registers may only return a status or
raise RegisterBlockError: a garbled frame is a stale bay, never a crash.
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Callable
from functools import reduce
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import bay_map, cabinet_map, codec, meter_map, rtu_timing
from protocol.bay_map import BatteryInfo, BayStatus, BmsFault, BoardFault, IoFlag
from protocol.cabinet_map import CabinetStatus
from protocol.errors import ProtocolError, RegisterBlockError, UnknownMapVersionError
from protocol.meter_map import MeterReading

FlagT = TypeVar("FlagT", bound=enum.IntFlag)

S16_MIN, S16_MAX = -0x8000, 0x7FFF
U16_MAX = 0xFFFF

# --------------------------------------------------------------------------- strategies


def on_grid(scale: float, lo: int, hi: int) -> st.SearchStrategy[float]:
    """Physical values that are a whole number of counts, as the decoder returns them."""
    return st.integers(lo, hi).map(lambda counts: round(counts * scale, 6))


def flags(kind: type[FlagT]) -> st.SearchStrategy[FlagT]:
    """Any combination of the bits a map defines (and only those)."""
    return st.lists(st.sampled_from(list(kind)), unique=True).map(
        lambda members: reduce(operator.or_, members, kind(0))
    )


registers = st.integers(0, U16_MAX)
any_register_list = st.lists(registers, min_size=0, max_size=40)
battery_ids = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=16
)
temps_c = on_grid(bay_map.TEMP_SCALE, S16_MIN, S16_MAX)
volts = on_grid(bay_map.VOLT_SCALE, 0, U16_MAX)
signed_amps = on_grid(bay_map.AMP_SCALE, S16_MIN, S16_MAX)
unsigned_amps = on_grid(bay_map.AMP_SCALE, 0, U16_MAX)
percents = on_grid(bay_map.PERCENT_SCALE, 0, 1000)
float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)

batteries = st.builds(
    BatteryInfo,
    battery_id=battery_ids,
    soc_pct=percents,
    health_pct=percents,
    pack_voltage_v=volts,
    cell_temp_c=temps_c,
    cycle_count=registers,
    faults=flags(BmsFault),
)


@st.composite
def bay_statuses(draw: Callable[..., Any]) -> BayStatus:
    """A bay status the board can serve: a battery is reported only with BMS_LINK set."""
    io = draw(flags(IoFlag))
    battery = draw(st.none() | batteries) if IoFlag.BMS_LINK in io else None
    return BayStatus(
        map_version=bay_map.MAP_VERSION,
        firmware_version=draw(registers),
        board_faults=draw(flags(BoardFault)),
        io=io,
        bay_temp_c=draw(temps_c),
        charger_voltage_v=draw(volts),
        charger_current_a=draw(signed_amps),
        charger_limit_a=draw(unsigned_amps),
        battery=battery,
        door_open_count=draw(registers),
    )


cabinet_statuses = st.builds(
    CabinetStatus,
    map_version=st.just(cabinet_map.MAP_VERSION),
    firmware_version=registers,
    board_faults=flags(cabinet_map.BoardFault),
    io=flags(cabinet_map.IoFlag),
    cabinet_temp_c=on_grid(cabinet_map.TEMP_SCALE, S16_MIN, S16_MAX),
)

meter_readings = st.builds(
    MeterReading, voltage_v=float32s, current_a=float32s, power_w=float32s, energy_kwh=float32s
)


@st.composite
def corrupted(draw: Callable[..., Any], valid_blocks: st.SearchStrategy[list[int]]) -> list[int]:
    """A valid register image with a few registers overwritten by arbitrary values.

    Random lists almost never get past the length check; this reaches the field checks.
    """
    regs = list(draw(valid_blocks))
    for index in draw(st.lists(st.integers(0, len(regs) - 1), max_size=4)):
        regs[index] = draw(registers)
    return regs


def bay_block(**fields: int) -> list[int]:
    """A valid bay status block (empty bay), with registers overridden by StatusReg name."""
    regs = [0] * bay_map.STATUS_COUNT
    regs[bay_map.StatusReg.MAP_VERSION] = bay_map.MAP_VERSION
    for name, value in fields.items():
        regs[bay_map.StatusReg[name]] = value
    return regs


def bay_block_with_battery(battery_id: str = "PK0000000001", **fields: int) -> list[int]:
    """A valid bay status block with an identified, plugged battery."""
    regs = bay_block(IO_FLAGS=int(IoFlag.BATTERY_PRESENT | IoFlag.BMS_LINK), SOC=500, HEALTH=900)
    start = bay_map.StatusReg.BATTERY_ID
    regs[start : start + bay_map.BATTERY_ID_REGS] = codec.ascii_to_regs(
        battery_id, bay_map.BATTERY_ID_REGS
    )
    for name, value in fields.items():
        regs[bay_map.StatusReg[name]] = value
    return regs


def cabinet_block(**fields: int) -> list[int]:
    regs = [0] * cabinet_map.STATUS_COUNT
    regs[cabinet_map.StatusReg.MAP_VERSION] = cabinet_map.MAP_VERSION
    for name, value in fields.items():
        regs[cabinet_map.StatusReg[name]] = value
    return regs


def meter_blocks(**values: float) -> tuple[list[int], list[int]]:
    fields = {"voltage_v": 230.0, "current_a": 4.5, "power_w": 1035.0, "energy_kwh": 12.25}
    reading = MeterReading(**{**fields, **values})
    return meter_map.encode_instant(reading), meter_map.encode_energy(reading)


def assert_decodes_or_refuses(decode: Callable[[], object], kind: type) -> object | None:
    """Run a decoder: it returns ``kind`` or raises RegisterBlockError with a message."""
    try:
        result = decode()
    except RegisterBlockError as exc:
        assert str(exc), "a refusal must tell the technician why"
        return None
    assert isinstance(result, kind)
    return result


# --------------------------------------------------------------------------- round trips


@settings(max_examples=200)
@given(bay_statuses())
def test_bay_status_survives_encode_then_decode(status: BayStatus) -> None:
    regs = bay_map.encode_status(status)
    assert len(regs) == bay_map.STATUS_COUNT
    assert all(0 <= r <= U16_MAX for r in regs)
    assert bay_map.decode_status(regs) == status


@settings(max_examples=200)
@given(bay_statuses(), batteries)
def test_bay_battery_is_dropped_when_bms_link_is_down(
    status: BayStatus, battery: BatteryInfo
) -> None:
    unplugged = BayStatus(
        **{
            **{name: getattr(status, name) for name in BayStatus.__slots__},
            "io": status.io & ~IoFlag.BMS_LINK,
            "battery": battery,
        }
    )
    assert bay_map.decode_status(bay_map.encode_status(unplugged)).battery is None


@settings(max_examples=200)
@given(bay_statuses())
def test_bay_without_battery_serves_zeros_in_battery_registers(status: BayStatus) -> None:
    empty = BayStatus(
        **{
            **{name: getattr(status, name) for name in BayStatus.__slots__},
            "battery": None,
        }
    )
    regs = bay_map.encode_status(empty)
    assert regs[bay_map.StatusReg.BATTERY_ID : bay_map.StatusReg.BMS_FAULTS + 1] == [0] * 14


@settings(max_examples=200)
@given(cabinet_statuses)
def test_cabinet_status_survives_encode_then_decode(status: CabinetStatus) -> None:
    regs = cabinet_map.encode_status(status)
    assert len(regs) == cabinet_map.STATUS_COUNT
    assert cabinet_map.decode_status(regs) == status


@settings(max_examples=200)
@given(meter_readings)
def test_meter_reading_survives_encode_then_decode(reading: MeterReading) -> None:
    instant = meter_map.encode_instant(reading)
    energy = meter_map.encode_energy(reading)
    assert len(instant) == meter_map.INSTANT_COUNT
    assert len(energy) == meter_map.ENERGY_COUNT
    assert meter_map.decode(instant, energy) == reading


@settings(max_examples=200)
@given(meter_readings, st.lists(registers, min_size=8, max_size=8))
def test_meter_ignores_the_unused_words_of_the_instant_block(
    reading: MeterReading, filler: list[int]
) -> None:
    instant = meter_map.encode_instant(reading)
    unused = [i for i in range(meter_map.INSTANT_COUNT) if i not in {0, 1, 6, 7, 12, 13}]
    for index, value in zip(unused, filler, strict=True):
        instant[index] = value
    assert meter_map.decode(instant, meter_map.encode_energy(reading)) == reading


# --------------------------------------------------------------------------- arbitrary input

bay_register_lists = (
    any_register_list
    | st.lists(registers, min_size=bay_map.STATUS_COUNT, max_size=bay_map.STATUS_COUNT)
    | corrupted(bay_statuses().map(bay_map.encode_status))
)
cabinet_register_lists = (
    any_register_list
    | st.lists(registers, min_size=cabinet_map.STATUS_COUNT, max_size=cabinet_map.STATUS_COUNT)
    | corrupted(cabinet_statuses.map(cabinet_map.encode_status))
)


@settings(max_examples=200)
@given(bay_register_lists)
def test_bay_decode_of_any_registers_returns_status_or_block_error(regs: list[int]) -> None:
    status = assert_decodes_or_refuses(lambda: bay_map.decode_status(regs), BayStatus)
    if isinstance(status, BayStatus):
        assert status.map_version in bay_map.SUPPORTED_MAP_VERSIONS
        if status.battery is not None:
            assert IoFlag.BMS_LINK in status.io
            assert 1 <= len(status.battery.battery_id) <= 16
            assert 0.0 <= status.battery.soc_pct <= 100.0
            assert 0.0 <= status.battery.health_pct <= 100.0


@settings(max_examples=200)
@given(cabinet_register_lists)
def test_cabinet_decode_of_any_registers_returns_status_or_block_error(regs: list[int]) -> None:
    status = assert_decodes_or_refuses(lambda: cabinet_map.decode_status(regs), CabinetStatus)
    if isinstance(status, CabinetStatus):
        assert status.map_version in cabinet_map.SUPPORTED_MAP_VERSIONS


@settings(max_examples=200)
@given(
    any_register_list
    | st.lists(registers, min_size=meter_map.INSTANT_COUNT, max_size=meter_map.INSTANT_COUNT),
    any_register_list
    | st.lists(registers, min_size=meter_map.ENERGY_COUNT, max_size=meter_map.ENERGY_COUNT),
)
def test_meter_decode_of_any_registers_returns_reading_or_block_error(
    instant: list[int], energy: list[int]
) -> None:
    reading = assert_decodes_or_refuses(lambda: meter_map.decode(instant, energy), MeterReading)
    if isinstance(reading, MeterReading):
        assert all(
            math.isfinite(v)
            for v in (reading.voltage_v, reading.current_a, reading.power_w, reading.energy_kwh)
        )


def test_block_error_is_a_protocol_error() -> None:
    assert issubclass(RegisterBlockError, ProtocolError)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("length", [0, 1, bay_map.STATUS_COUNT - 1, bay_map.STATUS_COUNT + 1])
def test_bay_refuses_a_block_of_the_wrong_length(length: int) -> None:
    regs = (bay_block() * 2)[:length]
    with pytest.raises(
        RegisterBlockError,
        match=rf"bay status block: expected 23 registers, got {length}$",
    ):
        bay_map.decode_status(regs)


@pytest.mark.parametrize("length", [0, cabinet_map.STATUS_COUNT - 1, cabinet_map.STATUS_COUNT + 1])
def test_cabinet_refuses_a_block_of_the_wrong_length(length: int) -> None:
    regs = (cabinet_block() * 2)[:length]
    with pytest.raises(
        RegisterBlockError,
        match=rf"cabinet status block: expected 5 registers, got {length}$",
    ):
        cabinet_map.decode_status(regs)


def test_meter_refuses_instant_block_of_the_wrong_length() -> None:
    instant, energy = meter_blocks()
    with pytest.raises(
        RegisterBlockError,
        match=r"meter instant block: expected 14 registers, got 13$",
    ):
        meter_map.decode(instant[:-1], energy)


def test_meter_refuses_energy_block_of_the_wrong_length() -> None:
    instant, energy = meter_blocks()
    with pytest.raises(
        RegisterBlockError,
        match=r"meter energy block: expected 2 registers, got 3$",
    ):
        meter_map.decode(instant, [*energy, 0])


@pytest.mark.parametrize("value", [-1, U16_MAX + 1])
def test_bay_refuses_a_register_value_outside_16_bits(value: int) -> None:
    with pytest.raises(RegisterBlockError, match=r"register value outside 0\.\.65535"):
        bay_map.decode_status(bay_block(DOOR_OPEN_COUNT=value))


@pytest.mark.parametrize("version", [0, 3, U16_MAX])
def test_bay_refuses_an_unknown_map_version(version: int) -> None:
    with pytest.raises(
        UnknownMapVersionError,
        match=rf"^bay board reports register map version {version}; "
        r"this software drives \[1, 2\]$",
    ):
        bay_map.decode_status(bay_block(MAP_VERSION=version))


@pytest.mark.parametrize("version", [0, 2, U16_MAX])
def test_cabinet_refuses_an_unknown_map_version(version: int) -> None:
    with pytest.raises(
        UnknownMapVersionError,
        match=rf"^cabinet board reports register map version {version}; "
        r"this software drives \[1\]$",
    ):
        cabinet_map.decode_status(cabinet_block(MAP_VERSION=version))


@pytest.mark.parametrize(
    ("register", "raw", "message"),
    [
        ("IO_FLAGS", 0x0040, r"^bay io flags: undefined bits 0x0040 set$"),
        ("IO_FLAGS", 0x8001, r"^bay io flags: undefined bits 0x8000 set$"),
        ("BOARD_FAULTS", 0x0041, r"^bay board faults: undefined bits 0x0040 set$"),
        ("BOARD_FAULTS", 0xFFFF, r"^bay board faults: undefined bits 0xffc0 set$"),
    ],
)
def test_bay_refuses_undefined_flag_bits(register: str, raw: int, message: str) -> None:
    with pytest.raises(RegisterBlockError, match=message):
        bay_map.decode_status(bay_block(**{register: raw}))


def test_bay_refuses_undefined_bms_fault_bits_of_a_plugged_battery() -> None:
    with pytest.raises(RegisterBlockError, match=r"^bms faults: undefined bits 0x0100 set$"):
        bay_map.decode_status(bay_block_with_battery(BMS_FAULTS=0x0101))


@pytest.mark.parametrize(
    ("register", "raw", "message"),
    [
        ("IO_FLAGS", 0x0020, r"^cabinet io flags: undefined bits 0x0020 set$"),
        ("BOARD_FAULTS", 0x0008, r"^cabinet faults: undefined bits 0x0008 set$"),
    ],
)
def test_cabinet_refuses_undefined_flag_bits(register: str, raw: int, message: str) -> None:
    with pytest.raises(RegisterBlockError, match=message):
        cabinet_map.decode_status(cabinet_block(**{register: raw}))


@pytest.mark.parametrize("field", ["voltage_v", "current_a", "power_w", "energy_kwh"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_meter_refuses_nan_or_infinity_in_any_field(field: str, value: float) -> None:
    instant, energy = meter_blocks(**{field: value})
    what = field.split("_", maxsplit=1)[0]
    with pytest.raises(RegisterBlockError, match=rf"^meter reports a non-finite {what}$"):
        meter_map.decode(instant, energy)


def test_meter_refuses_a_nan_with_any_payload() -> None:
    instant, energy = meter_blocks()
    instant[0:2] = [0xFFC0, 0x0001]  # negative quiet NaN with a payload, as a glitch would read
    with pytest.raises(RegisterBlockError, match="non-finite voltage"):
        meter_map.decode(instant, energy)


@pytest.mark.parametrize("register", ["SOC", "HEALTH"])
def test_bay_refuses_a_percentage_above_100(register: str) -> None:
    with pytest.raises(RegisterBlockError, match=r"^bms reports a percentage above 100$"):
        bay_map.decode_status(bay_block_with_battery(**{register: 1001}))


def test_bay_accepts_exactly_100_percent() -> None:
    status = bay_map.decode_status(bay_block_with_battery(SOC=1000, HEALTH=1000))
    assert status.battery is not None
    assert status.battery.soc_pct == 100.0
    assert status.battery.health_pct == 100.0


@pytest.mark.parametrize(
    ("id_regs", "message"),
    [
        ([0x4180], r"non-ASCII"),
        ([0x4101], r"non-printable"),
        ([0x4100, 0x4200], r"non-printable"),  # NUL inside the id, not only as padding
        ([0x410A], r"non-printable"),
    ],
)
def test_bay_refuses_a_battery_id_with_bad_bytes(id_regs: list[int], message: str) -> None:
    regs = bay_block_with_battery()
    start = bay_map.StatusReg.BATTERY_ID
    regs[start : start + bay_map.BATTERY_ID_REGS] = id_regs + [0] * (8 - len(id_regs))
    with pytest.raises(RegisterBlockError, match=message):
        bay_map.decode_status(regs)


def test_bay_with_bms_link_but_no_id_reports_no_battery() -> None:
    regs = bay_block(IO_FLAGS=int(IoFlag.BATTERY_PRESENT | IoFlag.BMS_LINK), SOC=500)
    status = bay_map.decode_status(regs)
    assert status.battery is None
    assert status.battery_present


# --------------------------------------------------------------------------- rtu_timing


def test_char_time_is_eleven_bits() -> None:
    assert rtu_timing.char_time(9600) == 11 / 9600


def test_inter_frame_gap_is_three_and_a_half_chars_up_to_19200() -> None:
    assert rtu_timing.inter_frame_gap(19200) == 3.5 * 11 / 19200
    assert rtu_timing.inter_frame_gap(9600) == 3.5 * 11 / 9600


@pytest.mark.parametrize("baud", [38400, 57600, 115200])
def test_inter_frame_gap_is_fixed_above_19200(baud: int) -> None:
    assert rtu_timing.inter_frame_gap(baud) == 0.00175


@pytest.mark.parametrize(
    ("baud", "twelve_reads_s"), [(9600, 0.825), (19200, 0.4125), (115200, 0.1027)]
)
def test_twelve_reads_of_20_registers_match_the_design_brief(
    baud: int, twelve_reads_s: float
) -> None:
    assert rtu_timing.read_transaction_time(20, baud) * 12 == pytest.approx(
        twelve_reads_s, abs=5e-5
    )


@pytest.mark.parametrize(("baud", "cycle_ms"), [(9600, 907.5), (19200, 453.8), (115200, 109.6)])
def test_twelve_bay_status_reads_match_the_hardware_doc_table(baud: int, cycle_ms: float) -> None:
    cycle = 12 * rtu_timing.read_transaction_time(bay_map.STATUS_COUNT, baud)
    assert cycle * 1000 == pytest.approx(cycle_ms, abs=0.06)  # the doc rounds to 0.1 ms


@settings(max_examples=200)
@given(
    st.integers(1, 125),
    st.sampled_from([1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200]),
    st.floats(0.0, 0.1),
)
def test_read_transaction_is_request_reply_two_gaps_and_turnaround(
    count: int, baud: int, reply_delay_s: float
) -> None:
    chars = rtu_timing.READ_REQUEST_BYTES + rtu_timing.read_reply_bytes(count)
    expected = (
        chars * rtu_timing.char_time(baud) + 2 * rtu_timing.inter_frame_gap(baud) + reply_delay_s
    )
    assert rtu_timing.read_transaction_time(count, baud, reply_delay_s) == pytest.approx(expected)


@pytest.mark.parametrize("baud", [0, -9600])
def test_char_time_refuses_a_non_positive_baud(baud: int) -> None:
    with pytest.raises(ValueError, match="baud must be positive"):
        rtu_timing.char_time(baud)


# --------------------------------------------------------------------------- codec


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (230.0, (0x4366, 0x0000)),
        (1.0, (0x3F80, 0x0000)),
        (-2.5, (0xC020, 0x0000)),
        (0.0, (0x0000, 0x0000)),
        (2.0**-149, (0x0000, 0x0001)),  # smallest subnormal: the low word really is the low one
    ],
)
def test_float32_is_high_word_first(value: float, words: tuple[int, int]) -> None:
    assert codec.float32_to_regs(value) == words
    assert codec.regs_to_float32(*words) == value


@settings(max_examples=200)
@given(float32s)
def test_float32_survives_encode_then_decode(value: float) -> None:
    hi, lo = codec.float32_to_regs(value)
    assert 0 <= hi <= U16_MAX
    assert 0 <= lo <= U16_MAX
    assert codec.regs_to_float32(hi, lo) == value


@pytest.mark.parametrize(
    ("text", "n_regs", "regs"),
    [
        ("", 2, [0x0000, 0x0000]),
        ("A", 2, [0x4100, 0x0000]),
        ("AB", 3, [0x4142, 0x0000, 0x0000]),
        ("ABC", 2, [0x4142, 0x4300]),
        ("ABCD", 2, [0x4142, 0x4344]),
    ],
)
def test_ascii_field_is_nul_padded_first_char_in_high_byte(
    text: str, n_regs: int, regs: list[int]
) -> None:
    assert codec.ascii_to_regs(text, n_regs) == regs
    assert codec.regs_to_ascii(regs) == text


def test_ascii_field_refuses_text_longer_than_the_field() -> None:
    with pytest.raises(ValueError, match="does not fit in 8 registers"):
        codec.ascii_to_regs("X" * 17, 8)


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16))
def test_ascii_field_survives_encode_then_decode(text: str) -> None:
    regs = codec.ascii_to_regs(text, 8)
    assert len(regs) == 8
    assert codec.regs_to_ascii(regs) == text


@settings(max_examples=200)
@given(st.integers(S16_MIN, S16_MAX))
def test_signed_register_round_trips_in_s16_range(value: int) -> None:
    reg = codec.s16_to_reg(value)
    assert 0 <= reg <= U16_MAX
    assert codec.reg_to_s16(reg) == value


@pytest.mark.parametrize(
    ("value", "signed", "reg"),
    [
        (1e9, True, 0x7FFF),
        (-1e9, True, 0x8000),
        (1e9, False, U16_MAX),
        (-5.0, False, 0),
        (math.nan, True, 0),
        (math.inf, False, 0),
    ],
)
def test_scaled_encoding_saturates_and_maps_non_finite_to_zero(
    value: float, signed: bool, reg: int
) -> None:
    assert codec.scaled_to_reg(value, 0.1, signed=signed) == reg


@pytest.mark.parametrize(("amps", "reg"), [(0.0, 0), (5.0, 500), (9.99, 999), (10.0, 1000)])
def test_current_limit_encodes_in_centiamps(amps: float, reg: int) -> None:
    assert bay_map.encode_current_limit(amps) == reg


@pytest.mark.parametrize("amps", [10.01, 11.0, 1e6, -0.01, -1.0, math.nan, math.inf])
def test_current_limit_refuses_above_10_a_or_negative(amps: float) -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.10\.0 A"):
        bay_map.encode_current_limit(amps)


@settings(max_examples=200)
@given(st.floats(0.0, bay_map.MAX_CHARGE_CURRENT_A))
def test_any_allowed_current_limit_fits_the_board_range(amps: float) -> None:
    assert 0 <= bay_map.encode_current_limit(amps) <= 1000


def test_firmware_version_reads_major_dot_minor() -> None:
    assert bay_map.firmware_version_str(0x0103) == "1.3"
