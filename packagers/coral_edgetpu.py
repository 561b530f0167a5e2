"""Target `coral-edgetpu`: full-integer int8 TFLite plus an Edge TPU op-compatibility report.

The int8 TFLite comes from onnx2tf + TensorFlow for an ONNX upload (the `coral` extra,
packagers/_onnx2tf.py, the seller's calibration samples as the representative dataset), from
ai-edge-quantizer for a float TFLite upload, or is the seller's full-int8 TFLite sealed as uploaded; a
model the converter cannot take gets a UsageError naming the cause and carrying the op-compatibility
estimate. `edgetpu_compiler` runs when it is on PATH and its log is kept."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgemart.core.errors import UsageError
from packagers._base import Conversion, Packager, QualityOptions, register
from packagers._edgetpu_ops import model_compatibility, onnx_compatibility, tflite_compatibility
from packagers._model import ModelInfo, full_int8_problems, parse_onnx
from packagers._onnx2tf import CALIBRATION_SAMPLES, convert_int8, require_converter
from packagers._runtime import make_litert_interpreter
from packagers._tflite_quant import HOW, calibration_required, quantize_float_tflite
from packagers.arm_cpu import sealed_int8_tflite


@dataclass(frozen=True)
class CoralEdgeTpuOptions(QualityOptions):
    run_compiler: bool = True  # run edgetpu_compiler when it is on PATH
    compiler_timeout_s: int = 300

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compiler_timeout_s < 1:
            raise UsageError(f"option compiler_timeout_s must be >= 1, got {self.compiler_timeout_s}")


_COMPILING = "running edgetpu_compiler"


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
        self._compile(model, compat, conversion.metadata, conversion.notes, lambda: progress(0.5, _COMPILING))
        return conversion

    def convert(self, model, info, calibration, progress, *, holdout=None) -> Conversion:
        assert calibration is not None
        if info.format == "tflite":
            return self._from_float_tflite(model, info, calibration, progress)
        proto = parse_onnx(model)
        require_converter()
        progress(0.1, "converting with onnx2tf (TensorFlow), the calibration samples as representative data")
        try:
            payload, log, prepared = convert_int8(
                proto, calibration.arrays, calibration.per_run, calibration.fixed
            )
        except UsageError as exc:
            compat = onnx_compatibility(proto)
            details = {**(exc.details or {}), "op_compatibility": compat}
            raise UsageError(f"{exc.message}. {_compat_line(compat)}", details=details) from None
        progress(0.6, "checking the build loads in LiteRT and is full-integer")
        try:
            make_litert_interpreter(payload).allocate_tensors()
        except (UsageError, RuntimeError, ValueError) as exc:  # e.g. a TensorFlow (Flex) op kept by onnx2tf
            why = exc.message if isinstance(exc, UsageError) else str(exc).strip().splitlines()[0]
            raise UsageError(
                f"coral-edgetpu: the converted model does not load in LiteRT ({why[:300]}); build it for a "
                "target that takes the ONNX model: edgemart package MODEL.onnx --target arm-cpu "
                "--calibration CAL.npz --out DIR"
            ) from None
        problems = full_int8_problems(payload)
        if problems:
            raise UsageError(
                "coral-edgetpu: the converted model is not full-integer; these tensors are not int8/int32: "
                + ", ".join(problems)
                + ". The Edge TPU runs int8 only: build it for a CPU target instead: "
                "edgemart package MODEL.onnx --target arm-cpu --calibration CAL.npz --out DIR"
            )
        compat = tflite_compatibility(payload)
        floats, quantized = _op_types(compat)
        notes = [_compat_line(compat), "static batch 1 (the Edge TPU compiler needs static shapes)"]
        for row in prepared.get("recurrent_unrolled", []):
            notes.append(
                f"recurrent node {row['node']} ({row['op']}, {row['direction']}) unrolled into cell math "
                f"over {row['steps']} step(s) before conversion"
            )
        meta: dict = {
            "converter": f"onnx2tf {_version('onnx2tf')} + TensorFlow {_version('tensorflow')}",
            "quantization": "int8 full-integer (TFLite converter): per-channel int8 weights, int8 activations, "
            "float32 inputs/outputs (QUANTIZE/DEQUANTIZE at the edges)",
            "calibration_samples": min(calibration.count, CALIBRATION_SAMPLES),
            "converter_log": log,
            **prepared,
        }
        self._compile(payload, compat, meta, notes, lambda: progress(0.8, _COMPILING))
        return Conversion(
            payload=payload,
            format="tflite",
            metadata=meta,
            float_ops=floats,
            quantized_ops=quantized,
            op_compatibility=compat,
            notes=notes,
        )

    def _compile(self, payload: bytes, compat: dict, metadata: dict, notes: list[str], started) -> None:
        """Run edgetpu_compiler on the build when asked and it is on PATH: its log goes with the op report,
        its figures into the metadata, its one-line summary into the notes."""
        opts = self.options
        assert isinstance(opts, CoralEdgeTpuOptions)
        if not opts.run_compiler:
            return
        started()
        compiled = run_edgetpu_compiler(payload, opts.compiler_timeout_s)
        compat["compiler_log"] = compiled["log"]
        metadata["edgetpu_compiler"] = {k: v for k, v in compiled.items() if k != "log"}
        notes.append(compiled["summary"])

    def _from_float_tflite(self, model: bytes, info: ModelInfo, calibration, progress) -> Conversion:
        """A float TFLite upload quantized to full int8 (ai-edge-quantizer), then the Edge TPU op report."""
        payload, meta = quantize_float_tflite(model, info, calibration, progress, self.target)
        compat = tflite_compatibility(payload)
        floats, quantized = _op_types(compat)
        notes = [HOW + f" ({meta['calibration_samples']} calibration samples)", _compat_line(compat)]
        self._compile(payload, compat, meta, notes, lambda: progress(0.9, _COMPILING))
        return Conversion(
            payload=payload,
            format="tflite",
            metadata=meta,
            float_ops=floats,
            quantized_ops=quantized,
            op_compatibility=compat,
            notes=notes,
        )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _op_types(compat: dict) -> tuple[dict, dict]:
    floats: Counter[str] = Counter()
    ints: Counter[str] = Counter()
    for row in compat["ops"]:
        (floats if "float" in row["reason"] or row["mapped_to"] == "DEQUANTIZE" else ints)[
            row["mapped_to"]
        ] += 1
    return dict(floats), dict(ints)


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
