"""Issuing and verifying rider QR tokens with Ed25519 (``cryptography``).

Verification needs no network: the cabinet holds the backend's public keys
(``auth.public_keys``). A token is refused, with a reason code, if it is
malformed, signed by no trusted key, expired, issued in the future, meant for
another cabinet, or already used (the replay check is the journal's). With the
cabinet's clock unset (cabinet/daemon/clock.py: before 2025-01-01) a correctly signed token
is refused with ``clock_unset``: its expiry cannot be judged, so it is neither
accepted nor refused by accident.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from cabinet.daemon.clock import clock_is_set, unset_clock_detail
from protocol.errors import CodedError
from protocol.rider_token import TokenClaims, TokenFormatError, assemble, signing_input, split

CLOCK_SKEW_S = 300  # a cabinet's clock may drift between NTP syncs; tokens live minutes
DEFAULT_TTL_S = 300


class TokenRefusedError(CodedError):
    """A token the cabinet will not honour; ``reason`` is the code in events and replies."""


class KeyFileError(Exception):
    """A key file that cannot be read or is not an Ed25519 key."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """Paths written by ``cabinet keys generate``."""

    private: Path
    public: Path


def _load_pem_public_key(data: bytes) -> object:
    """``serialization.load_pem_public_key``, without importing ``serialization``.

    The daemon reads public keys only. ``cryptography.hazmat.primitives.serialization``
    imports every other algorithm (RSA, DSA, EC, DH, SSH keys, ciphers; ~1.2 MB resident)
    for functions that are this one Rust function re-exported; the daemon calls it
    directly and keeps the rest out (DESIGN.md §6, tests/test_daemon_footprint.py).
    """
    try:
        from cryptography.hazmat.bindings._rust import openssl  # noqa: PLC0415
    except ImportError:  # a cryptography that moved it: the public name, at its cost
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        return serialization.load_pem_public_key(data)
    return openssl.keys.load_pem_public_key(data)


def generate_keys(prefix: str) -> KeyPair:
    """Write ``PREFIX.key`` (PKCS#8 PEM, mode 0600) and ``PREFIX.pub`` (SPKI PEM, 0640)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - not the daemon's

    key = Ed25519PrivateKey.generate()
    private, public = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for path in (private, public):
        if path.exists():
            raise KeyFileError(f"{path} already exists: refusing to overwrite a key")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for path, data, mode in ((private, pem, 0o600), (public, spki, 0o640)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(fd, mode)  # the mode asked for, whatever the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    return KeyPair(private, public)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (technicians and firmware signing; never the daemon)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - not the daemon's

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key."""
    try:
        key = _load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


def issue(
    key: Ed25519PrivateKey,
    rider: str,
    *,
    now: int,
    ttl_s: int = DEFAULT_TTL_S,
    mode: str = "swap",
    cabinet: str | None = None,
) -> str:
    """Sign a token for ``rider`` valid for ``ttl_s`` seconds from ``now``."""
    claims = TokenClaims(
        rider=rider, mode=mode, iat=now, exp=now + ttl_s, nonce=secrets.token_hex(16), cab=cabinet
    )
    return assemble(claims, key.sign(signing_input(claims)))


def verify(
    token: str,
    keys: list[Ed25519PublicKey],
    *,
    now: int,
    cabinet_id: str | None = None,
    require_cabinet_claim: bool = True,
) -> TokenClaims:
    """Check signature, validity window and audience; the caller checks single use.

    ``now`` is the injected clock's wall time (epoch seconds). With ``cabinet_id`` given
    and ``require_cabinet_claim`` (``auth.require_cabinet_claim``), a token without a
    ``cab`` claim is refused: it could otherwise be used once at every cabinet.
    """
    try:
        signed, body, signature = split(token.strip())
        claims = TokenClaims.model_validate_json(body)
    except (TokenFormatError, ValidationError, ValueError) as exc:
        first_line = str(exc).splitlines()[0]
        raise TokenRefusedError("malformed", f"malformed token: {first_line}") from exc
    for key in keys:
        try:
            key.verify(signature, signed)
            break
        except InvalidSignature:
            continue
    else:
        raise TokenRefusedError("bad_signature", "token is not signed by a trusted key")
    if not clock_is_set(now):
        raise TokenRefusedError("clock_unset", unset_clock_detail(now))
    if now > claims.exp:
        raise TokenRefusedError("expired", f"token expired {now - claims.exp} s ago")
    if claims.iat > now + CLOCK_SKEW_S:
        raise TokenRefusedError("not_yet_valid", "token issued in the future (check the clock)")
    if claims.cab is not None and cabinet_id is not None and claims.cab != cabinet_id:
        raise TokenRefusedError("wrong_cabinet", f"token is for cabinet {claims.cab}")
    if claims.cab is None and cabinet_id is not None and require_cabinet_claim:
        raise TokenRefusedError(
            "no_cabinet_claim",
            "token names no cabinet (no cab claim); fleet-wide tokens are off "
            "(auth.require_cabinet_claim)",
        )
    return claims
