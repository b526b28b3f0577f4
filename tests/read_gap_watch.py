"""The longest gap between two reads of each board, watched on the simulator's counters.

The simulator counts every register read per unit and stamps when the latest went
onto the line (``ctl state``: ``reads``, ``last_read_at``, and its clock ``now``).
Sampled every ``SAMPLE_S`` over one control connection: two samples where a unit's
reads went up by exactly one give that gap exactly; every sample also bounds it from
below by the unit's age (``now - last_read_at``), which catches a gap still open. Both
only ever under-estimate, so a gap reported over a limit is a real one.

On a loaded machine a gap also holds the time the daemon waited for a CPU. The wire
gap leaves that out: the line's busy time (every unit's ``busy_s`` and the broadcasts)
between two reads of a unit, i.e. what the daemon's schedule put on the wire before it
came back to that unit. The simulator stamps each read with the line's busy time then
(``line_busy_at_read``), so the wire gap is exact as the wall-clock one is, and a gap
still open is bounded from below by ``line_busy_s`` now. (Taking the busy time at the
samples instead counted the wire after a gap's closing read up to the next sample, and a
loaded machine that sampled late made a kept schedule look 0.13 s over its second.)
That is what a test can hold the schedule to on any machine; the bench prints both.
"""

from __future__ import annotations

import json
import socket
import threading

SAMPLE_S = 0.05  # ten samples or more per poll period: most gaps are seen exactly


class ReadGapWatch:
    """Watches ``units`` on the simulator at ``control`` (``tcp://host:port``)."""

    def __init__(self, control: str, units: tuple[int, ...]) -> None:
        host, port = control.removeprefix("tcp://").rsplit(":", 1)
        self._address = (host, int(port))
        self._units = units
        #: unit -> the longest gap seen between two of its reads (or since its last one)
        self.longest_s: dict[int, float] = dict.fromkeys(units, 0.0)
        #: unit -> the most line busy time seen between two of its reads
        self.longest_wire_s: dict[int, float] = dict.fromkeys(units, 0.0)
        #: unit -> the simulator's clock when that longest gap ended (or was last seen open)
        self.longest_at: dict[int, float] = dict.fromkeys(units, 0.0)
        self.started_at = 0.0  # the simulator's clock at the first sample
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ReadGapWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def worst_s(self) -> float:
        """The longest gap of any watched unit."""
        return max(self.longest_s.values())

    @property
    def worst_wire_s(self) -> float:
        """The most line busy time between two reads of any watched unit."""
        return max(self.longest_wire_s.values())

    def _run(self) -> None:
        seen: dict[int, tuple[int, float, float]] = {}  # unit -> reads, last read at, busy then
        with socket.create_connection(self._address) as conn, conn.makefile("rwb") as stream:
            while not self._stop.wait(SAMPLE_S):
                stream.write(b'{"verb": "state"}\n')
                stream.flush()
                bus = json.loads(stream.readline())["result"]["bus"]
                if not self.samples:
                    self.started_at = bus["now"]
                self.samples += 1
                busy = bus["line_busy_s"]
                for unit in self._units:
                    counters = bus["units"].get(str(unit))
                    if not counters or not counters["reads"]:
                        continue
                    reads, at = counters["reads"], counters["last_read_at"]
                    busy_at = counters["line_busy_at_read"]
                    gap, wire = bus["now"] - at, busy - busy_at
                    previous = seen.get(unit)
                    if previous is not None and reads == previous[0] + 1:
                        gap = max(gap, at - previous[1])
                        wire = max(wire, busy_at - previous[2])
                    seen[unit] = (reads, at, busy_at)
                    self.longest_wire_s[unit] = max(self.longest_wire_s[unit], wire)
                    if gap > self.longest_s[unit]:
                        self.longest_s[unit], self.longest_at[unit] = gap, bus["now"]
