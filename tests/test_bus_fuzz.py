"""Garbage on the wire never crashes the master: every reply ends as data or a domain error."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymodbus.framer import FramerRTU

from drivers.boards import BayBoard
from drivers.modbus_bus import BusError
from protocol import bay_map
from protocol.errors import ProtocolError
from tests.conftest import master


def with_crc(frame: bytes) -> bytes:
    return frame + FramerRTU.compute_CRC(frame).to_bytes(2, "big")


random_bytes = st.binary(min_size=0, max_size=80)
# Frames that pass the CRC check, so the fuzzing reaches the PDU decoder and our block decoder.
well_framed = st.builds(
    lambda unit, fc, payload: with_crc(bytes([unit, fc]) + payload),
    st.sampled_from([1, 1, 1, 2, 0, 255]),
    st.sampled_from([4, 4, 3, 0x84, 6, 16, 0x2B, 0]),
    st.binary(min_size=0, max_size=60),
)
register_blocks = st.builds(
    lambda regs: with_crc(
        bytes([1, 4, 2 * len(regs)]) + b"".join(r.to_bytes(2, "big") for r in regs)
    ),
    st.lists(st.integers(0, 0xFFFF), min_size=0, max_size=30)
    | st.lists(
        st.integers(0, 0xFFFF), min_size=bay_map.STATUS_COUNT, max_size=bay_map.STATUS_COUNT
    ),
)
replies = st.lists(random_bytes | well_framed | register_blocks, min_size=1, max_size=3)


async def one_exchange(chunks: list[bytes]) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with master(f"tcp://127.0.0.1:{port}", timeout_s=0.03) as bus:
            try:
                status = await BayBoard(bus, 1).read_status()
            except (BusError, ProtocolError) as exc:
                assert str(exc)  # a message a technician can read
            else:
                assert status.map_version in bay_map.SUPPORTED_MAP_VERSIONS
    finally:
        server.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies)
def test_any_reply_is_either_a_status_or_a_domain_error(chunks: list[bytes]) -> None:
    asyncio.run(one_exchange(chunks))
