"""Target `onnx-fp32`: the original ONNX model, validated (checker + loads in onnxruntime), unchanged.

It is the baseline the other targets are measured against; its report gives the reference latency."""

from __future__ import annotations

from dataclasses import dataclass

from packagers._base import Conversion, Packager, QualityOptions, register
from packagers._runtime import OnnxRunner


@dataclass(frozen=True)
class OnnxFp32Options(QualityOptions):
    """onnx-fp32 has only the shared quality options."""


@register
class OnnxFp32Packager(Packager):
    target = "onnx-fp32"
    options_type = OnnxFp32Options
    needs_calibration = False
    made_for = "any onnxruntime CPU"
    native_machines = None

    def convert(self, model, info, calibration, progress, *, holdout=None) -> Conversion:
        progress(0.5, "loading in onnxruntime")
        OnnxRunner(model)  # raises UsageError if onnxruntime refuses it
        return Conversion(
            payload=model,
            format="onnx",
            metadata={"opset": info.default_opset, "validated_with": ["onnx.checker", "onnxruntime"]},
            float_ops={op: n for op, n in info.op_counts.items() if op != "Constant"},
            notes=["payload is the original model, byte for byte"],
        )
