"""Derive the swap machine's graph from its table and render it into docs/swap.md.

The graph is computed, not drawn: every (phase, event type) pair of
``cabinet.core.swap_machine.TRANSITIONS`` is tried, from IDLE, on every reachable state with
one input of each kind the runtime produces, and the phase-to-phase edges seen are the
graph. ``python tools/render_swap_graph.py`` rewrites the block between the markers in
docs/swap.md; ``--check`` exits 1 if that block is stale (tests/test_swap_graph.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from cabinet.core.battery_rules import BatteryObs
from cabinet.core.swap_machine import (
    IDLE,
    Abort,
    BatteryInserted,
    BatteryRemoved,
    BayOffline,
    Candidate,
    DispensableNow,
    DoorClosed,
    DoorOpened,
    Event,
    LockJammed,
    Mode,
    Phase,
    Start,
    SwapMachine,
    Timer,
    TimerExpired,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "swap.md"
BEGIN, END = "<!-- swap-graph:begin (tools/render_swap_graph.py) -->", "<!-- swap-graph:end -->"

GOOD = BatteryObs("BAT-R1", plugged=True, soc_pct=10, health_pct=90)
HOT = BatteryObs("BAT-R1", plugged=True, soc_pct=10, health_pct=90, cell_temp_c=60)
FULL = (Candidate(5, "BAT-F5"), Candidate(6, "BAT-F6"))


def inputs() -> list[Event]:
    """One of each input kind the runtime produces, on the bays a session uses."""
    events: list[Event] = [Start("s", "r", mode, (1, 2), FULL) for mode in Mode]
    events += [Start("s", "r", Mode.SWAP, (), FULL), Start("s", "r", Mode.SWAP, (1,), ())]
    for bay in (1, 2, 5, 6):
        events += [DoorOpened(bay), DoorClosed(bay), LockJammed(bay), BayOffline(bay)]
        events += [BatteryRemoved(bay, None), BatteryRemoved(bay, "BAT-R1")]
        events += [BatteryRemoved(bay, f"BAT-F{bay}")]
        events += [BatteryInserted(bay, b) for b in (GOOD, HOT, BatteryObs(None, False))]
        events += [BatteryInserted(bay, BatteryObs(f"BAT-F{bay}", True, 99, 90))]
    events += [TimerExpired(t) for t in Timer]
    events += [DispensableNow(FULL), DispensableNow(FULL[1:]), DispensableNow(())]
    events.append(Abort("smoke"))
    return events


def explore(machine: SwapMachine) -> dict[Phase, set[Phase]]:
    """Every phase-to-phase edge the table takes from IDLE, by breadth-first search."""
    edges: dict[Phase, set[Phase]] = {phase: set() for phase in Phase}
    seen, todo = {IDLE}, [IDLE]
    while todo:
        state = todo.pop()
        for event in inputs():
            nxt = machine.step(state, event).state
            edges[state.phase].add(nxt.phase)
            if nxt not in seen and len(seen) < 20_000:
                seen.add(nxt)
                todo.append(nxt)
    return edges


def reachable(edges: dict[Phase, set[Phase]], start: Iterable[Phase]) -> set[Phase]:
    """Phases reachable from ``start`` over ``edges`` (``start`` included)."""
    found, todo = set(start), list(start)
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in found:
                found.add(nxt)
                todo.append(nxt)
    return found


def graph_problems(edges: dict[Phase, set[Phase]]) -> list[str]:
    """Phases no session reaches, and phases from which no session ever ends."""
    problems = [f"{p} is unreachable" for p in set(Phase) - reachable(edges, [Phase.IDLE])]
    problems += [
        f"{phase} is a trap: no way back to idle"
        for phase in Phase
        if Phase.IDLE not in reachable(edges, [phase])
    ]
    return sorted(problems)


def mermaid(edges: dict[Phase, set[Phase]]) -> str:
    """A mermaid ``stateDiagram-v2`` of the derived edges (self-loops left out)."""
    lines = ["```mermaid", "stateDiagram-v2", "    [*] --> idle"]
    for phase in Phase:
        lines += [f"    {phase} --> {nxt}" for nxt in Phase if nxt in edges[phase] and nxt != phase]
    lines.append("```")
    return "\n".join(lines)


def rendered(doc: str) -> str:
    """``doc`` with the graph block replaced by the current table's graph."""
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{mermaid(explore(SwapMachine()))}\n{END}{tail}"


def main(argv: list[str]) -> int:
    """Rewrite the graph block, or with ``--check`` report whether it is stale."""
    doc = DOC.read_text(encoding="utf-8")
    new = rendered(doc)
    if "--check" in argv:
        if new != doc:
            print("docs/swap.md: the swap graph is stale; run python tools/render_swap_graph.py")
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
