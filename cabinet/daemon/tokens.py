"""Issuing and verifying rider QR tokens with Ed25519 (PyNaCl, i.e. libsodium).

Verification needs no network: the cabinet holds the backend's public keys
(``auth.public_keys``). A token is refused, with a reason code, if it is
malformed, signed by no trusted key, expired, issued in the future, meant for
another cabinet, or already used (the replay check is the journal's). With the
cabinet's clock unset (cabinet/daemon/clock.py: before 2025-01-01) a correctly signed token
is refused with ``clock_unset``: its expiry cannot be judged, so it is neither
accepted nor refused by accident.

Keys are PyNaCl's ``SigningKey`` / ``VerifyKey``, read from and written to the same PEM
files as ever (PKCS#8 / SubjectPublicKeyInfo, protocol/ed25519_keys.py). PyNaCl, not
``cryptography``: one small library for the one algorithm the cabinet uses costs the
daemon ~2 MB resident instead of ~7 MB (issue 14); Ed25519 signatures are
deterministic, so tokens and images are byte for byte what the old code made.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey, VerifyKey
from pydantic import ValidationError

from cabinet.daemon.clock import clock_is_set, unset_clock_detail
from protocol import ed25519_keys
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


def generate_keys(prefix: str) -> KeyPair:
    """Write ``PREFIX.key`` (PKCS#8 PEM, mode 0600) and ``PREFIX.pub`` (SPKI PEM, 0640)."""
    key = SigningKey.generate()
    private, public = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for path in (private, public):
        if path.exists():
            raise KeyFileError(f"{path} already exists: refusing to overwrite a key")
    pem = ed25519_keys.encode_private(bytes(key))
    spki = ed25519_keys.encode_public(bytes(key.verify_key))
    for path, data, mode in ((private, pem, 0o600), (public, spki, 0o640)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(fd, mode)  # the mode asked for, whatever the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    return KeyPair(private, public)


def load_private_key(path: Path) -> SigningKey:
    """Read an Ed25519 private key (technicians and firmware signing; never the daemon)."""
    try:
        return SigningKey(ed25519_keys.decode_private(path.read_bytes()))
    except (OSError, ed25519_keys.KeyFormatError) as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc}") from exc


def load_public_key(path: Path) -> VerifyKey:
    """Read an Ed25519 public key."""
    try:
        return VerifyKey(ed25519_keys.decode_public(path.read_bytes()))
    except (OSError, ed25519_keys.KeyFormatError) as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc}") from exc


def issue(
    key: SigningKey,
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
    return assemble(claims, key.sign(signing_input(claims)).signature)


def verify(
    token: str,
    keys: list[VerifyKey],
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
    if not any(ed25519_keys.signed_by(key, signature, signed) for key in keys):
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
