"""Target `arm-cpu`: int8 QDQ ONNX (per-channel weights) by onnxruntime static quantization.

Runs with onnxruntime on aarch64; the report names the layers that lose the most precision."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Literal

from drm.errors import UsageError
from packagers._base import Conversion, Packager, QualityOptions, register
from packagers._data import take
from packagers._qdq import layer_errors, op_coverage, prepare_for_qdq, quantize_qdq

CalibrationMethodName = Literal["minmax", "entropy", "percentile"]
LAYER_SAMPLES = 16  # samples used for the per-layer comparison (intermediates are large)


@dataclass(frozen=True)
class ArmCpuOptions(QualityOptions):
    calibration_method: CalibrationMethodName = "minmax"
    percentile: float = 99.999  # only for calibration_method=percentile
    per_channel: bool = True
    nodes_to_exclude: tuple[str, ...] = ()  # node names kept in float
    preprocess: bool = True  # onnxruntime quant_pre_process (shape inference + optimization)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"option percentile must be in (50, 100], got {self.percentile}")


@register
class ArmCpuPackager(Packager):
    target = "arm-cpu"
    options_type = ArmCpuOptions

    def convert(self, model, info, calibration, progress) -> Conversion:
        opts = self.options
        assert isinstance(opts, ArmCpuOptions) and calibration is not None
        with tempfile.TemporaryDirectory(prefix="edgemart-arm-cpu-") as tmp:
            progress(0.05, "pre-processing (shape inference, opset)")
            fp32, meta = prepare_for_qdq(model, tmp, opts.preprocess)
            progress(0.2, f"calibrating ({opts.calibration_method}) and quantizing")
            qdq = quantize_qdq(
                fp32,
                calibration,
                info,
                tmp,
                per_channel=opts.per_channel,
                method=opts.calibration_method,
                percentile=opts.percentile,
                nodes_to_exclude=opts.nodes_to_exclude,
                symmetric_activations=False,
            )
        progress(0.8, "comparing intermediate activations")
        n = min(LAYER_SAMPLES, next(iter(calibration.values())).shape[0])
        worst, suggested = layer_errors(fp32, qdq, take(calibration, slice(0, n)))
        floats, quantized = op_coverage(qdq)
        meta.update(
            quantization="onnxruntime static QDQ int8",
            calibration_method=opts.calibration_method,
            per_channel=opts.per_channel,
            nodes_excluded=list(opts.nodes_to_exclude),
            calibration_samples=int(next(iter(calibration.values())).shape[0]),
        )
        return Conversion(
            payload=qdq.SerializeToString(),
            format="onnx",
            metadata=meta,
            worst_layers=worst,
            suggested_nodes_to_exclude=suggested,
            float_ops=floats,
            quantized_ops=quantized,
        )
