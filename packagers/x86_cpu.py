"""Target `x86-cpu`: int8 ONNX with uint8 activations and int8 per-channel weights (U8S8), the pairing
onnxruntime fuses into its fast x86 kernels (VNNI / AVX2), QDQ or QOperator, whichever is smaller at equal
agreement. Measured on an x86 host, its report's latency is this build's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from packagers._base import register
from packagers.arm_cpu import ArmCpuOptions, IntCpuPackager


@dataclass(frozen=True)
class X86CpuOptions(ArmCpuOptions):
    """The arm-cpu options; activations are uint8 (asymmetric), weights int8 per channel. QDQ by default:
    onnxruntime fuses it into the same x86 kernels, and on PP-OCR rec it ran faster than the (smaller)
    QOperator form (0.66x vs 0.75x fp32, 1 thread, AVX-512 VNNI)."""

    format: Literal["auto", "qdq", "qoperator"] = "qdq"


@register
class X86CpuPackager(IntCpuPackager):
    target = "x86-cpu"
    options_type = X86CpuOptions
    activations = "uint8"
    made_for = "x86_64 CPU (onnxruntime)"
    native_machines = frozenset({"x86_64", "amd64", "AMD64"})
