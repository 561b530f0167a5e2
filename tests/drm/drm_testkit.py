"""Shared constants and settings for tests/drm (imported by conftest and the test modules)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

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
PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@dataclass
class Store:
    authority: drm.Authority
    issuer: drm.Issuer  # Ed25519 + ML-DSA-65
    issuer_ed_only: drm.Issuer  # Ed25519 only (small tokens for exhaustive bit flips)


IssueFn = Callable[..., bytes]
