"""The rider's screen as a pure function: what a rider reads for each situation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cabinet.daemon.display.catalogue import CATALOGUE, LANGUAGES
from cabinet.daemon.display.challenges import judge
from cabinet.daemon.display.view import Facts, charging_eta_min, screen
from protocol.catalogue import DEPOSIT_REJECTION_REASONS, SWAP_FAILURE_REASONS

FAILURE_REASONS = tuple(SWAP_FAILURE_REASONS)

IDLE = Facts(
    cabinet_id="CAB-1",
    language="en",
    active=False,
    prompt_code="",
    prompt_age_s=999.0,
    return_bay=None,
    dispense_bay=None,
    session_id=None,
    timer_left_s=None,
    ready_count=3,
    charging_socs=(40.0, 80.0),
    ready_soc_pct=90.0,
    qr_svg="<svg></svg>",
)


def test_idle_shows_the_code_the_pass_and_the_batteries() -> None:
    shown = screen(IDLE)
    assert shown.kind == "idle"
    assert shown.qr_svg == "<svg></svg>"
    assert "or hold your pass to the scanner" in shown.lines
    assert "3 full batteries ready" in shown.lines
    assert "next one full in about 12 min" in shown.lines  # (90 - 80) * 1.2
    assert "1 full battery ready" in screen(replace(IDLE, ready_count=1)).lines


def test_without_the_fleet_link_no_code_is_shown_only_the_pass() -> None:
    """The app's swap.start cannot arrive: a rider scanning the screen would wait for nothing."""
    shown = screen(replace(IDLE, app_online=False))
    assert shown.qr_svg == ""
    assert shown.lines[:2] == (
        "Hold your pass to the scanner",
        "The app cannot start a swap here right now",
    )
    assert "3 full batteries ready" in shown.lines
    assert shown.prompt_code == "idle"  # not spoken again on every broker outage
    chinese = screen(replace(IDLE, app_online=False, language="zh-CN"))
    assert chinese.lines[:2] == ("请将您的通行码对准扫描器", "暂时无法通过App在此换电")


def test_a_session_shows_the_bay_the_step_and_the_countdown() -> None:
    facts = replace(
        IDLE, active=True, prompt_code="insert", return_bay=7, dispense_bay=2, timer_left_s=41.2
    )
    shown = screen(facts)
    assert (shown.kind, shown.bay, shown.step, shown.countdown_s) == ("session", 7, "insert", 42)
    assert shown.lines == ("Put your battery in bay 7, plug it in and shut the door",)
    take = screen(replace(facts, prompt_code="take"))
    assert take.bay == 2
    assert "bay 2" in take.lines[0]


def test_chinese_comes_from_the_same_catalogue() -> None:
    facts = replace(IDLE, language="zh-CN", active=True, prompt_code="take", dispense_bay=4)
    assert screen(facts).lines == ("请从 4 号仓取出电池并关好仓门",)


@pytest.mark.parametrize("reason", FAILURE_REASONS)
@pytest.mark.parametrize("language", LANGUAGES)
def test_every_failure_says_what_happened_and_what_next(reason: str, language: str) -> None:
    facts = replace(
        IDLE,
        language=language,
        prompt_code=f"failed.{reason}",
        prompt_age_s=1.0,
        return_bay=5,
        session_id="abcdef123456",
    )
    shown = screen(facts)
    assert shown.kind == "result"
    assert shown.step == "failed"
    assert shown.lines[0] != f"failed.{reason}"
    assert "{" not in shown.lines[0]
    later = screen(replace(facts, prompt_age_s=60.0))
    assert later.kind == "idle"


def test_support_code_names_the_cabinet_and_session() -> None:
    facts = replace(
        IDLE, prompt_code="failed.door_failed", prompt_age_s=0.5, session_id="abcdef123456"
    )
    assert screen(facts).lines[0].endswith("Contact support with code CAB-1-ABCDEF")


def test_safety_screens_come_before_everything() -> None:
    smoke = screen(replace(IDLE, smoke=True, active=True, prompt_code="insert", return_bay=1))
    assert (smoke.kind, smoke.title) == ("safety", "Smoke detected")
    assert screen(replace(IDLE, mains_lost=True)).title == "Power failure"
    assert screen(replace(IDLE, lockout=True)).title == "Cabinet locked"
    assert screen(replace(IDLE, out_of_service=True)).title == "Out of service"


def test_every_catalogue_entry_has_every_language() -> None:
    for code, entry in CATALOGUE.items():
        assert set(entry) == set(LANGUAGES), code


def test_eta_is_none_without_charging_batteries() -> None:
    assert charging_eta_min((), 90.0) is None
    assert charging_eta_min((95.0,), 90.0) == 1


def test_challenges_are_judged_once_within_their_window() -> None:
    issued = {"fresh": 1000.0, "old": 900.0, "before_boot": 990.0}
    common = {"now": 1010.0, "window_s": 60.0, "boot_wall": 995.0}
    assert judge("fresh", issued=issued, used={}, **common) is None
    assert judge("fresh", issued=issued, used={"fresh": 1005.0}, **common) == "challenge_used"
    assert judge("old", issued=issued, used={}, **common) == "stale_challenge"
    assert judge("before_boot", issued=issued, used={}, **common) == "stale_challenge"
    assert judge("never", issued=issued, used={}, **common) == "unknown_challenge"


@pytest.mark.parametrize("reason", DEPOSIT_REJECTION_REASONS)
@pytest.mark.parametrize("language", LANGUAGES)
def test_every_refused_battery_says_where_to_take_it_back(reason: str, language: str) -> None:
    facts = replace(
        IDLE, language=language, active=True, prompt_code=f"rejected.{reason}", return_bay=9
    )
    shown = screen(facts)
    assert (shown.bay, shown.step) == (9, "take")
    assert "9" in shown.lines[0]
