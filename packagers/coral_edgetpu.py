"""Target `coral-edgetpu`: full-integer int8 TFLite plus an Edge TPU op-compatibility report.

The int8 TFLite comes from the in-house writer (dense classifiers), from ai-edge-quantizer for a float TFLite
upload, or is the seller's full-int8 TFLite sealed as uploaded; other models get a UsageError that carries the
op-compatibility estimate. `edgetpu_compiler` runs when it is on PATH and its log is kept."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemart.core.errors import UsageError
from packagers._base import Conversion, Packager, QualityOptions, register
from packagers._edgetpu_ops import model_compatibility, onnx_compatibility, tflite_compatibility
from packagers._model import ModelInfo, parse_onnx
from packagers._qdq import EXACT_SNR_DB, _with_outputs
from packagers._runtime import OnnxRunner, make_litert_interpreter
from packagers._tflite_quant import HOW, calibration_required, quantize_float_tflite
from packagers._tflite_writer import lower_onnx, write_int8_tflite
from packagers.arm_cpu import sealed_int8_tflite
from packagers.quality import snr_db

RANGE_SAMPLES = 500


@dataclass(frozen=True)
class CoralEdgeTpuOptions(QualityOptions):
    run_compiler: bool = True  # run edgetpu_compiler when it is on PATH
    compiler_timeout_s: int = 300

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compiler_timeout_s < 1:
            raise UsageError(f"option compiler_timeout_s must be >= 1, got {self.compiler_timeout_s}")


def _compat_line(report: dict) -> str:
    return f"Edge TPU estimate: {report['summary']}"


@register
class CoralEdgeTpuPackager(Packager):
    target = "coral-edgetpu"
    options_type = CoralEdgeTpuOptions
    made_for = "Coral Edge TPU (LiteRT + libedgetpu)"
    native_machines = frozenset()

    def check_input(self, info: ModelInfo, model: bytes) -> None:
        """ONNX and TFLite both: a full-int8 TFLite is sealed as uploaded, a float one quantized (with samples)."""

    def missing_calibration(self, info: ModelInfo) -> UsageError:
        return (
            calibration_required(self.target)
            if info.format == "tflite"
            else super().missing_calibration(info)
        )

    def as_uploaded(self, info: ModelInfo, model: bytes, progress) -> Conversion | None:
        if info.format != "tflite" or not info.quantized:
            return None
        conversion = sealed_int8_tflite(model, self.target)
        compat = tflite_compatibility(model)
        conversion.op_compatibility = compat
        conversion.float_ops, conversion.quantized_ops = _op_types(compat)
        conversion.notes.append(_compat_line(compat))
        opts = self.options
        assert isinstance(opts, CoralEdgeTpuOptions)
        if opts.run_compiler:
            progress(0.5, "running edgetpu_compiler")
            compiled = run_edgetpu_compiler(model, opts.compiler_timeout_s)
            compat["compiler_log"] = compiled["log"]
            conversion.metadata["edgetpu_compiler"] = {k: v for k, v in compiled.items() if k != "log"}
            conversion.notes.append(compiled["summary"])
        return conversion

    def convert(self, model, info, calibration, progress, *, holdout=None) -> Conversion:
        opts = self.options
        assert isinstance(opts, CoralEdgeTpuOptions) and calibration is not None
        if info.format == "tflite":
            return self._from_float_tflite(model, info, calibration, progress)
        proto = parse_onnx(model)
        try:
            layers, _ = lower_onnx(proto)
        except UsageError as exc:
            compat = onnx_compatibility(proto)
            raise UsageError(
                f"{exc.message}. {_compat_line(compat)}", details={"op_compatibility": compat}
            ) from None
        progress(0.1, "measuring activation ranges")
        subset = calibration.take(slice(0, RANGE_SAMPLES))
        names = [i.name for i in proto.graph.input] + [layer.output for layer in layers]
        names = list(dict.fromkeys(names))
        values = OnnxRunner(_with_outputs(proto, names), output_names=names).run_all(subset)
        ranges = {n: (float(np.min(v)), float(np.max(v))) for n, v in values.items() if v.dtype.kind == "f"}
        progress(0.4, "writing int8 TFLite")
        shapes = {k: v.shape for k, v in calibration.arrays.items()}
        payload = write_int8_tflite(proto, ranges, shapes)
        progress(0.6, "checking the build loads in LiteRT; per-layer error")
        worst = _layer_errors(payload, layers, values, subset.arrays)
        compat = tflite_compatibility(payload)
        floats, quantized = _op_types(compat)
        notes = [_compat_line(compat)]
        meta: dict = {"converter": "edgemart in-house ONNX->TFLite int8 writer", "quantization": "int8 full-integer, "
                      "per-tensor symmetric weights, asymmetric activations, float I/O"}  # fmt: skip
        if opts.run_compiler:
            progress(0.8, "running edgetpu_compiler")
            compiled = run_edgetpu_compiler(payload, opts.compiler_timeout_s)
            compat["compiler_log"] = compiled["log"]
            meta["edgetpu_compiler"] = {k: v for k, v in compiled.items() if k != "log"}
            notes.append(compiled["summary"])
        return Conversion(
            payload=payload,
            format="tflite",
            metadata=meta,
            worst_layers=worst,
            float_ops=floats,
            quantized_ops=quantized,
            op_compatibility=compat,
            notes=notes,
        )

    def _from_float_tflite(self, model: bytes, info: ModelInfo, calibration, progress) -> Conversion:
        """A float TFLite upload quantized to full int8 (ai-edge-quantizer), then the Edge TPU op report."""
        opts = self.options
        assert isinstance(opts, CoralEdgeTpuOptions)
        payload, meta = quantize_float_tflite(model, info, calibration, progress, self.target)
        compat = tflite_compatibility(payload)
        floats, quantized = _op_types(compat)
        notes = [HOW + f" ({meta['calibration_samples']} calibration samples)", _compat_line(compat)]
        if opts.run_compiler:
            progress(0.9, "running edgetpu_compiler")
            compiled = run_edgetpu_compiler(payload, opts.compiler_timeout_s)
            compat["compiler_log"] = compiled["log"]
            meta["edgetpu_compiler"] = {k: v for k, v in compiled.items() if k != "log"}
            notes.append(compiled["summary"])
        return Conversion(
            payload=payload,
            format="tflite",
            metadata=meta,
            float_ops=floats,
            quantized_ops=quantized,
            op_compatibility=compat,
            notes=notes,
        )


def _op_types(compat: dict) -> tuple[dict, dict]:
    floats: Counter[str] = Counter()
    ints: Counter[str] = Counter()
    for row in compat["ops"]:
        (floats if "float" in row["reason"] or row["mapped_to"] == "DEQUANTIZE" else ints)[
            row["mapped_to"]
        ] += 1
    return dict(floats), dict(ints)


def _layer_errors(payload: bytes, layers, reference: dict, samples: dict, top: int = 5) -> list[dict]:
    """Dequantized int8 activations of each layer vs the fp32 ONNX tensor it replaces (first 16 samples)."""
    batch = next(iter(samples.values()))[:16]
    interpreter = _with_preserved(payload, batch.shape)
    details = {d["name"]: d for d in interpreter.get_tensor_details()}
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], batch)
    interpreter.invoke()
    rows = []
    for layer in layers:
        d = details.get(layer.output)
        if d is None or layer.output not in reference or d["dtype"] != np.int8:
            continue
        scale, zero = d["quantization"]
        got = (interpreter.get_tensor(d["index"]).astype(np.float32) - zero) * scale
        value = snr_db(reference[layer.output][: len(batch)], got)
        rows.append(
            {
                "node": "+".join(n for n in layer.nodes if n) or layer.output,
                "op_type": layer.kind,
                "tensor": layer.output,
                "snr_db": round(EXACT_SNR_DB if value is None else min(value, EXACT_SNR_DB), 2),
                "snr_drop_db": None,
                "quantized": True,
            }
        )
    return sorted(rows, key=lambda r: r["snr_db"])[:top]


def _with_preserved(payload: bytes, shape):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        interpreter = make_litert_interpreter(payload, preserve_all_tensors=True)
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], list(shape), strict=True)
    interpreter.allocate_tensors()
    return interpreter


def run_edgetpu_compiler(payload: bytes, timeout_s: int) -> dict:
    """Run `edgetpu_compiler` on the payload if installed; the log is kept whatever happens."""
    exe = shutil.which("edgetpu_compiler")
    if exe is None:
        return {
            "ran": False,
            "log": "",
            "summary": "edgetpu_compiler is not on PATH: op placement above is the published-list estimate",
        }
    with tempfile.TemporaryDirectory(prefix="edgemart-edgetpu-") as tmp:
        src = Path(tmp) / "model.tflite"
        src.write_bytes(payload)
        try:
            proc = subprocess.run(
                [exe, "-s", "-o", tmp, str(src)],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {
                "ran": True,
                "log": "",
                "returncode": None,
                "summary": f"edgetpu_compiler timed out after {timeout_s} s",
            }
        compiled = Path(tmp) / "model_edgetpu.tflite"
        result: dict = {
            "ran": True,
            "returncode": proc.returncode,
            "log": (proc.stdout + proc.stderr)[-20000:],
        }
        if compiled.is_file():
            data = compiled.read_bytes()
            result["compiled_sha256"] = "sha256:" + hashlib.sha256(data).hexdigest()
            result["compiled_bytes"] = len(data)
        result["summary"] = f"edgetpu_compiler exited {proc.returncode}" + (
            ", compiled model produced" if compiled.is_file() else ", no compiled model"
        )
        return result


def edgetpu_compatibility(model: bytes) -> dict:
    """Op-compatibility report for any ONNX or TFLite model, without converting it."""
    from packagers._model import inspect_model

    return model_compatibility(model, inspect_model(model))
