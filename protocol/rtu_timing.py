"""Time that Modbus RTU frames occupy on an RS-485 line.

The simulator delays every reply by this model and the benchmark divides measured
cycle times by it, so both agree on what "the wire-time minimum" is. Figures follow
the Modbus over serial line spec: 11 bits a character (start, 8 data, parity or a
second stop bit, stop), a silent interval of 3.5 characters between frames, fixed at
1.75 ms above 19200 baud where 3.5 characters would be shorter than UART jitter.
"""

from __future__ import annotations

BITS_PER_CHAR = 11
FIXED_GAP_ABOVE_BAUD = 19200
FIXED_GAP_S = 0.00175

# Byte counts of the frames the daemon uses (address + function + ... + CRC16).
READ_REQUEST_BYTES = 8  # addr, fc, start(2), count(2), crc(2)
WRITE_SINGLE_BYTES = 8  # request and echo reply are the same size
EXCEPTION_REPLY_BYTES = 5


def char_time(baud: int) -> float:
    """Seconds one character takes on the wire."""
    if baud <= 0:
        raise ValueError("baud must be positive")
    return BITS_PER_CHAR / baud


def inter_frame_gap(baud: int) -> float:
    """The silent interval (t3.5) that delimits RTU frames."""
    if baud > FIXED_GAP_ABOVE_BAUD:
        return FIXED_GAP_S
    return 3.5 * char_time(baud)


def frame_time(n_bytes: int, baud: int) -> float:
    """Wire time of one frame including the silent interval that ends it."""
    return n_bytes * char_time(baud) + inter_frame_gap(baud)


def read_reply_bytes(count: int) -> int:
    """Bytes of a read-registers reply carrying ``count`` registers."""
    return 5 + 2 * count


def write_multiple_request_bytes(count: int) -> int:
    """Bytes of a write-multiple-registers (FC16) request."""
    return 9 + 2 * count


def read_transaction_time(count: int, baud: int, reply_delay_s: float = 0.0) -> float:
    """Wire-time minimum of one read of ``count`` registers: request, turnaround, reply."""
    return (
        frame_time(READ_REQUEST_BYTES, baud)
        + reply_delay_s
        + frame_time(read_reply_bytes(count), baud)
    )
