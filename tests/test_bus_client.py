"""The simulated cabinet plugs into the bus master through its declared client port.

``ModbusBus(client=...)`` takes anything that answers ``drivers.bus_client.BusClient``;
the virtual-time campaign and ``cabinet sim fleet`` hand it ``sim.direct_bus.DirectClient``
instead of writing a private attribute. The bus keeps all its bookkeeping either way.
"""

from __future__ import annotations

import asyncio
import random

from drivers.boards import BayBoard
from drivers.bus_url import parse_endpoint
from drivers.modbus_bus import ModbusBus
from protocol import bay_map
from sim.cabinet_model import SimulatedCabinet
from sim.direct_bus import DirectClient


class _Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_supplied_client_answers_without_a_port_and_survives_a_reopen() -> None:
    clock = _Clock()
    world = SimulatedCabinet(clock=clock, seed=3)

    async def scenario() -> None:
        bus = ModbusBus(
            parse_endpoint("tcp://127.0.0.1:9"),  # nothing listens: never opened
            clock=clock,
            client=DirectClient(world, random.Random(3)),
        )
        status = await BayBoard(bus, 2).read_status()
        assert status.map_version == bay_map.MAP_VERSION
        assert bus.unit_stats(2).ok == 1  # the bus's own bookkeeping saw the answer
        # what the poller does after a lost bus: close, then connect again
        bus.close()
        await bus.connect()
        again = await BayBoard(bus, 2).read_status()
        assert again.battery == status.battery  # the same world answers through the same client
        assert bus.unit_stats(2).ok == 2

    asyncio.run(scenario())
