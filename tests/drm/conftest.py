"""Fixtures for the drm attack tests: a fixed clock, a store root + issuer, devices, and a license helper."""

from __future__ import annotations

import pytest
from drm_testkit import BUILD_HASH, NOW, IssueFn, Store

import drm


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
