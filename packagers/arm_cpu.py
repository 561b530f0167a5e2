"""Target `arm-cpu`: int8 QDQ ONNX (per-channel weights) by onnxruntime static quantization.

Runs with onnxruntime on aarch64; the report names the layers that lose the most precision."""

from __future__ import annotations

from dataclasses import dataclass

from packagers._base import Conversion, Packager, register
from packagers._qdq import QdqOptions, qdq_conversion, quantize_with_options


@dataclass(frozen=True)
class ArmCpuOptions(QdqOptions):
    """Per-channel weights, asymmetric activations (onnxruntime's defaults for ARM CPUs)."""


@register
class ArmCpuPackager(Packager):
    target = "arm-cpu"
    options_type = ArmCpuOptions

    def convert(self, model, info, calibration, progress) -> Conversion:
        opts = self.options
        assert isinstance(opts, ArmCpuOptions) and calibration is not None
        fp32, qdq, meta = quantize_with_options(
            model,
            calibration,
            opts,
            progress,
            symmetric_activations=False,
            what=f"calibrating ({opts.calibration_method}) and quantizing",
        )
        progress(0.8, "comparing intermediate activations")
        meta.update(
            quantization="onnxruntime static QDQ int8",
            calibration_samples=calibration.count,
        )
        return qdq_conversion(fp32, qdq, calibration, meta)
