"""Target `arm-cpu`: int8 ONNX (per-channel weights, S8S8) by onnxruntime static quantization, for aarch64.

QDQ or QOperator, whichever measures smaller with equal agreement; the report names the layers that lose
the most precision, and never presents a run on another architecture as this build's latency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from packagers._base import Conversion, Packager, register
from packagers._qdq import QdqOptions, compact, qdq_conversion, quantize_with_options, smaller_equal_format

# The ops whose int8 kernels pay for their quantize/dequantize steps on a CPU. Quantizing the elementwise
# ops around them (HardSwish, Add, Mul...) adds conversions, costs 3-7 dB of output SNR on PP-OCR det/rec
# and was no faster (bench/packagers.py; measured on x86_64, where a CPU build can be timed here).
CPU_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass(frozen=True)
class ArmCpuOptions(QdqOptions):
    """Per-channel weights, asymmetric int8 activations (S8S8: onnxruntime's choice for ARM CPUs)."""

    op_types: tuple[str, ...] = CPU_OP_TYPES
    format: Literal["auto", "qdq", "qoperator"] = "auto"  # auto: the smaller of the two at equal agreement


class IntCpuPackager(Packager):
    """A CPU target built by onnxruntime static quantization with `activations` of that type."""

    activations: Literal["int8", "uint8"] = "int8"

    def convert(self, model, info, calibration, progress) -> Conversion:
        opts = self.options
        assert isinstance(opts, ArmCpuOptions) and calibration is not None
        quantized = quantize_with_options(
            model,
            calibration,
            opts,
            progress,
            symmetric_activations=False,
            what=f"calibrating ({opts.calibration_method}) and quantizing",
            activations=self.activations,
            operator_format_too=opts.format != "qdq",
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


@register
class ArmCpuPackager(IntCpuPackager):
    target = "arm-cpu"
    options_type = ArmCpuOptions
    made_for = "aarch64 CPU (onnxruntime)"
    native_machines = frozenset({"aarch64", "arm64"})
