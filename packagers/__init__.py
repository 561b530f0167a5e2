"""Per-target packaging: quantize and package a model for a target, with an honest quality report.

Targets live in one registry (`get_packager`); `package_model` is the one-call recipe."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from edge_runtime.evaluation.samples import Contract, SampleSet, StatePair
from packagers import arm_cpu as _arm_cpu  # noqa: F401 - registers the target
from packagers import coral_edgetpu as _coral_edgetpu  # noqa: F401 - registers the target
from packagers import fpga_xint8 as _fpga_xint8  # noqa: F401 - registers the target
from packagers import onnx_fp32 as _onnx_fp32  # noqa: F401 - registers the target
from packagers import x86_cpu as _x86_cpu  # noqa: F401 - registers the target
from packagers._base import Build, Packager, get_packager, registered_targets
from packagers._data import SampleLimits, bind_samples, card_contract_options, load_calibration
from packagers._model import ModelInfo, TensorSpec, inspect_model
from packagers.quality import QualityReport

TARGETS: tuple[str, ...] = registered_targets()


def package_model(
    model: bytes,
    target: str,
    *,
    calibration: Mapping[str, np.ndarray] | SampleSet | None = None,
    holdout: Mapping[str, np.ndarray] | SampleSet | None = None,
    options: Mapping | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> Build:
    """Package `model` for `target`; raises UsageError for bad input, returns a Build whose quality may fail."""
    return get_packager(target, options).package(
        model, calibration=calibration, holdout=holdout, progress=progress
    )


__all__ = [
    "TARGETS",
    "Build",
    "Contract",
    "ModelInfo",
    "Packager",
    "QualityReport",
    "SampleLimits",
    "SampleSet",
    "StatePair",
    "TensorSpec",
    "bind_samples",
    "card_contract_options",
    "get_packager",
    "inspect_model",
    "load_calibration",
    "package_model",
]
