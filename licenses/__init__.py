"""License-compliance gate: SPDX policy, model-card lineage, weight fingerprints, NOTICE and ML-BOM.

The store calls check_model() on every upload and keeps a LicenseIndex of open models to compare against.
Exports load lazily (PEP 562) so `licenses.cli` can be imported without numpy/scipy/onnx."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from licenses.card import ModelCard, parse_model_card
    from licenses.gate import Decision, Finding, check_model
    from licenses.index import LicenseIndex, Match
    from licenses.outputs import make_mlbom, make_notice

_EXPORTS = {
    "Decision": "licenses.gate",
    "Finding": "licenses.gate",
    "check_model": "licenses.gate",
    "LicenseIndex": "licenses.index",
    "Match": "licenses.index",
    "ModelCard": "licenses.card",
    "parse_model_card": "licenses.card",
    "make_mlbom": "licenses.outputs",
    "make_notice": "licenses.outputs",
}

__all__ = [
    "Decision",
    "Finding",
    "LicenseIndex",
    "Match",
    "ModelCard",
    "check_model",
    "make_mlbom",
    "make_notice",
    "parse_model_card",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'licenses' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
