"""Sealing of the device's rollback-protection state under a device-local AEAD key.

The state is canonical JSON sealed with AES-256-GCM; the AAD binds the device id so a state
file cannot be moved between devices. Writing it atomically is the device's job (edge_runtime)."""

from __future__ import annotations

import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from drm._canonical import FormatError, dumps, loads
from edgemart.core.errors import IntegrityError, UsageError

STATE_MAGIC = b"EMST\x01"
MAX_STATE_BYTES = 4 * 1024 * 1024


def _aead(key: bytes) -> AESGCM:
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise UsageError("state key must be 32 bytes")
    return AESGCM(bytes(key))


def _aad(device_id: str) -> bytes:
    if not isinstance(device_id, str):
        raise UsageError("device_id must be a string")
    return b"edgemart-state/1\x00" + device_id.encode("utf-8", "surrogatepass")


def seal_state(state: dict[str, Any], *, key: bytes, device_id: str) -> bytes:
    """``STATE_MAGIC | nonce(12) | AES-256-GCM(canonical JSON of state)``, AAD binding the device id."""
    if not isinstance(state, dict):
        raise UsageError("device state must be a dict")
    nonce = os.urandom(12)
    return STATE_MAGIC + nonce + _aead(key).encrypt(nonce, dumps(state), _aad(device_id))


def open_state(blob: bytes, *, key: bytes, device_id: str) -> dict[str, Any]:
    """The state dict; one opaque IntegrityError for a wrong key/device, tampering or garbage."""
    aead, aad = _aead(key), _aad(device_id)
    if (
        not isinstance(blob, (bytes, bytearray))
        or len(blob) > MAX_STATE_BYTES
        or len(blob) < len(STATE_MAGIC) + 12 + 16
        or not blob.startswith(STATE_MAGIC)
    ):
        raise IntegrityError()
    nonce = bytes(blob[len(STATE_MAGIC) : len(STATE_MAGIC) + 12])
    try:
        plain = aead.decrypt(nonce, bytes(blob[len(STATE_MAGIC) + 12 :]), aad)
        value = loads(plain, max_size=MAX_STATE_BYTES, what="device state")
    except (InvalidTag, FormatError):
        raise IntegrityError() from None
    if not isinstance(value, dict):
        raise IntegrityError()
    return value
