"""The rider QR token: what the backend signs and the cabinet verifies offline.

Wire form, ASCII so any QR scanner passes it through unchanged::

    CT1.<base64url(claims JSON)>.<base64url(Ed25519 signature)>

The signature covers the ASCII bytes ``CT1.<claims part>``. Claims name the rider,
what they may do, when the token was issued and expires, a random nonce that makes
it single-use, and optionally the one cabinet it is good for. This module is the
format only; signing and verifying live in ``cabinet.daemon.tokens``.
"""

from __future__ import annotations

import base64
import binascii

from pydantic import BaseModel, ConfigDict, Field

PREFIX = "CT1"
MAX_TOKEN_CHARS = 600  # a QR code a phone shows comfortably; real tokens are ~250


class TokenFormatError(ValueError):
    """The text is not a token of this format at all (not a signature or expiry problem)."""


class TokenClaims(BaseModel):
    """What a token says. Validated strictly: an unknown claim is a malformed token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = Field(1, ge=1, le=1)
    rider: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
    mode: str = Field("swap", pattern=r"^(swap|pickup|return)$")
    iat: int = Field(ge=0)
    exp: int = Field(ge=0)
    nonce: str = Field(min_length=16, max_length=64, pattern=r"^[0-9a-f]+$")
    cab: str | None = Field(default=None, max_length=64)


def b64url(data: bytes) -> str:
    """Unpadded base64url, as in JWS."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Decode unpadded base64url, refusing anything else."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenFormatError("token part is not base64url") from exc


def signing_input(claims: TokenClaims) -> bytes:
    """The bytes the signature covers."""
    body = claims.model_dump_json(exclude_none=True).encode("utf-8")
    return f"{PREFIX}.{b64url(body)}".encode("ascii")


def assemble(claims: TokenClaims, signature: bytes) -> str:
    """The token text."""
    return f"{signing_input(claims).decode('ascii')}.{b64url(signature)}"


def split(token: str) -> tuple[bytes, bytes, bytes]:
    """(signed bytes, claims JSON, signature) of a token, or TokenFormatError."""
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenFormatError("token too long")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenFormatError(f"not a {PREFIX} token")
    return f"{parts[0]}.{parts[1]}".encode("ascii"), unb64url(parts[1]), unb64url(parts[2])
