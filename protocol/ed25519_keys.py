"""Ed25519 key files: the PEM forms cabinets, backends and firmware vendors exchange.

A private key is PKCS#8 (RFC 5958, RFC 8410) in a ``PRIVATE KEY`` PEM block, a public
key SubjectPublicKeyInfo in a ``PUBLIC KEY`` block: what ``openssl genpkey -algorithm
ed25519`` writes and what ``cabinet keys generate`` has always written. Keys in
these files are a contract with their holders, so this module reads and writes
exactly those bytes.

Why by hand: for Ed25519 both structures are a fixed DER prefix followed by the 32
key bytes (the algorithm has no parameters), so the signing library (PyNaCl, which
deals in raw 32-byte keys) needs no ASN.1 package beside it. Pure data: bytes in,
bytes out, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

KEY_BYTES = 32
SIGNATURE_BYTES = 64
#: SEQUENCE { SEQUENCE { OID 1.3.101.112 (id-Ed25519) }, BIT STRING (0 unused bits) 32 bytes }
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
#: SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING 32 bytes } }
PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")

_PEM = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----",
    re.DOTALL,
)


class KeyFormatError(ValueError):
    """The bytes are not an Ed25519 key in the expected PEM form (the message says how)."""


def _pem_body(data: bytes, label: str, what: str) -> bytes:
    """The DER inside the first ``label`` PEM block of ``data`` (text around it is ignored)."""
    blocks = _PEM.findall(data)
    for found, body in blocks:
        if found.decode("ascii") == label:
            try:
                return base64.b64decode(b"".join(body.split()), validate=True)
            except (binascii.Error, ValueError):
                raise KeyFormatError(f"the PEM {label} block is not valid base64") from None
    if blocks:
        labels = ", ".join(sorted({found.decode("ascii") for found, _ in blocks}))
        raise KeyFormatError(f"not {what}: no PEM {label} block (found {labels})")
    raise KeyFormatError(f"not {what}: no PEM {label} block")


def _pem(label: str, der: bytes) -> bytes:
    """PEM as OpenSSL and ``cryptography`` write it: 64-character lines, trailing newline."""
    text = base64.b64encode(der).decode("ascii")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""]).encode()


def encode_public(raw: bytes) -> bytes:
    """The ``PUBLIC KEY`` PEM (SubjectPublicKeyInfo) of a raw 32-byte public key."""
    if len(raw) != KEY_BYTES:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return _pem("PUBLIC KEY", SPKI_PREFIX + raw)


def encode_private(seed: bytes) -> bytes:
    """The ``PRIVATE KEY`` PEM (PKCS#8 v1, unencrypted) of a raw 32-byte private key (seed)."""
    if len(seed) != KEY_BYTES:
        raise ValueError("an Ed25519 private key is 32 bytes")
    return _pem("PRIVATE KEY", PKCS8_PREFIX + seed)


def decode_public(data: bytes) -> bytes:
    """The raw 32-byte public key in a ``PUBLIC KEY`` PEM, or KeyFormatError."""
    der = _pem_body(data, "PUBLIC KEY", "a public key")
    if len(der) != len(SPKI_PREFIX) + KEY_BYTES or not der.startswith(SPKI_PREFIX):
        raise KeyFormatError("not an Ed25519 public key")
    return der[len(SPKI_PREFIX) :]


def decode_private(data: bytes) -> bytes:
    """The raw 32-byte private key (seed) in a ``PRIVATE KEY`` PEM, or KeyFormatError.

    Exactly the form ``cryptography`` read before (RFC 8410's PKCS#8 v1): an encrypted
    key, another algorithm's key or a version-2 key with attributes is refused, as then.
    """
    der = _pem_body(data, "PRIVATE KEY", "an unencrypted private key")
    if len(der) != len(PKCS8_PREFIX) + KEY_BYTES or not der.startswith(PKCS8_PREFIX):
        raise KeyFormatError("not an Ed25519 private key (PKCS#8)")
    return der[len(PKCS8_PREFIX) :]


def signed_by(key: VerifyKey, signature: bytes, message: bytes) -> bool:
    """Whether ``key`` made ``signature`` over ``message``: rider tokens and firmware images.

    A signature of the wrong length is just a bad signature (PyNaCl raises ValueError).
    """
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        key.verify(message, signature)
    except BadSignatureError:
        return False
    return True
