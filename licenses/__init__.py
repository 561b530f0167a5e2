"""License-compliance gate: SPDX policy, model-card lineage, weight fingerprints, NOTICE and ML-BOM.

The store calls check_model() on every upload and keeps a LicenseIndex of open models to compare against."""

from licenses.card import ModelCard, parse_model_card
from licenses.gate import Decision, Finding, check_model
from licenses.index import LicenseIndex, Match
from licenses.outputs import make_mlbom, make_notice

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
