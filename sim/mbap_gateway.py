"""The simulator as a Modbus/TCP gateway: MBAP on the TCP side, the RTU line behind it.

A serial-to-Ethernet gateway in Modbus/TCP mode strips the 7-byte MBAP header from a
request, sends unit id + PDU + CRC on its RS-485 line, and wraps the reply the same
way. The simulated line (``SimulatedBus``) judges frames in their RTU form (which unit
is silent, which reply gets a CRC error, what a write's echo is), so this module
translates each packet to the RTU frame the line would carry and back. A reply that
failed its CRC on the line is dropped, as a gateway drops it: the master hears
silence, there is no CRC on the TCP side to carry the damage.
"""

from __future__ import annotations

from collections.abc import Callable

from pymodbus.framer import FramerRTU

MBAP_HEADER_BYTES = 7  # transaction id, protocol id, length (all u16), unit id
CRC_BYTES = 2

TracePacket = Callable[[bool, bytes], bytes]


def _crc(frame: bytes) -> bytes:
    return int(FramerRTU.compute_CRC(frame)).to_bytes(2, "big")


def to_rtu(adu: bytes) -> tuple[bytes, bytes] | None:
    """(transaction + protocol id, the RTU frame) of one whole MBAP ADU, or None if partial."""
    if len(adu) < MBAP_HEADER_BYTES:
        return None
    length = int.from_bytes(adu[4:6], "big")  # unit id + PDU
    if len(adu) < 6 + length:
        return None
    body = adu[6 : 6 + length]
    return adu[:4], body + _crc(body)


def to_mbap(ids: bytes, rtu: bytes) -> bytes:
    """The MBAP ADU carrying RTU frame ``rtu`` (its CRC removed) under ``ids``."""
    body = rtu[:-CRC_BYTES]
    return ids + len(body).to_bytes(2, "big") + body


def mbap_trace(line: TracePacket) -> TracePacket:
    """Wrap the line's RTU ``trace_packet`` for a server speaking Modbus/TCP."""

    def trace(sending: bool, adu: bytes) -> bytes:
        parsed = to_rtu(adu)
        if parsed is None:
            return adu  # a partial request: pymodbus waits for the rest
        ids, rtu = parsed
        if not sending:
            line(False, rtu)  # the line notes the request; the server parses the ADU
            return adu
        on_wire = line(True, rtu)
        if not on_wire or _crc(on_wire[:-CRC_BYTES]) != on_wire[-CRC_BYTES:]:
            return b""  # silence, or a garbled reply the gateway discards
        return to_mbap(ids, on_wire)

    return trace
