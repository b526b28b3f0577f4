"""The demo's live terminal view: what a person watching the cabinet wants to see.

Built only from what the daemon answers on its control socket (the same answers
``cabinet status``/``bays``/``events`` print) and what the backend received over
MQTT, so the view shows the real system, not the demo's intentions. ``render`` is
pure; the demo redraws it in place a few times a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

BAR_WIDTH = 10
CLEAR = "\x1b[H\x1b[2J"  # home + clear: plain ANSI, no curses needed


@dataclass(slots=True)
class Frame:
    """Everything one redraw shows."""

    status: dict[str, Any]
    bays: list[dict[str, Any]]
    events: list[dict[str, Any]]
    published: int  # events the backend received over MQTT
    gaps: int
    duplicates: int
    riders: list[str] = field(default_factory=list)  # most recent last
    completed: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    screen_url: str = ""  # the rider's kiosk page, for a browser


def soc_bar(soc: float | None) -> str:
    """``[######----]  62%``: a battery's charge at a glance."""
    if soc is None:
        return " " * (BAR_WIDTH + 7)
    filled = round(soc / 100 * BAR_WIDTH)
    return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {soc:3.0f}%"


def _bay_line(bay: dict[str, Any], session: dict[str, Any] | None) -> str:
    number = f"{bay['bay']:>2}"
    if not bay["online"]:
        return f" {number}  OFFLINE"
    door = "OPEN  " if bay["door"] == "open" else "closed"
    battery = bay["battery_id"] or ("(unknown)" if bay["battery_present"] else "empty")
    temp = "" if bay["cell_temp_c"] is None else f"{bay['cell_temp_c']:4.1f}C"
    charging = "charging" if bay["charging"] else ""
    marks = []
    if session is not None and bay["bay"] == session["return_bay"]:
        marks.append("<- return")
    if session is not None and bay["bay"] == session["dispense_bay"]:
        marks.append("<- dispense")
    if not bay["in_service"]:
        marks.append(f"OUT OF SERVICE: {bay['out_of_service_reason']}")
    return (
        f" {number}  {door}  {battery:<12} {soc_bar(bay['soc_pct'])}  {temp:>6}  "
        f"{charging:<8}  {' '.join(marks)}"
    ).rstrip()


def _event_line(event: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["ts"] / 1000))
    skip = {"seq", "id", "type", "ts", "session_id"}
    detail = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip and v is not None)
    return f" {event['seq']:>5} {stamp} {event['type']:<22} {detail}"[:118]


def render(frame: Frame) -> list[str]:
    """The screen, line by line (fits 120 x 45)."""
    status = frame.status
    session = status["session"]
    mqtt = status["mqtt"]
    link = "not configured"
    if mqtt is not None:
        link = ("connected" if mqtt["connected"] else "DISCONNECTED") + f" {mqtt['url']}"
    lines = [
        f" cabinet {status['cabinet_id']}   demo running {frame.elapsed_s:5.0f} s   "
        f"swaps completed {frame.completed}, failed {frame.failed}   (Ctrl-C ends the demo)",
        f" MQTT {link}   outbox {status['outbox_depth']} waiting   "
        f"backend received {frame.published} events (gaps {frame.gaps}, "
        f"duplicates {frame.duplicates})",
        "",
        " BAY DOOR    BATTERY      CHARGE             CELL    CHARGER",
    ]
    if frame.screen_url:
        lines.insert(2, f" rider's screen: open {frame.screen_url} in a browser")
    lines += [_bay_line(bay, session) for bay in frame.bays]
    lines.append("")
    if session is None:
        lines.append(" session: none - waiting for a rider")
    else:
        lines.append(
            f" session {session['session_id']}: rider {session['rider_id']}, {session['phase']}"
        )
    lines.append(f" screen:  {status['prompt'] or '-'}")
    safety = status["cabinet"]
    if safety["smoke"] or safety["mains_present"] is False:
        lines.append(" SAFETY:  smoke or mains loss - charging cut")
    lines += ["", " riders:"]
    lines += [f"   {line}" for line in frame.riders[-4:]] or ["   -"]
    lines += ["", " recent events:"]
    lines += [_event_line(event) for event in frame.events[-10:]]
    return lines
