"""Fixtures for the fault-injection tests: real devices, real sealed corpus builds, subprocesses to kill."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Put the project root first so tests/ never shadows the real packages (see tests/edge_runtime/conftest.py).
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
for _name in ("drm", "edge_runtime"):
    if _name in sys.modules and getattr(sys.modules[_name], "__file__", None) is None:
        del sys.modules[_name]

from fault_helpers import DAY, NOW, Licensed, make_licensed  # noqa: E402

import drm  # noqa: E402


@pytest.fixture(scope="session")
def authority():
    auth = drm.Authority.generate(now=NOW - DAY)
    return auth, auth.issue_issuer(now=NOW - DAY)


@pytest.fixture
def licensed(tmp_path: Path, authority, digits_base: Path) -> Licensed:
    return make_licensed(tmp_path, authority, digits_base.read_bytes())
