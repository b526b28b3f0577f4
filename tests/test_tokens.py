"""`cabinet keys generate` and `cabinet token issue|verify`, as the backend uses them."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from cabinet.daemon.clock import CLOCK_SET_AFTER
from cabinet.daemon.tokens import (
    TokenRefusedError,
    issue,
    load_private_key,
    load_public_key,
    verify,
)
from protocol.rider_token import MAX_TOKEN_CHARS
from tests.conftest import cabinet_cmd


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    prefix = tmp_path / "backend"
    result = cabinet_cmd("keys", "generate", str(prefix))
    assert result.returncode == 0, result.stderr
    return prefix


def test_keys_are_written_private_and_never_overwritten(keys: Path) -> None:
    mode = stat.S_IMODE(keys.with_suffix(".key").stat().st_mode)
    assert mode == 0o600
    again = cabinet_cmd("keys", "generate", str(keys))
    assert again.returncode == 1
    assert "already exists: refusing to overwrite a key" in again.stderr


def test_issue_then_verify(keys: Path) -> None:
    args = ("--key", f"{keys}.key", "--rider", "R-9", "--mode", "pickup", "--fleet-wide")
    token = cabinet_cmd("token", "issue", *args).stdout.strip()
    assert token.startswith("CT1.") and len(token) < MAX_TOKEN_CHARS
    result = cabinet_cmd("token", "verify", token, "--pub", f"{keys}.pub", "--json")
    assert result.returncode == 0, result.stderr
    claims = json.loads(result.stdout)["claims"]
    assert claims["rider"] == "R-9" and claims["mode"] == "pickup"
    assert claims["exp"] - claims["iat"] == 300


def test_verify_names_the_reason(keys: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    cabinet_cmd("keys", "generate", str(other))
    issued = cabinet_cmd("token", "issue", "--key", f"{other}.key", "--rider", "R", "--fleet-wide")
    forged = issued.stdout.strip()
    result = cabinet_cmd("token", "verify", forged, "--pub", f"{keys}.pub")
    assert result.returncode == 3
    assert result.stdout.strip() == "refused (bad_signature): token is not signed by a trusted key"


def test_refusals_in_process(keys: Path) -> None:
    key = load_private_key(Path(f"{keys}.key"))
    pub = [load_public_key(Path(f"{keys}.pub"))]
    now = int(time.time())
    good = issue(key, "R-1", now=now, cabinet="cab-1")
    assert verify(good, pub, now=now, cabinet_id="cab-1").rider == "R-1"
    cases = {
        "expired": (issue(key, "R-1", now=now - 1000, ttl_s=10), now, None),
        "not_yet_valid": (issue(key, "R-1", now=now + 3600), now, None),
        "wrong_cabinet": (good, now, "cab-2"),
        "malformed": ("CT1.e30.AAAA", now, None),
    }
    for reason, (token, at, cabinet) in cases.items():
        with pytest.raises(TokenRefusedError) as err:
            verify(token, pub, now=at, cabinet_id=cabinet)
        assert err.value.reason == reason
    tampered = good[:-6] + ("A" if good[-6] != "A" else "B") + good[-5:]
    with pytest.raises(TokenRefusedError) as err:
        verify(tampered, pub, now=now)
    assert err.value.reason in {"bad_signature", "malformed"}


@settings(max_examples=300)
@given(
    text=st.text(max_size=700)
    | st.builds(
        lambda a, b: f"CT1.{a}.{b}",
        st.text("ABCDEFabcdef0123456789-_", max_size=200),
        st.text("ABCDEFabcdef0123456789-_", max_size=100),
    )
)
def test_any_scanned_text_is_a_clear_refusal_never_a_crash(text: str) -> None:
    key = SigningKey.generate().verify_key
    with pytest.raises(TokenRefusedError) as err:
        verify(text, [key], now=int(time.time()))
    assert err.value.reason in {"malformed", "bad_signature"}
    assert str(err.value)


def test_a_cabinet_whose_clock_is_unset_refuses_offline_tokens_clearly(keys: Path) -> None:
    """An RTC that booted at 1970 must not make expiry a coin toss (issue 11, the core)."""
    key = load_private_key(Path(f"{keys}.key"))
    pub = [load_public_key(Path(f"{keys}.pub"))]
    now = int(time.time())
    for token, at in [
        (issue(key, "R-1", now=now), 0),  # a fresh token, checked by a clock at 1970
        (issue(key, "R-1", now=10, ttl_s=300), 100),  # "valid" by a 1970 clock: still refused
        (issue(key, "R-1", now=now), CLOCK_SET_AFTER - 1),
    ]:
        with pytest.raises(TokenRefusedError) as err:
            verify(token, pub, now=at)
        assert err.value.reason == "clock_unset"
        assert str(err.value).startswith("clock not set: it says 19") or "2024" in str(err.value)
        assert "app swaps still work" in str(err.value)
    assert verify(issue(key, "R-1", now=now), pub, now=now).rider == "R-1"  # a set clock is fine
    with pytest.raises(TokenRefusedError) as forged:  # a forgery is still called a forgery
        other = SigningKey.generate()
        verify(issue(other, "R-1", now=now), pub, now=0)
    assert forged.value.reason == "bad_signature"
