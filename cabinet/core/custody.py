"""The battery custody ledger: every battery the cabinet has known is somewhere.

A battery is in a bay, with a rider (named by the session that handed it over),
or flagged missing (it left a bay without a session handing it out) — never
nowhere. The swap machine moves batteries between bays and riders with custody
commands; the bays' reports then confirm or contradict the ledger, and a
contradiction is a change the operator hears about, not a silent overwrite.

**The grace for identity.** A bay can report a pack present without saying which
one it is: its BMS has not answered yet (it wakes when the connector mates, or
with a board that was just powered), or the pack is unplugged and its id hidden.
Such a reading leaves the battery last seen there in place — but only for
``IDENTITY_GRACE_S`` of unbroken unreadable readings; past that the battery is
missing, and the change says why (the pack in the bay cannot be read). Found by
the stateful swap story: a battery swapped for an unreadable pack while its board
was silent stayed in the ledger for as long as the pack stayed unreadable, so a
theft was never reported. The grace is memory only (a restart counts it again:
conservative, an alarm a restart's length later at worst), and it does not run
for a bay the session's open door attends to (``attended``): the rider there may
unplug a pack and take it or put it back, and the swap machine settles where it went.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: How long a bay may report a present pack without an id before the battery the ledger
#: last saw there is called missing. A BMS that is waking up answers within a few polls --
#: a couple of seconds even at 9600 baud, where a 12-bay cycle is ~0.8 s, and a board
#: isolated for a few bad reads is re-probed within 5 s (``bus.reprobe_interval_s``) -- so
#: 30 s is ten times what an honest pack needs, while a swapped or stolen battery is still
#: reported within half a minute, before ``bus.offline_alarm_s`` (60 s) would even call
#: a silent board an alarm. The default of ``swap.identity_grace_s``: a site whose packs wake
#: more slowly sets a longer one (docs/swap.md §5).
IDENTITY_GRACE_S = 30.0
#: What is left of a grace for a bay whose board answers again after a silence, at least:
#: its BMS link wakes with the board. Not a whole new grace: a board isolated now and then
#: (a few bad reads on a noisy line, re-probed within 5 s) would hide a swapped battery for ever.
BOARD_WAKE_S = 10.0


class Where(enum.StrEnum):
    """The kinds of place a battery can be."""

    BAY = "bay"
    RIDER = "rider"
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class Location:
    """Where one battery is."""

    where: Where
    #: the bay it is in, or for a missing battery the bay it was last seen in
    bay: int | None = None
    rider_id: str | None = None
    session_id: str | None = None

    def describe(self) -> str:
        """Say it as an operator would read it."""
        if self.where is Where.BAY:
            return f"bay {self.bay}"
        if self.where is Where.RIDER:
            return f"rider {self.rider_id} (session {self.session_id})"
        return "missing"


@dataclass(frozen=True, slots=True)
class CustodyChange:
    """A move the ledger recorded; ``surprise`` marks one no session explains.

    ``detail`` says, for a battery gone missing, why the ledger thinks so (the
    operator's alarm carries it).
    """

    battery_id: str
    before: Location | None
    after: Location
    surprise: bool
    detail: str | None = None

    @property
    def found(self) -> bool:
        """A battery the ledger had as missing is accounted for again."""
        return (
            self.before is not None
            and self.before.where is Where.MISSING
            and self.after.where is not Where.MISSING
        )


class CustodyLedger:
    """Battery id -> location, with the rules for confirmed moves and observed ones."""

    def __init__(
        self,
        locations: dict[str, Location] | None = None,
        *,
        identity_grace_s: float = IDENTITY_GRACE_S,
    ) -> None:
        self._locations: dict[str, Location] = dict(locations or {})
        self.identity_grace_s = identity_grace_s
        # bay -> when it first read an unreadable pack, on every reading since, while
        # holding a recorded battery and attended to by nothing else (memory only)
        self._unreadable_since: dict[int, float] = {}
        # bays whose board went silent while their grace ran (``bay_silent``)
        self._silenced: set[int] = set()

    def __contains__(self, battery_id: str) -> bool:
        return battery_id in self._locations

    def location(self, battery_id: str) -> Location | None:
        """Where ``battery_id`` is, or None for a battery never seen."""
        return self._locations.get(battery_id)

    def items(self) -> Iterable[tuple[str, Location]]:
        """Every battery with its location."""
        return self._locations.items()

    def in_bay(self, bay: int) -> list[str]:
        """Batteries the ledger places in ``bay`` (normally zero or one)."""
        return [
            b for b, loc in self._locations.items() if loc.where is Where.BAY and loc.bay == bay
        ]

    def missing_from(self, bay: int) -> list[str]:
        """Batteries missing since they were last seen in ``bay``."""
        return [
            b for b, loc in self._locations.items() if loc.where is Where.MISSING and loc.bay == bay
        ]

    def _move(
        self, battery_id: str, after: Location, *, surprise: bool, detail: str | None = None
    ) -> CustodyChange | None:
        before = self._locations.get(battery_id)
        if before == after:
            return None
        self._locations[battery_id] = after
        return CustodyChange(battery_id, before, after, surprise, detail)

    def to_bay(self, battery_id: str, bay: int) -> CustodyChange | None:
        """A confirmed deposit: the battery is now in ``bay``."""
        return self._move(battery_id, Location(Where.BAY, bay=bay), surprise=False)

    def to_rider(self, battery_id: str, rider_id: str, session_id: str) -> CustodyChange | None:
        """A confirmed hand-over to a rider."""
        return self._move(
            battery_id,
            Location(Where.RIDER, rider_id=rider_id, session_id=session_id),
            surprise=False,
        )

    def observe_bay(
        self,
        bay: int,
        battery_id: str | None,
        *,
        present: bool,
        now: float,
        expected: bool = False,
        attended: bool = False,
    ) -> list[CustodyChange]:
        """Reconcile the ledger with what ``bay`` reports now (``now``: monotonic seconds).

        An identified battery in the bay is recorded there (a surprise unless the
        ledger already said so). A battery the ledger placed here that is gone, with
        no session having handed it over, becomes missing. An unidentified battery
        (``present`` without an id) leaves recorded batteries where they are for
        ``identity_grace_s`` of such readings -- the BMS may simply not have answered
        yet -- and then they are missing too. ``expected`` marks a bay a session has
        open for a battery (the return bay): an arrival there is no surprise.
        ``attended`` marks a bay whose recorded battery the session's open door settles
        (the swap machine hands it over or keeps it): no grace runs for it.
        """
        changes: list[CustodyChange] = []
        if bay in self._silenced:  # the board answers again: its pack gets a wake window
            self._silenced.discard(bay)
            if (since := self._unreadable_since.get(bay)) is not None:
                wake = min(BOARD_WAKE_S, self.identity_grace_s)
                self._unreadable_since[bay] = max(since, now - self.identity_grace_s + wake)
        if battery_id is not None:
            change = self._move(battery_id, Location(Where.BAY, bay=bay), surprise=not expected)
            if change is not None:
                changes.append(change)
        held = [b for b in self.in_bay(bay) if b != battery_id]
        unreadable = present and battery_id is None
        if not (unreadable and held) or attended:
            self._unreadable_since.pop(bay, None)
            if unreadable:
                return changes  # no one recorded here, or the session's door settles it
        else:
            since = self._unreadable_since.setdefault(bay, now)
            if now - since < self.identity_grace_s:
                return changes
            del self._unreadable_since[bay]
        for other in held:
            if unreadable:
                detail = (
                    f"bay {bay} holds a pack whose id cannot be read; {other} was last seen there"
                )
            else:
                detail = f"{other} left its bay without a session"
            change = self._move(
                other, Location(Where.MISSING, bay=bay), surprise=True, detail=detail
            )
            if change is not None:
                changes.append(change)
        return changes

    @property
    def graces(self) -> Mapping[int, float]:
        """Bays whose identity grace runs, with when it began (read only)."""
        return self._unreadable_since

    def may_want_reading(self, bay: int, battery_id: str | None, *, present: bool) -> bool:
        """Whether ``wants_reading`` can say yes to this reading at all.

        Only if a grace runs for ``bay`` or the reading is of an unreadable pack: almost
        every reading is neither, and then the caller needs neither the clock nor the
        session's bays to know (the daemon asks on every reading of every bay).
        """
        return bay in self._unreadable_since or (present and battery_id is None)

    def wants_reading(
        self,
        bay: int,
        battery_id: str | None,
        *,
        present: bool,
        now: float,
        attended: bool = False,
    ) -> bool:
        """Whether ``observe_bay`` of this reading would start, end or drop ``bay``'s grace.

        The daemon skips a reading equal to the last one; such a reading still counts
        for the grace, so it asks here first (cheap: a dict look-up unless the bay
        reads an unreadable pack or a grace runs).
        """
        since = self._unreadable_since.get(bay)
        unreadable = present and battery_id is None
        if since is None:
            return unreadable and not attended and bool(self.in_bay(bay))
        return (
            not unreadable
            or attended
            or now - since >= self.identity_grace_s
            or not self.in_bay(bay)
        )

    def bay_silent(self, bay: int) -> None:
        """``bay``'s board stopped answering: its grace goes on, with a wake window after.

        A board that was off brings its BMS link up with it: when it answers again the pack
        has at least ``BOARD_WAKE_S`` to say who it is, but the grace is not counted from
        scratch (a board isolated every few seconds would otherwise never end it).
        """
        if bay in self._unreadable_since:
            self._silenced.add(bay)
