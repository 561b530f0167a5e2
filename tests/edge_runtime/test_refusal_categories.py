"""A refusal tells the caller a category it can act on (one line on stderr), never which check or byte of a
license failed: every verification failure shares one category; the precise reason stays in the audit log."""

from __future__ import annotations

import pytest

from edge_runtime.device import refusal_category

CASES = [
    ("run cap exhausted: 50 of 50 runs used", "run cap reached"),
    ("license has expired", "license expired"),
    ("license is not yet valid", "license not yet valid"),
    ("license lic_123 is revoked", "license revoked"),
    ("license is bound to another device", "wrong device"),
    ("license is bound to a fleet key this device does not hold", "wrong device"),
    ("content key unwrap failed (wrong device key or tampered binding)", "wrong device"),
    ("clock rollback: system clock 2026-01-01T00:00:00Z is behind ...", "device clock went back"),
    ("license is for another build", "license is for another build"),
    ("build failed its integrity check (tampered, truncated or swapped container)", "build damaged or not the licensed one"),
    ("device state file is corrupt or was not sealed by this device", "device state cannot be trusted"),
]  # fmt: skip

OPAQUE = [  # all of these must read the same to the caller
    "license: Ed25519 signature invalid",
    "license: ML-DSA-65 co-signature stripped",
    "license: issuer certificate: certificate signature does not verify under the pinned root",
    "malformed license: bad base64",
    "issuer_kid does not match the signing certificate",
    "certificate was not issued by the pinned root",
]


@pytest.mark.parametrize("reason, category", CASES)
def test_reasons_map_to_their_category(reason: str, category: str) -> None:
    assert refusal_category(reason) == category


def test_verification_failures_are_one_opaque_category() -> None:
    assert {refusal_category(r) for r in OPAQUE} == {"license could not be verified"}
