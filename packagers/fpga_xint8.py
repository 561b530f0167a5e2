"""Target `fpga-xint8`: symmetric int8 QDQ ONNX whose every scale is an exact power of two (Vitis-AI style).

Each tensor's power of two is chosen by least squared error on its calibration data (floor vs ceil of the
float scale's exponent, and of the max-abs scale's), not by blind rounding; int32 biases follow exactly."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from edgemart.core.errors import UsageError
from packagers._base import Conversion, Packager, register
from packagers._qdq import LAYER_SAMPLES, QdqOptions, _with_outputs, qdq_conversion, quantize_with_options
from packagers._runtime import OnnxRunner
from packagers._xint8_rules import apply_dpu_variants, check, enforce

ACTIVATION_SAMPLES = 32  # calibration samples whose activations choose each power of two


@dataclass(frozen=True)
class FpgaXint8Options(QdqOptions):
    per_channel: bool = False  # DPU-style accelerators use one power-of-two scale per tensor
    dpu_variants: bool = True  # LeakyRelu and HardSigmoid take the DPU's fixed-point slopes
    sigmoid_as_hard_sigmoid: bool = False  # run Sigmoid as the DPU HardSigmoid (else it stays on the CPU)
    int8_biases: bool = False  # biases as int8 with their own power of two (within shift_bias), not int32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibration_method == "auto":
            # The scales are snapped to powers of two after calibration, so agreement measured on the
            # candidates would not be the build's: the method is the seller's choice here.
            raise UsageError(
                "option calibration_method=auto is for arm-cpu and x86-cpu; fpga-xint8 snaps every scale to a "
                "power of two after calibrating, so choose minmax, entropy or percentile"
            )


def is_power_of_two(values: np.ndarray) -> bool:
    """True when every value is exactly 2**k (positive, mantissa 0.5 in frexp terms)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    mantissa, _ = np.frexp(arr)
    return bool(arr.size) and bool(np.all((arr > 0) & (mantissa == 0.5)))


def _fake_quant_mse(x: np.ndarray, scale: float, qmin: int = -128, qmax: int = 127) -> float:
    q = np.clip(np.round(x / scale), qmin, qmax)
    return float(np.mean((q * scale - x) ** 2))


def best_power_of_two(x: np.ndarray, float_scale: float) -> tuple[float, str]:
    """The power of two with least quantization MSE on `x`, among floor/ceil exponents of two candidates."""
    x = np.asarray(x, dtype=np.float64).ravel()
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    bases = [s for s in (float_scale, peak / 127.0) if s > 0 and math.isfinite(s)]
    if not bases:
        return 1.0, "degenerate"
    candidates: dict[float, str] = {}
    for base in bases:
        e = math.log2(base)
        candidates.setdefault(2.0 ** math.floor(e), "floor")
        candidates.setdefault(2.0 ** math.ceil(e), "ceil")
    if not x.size:
        return 2.0 ** round(math.log2(bases[0])), "nearest"
    best = min(candidates, key=lambda s: (_fake_quant_mse(x, s), s))
    return best, candidates[best]


@register
class FpgaXint8Packager(Packager):
    target = "fpga-xint8"
    options_type = FpgaXint8Options
    made_for = "Vitis AI DPU (deployable QDQ ONNX)"
    native_machines = frozenset()

    def convert(self, model, info, calibration, progress, *, holdout=None) -> Conversion:
        opts = self.options
        assert isinstance(opts, FpgaXint8Options) and calibration is not None
        quantized = quantize_with_options(
            model,
            calibration,
            opts,
            progress,
            symmetric_activations=True,
            what="calibrating and quantizing (symmetric int8)",
        )
        fp32, qdq, meta = quantized.fp32, quantized.qdq, quantized.meta
        progress(0.6, "snapping scales to powers of two")
        n = min(ACTIVATION_SAMPLES, calibration.count)
        stats = snap_to_powers_of_two(qdq, fp32, calibration.take(slice(0, n)))
        progress(0.8, "checking the Vitis AI XINT8 constraints")
        rows = apply_dpu_variants(qdq, opts.sigmoid_as_hard_sigmoid) if opts.dpu_variants else []
        adjusted = enforce(qdq)
        requantize_biases(qdq, fp32, int8=opts.int8_biases)  # input positions may have moved
        rows += check(qdq, adjusted)
        progress(0.85, "comparing intermediate activations")
        violated = [r for r in rows if r["status"] == "violated"]
        moved = [r for r in rows if r["status"].startswith("adjusted")]
        meta.update(
            quantization="onnxruntime static QDQ int8 (symmetric), scales snapped to powers of two",
            power_of_two=stats,
            xint8_constraints={"checked": len(rows), "adjusted": len(moved), "violated": len(violated)},
            biases="int8, power of two" if opts.int8_biases else "int32 (input pos + weight pos)",
        )
        notes = [
            f"{stats['scales']} scales snapped to powers of two; {stats['differs_from_nearest']} differ "
            "from blind rounding of the exponent (chosen by least MSE on calibration data)",
            f"Vitis AI XINT8 constraints: {len(rows)} checked node by node, {len(moved)} met by moving a "
            f"position, {len(violated)} violated",
        ]
        conversion = qdq_conversion(quantized, calibration, layer_samples=min(n, LAYER_SAMPLES), notes=notes)
        conversion.constraints = rows
        return conversion


def requantize_biases(qdq, fp32, *, int8: bool) -> None:
    """Biases again after positions moved: int32 at input pos + weight pos, or int8 at the power of two with
    least error that keeps shift_bias in [0, 15]."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qdq.graph.initializer}
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))

    for dq in [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]:
        if dq.input[0] in inits and inits[dq.input[0]].data_type == 6:  # int32 bias
            _requantize_bias(dq, qdq, fp32_inits, inits, producer, array, put)
            if int8:
                bias = array(dq.input[0]).astype(np.float64) * array(dq.input[1]).astype(np.float64)
                fine = float(np.max(array(dq.input[1])))  # input scale x weight scale: shift_bias 0
                peak = float(np.max(np.abs(bias))) or fine
                candidates = [fine * 2.0**k for k in range(0, 16)]
                fitting = [c for c in candidates if peak / c <= 127] or candidates[-1:]
                scale = min(fitting, key=lambda c: (_fake_quant_mse(bias, c), c))
                put(dq.input[1], np.array(scale, np.float32))
                put(dq.input[0], np.clip(np.round(bias / scale), -128, 127).astype(np.int8))
                if len(dq.input) > 2 and dq.input[2] in inits:
                    put(dq.input[2], np.zeros((), np.int8))


def snap_to_powers_of_two(qdq, fp32, samples) -> dict:
    """Rewrite `qdq` in place: every Q/DQ scale a power of two, every zero point 0, weights/biases requantized."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qdq.graph.initializer}
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    nodes = [n for n in qdq.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    producer = {o: n for n in qdq.graph.node for o in n.output}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))

    def axis_of(node) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), 1)

    # Float data seen by each activation quantizer, from the QDQ model itself on calibration samples.
    act_names = sorted({n.input[0] for n in nodes if n.op_type == "QuantizeLinear"})
    acts = (
        OnnxRunner(_with_outputs(qdq, act_names), output_names=act_names).run_all(samples)
        if act_names
        else {}
    )

    groups: dict[str, list] = {}
    for node in nodes:
        groups.setdefault(node.input[1], []).append(node)
    choices: Counter[str] = Counter()
    differs = 0
    biases = []
    for scale_name, members in groups.items():
        old = array(scale_name).astype(np.float64)
        first = members[0]
        data_name = first.input[0]
        if first.op_type == "DequantizeLinear" and data_name in inits and inits[data_name].data_type == 6:
            biases.append(first)  # int32 bias: its scale is fixed by input and weight scales
            continue
        q_node = next((m for m in members if m.op_type == "QuantizeLinear"), None)
        is_weight = q_node is None and data_name in inits
        if q_node is not None:
            values = acts[q_node.input[0]].astype(np.float64)
        elif is_weight:
            float_name = data_name.removesuffix("_quantized")
            if float_name in fp32_inits:
                values = numpy_helper.to_array(fp32_inits[float_name]).astype(np.float64)
            else:
                zp = array(first.input[2]).astype(np.float64) if len(first.input) > 2 else 0.0
                values = (array(data_name).astype(np.float64) - _bcast(zp, old, axis_of(first), 0)) * _bcast(
                    old, old, axis_of(first), array(data_name).ndim
                )
        else:
            raise UsageError(f"fpga-xint8: cannot find the data quantized with scale {scale_name!r}")
        if old.ndim == 0:
            chosen, how = best_power_of_two(values, float(old))
            new = np.array(chosen, dtype=np.float32)
            choices[how] += 1
            differs += chosen != 2.0 ** round(math.log2(float(old))) if old > 0 else 0
        else:
            axis = axis_of(first)
            moved = np.moveaxis(values, axis, 0).reshape(old.shape[0], -1)
            picks = [best_power_of_two(moved[c], float(old[c])) for c in range(old.shape[0])]
            new = np.array([p[0] for p in picks], dtype=np.float32)
            choices.update(p[1] for p in picks)
            differs += sum(
                p[0] != 2.0 ** round(math.log2(float(o))) for p, o in zip(picks, old, strict=True) if o > 0
            )
        put(scale_name, new)
        for member in members:
            if len(member.input) > 2 and member.input[2] in inits:
                put(member.input[2], np.zeros_like(array(member.input[2])))
        if is_weight:
            scale = _bcast(new.astype(np.float64), new, axis_of(first), values.ndim)
            put(data_name, np.clip(np.round(values / scale), -128, 127).astype(np.int8))

    for dq in biases:
        _requantize_bias(dq, qdq, fp32_inits, inits, producer, array, put)

    bad = [n.input[1] for n in nodes if not is_power_of_two(array(n.input[1]))] + [
        n.input[2] for n in nodes if len(n.input) > 2 and np.any(array(n.input[2]) != 0)
    ]
    if bad:
        raise UsageError(f"fpga-xint8: tensor {bad[0]!r} is not power-of-two symmetric after snapping")
    return {
        "scales": sum(choices.values()),
        "chose": dict(choices),
        "differs_from_nearest": int(differs),
        "int32_biases": len(biases),
    }


def _bcast(value: np.ndarray, scale: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if np.ndim(scale) == 0 or ndim == 0:
        return value
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(value).reshape(shape)


def _requantize_bias(dq, qdq, fp32_inits, inits, producer, array, put) -> None:
    """int32 bias scale = input scale x weight scale (a product of powers of two), bias requantized from float."""
    from onnx import numpy_helper

    out = dq.output[0]
    consumer = next((n for n in qdq.graph.node if len(n.input) > 2 and n.input[2] == out), None)
    if consumer is None:
        raise UsageError(f"fpga-xint8: int32 tensor {dq.input[0]!r} is not a Conv/Gemm bias")
    in_dq, w_dq = producer.get(consumer.input[0]), producer.get(consumer.input[1])
    if (
        in_dq is None
        or w_dq is None
        or in_dq.op_type != "DequantizeLinear"
        or w_dq.op_type != "DequantizeLinear"
    ):
        raise UsageError(f"fpga-xint8: bias of node {consumer.name!r} has unquantized input or weight")
    new_scale = (array(in_dq.input[1]).astype(np.float64) * array(w_dq.input[1]).astype(np.float64)).astype(
        np.float32
    )
    float_name = dq.input[0].removesuffix("_quantized")
    if float_name in fp32_inits:
        bias = numpy_helper.to_array(fp32_inits[float_name]).astype(np.float64)
    else:
        bias = array(dq.input[0]).astype(np.float64) * array(dq.input[1]).astype(np.float64)
    old_scale = array(dq.input[1])
    put(dq.input[1], new_scale.reshape(old_scale.shape) if new_scale.size == old_scale.size else new_scale)
    limit = np.iinfo(np.int32)
    put(dq.input[0], np.clip(np.round(bias / new_scale), limit.min, limit.max).astype(np.int32))
    if len(dq.input) > 2 and dq.input[2] in inits:
        put(dq.input[2], np.zeros_like(array(dq.input[2])))
