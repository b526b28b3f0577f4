"""What the rider's screen shows, as a pure function of the controller's facts.

``screen(facts)`` turns a ``Facts`` (the session, the last prompt, the timers, the
cabinet's safety and the batteries) into a ``Screen``: already-worded lines in the
rider's language, the bay in big digits, the step's pictogram key, the countdown.
The page only places them, so everything a rider reads is decided (and tested) here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cabinet.daemon.display.catalogue import text

#: a result (done, failed) stays on screen this long before the idle screen returns
RESULT_HOLD_S = 12.0
#: rough charging rate for the idle screen's ETA: minutes per SoC percent at the bay's
#: charging current (a 0-100 % charge at 5 A takes about two hours on the reference pack)
MINUTES_PER_PCT = 1.2

# which bay each step is about, and its pictogram
_RETURN_STEPS = {"opening_return": "door", "insert": "insert", "giving_back": "take"}
_DISPENSE_STEPS = {"opening_dispense": "door", "take": "take"}


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything the screen depends on, read from the controller at one instant."""

    cabinet_id: str
    language: str
    active: bool  # a session is running
    prompt_code: str  # the machine's last prompt ("" before the first)
    prompt_age_s: float  # seconds since that prompt
    return_bay: int | None  # the session's (or the last session's) bays
    dispense_bay: int | None
    session_id: str | None
    timer_left_s: float | None  # the rider's running timer (deposit, take_back, pickup, close)
    ready_count: int  # full batteries that could be handed out now
    charging_socs: tuple[float, ...]  # SoC of batteries charging towards the threshold
    ready_soc_pct: float
    smoke: bool = False
    mains_lost: bool = False
    lockout: bool = False
    out_of_service: bool = False
    qr_svg: str = ""  # the dynamic QR code, inline SVG (empty: none to show)
    #: the fleet link is up: a code scanned with the app can reach the cabinet as swap.start
    app_online: bool = True


@dataclass(frozen=True, slots=True)
class Screen:
    """What the page draws; ``kind`` picks the layout."""

    kind: str  # idle | session | result | safety | out_of_service
    language: str
    title: str = ""
    lines: tuple[str, ...] = ()
    bay: int | None = None
    bay_label: str = ""
    step: str = ""  # pictogram: door | insert | take | done | failed | smoke | power | stop
    prompt_code: str = ""
    countdown_s: int | None = None
    countdown_label: str = ""
    qr_svg: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The SSE payload."""
        return asdict(self)


def charging_eta_min(socs: tuple[float, ...], ready_soc_pct: float) -> int | None:
    """Minutes until the fullest charging battery reaches the dispense threshold."""
    if not socs:
        return None
    gap = max(0.0, ready_soc_pct - max(socs))
    return max(1, round(gap * MINUTES_PER_PCT))


def _support_code(facts: Facts) -> str:
    """What the rider quotes to support: the cabinet, the session and the reason."""
    session = (facts.session_id or "")[:6].upper()
    return f"{facts.cabinet_id}-{session}" if session else facts.cabinet_id


def screen(facts: Facts) -> Screen:
    """The screen for ``facts``; safety first, then the session, then idle."""
    lang = facts.language
    if facts.smoke:
        return Screen(
            "safety",
            lang,
            text("safety.smoke.title", lang),
            (text("safety.smoke", lang),),
            step="smoke",
            prompt_code="safety.smoke",
        )
    if facts.lockout:
        return Screen(
            "safety",
            lang,
            text("safety.lockout.title", lang),
            (text("safety.lockout", lang),),
            step="stop",
            prompt_code="safety.lockout",
        )
    code = facts.prompt_code
    if facts.active:
        return _session(facts, code)
    if (
        code
        and facts.prompt_age_s < RESULT_HOLD_S
        and code.split(".")[0] in {"completed", "failed"}
    ):
        return _result(facts, code)
    if facts.mains_lost:
        return Screen(
            "safety",
            lang,
            text("safety.mains_lost.title", lang),
            (text("safety.mains_lost", lang),),
            step="power",
            prompt_code="safety.mains_lost",
        )
    if facts.out_of_service:
        return Screen(
            "out_of_service",
            lang,
            text("out_of_service.title", lang),
            (text("out_of_service", lang),),
            step="stop",
            prompt_code="out_of_service",
        )
    return _idle(facts)


def _session(facts: Facts, code: str) -> Screen:
    lang = facts.language
    if code in _DISPENSE_STEPS:
        bay, step = facts.dispense_bay, _DISPENSE_STEPS[code]
    elif code.startswith("rejected."):
        bay, step = facts.return_bay, "take"
    else:
        bay, step = facts.return_bay, _RETURN_STEPS.get(code, "door")
        if code not in _RETURN_STEPS:  # a session between prompts: it starts at the return bay
            code = "opening_return" if bay is not None else "opening_dispense"
            bay = bay if bay is not None else facts.dispense_bay
    countdown = None if facts.timer_left_s is None else max(0, int(facts.timer_left_s + 0.999))
    return Screen(
        "session",
        lang,
        lines=(text(code, lang, bay=bay),),
        bay=bay,
        bay_label=text("session.bay", lang),
        step=step,
        prompt_code=code,
        countdown_s=countdown,
        countdown_label=text("session.seconds_left", lang),
    )


def _result(facts: Facts, code: str) -> Screen:
    lang = facts.language
    # no bay number: the session is over and no door is waiting for the rider
    return Screen(
        "result",
        lang,
        lines=(text(code, lang, bay=facts.return_bay, code=_support_code(facts)),),
        step="done" if code == "completed" else "failed",
        prompt_code=code,
    )


def _idle(facts: Facts) -> Screen:
    lang = facts.language
    if facts.app_online:
        lines = [text("idle.scan", lang), text("idle.pass", lang)]
    else:  # no code to scan: the app's swap.start could not reach the cabinet
        lines = [text("idle.pass_only", lang), text("idle.app_offline", lang)]
    if facts.ready_count == 1:
        lines.append(text("idle.ready_one", lang))
    elif facts.ready_count:
        lines.append(text("idle.ready", lang, n=facts.ready_count))
    else:
        lines.append(text("idle.none_ready", lang))
    eta = charging_eta_min(facts.charging_socs, facts.ready_soc_pct)
    if eta is not None:
        lines.append(text("idle.charging_eta", lang, minutes=eta))
    return Screen(
        "idle",
        lang,
        text("idle.title", lang),
        tuple(lines),
        step="scan",
        prompt_code="idle",
        qr_svg=facts.qr_svg if facts.app_online else "",
    )
