"""The bus I/O the controller decides and the bay poller carries out.

The controller never touches the bus: a decision that needs a frame on the line
(a door unlocked for a session or a person, a charger turned off, the contactor
opened) becomes one of these commands, handed to ``BayPoller.carry_out`` once
the decision is journaled — the swap machine's sans-I/O pattern one level up.
"""

from __future__ import annotations

from dataclasses import dataclass

from cabinet.core.swap_machine import Unlock

#: A safety write's target: ("charger", bay) or ("contactor", None).
SafetyTarget = tuple[str, int | None]


@dataclass(frozen=True, slots=True)
class OperatorUnlock:
    """Open ``bay`` for an operator or technician, outside any session."""

    bay: int


@dataclass(frozen=True, slots=True)
class MakeSafe:
    """Charger off / contactor open, re-sent until reading the board back confirms it."""

    target: SafetyTarget


#: ``Unlock`` is the swap machine's own: a session's door, dropped if no longer wanted.
BusCommand = Unlock | OperatorUnlock | MakeSafe
