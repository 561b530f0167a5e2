"""Target `arm-cpu`: int8 ONNX (per-channel weights, S8S8) by onnxruntime static quantization, for aarch64.

A TFLite upload is built for LiteRT instead: a full-int8 one sealed as uploaded, a float one quantized to full
int8 with ai-edge-quantizer (packagers/_tflite_quant.py).

QDQ or QOperator, whichever measures smaller with equal agreement; the report names the layers that lose
the most precision, and never presents a run on another architecture as this build's latency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgemart.core.errors import UsageError
from packagers._base import Conversion, Packager, register
from packagers._model import ModelInfo, full_int8_problems, inspect_model
from packagers._qdq import QdqOptions, compact, qdq_conversion, quantize_with_options, smaller_equal_format
from packagers._runtime import OnnxRunner
from packagers._tflite_quant import HOW, calibration_required, quantize_float_tflite

# The ops whose int8 kernels pay for their quantize/dequantize steps on a CPU. Quantizing the elementwise
# ops around them (HardSwish, Add, Mul...) adds conversions, costs 3-7 dB of output SNR on PP-OCR det/rec
# and was no faster (bench/packagers.py; measured on x86_64, where a CPU build can be timed here).
CPU_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass(frozen=True)
class ArmCpuOptions(QdqOptions):
    """Per-channel weights, asymmetric int8 activations (S8S8: onnxruntime's choice for ARM CPUs)."""

    op_types: tuple[str, ...] = CPU_OP_TYPES
    calibration_method: Literal["auto", "minmax", "entropy", "percentile"] = "auto"
    format: Literal["auto", "qdq", "qoperator"] = "auto"  # auto: the smaller of the two at equal agreement


class IntCpuPackager(Packager):
    """A CPU target built by onnxruntime static quantization with `activations` of that type."""

    activations: Literal["int8", "uint8"] = "int8"
    # TFLite uploads run with LiteRT: a full-int8 one is sealed as uploaded, a float one quantized to full int8
    takes_tflite: bool = False

    def check_input(self, info: ModelInfo, model: bytes) -> None:
        if info.format == "tflite" and not self.takes_tflite:
            raise UsageError(
                f"target {self.target} takes ONNX models; this is a {'float ' if not info.quantized else ''}"
                "TFLite model (coral-edgetpu and arm-cpu take TFLite: edgemart package MODEL.tflite "
                "--target arm-cpu --calibration samples.npz --out DIR)"
            )

    def missing_calibration(self, info: ModelInfo) -> UsageError:
        return (
            calibration_required(self.target)
            if info.format == "tflite"
            else super().missing_calibration(info)
        )

    def as_uploaded(self, info: ModelInfo, model: bytes, progress) -> Conversion | None:
        if not info.quantized:
            return None
        if info.format == "tflite":
            return sealed_int8_tflite(model, self.target)
        progress(0.5, "pre-quantized ONNX: validating it loads in onnxruntime")
        OnnxRunner(model)
        return Conversion(
            payload=model,
            format="onnx",
            metadata={
                "as_uploaded": True,
                "quantization": "pre-quantized by the seller (QDQ / QLinear ONNX)",
            },
            quantized_ops={
                op: n
                for op, n in info.op_counts.items()
                if op.startswith(("QLinear", "Quantize", "Dequantize")) or op.endswith("Integer")
            },  # fmt: skip
            notes=["as uploaded: the seller's pre-quantized ONNX, sealed byte for byte"],
            as_uploaded=True,
        )

    def convert(self, model, info, calibration, progress, *, holdout=None) -> Conversion:
        opts = self.options
        assert isinstance(opts, ArmCpuOptions) and calibration is not None
        if info.format == "tflite":
            _onnx_only_options(opts, self.target)
            return float_tflite_conversion(model, info, calibration, progress, self.target)
        quantized = quantize_with_options(
            model,
            calibration,
            opts,
            progress,
            symmetric_activations=False,
            what=f"calibrating ({opts.calibration_method}) and quantizing",
            activations=self.activations,
            operator_format_too=opts.format != "qdq",
            holdout=holdout,
        )
        progress(0.75, "choosing the format, comparing intermediate activations")
        if opts.format == "qoperator":
            assert quantized.qoperator is not None
            payload, choice = (
                compact(quantized.qoperator),
                {"format": "QOperator", "why": "option format=qoperator"},
            )
        else:
            payload, choice = smaller_equal_format(quantized, calibration)
        acts = "U8S8" if self.activations == "uint8" else "S8S8"
        quantized.meta.update(
            quantization=f"onnxruntime static int8 ({acts}, {choice['format']})",
            calibration_samples=calibration.count,
            format_choice=choice,
        )
        notes = [
            f"{choice['format']} format: {choice['why']}"
            + (
                f" ({choice['qoperator_bytes']} vs {choice['qdq_bytes']} bytes)"
                if "qoperator_bytes" in choice
                else ""
            )
        ]
        return qdq_conversion(quantized, calibration, payload=payload, notes=notes)


def sealed_int8_tflite(model: bytes, target: str) -> Conversion:
    """A full-int8 TFLite upload as the build: every tensor but the graph's inputs and outputs int8/int32."""
    problems = full_int8_problems(model)
    if problems:
        raise UsageError(
            f"target {target} seals a TFLite upload only when it is full int8; these tensors are not int8/int32: "
            + ", ".join(problems)
        )
    payload, how = model, "sealed byte for byte"
    if target != "coral-edgetpu":
        # The same bytes may also be sold as the coral-edgetpu build, and a build hash is sold once: this
        # target's copy carries a metadata entry naming it (LiteRT ignores it; tensors and ops are untouched).
        payload, how = with_target_marker(model, target), f"with a metadata entry naming {target}"
    return Conversion(
        payload=payload,
        format="tflite",
        metadata={
            "as_uploaded": True,
            "quantization": "full-int8 TFLite by the seller",
            "runtime": "LiteRT",
            "packaging": how,
        },  # fmt: skip
        notes=[
            "as uploaded: the seller's full-int8 TFLite (every non-I/O tensor int8/int32), sealed byte for byte"
        ],
        as_uploaded=True,
    )


def _onnx_only_options(opts: QdqOptions, target: str) -> None:
    """onnxruntime's quantization options do not reach ai-edge-quantizer: set on a TFLite upload, they are an error."""
    import dataclasses

    from packagers._base import QualityOptions

    shared = {f.name for f in dataclasses.fields(QualityOptions)}
    defaults = type(opts)()
    given = [
        f.name
        for f in dataclasses.fields(opts)
        if f.name not in shared and getattr(opts, f.name) != getattr(defaults, f.name)
    ]
    if given:
        raise UsageError(
            f"option {', '.join(given)} of target {target} applies to ONNX input (onnxruntime quantization); "
            f"a float TFLite is quantized with ai-edge-quantizer static_wi8_ai8: leave it out, e.g. "
            f"edgemart package MODEL.tflite --target {target} --calibration samples.npz --out DIR"
        )


def float_tflite_conversion(model: bytes, info: ModelInfo, calibration, progress, target: str) -> Conversion:
    """A float TFLite upload quantized to full int8 for a LiteRT CPU target; its copy names the target, as a
    sealed upload's does (the coral-edgetpu build from the same upload has the same tensors, and a build
    hash is sold once)."""
    payload, meta = quantize_float_tflite(model, info, calibration, progress, target)
    return Conversion(
        payload=with_target_marker(payload, target),
        format="tflite",
        metadata={**meta, "packaging": f"with a metadata entry naming {target}"},
        quantized_ops=dict(inspect_model(payload).op_counts),
        notes=[HOW + f" ({meta['calibration_samples']} calibration samples), run with LiteRT"],
    )


def with_target_marker(model: bytes, target: str) -> bytes:
    """The TFLite model re-serialized with a metadata entry `edgemart.target` = `target`."""
    import flatbuffers

    from packagers._model import tflite_schema, tflite_tree

    schema = tflite_schema()
    tree = tflite_tree(model)
    buffer = schema.BufferT()
    buffer.data = list(target.encode())
    tree.buffers = [*(tree.buffers or []), buffer]
    entry = schema.MetadataT()
    entry.name, entry.buffer = b"edgemart.target", len(tree.buffers) - 1
    tree.metadata = [*(tree.metadata or []), entry]
    builder = flatbuffers.Builder(len(model) + 1024)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@register
class ArmCpuPackager(IntCpuPackager):
    target = "arm-cpu"
    takes_tflite = True
    options_type = ArmCpuOptions
    made_for = "aarch64 CPU (onnxruntime)"
    made_for_tflite = "aarch64 CPU (LiteRT)"
    native_machines = frozenset({"aarch64", "arm64"})
