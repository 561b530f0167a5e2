"""Fixtures for the drm attack tests: a fixed clock, a store root + issuer, devices, and a license helper."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings

import drm

NOW = 1_760_000_000  # a frozen clock: every test passes `now` explicitly
BUILD_HASH = "sha256:" + "ab" * 32

# Fuzz-style tests use this profile: `make fuzz` sets EDGEMART_FUZZ_EXAMPLES=20000.
FUZZ = settings(
    max_examples=int(os.environ.get("EDGEMART_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass
class Store:
    authority: drm.Authority
    issuer: drm.Issuer  # Ed25519 + ML-DSA-65
    issuer_ed_only: drm.Issuer  # Ed25519 only (small tokens for exhaustive bit flips)


@pytest.fixture(scope="session")
def store() -> Store:
    authority = drm.Authority.generate(now=NOW - 86400)
    return Store(
        authority,
        authority.issue_issuer(now=NOW - 86400),
        authority.issue_issuer(now=NOW - 86400, pq=False, name="edgemart issuer ed25519"),
    )


@pytest.fixture(scope="session")
def device() -> drm.DeviceKeys:
    return drm.DeviceKeys.generate()


@pytest.fixture(scope="session")
def other_device() -> drm.DeviceKeys:
    return drm.DeviceKeys.generate()


@pytest.fixture(scope="session")
def cek() -> bytes:
    return bytes(range(32))


IssueFn = Callable[..., bytes]


@pytest.fixture(scope="session")
def issue(store: Store, device: drm.DeviceKeys, cek: bytes) -> IssueFn:
    def _issue(**overrides: object) -> bytes:
        args: dict[str, object] = {
            "issuer": store.issuer,
            "cek": cek,
            "recipient": device.kem_public(),
            "kind": "eval",
            "listing": "digits-mlp",
            "build_hash": BUILD_HASH,
            "target": "onnx-fp32",
            "now": NOW,
            "days": 7,
            "max_runs": 100,
            "device_id": device.device_id,
        }
        args.update(overrides)
        return drm.issue_license(**args)  # type: ignore[arg-type]

    return _issue
