"""Sealing of the device's rollback-protection state under a device-local AEAD key.

The state is canonical JSON sealed with AES-256-GCM; the AAD binds the device id so a state
file cannot be moved between devices. Writing it atomically is the device's job (edge_runtime)."""

from __future__ import annotations

import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from drm._canonical import FormatError, dumps, loads
from drm.errors import IntegrityError

STATE_MAGIC = b"EMST\x01"
MAX_STATE_BYTES = 4 * 1024 * 1024


def seal_state(state: dict[str, Any], *, key: bytes, device_id: str) -> bytes:
    nonce = os.urandom(12)
    return STATE_MAGIC + nonce + AESGCM(key).encrypt(nonce, dumps(state), b"edgemart-state/1\x00" + device_id.encode())


def open_state(blob: bytes, *, key: bytes, device_id: str) -> dict[str, Any]:
    if len(blob) > MAX_STATE_BYTES or len(blob) < len(STATE_MAGIC) + 12 + 16 or not blob.startswith(STATE_MAGIC):
        raise IntegrityError()
    nonce = blob[len(STATE_MAGIC) : len(STATE_MAGIC) + 12]
    try:
        plain = AESGCM(key).decrypt(nonce, blob[len(STATE_MAGIC) + 12 :], b"edgemart-state/1\x00" + device_id.encode())
        value = loads(plain, max_size=MAX_STATE_BYTES, what="device state")
    except (InvalidTag, FormatError):
        raise IntegrityError() from None
    if not isinstance(value, dict):
        raise IntegrityError()
    return value
