"""The rider's screen and the dynamic QR code against the real daemon, simulator and broker.

Seen from the rider's side: what the page is pushed (its event stream, as the page's
EventSource reads it) and what the backend playing the app gets back over MQTT.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cabinet.demo.backend import scan_screen
from tests.daemon_harness import wait_until
from tests.display_helpers import (
    ScreenWatcher,
    cabinet_with_screen,
    get_json,
    screen_and_broker,
    text_of,
    wait_online,
)
from tests.test_swap_end_to_end import collect, deposit


def test_the_screen_follows_an_app_swap_started_from_its_qr_code(tmp_path: Path) -> None:
    spoken = tmp_path / "spoken.txt"
    writer = (
        f"{sys.executable} -c \"import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')\""
    )
    display = {"audio_command": f"{writer} {spoken} {{text}}"}
    with cabinet_with_screen(tmp_path, seed=31, display=display) as (cab, backend, url):
        idle = get_json(url + "screen.json")
        assert idle["kind"] == "idle"
        assert idle["qr_svg"].startswith("<svg")
        assert "or hold your pass to the scanner" in idle["lines"]
        assert any("ready" in line for line in idle["lines"])
        watcher = ScreenWatcher(url)
        try:
            reply = backend.app_swap(url, "R-app", lang="zh-CN")
            assert reply["ok"] is True, reply
            ret, out = reply["result"]["return_bay"], reply["result"]["dispense_bay"]
            first = watcher.wait_for("the return bay on screen", lambda s: s["bay"] == ret)
            assert first["kind"] == "session" and str(ret) in first["lines"][0]
            assert first["language"] == "zh-CN"  # the rider's language, from swap.start
            deposit(cab, ret, "BAT-APP1")
            watcher.wait_for("the take step", lambda s: s["prompt_code"] == "take")
            collect(cab, out)
            done = watcher.wait_for("the thank-you", lambda s: s["prompt_code"] == "completed")
            assert "换电完成" in text_of(done)
            steps = [s["prompt_code"] for s in watcher.seen() if s["kind"] == "session"]
            assert "insert" in steps and steps.index("insert") < steps.index("take")
            counting = [s["countdown_s"] for s in watcher.seen() if s["prompt_code"] == "insert"]
            assert counting and all(0 < c <= 90 for c in counting)
            # the voice said the steps too, in the rider's language
            wait_until("the thank-you spoken", lambda: "换电完成" in _read(spoken))
            assert f"请将电池放入 {ret} 号仓" in _read(spoken)
        finally:
            watcher.stop()


def test_the_screen_changes_within_200_ms_of_the_cabinet(tmp_path: Path) -> None:
    with cabinet_with_screen(tmp_path, seed=32) as (cab, backend, url):
        watcher = ScreenWatcher(url)
        try:
            watcher.wait_for("the idle screen", lambda s: s["kind"] == "idle")
            reply = backend.app_swap(url, "R-fast")
            ret = reply["result"]["return_bay"]
            cab.wait_door(ret, "open")
            cab.ctl("insert", str(ret), "--battery", "BAT-FAST", "--soc", "15")
            cab.ctl("close", str(ret))
            event = cab.wait_event("swap.battery_deposited")
            shown = wait_until(
                "the take screen",
                lambda: next(
                    (t for t, s in watcher.screens if s["prompt_code"] in DISPENSE_STEPS),
                    None,
                ),
            )
            lag_s = shown - _monotonic_of(event["ts"])
            print(f"deposit journaled -> screen pushed: {lag_s * 1000:.0f} ms")
            assert lag_s < 0.2
        finally:
            watcher.stop()


DISPENSE_STEPS = ("opening_dispense", "take")


def _code(url: str) -> str | None:
    """The challenge on screen, or None while the page does not answer (restarting)."""
    try:
        return scan_screen(url)[1]
    except OSError:
        return None


def _monotonic_of(ts_ms: int) -> float:
    """An event's wall-clock ts on this process's monotonic clock."""
    return time.monotonic() - (time.time() - ts_ms / 1000)


def test_a_stale_used_or_unknown_challenge_opens_nothing(tmp_path: Path) -> None:
    display = {"challenge_rotate_s": 1.0}
    with cabinet_with_screen(tmp_path, seed=33, display=display) as (cab, backend, url):
        cabinet_id, old = scan_screen(url)
        replies = {
            "none": backend.authorise_swap(cabinet_id, "R-none"),
            "unknown": backend.authorise_swap(cabinet_id, "R-x", challenge="NotShownEver1"),
        }
        wait_until("the code to go stale", lambda: scan_screen(url)[1] != old, timeout=5)
        time.sleep(2.1)  # the window is 2 x 1 s: this is the thing under test, not a sync
        replies["stale"] = backend.authorise_swap(cabinet_id, "R-stale", challenge=old)
        _, fresh = scan_screen(url)
        ok = backend.authorise_swap(cabinet_id, "R-ok", challenge=fresh)
        assert ok["ok"] is True, ok
        # the rider shuts the door once it has opened (and the daemon saw it open): shut
        # before that, the daemon rightly calls the door failed and opens another bay
        opened = cab.wait_event("swap.door_opened", rider_id="R-ok", purpose="return")
        cab.ctl("close", str(opened["bay"]))  # wait: nothing deposited, ends it
        cab.wait_event("swap.failed", rider_id="R-ok")
        replies["used"] = backend.authorise_swap(cabinet_id, "R-again", challenge=fresh)
        codes = {k: (r["ok"], r["error"]["code"]) for k, r in replies.items()}
        assert codes == {
            "none": (False, "unknown_challenge"),
            "unknown": (False, "unknown_challenge"),
            "stale": (False, "stale_challenge"),
            "used": (False, "challenge_used"),
        }
        refused = {e["reason"] for e in cab.events("auth.refused")}
        assert refused == {"unknown_challenge", "stale_challenge", "challenge_used"}
        assert len(cab.events("swap.started")) == 1


def test_a_restart_does_not_accept_a_code_shown_before_it(tmp_path: Path) -> None:
    with cabinet_with_screen(tmp_path, seed=34, display={"challenge_rotate_s": 60.0}) as (
        cab,
        backend,
        url,
    ):
        cabinet_id, before = scan_screen(url)
        cab.stop()
        cab.start()
        wait_until("the screen to show a new code", lambda: _code(url) not in (None, before))
        wait_online(cab, backend)
        reply = backend.authorise_swap(cabinet_id, "R-photo", challenge=before)
        assert (reply["ok"], reply["error"]["code"]) == (False, "stale_challenge")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


def test_the_code_is_taken_down_while_the_fleet_link_is_down(tmp_path: Path) -> None:
    """A broker outage: the app's swap.start cannot arrive, so riders are sent to the scanner."""
    with screen_and_broker(tmp_path, seed=5) as (cab, backend, url, broker):
        assert get_json(url + "screen.json")["qr_svg"].startswith("<svg")
        broker.stop()

        def without_code() -> dict[str, object] | None:
            shown: dict[str, object] = get_json(url + "screen.json")
            return shown if shown["qr_svg"] == "" else None

        offline = wait_until("the screen without its code", without_code)
        assert offline["kind"] == "idle"
        assert offline["lines"][:2] == [  # type: ignore[index]
            "Hold your pass to the scanner",
            "The app cannot start a swap here right now",
        ]
        broker.start()
        wait_online(cab, backend)
        wait_until(
            "the code back", lambda: get_json(url + "screen.json")["qr_svg"].startswith("<svg")
        )
