"""Device state sealing: tamper, wrong key, wrong device (moving a state file) and garbage."""

from __future__ import annotations

import pytest

import drm

KEY = bytes(range(32))


def test_round_trip_and_tamper() -> None:
    state = {"high_water": 1_760_000_000, "counters": {"lic_1": 3}, "log_head": "sha256:" + "00" * 32}
    blob = drm.seal_state(state, key=KEY, device_id="dev-a")
    assert drm.open_state(blob, key=KEY, device_id="dev-a") == state
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 0x80
        with pytest.raises(drm.IntegrityError):
            drm.open_state(bytes(flipped), key=KEY, device_id="dev-a")
    with pytest.raises(drm.IntegrityError):
        drm.open_state(blob, key=KEY, device_id="dev-b")  # moved to another device
    with pytest.raises(drm.IntegrityError):
        drm.open_state(blob, key=bytes(32), device_id="dev-a")
    for bad in (b"", blob[:20], blob[:-1], blob + b"x", "text"):
        with pytest.raises(drm.IntegrityError):
            drm.open_state(bad, key=KEY, device_id="dev-a")  # type: ignore[arg-type]


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(drm.UsageError):
        drm.seal_state({}, key=b"short", device_id="d")
    with pytest.raises(drm.UsageError):
        drm.seal_state([], key=KEY, device_id="d")  # type: ignore[arg-type]
    with pytest.raises(drm.FormatError):
        drm.seal_state({"x": 1.5}, key=KEY, device_id="d")
