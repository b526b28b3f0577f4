"""The signed firmware image: what a vendor builds and a cabinet agrees to flash.

Layout (all integers big-endian)::

    0    4  magic "CFW1"
    4    2  header length (128)
    6    2  format version (1)
    8    2  firmware version (major << 8 | minor, as the board reports it)
    10   2  target board type (protocol.firmware_map.BOARD_TYPES)
    12   4  payload size
    16  32  SHA-256 of the payload
    48  64  Ed25519 signature over bytes 0-47
    112 16  reserved, zero
    128  …  payload

The signature covers the version, the target and the payload's hash, so neither
can be changed without the vendor's key; an all-zero signature is an unsigned
(development) image and is refused like a wrong one. A cabinet also refuses an
image for another board type and, unless forced, one that is not newer than what
the board runs.

Signing and checking use PyNaCl (libsodium), the cabinet's one Ed25519 library; the
signature is deterministic, so an image signed before the move from ``cryptography``
is byte for byte the one signed after (tests/test_ed25519_formats.py).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from nacl.signing import SigningKey, VerifyKey

from protocol import ed25519_keys
from protocol.errors import CodedError
from protocol.firmware_map import BOARD_TYPES, MAX_IMAGE_BYTES

MAGIC = b"CFW1"
HEADER_BYTES = 128
FORMAT_VERSION = 1
SIGNED_BYTES = 48
_FIELDS = struct.Struct(">4sHHHHI32s")  # the signed part: 48 bytes
SIGNATURE_BYTES = ed25519_keys.SIGNATURE_BYTES


class ImageRejectedError(CodedError):
    """The image must not be flashed; ``reason`` is stable for programs."""


@dataclass(frozen=True, slots=True)
class FirmwareImage:
    """A parsed image (its payload hash already checked)."""

    version: int
    board_type: int
    payload: bytes
    sha256: bytes
    signed_part: bytes
    signature: bytes

    @property
    def version_str(self) -> str:
        """``1.4``: how technicians read versions."""
        return f"{self.version >> 8}.{self.version & 0xFF}"

    @property
    def target(self) -> str:
        """The board type's name, or its code when unknown."""
        names = {code: name for name, code in BOARD_TYPES.items()}
        return names.get(self.board_type, f"0x{self.board_type:04x}")


def parse_version(text: str) -> int:
    """``"1.4"`` → ``0x0104``."""
    try:
        major, minor = (int(part) for part in text.split("."))
    except ValueError:
        raise ValueError(f"version {text!r} is not MAJOR.MINOR") from None
    if not (0 <= major <= 255 and 0 <= minor <= 255):
        raise ValueError(f"version {text!r}: each part is 0-255")
    return major << 8 | minor


def build_image(payload: bytes, *, version: int, board_type: int, key: SigningKey | None) -> bytes:
    """A complete image; ``key=None`` leaves it unsigned (cabinets will refuse it)."""
    if not 0 < len(payload) <= MAX_IMAGE_BYTES:
        raise ValueError(f"payload must be 1-{MAX_IMAGE_BYTES} bytes")
    signed = _FIELDS.pack(
        MAGIC,
        HEADER_BYTES,
        FORMAT_VERSION,
        version,
        board_type,
        len(payload),
        hashlib.sha256(payload).digest(),
    )
    signature = key.sign(signed).signature if key is not None else bytes(SIGNATURE_BYTES)
    header = signed + signature + bytes(HEADER_BYTES - SIGNED_BYTES - SIGNATURE_BYTES)
    return header + payload


def parse_image(data: bytes) -> FirmwareImage:
    """Parse and check the structure and the payload hash (not yet the signature)."""
    if len(data) < HEADER_BYTES or data[:4] != MAGIC:
        raise ImageRejectedError("malformed", "not a cabinet firmware image (no CFW1 header)")
    signed = data[:SIGNED_BYTES]
    _magic, header_len, fmt, version, board_type, size, sha = _FIELDS.unpack(signed)
    if header_len != HEADER_BYTES or fmt != FORMAT_VERSION:
        raise ImageRejectedError("malformed", f"unsupported image format {fmt}/{header_len}")
    payload = data[HEADER_BYTES:]
    if len(payload) != size or size > MAX_IMAGE_BYTES:
        raise ImageRejectedError(
            "malformed", f"payload is {len(payload)} bytes, the header says {size}"
        )
    if hashlib.sha256(payload).digest() != sha:
        raise ImageRejectedError("malformed", "payload does not match its SHA-256 (corrupted)")
    signature = data[SIGNED_BYTES : SIGNED_BYTES + SIGNATURE_BYTES]
    return FirmwareImage(version, board_type, payload, sha, signed, signature)


def check_signature(image: FirmwareImage, keys: list[VerifyKey]) -> None:
    """Refuse an unsigned image or one no trusted key signed."""
    if not keys:
        raise ImageRejectedError(
            "no_keys", "no firmware signing keys configured (firmware.public_keys)"
        )
    if image.signature == bytes(SIGNATURE_BYTES):
        raise ImageRejectedError("unsigned", "image is unsigned: only signed firmware is flashed")
    if any(ed25519_keys.signed_by(key, image.signature, image.signed_part) for key in keys):
        return
    raise ImageRejectedError("bad_signature", "image is not signed by a trusted firmware key")


def check_fit(image: FirmwareImage, *, board_type: int, running: int, force: bool) -> None:
    """Refuse an image for another board, or not newer than ``running`` unless forced."""
    if image.board_type != board_type:
        raise ImageRejectedError(
            "wrong_target", f"image is for {image.target}, the board is type 0x{board_type:04x}"
        )
    if image.version <= running and not force:
        running_str = f"{running >> 8}.{running & 0xFF}"
        raise ImageRejectedError(
            "downgrade",
            f"image {image.version_str} is not newer than the running {running_str} "
            "(--force to flash it anyway)",
        )
