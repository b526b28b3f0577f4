"""Key files, rider tokens and firmware images are a contract: PyNaCl reads and writes them
exactly as the ``cryptography``-based code did, and as OpenSSL does.

``tests/fixtures/ed25519_before_pynacl/`` was made by the old code (``cabinet keys
generate``, ``cabinet token issue``, ``cabinet firmware sign`` with ``cryptography``
50) and by the ``openssl`` CLI (``genpkey -algorithm ed25519``, ``pkey -pubout``)
before the move; it is committed so that the move can be checked against it forever.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from cabinet.daemon.tokens import KeyFileError, issue, load_private_key, load_public_key, verify
from firmware_bridge.image import build_image, check_signature, parse_image
from protocol import ed25519_keys
from protocol import firmware_map as fw
from protocol.rider_token import split
from tests.conftest import cabinet_cmd

OLD = Path(__file__).parent / "fixtures" / "ed25519_before_pynacl"
OPENSSL = shutil.which("openssl")
NOW = 1_800_000_000  # a set clock (2027)
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="no openssl CLI")


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    assert OPENSSL is not None
    done = subprocess.run([OPENSSL, *args], input=stdin, capture_output=True, check=True)
    return done.stdout


def test_a_key_pair_and_token_made_by_the_old_code_still_verify() -> None:
    token = (OLD / "token.txt").read_text().strip()
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    pub = [load_public_key(OLD / "backend.pub")]
    assert verify(token, pub, now=claims["iat"], cabinet_id="cab-fixture").rider == "R-fixture"
    # Ed25519 is deterministic: the old private key, read now, signs the same bytes the same way
    signed, _body, signature = split(token)
    assert load_private_key(OLD / "backend.key").sign(signed).signature == signature


def test_the_old_token_is_refused_only_for_its_age_by_the_cli() -> None:
    """What a backend operator sees: the old signature is good, the token has just expired."""
    token = (OLD / "token.txt").read_text().strip()
    result = cabinet_cmd("token", "verify", token, "--pub", str(OLD / "backend.pub"), "--json")
    assert result.returncode == 3, result.stderr
    assert json.loads(result.stdout)["reason"] == "expired"


def test_an_old_key_signs_tokens_the_cli_accepts() -> None:
    issued = cabinet_cmd(
        "token", "issue", "--key", str(OLD / "backend.key"), "--rider", "R-7", "--fleet-wide"
    )
    assert issued.returncode == 0, issued.stderr
    result = cabinet_cmd(
        "token", "verify", issued.stdout.strip(), "--pub", str(OLD / "backend.pub")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("valid: rider R-7")


def test_a_firmware_image_signed_by_the_old_code_is_accepted_and_signed_identically(
    tmp_path: Path,
) -> None:
    old_image = (OLD / "image.cfw").read_bytes()
    check_signature(parse_image(old_image), [load_public_key(OLD / "backend.pub")])
    again = tmp_path / "again.cfw"
    result = cabinet_cmd(
        "firmware", "sign", str(OLD / "payload.bin"), "--key", str(OLD / "backend.key"),
        "--version", "1.4", "-o", str(again),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == old_image
    key = load_private_key(OLD / "backend.key")
    payload = (OLD / "payload.bin").read_bytes()
    assert build_image(payload, version=0x0104, board_type=fw.BAY_BOARD_TYPE, key=key) == old_image


def test_generated_key_files_are_byte_for_byte_what_cryptography_writes(tmp_path: Path) -> None:
    """``cryptography`` (a test dependency: tests/tls_certs.py) re-serialises them unchanged."""
    for n in range(5):
        result = cabinet_cmd("keys", "generate", str(tmp_path / f"k{n}"))
        assert result.returncode == 0, result.stderr
        private_pem = (tmp_path / f"k{n}.key").read_bytes()
        public_pem = (tmp_path / f"k{n}.pub").read_bytes()
        theirs = serialization.load_pem_private_key(private_pem, password=None)
        assert private_pem == theirs.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        assert public_pem == theirs.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@needs_openssl
def test_keys_from_the_openssl_cli_are_read_and_ours_are_read_by_it(tmp_path: Path) -> None:
    # the committed pair and a fresh one: both read, and openssl's public key is ours
    fresh = tmp_path / "fresh.key"
    _openssl("genpkey", "-algorithm", "ed25519", "-out", str(fresh))
    (tmp_path / "fresh.pub").write_bytes(_openssl("pkey", "-in", str(fresh), "-pubout"))
    for prefix in (OLD / "openssl", tmp_path / "fresh"):
        key = load_private_key(prefix.with_suffix(".key"))
        assert bytes(key.verify_key) == bytes(load_public_key(prefix.with_suffix(".pub")))
    # and the other way: openssl reads a key we wrote and derives the public key we wrote
    assert cabinet_cmd("keys", "generate", str(tmp_path / "ours")).returncode == 0
    derived = _openssl("pkey", "-in", str(tmp_path / "ours.key"), "-pubout")
    assert derived == (tmp_path / "ours.pub").read_bytes()


@needs_openssl
def test_a_token_signed_by_the_openssl_cli_is_valid_at_the_cabinet(tmp_path: Path) -> None:
    """A backend that signs with OpenSSL instead of this code is understood."""
    template = issue(load_private_key(OLD / "openssl.key"), "R-ossl", now=NOW)
    signed, _body, _sig = split(template)
    message = tmp_path / "signed"
    message.write_bytes(signed)
    signature = _openssl(
        "pkeyutl", "-sign", "-rawin", "-inkey", str(OLD / "openssl.key"), "-in", str(message)
    )
    token = f"{signed.decode()}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
    assert token == template  # the same deterministic signature
    assert verify(token, [load_public_key(OLD / "openssl.pub")], now=NOW).rider == "R-ossl"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "no PEM PRIVATE KEY block"),
        ((OLD / "backend.pub").read_bytes(), "no PEM PRIVATE KEY block (found PUBLIC KEY)"),
        ((OLD / "encrypted.key").read_bytes(), "(found ENCRYPTED PRIVATE KEY)"),
        ((OLD / "p256.key").read_bytes(), "not an Ed25519 private key"),
        ((OLD / "backend.key").read_bytes().replace(b"MC4C", b"MC4!"), "not valid base64"),
        ((OLD / "backend.key").read_bytes().replace(b"MC4C", b"MC8C"), "not an Ed25519 private"),
    ],
)
def test_a_wrong_key_file_is_one_clear_line(tmp_path: Path, content: bytes, expected: str) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(content)
    with pytest.raises(KeyFileError, match=re.escape(expected)):
        load_private_key(bad)
    result = cabinet_cmd("token", "issue", "--key", str(bad), "--rider", "R-1", "--fleet-wide")
    assert result.returncode != 0
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_a_private_key_given_as_the_public_key_is_refused(tmp_path: Path) -> None:
    result = cabinet_cmd("token", "verify", "CT1.e30.AA", "--pub", str(OLD / "backend.key"))
    assert result.returncode != 0
    assert "not a public key: no PEM PUBLIC KEY block (found PRIVATE KEY)" in result.stderr


@settings(max_examples=200)
@given(st.binary(min_size=32, max_size=32), st.sampled_from([b"", b"junk\n", b"  "]))
def test_pem_round_trip_with_text_around_and_crlf(raw: bytes, before: bytes) -> None:
    for encode, decode in (
        (ed25519_keys.encode_public, ed25519_keys.decode_public),
        (ed25519_keys.encode_private, ed25519_keys.decode_private),
    ):
        pem = encode(raw)
        assert decode(before + pem + b"trailing") == raw
        assert decode(pem.replace(b"\n", b"\r\n")) == raw
        assert decode(pem.rstrip()) == raw
