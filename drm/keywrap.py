"""Key wrapping at rest: a build's content key sealed under the store's key-encryption key (KEK).

Wrapped form (65 bytes): ``b"EMKW" | version 0x01 | nonce(12) | AES-256-GCM(cek)(32) | tag(16)``;
AAD = ``b"edgemart-cek-wrap/1\\x00" + build_hash`` so a wrapped key only opens for its own build."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgemart.core.errors import IntegrityError, UsageError

WRAP_MAGIC = b"EMKW\x01"
WRAPPED_LEN = len(WRAP_MAGIC) + 12 + 32 + 16
_AAD_PREFIX = b"edgemart-cek-wrap/1\x00"


def generate_kek() -> bytes:
    """A fresh random 256-bit key-encryption key."""
    return AESGCM.generate_key(bit_length=256)


def _aead(kek: bytes) -> AESGCM:
    if not isinstance(kek, (bytes, bytearray)) or len(kek) != 32:
        raise UsageError("key-encryption key must be 32 bytes")
    return AESGCM(bytes(kek))


def _aad(build_hash: str) -> bytes:
    if not isinstance(build_hash, str) or not build_hash.isascii():
        raise UsageError("build hash must be an ASCII string")
    return _AAD_PREFIX + build_hash.encode("ascii")


def wrap_key(kek: bytes, cek: bytes, *, build_hash: str) -> bytes:
    """Seal a 32-byte content key under ``kek``, bound to ``build_hash``."""
    if not isinstance(cek, (bytes, bytearray)) or len(cek) != 32:
        raise UsageError("content key must be 32 bytes")
    nonce = os.urandom(12)
    return WRAP_MAGIC + nonce + _aead(kek).encrypt(nonce, bytes(cek), _aad(build_hash))


def unwrap_key(kek: bytes, wrapped: bytes, *, build_hash: str) -> bytes:
    """Recover a content key; the one opaque IntegrityError for a wrong KEK, build hash or any tampering."""
    aead = _aead(kek)
    aad = _aad(build_hash)
    if (
        not isinstance(wrapped, (bytes, bytearray))
        or len(wrapped) != WRAPPED_LEN
        or not wrapped.startswith(WRAP_MAGIC)
    ):
        raise IntegrityError()
    nonce = bytes(wrapped[len(WRAP_MAGIC) : len(WRAP_MAGIC) + 12])
    try:
        return aead.decrypt(nonce, bytes(wrapped[len(WRAP_MAGIC) + 12 :]), aad)
    except InvalidTag:
        raise IntegrityError() from None
