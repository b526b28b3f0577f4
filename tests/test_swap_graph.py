"""The swap machine's graph, computed from its table (issue 11, "The core").

The graph is derived by exploring the table from IDLE with every kind of input the
runtime can produce (h2's "every state meets every input"): each (phase, event type)
pair is tried on every reachable state. From the edges found we check that every phase
is reachable from IDLE and that IDLE is reachable from every phase (no trap), and a
deliberately broken table proves the check bites.
"""

from __future__ import annotations

import subprocess
import sys

from cabinet.core.swap_machine import (
    IDLE,
    TRANSITIONS,
    Phase,
    SwapMachine,
    SwapState,
    Transition,
)
from tests.conftest import REPO
from tools.render_swap_graph import explore, graph_problems, inputs


def test_every_phase_is_reachable_and_none_is_a_trap() -> None:
    assert graph_problems(explore(SwapMachine())) == []


def test_the_check_bites_on_a_table_with_a_trap_phase() -> None:
    def stay(_m: SwapMachine, state: SwapState, _ev: object) -> Transition:
        return Transition(state)

    # giving_back keeps its way in (a failed dispense door) but loses every way out
    broken = {k: (stay if k[0] is Phase.GIVING_BACK else h) for k, h in TRANSITIONS.items()}
    assert graph_problems(explore(SwapMachine(table=broken))) == [
        "giving_back is a trap: no way back to idle"
    ]


def test_every_phase_meets_every_input() -> None:
    """h2-style: illegal pairs change nothing and command nothing; no pair raises."""
    machine = SwapMachine()
    seen, todo = {IDLE}, [IDLE]
    while todo and len(seen) < 5_000:
        state = todo.pop()
        for event in inputs():
            result = machine.step(state, event)
            if (state.phase, type(event)) not in TRANSITIONS:
                # refused, or another bay's business: either way nothing moves
                assert result.state == state and result.commands == ()
            elif result.state not in seen:
                seen.add(result.state)
                todo.append(result.state)
    assert {s.phase for s in seen} == set(Phase)


def test_the_graph_in_the_docs_is_the_tables() -> None:
    result = subprocess.run(
        [sys.executable, "tools/render_swap_graph.py", "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout
