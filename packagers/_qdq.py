# Why this is one module: the shared static-quantization flow (specialize, preprocess, calibrate, quantize, measure) every int8 ONNX target uses.
"""ONNX graph helpers shared by the QDQ targets: preparation for quantization, per-layer error, op coverage.

Per-layer error compares intermediate activations of the fp32 and the QDQ model by exposing them as outputs."""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edge_runtime.evaluation.samples import SampleSet
from edgemart.core.errors import UsageError
from packagers._base import Conversion, QualityOptions
from packagers._calibration import (
    AUTO_METHODS,
    activation_tensors,
    choose_method_for,
    entropy_ranges,
    range_stability,
)
from packagers._runtime import OnnxRunner
from packagers.quality import EXACT_SNR_DB, compare_outputs, snr_db

# Per-channel QDQ (DequantizeLinear with `axis`) needs opset 13.
QDQ_MIN_OPSET = 13
QUANTIZABLE_OPS = frozenset(
    {"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Sub", "Div", "Relu", "Clip", "Sigmoid",
     "HardSigmoid", "HardSwish", "GlobalAveragePool", "AveragePool", "MaxPool", "Softmax", "Concat",
     "Resize", "Transpose", "Reshape", "LeakyRelu", "Gather", "Pow", "ReduceMean", "Sqrt"}
)  # fmt: skip
_QDQ_NODES = ("QuantizeLinear", "DequantizeLinear")


def name_nodes(model) -> None:
    """Give every node a unique name: ORT's `nodes_to_exclude` and our reports refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def upgrade_opset(model, target: int = QDQ_MIN_OPSET):
    """Return (model, from_version); version-converts the default domain up to `target` if it is older."""
    import onnx
    from onnx import version_converter

    current = next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), None)
    if current is None or current >= target:
        return model, current
    try:
        converted = version_converter.convert_version(model, target)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        from edgemart.core.errors import UsageError

        raise UsageError(
            f"cannot upgrade ONNX opset {current} -> {target} for QDQ quantization: {exc}"
        ) from None
    return converted, current


def elem_types(model) -> dict[str, int]:
    """Tensor name -> ONNX elem type, from shape inference plus the graph's own declarations."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def op_coverage(qdq_model) -> tuple[dict[str, int], dict[str, int]]:
    """(ops left in float, quantized ops) of a QDQ model; a node is quantized when it reads a DequantizeLinear."""
    import onnx

    types = elem_types(qdq_model)
    dq_outputs = {o for n in qdq_model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    floats: Counter[str] = Counter()
    quantized: Counter[str] = Counter()
    for node in qdq_model.graph.node:
        if node.op_type in _QDQ_NODES or node.op_type == "Constant":
            continue
        if any(i in dq_outputs for i in node.input):
            quantized[node.op_type] += 1
        elif any(types.get(i) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) for i in node.input):
            floats[node.op_type] += 1
    return dict(floats), dict(quantized)


def _with_outputs(model, names: list[str]) -> bytes:
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    types = elem_types(model)
    for name in names:
        if name not in existing:
            elem = types.get(name) or onnx.TensorProto.FLOAT
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return copy.SerializeToString()


def layer_errors(
    fp32_model, qdq_model, samples: SampleSet, top: int = 5, suggest: int = 3
) -> tuple[list[dict], list[str]]:
    """Worst `top` layers by activation SNR, and the quantized nodes whose own SNR drop is largest.

    A layer's drop is the SNR of its worst input minus the SNR of its output: the precision that node
    itself loses, as opposed to error inherited from upstream. Those are the nodes worth excluding."""
    import onnx

    types = elem_types(fp32_model)
    q_produced = {o: n for n in qdq_model.graph.node for o in n.output}
    float_type = onnx.TensorProto.FLOAT

    def q_name(tensor: str) -> str | None:
        dq = f"{tensor}_DequantizeLinear_Output"
        if dq in q_produced:
            return dq
        return tensor if tensor in q_produced else None

    pairs: dict[str, str] = {}
    producer: dict[str, object] = {}
    for node in fp32_model.graph.node:
        if node.op_type == "Constant":
            continue
        for out in node.output:
            qn = q_name(out)
            if types.get(out) == float_type and qn is not None:
                pairs[out] = qn
                producer[out] = node
    input_pairs = {i.name: q_name(i.name) for i in fp32_model.graph.input}
    input_pairs = {k: v for k, v in input_pairs.items() if v is not None and v != k}
    if not pairs:
        return [], []
    ref_names = list(pairs) + list(input_pairs)
    q_names = [pairs[n] for n in pairs] + [input_pairs[n] for n in input_pairs]
    ref = OnnxRunner(_with_outputs(fp32_model, ref_names), output_names=ref_names).run_all(samples)
    got = OnnxRunner(_with_outputs(qdq_model, q_names), output_names=q_names).run_all(samples)
    snr: dict[str, float] = {}
    for r_name, g_name in zip(ref_names, q_names, strict=True):
        if ref[r_name].shape != got[g_name].shape:
            continue
        value = snr_db(ref[r_name], got[g_name])
        snr[r_name] = EXACT_SNR_DB if value is None else min(value, EXACT_SNR_DB)

    quantized_nodes = {
        n.name
        for n in qdq_model.graph.node
        if n.op_type not in _QDQ_NODES and any(i.endswith("_DequantizeLinear_Output") for i in n.input)
    }
    rows = []
    for tensor, node in producer.items():
        if tensor not in snr:
            continue
        upstream = [snr[i] for i in node.input if i in snr]  # type: ignore[attr-defined]
        # No tracked input (fused away by the quantizer, or a graph input kept in float): drop unknown.
        drop = min(upstream) - snr[tensor] if upstream else None
        rows.append(
            {
                "node": node.name,  # type: ignore[attr-defined]
                "op_type": node.op_type,  # type: ignore[attr-defined]
                "tensor": tensor,
                "snr_db": round(snr[tensor], 2),
                "snr_drop_db": None if drop is None else round(drop, 2),
                "quantized": node.name in quantized_nodes,  # type: ignore[attr-defined]
            }
        )
    worst = sorted(rows, key=lambda r: r["snr_db"])[:top]
    candidates = sorted(
        (
            r
            for r in rows
            if r["quantized"] and r["op_type"] in QUANTIZABLE_OPS and (r["snr_drop_db"] or 0.0) > 1.0
        ),
        key=lambda r: -r["snr_drop_db"],
    )
    return worst, [r["node"] for r in candidates[:suggest]]


def prepare_for_qdq(
    model: bytes, tmp: str, preprocess: bool, fixed: Mapping[str, np.ndarray] | None = None
) -> tuple[object, dict]:
    """Parse, specialize for the fixed inputs, name nodes, upgrade the opset for QDQ and run ORT's
    quantization pre-processing.

    Returns the fp32 model that gets quantized (the per-layer reference) and metadata about what was done."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from packagers._model import parse_onnx
    from packagers._specialize import specialize

    proto, specialized = specialize(parse_onnx(model), fixed or {})
    name_nodes(proto)
    proto, opset_before = upgrade_opset(proto)
    meta: dict = {
        **specialized,
        "opset_before": opset_before,
        "opset": QDQ_MIN_OPSET if opset_before < QDQ_MIN_OPSET else opset_before,
    }
    meta["preprocess"] = "skipped by option"
    if preprocess:
        src, out = f"{tmp}/named.onnx", f"{tmp}/preprocessed.onnx"
        onnx.save(proto, src)
        try:
            # Symbolic shape inference needs sympy and adds nothing for static-after-calibration shapes.
            quant_pre_process(src, out, skip_symbolic_shape=True)
            proto = onnx.load(out)
            meta["preprocess"] = "onnxruntime quant_pre_process (ONNX shape inference + graph optimization)"
        except Exception as exc:  # noqa: BLE001 - ORT's pre-processing raises anything; we record it and go on
            meta["preprocess"] = (
                f"not applied: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            )
        name_nodes(proto)
    _flatten_gemm_bias(proto)
    return proto, meta


def _flatten_gemm_bias(model) -> None:
    """Reshape Gemm biases [1, N] to [N]: ORT 1.32's int32-bias scale check breaks on 2-D per-channel biases."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    users: Counter[str] = Counter(i for n in model.graph.node for i in n.input)
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        init = inits[node.input[2]]
        if len(init.dims) == 2 and init.dims[0] == 1 and users[init.name] == 1:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).reshape(-1), init.name))


class _Reader:
    """ORT CalibrationDataReader over in-memory samples (small batches, or one run per sample), each feed
    holding only the inputs the model being calibrated has."""

    def __init__(self, samples: SampleSet, input_names: set[str], batch: int = 16) -> None:
        self._batches = [
            {k: v for k, v in feed.items() if k in input_names} for _, feed in samples.runs(batch)
        ]
        self._iter = iter(self._batches)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def quantize_qdq(
    fp32_model,
    samples: SampleSet,
    tmp: str,
    *,
    per_channel: bool,
    method: str,
    percentile: float,
    nodes_to_exclude: tuple[str, ...],
    symmetric_activations: bool,
    activations: Literal["int8", "uint8"] = "int8",
    operator_format: bool = False,
    op_types: tuple[str, ...] = (),
):
    """Static int8 quantization with onnxruntime (QDQ, or QOperator: QLinearConv, QLinearMatMul...);
    temp files stay in `tmp`."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from edgemart.core.errors import UsageError

    known = {n.name for n in fp32_model.graph.node}
    unknown = [n for n in nodes_to_exclude if n not in known]
    if unknown:
        raise UsageError(
            f"option nodes_to_exclude names unknown node {unknown[0]!r} (see the quality report's node names)"
        )

    class Reader(_Reader, CalibrationDataReader):
        pass

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    extra: dict = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    src, dst = f"{tmp}/fp32.onnx", f"{tmp}/int8-{'qop' if operator_format else 'qdq'}.onnx"
    onnx.save(fp32_model, src)
    initializers = {i.name for i in fp32_model.graph.initializer}
    inputs = {i.name for i in fp32_model.graph.input if i.name not in initializers}
    # onnxruntime's histogram calibrators (percentile, entropy) stack every run's activations into one
    # array, which fails when the last batch is shorter: they get one sample per run.
    batch = 16 if method == "minmax" else 1
    # They also report progress with print(): keep it off our stdout (--json).
    with contextlib.redirect_stdout(io.StringIO()):
        cache = (
            entropy_ranges(src, tmp, Reader(samples, inputs, batch), op_types)
            if method == "entropy"
            else None
        )
        quantize_static(
            src,
            dst,
            Reader(samples, inputs, batch),
            calibration_cache_path=cache,
            quant_format=QuantFormat.QOperator if operator_format else QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(nodes_to_exclude) or None,
            op_types_to_quantize=list(op_types) or None,
            calibrate_method=methods[method],
            extra_options=extra,
        )
    return onnx.load(dst)


LAYER_SAMPLES = 16  # samples used for the per-layer comparison (intermediates are large)


@dataclass(frozen=True)
class QdqOptions(QualityOptions):
    """Options every onnxruntime static-QDQ target shares."""

    # auto (the arm-cpu and x86-cpu default): quantize with each of AUTO_METHODS (minmax, percentile) and
    # keep the one agreeing best with fp32 on the holdout samples
    calibration_method: Literal["auto", "minmax", "entropy", "percentile"] = "minmax"
    percentile: float = 99.999  # for calibration_method=percentile (and auto's percentile candidate)
    # the calibration set is too small when an activation's scale may vary more than this between sets
    max_range_spread: float = 0.10
    per_channel: bool = True
    nodes_to_exclude: tuple[str, ...] = ()  # node names kept in float
    op_types: tuple[str, ...] = ()  # op types to quantize; empty: every op onnxruntime can quantize
    preprocess: bool = True  # onnxruntime quant_pre_process (shape inference + optimization)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"option percentile must be in (50, 100], got {self.percentile}")
        if not 0.0 < self.max_range_spread <= 1.0:
            raise UsageError(f"option max_range_spread must be in (0, 1], got {self.max_range_spread}")


@dataclass
class Quantized:
    """What `quantize_with_options` made: the fp32 model that was quantized (the per-layer reference), its
    QDQ quantization, optionally its QOperator quantization, and metadata."""

    fp32: object
    qdq: object
    qoperator: object | None
    meta: dict
    calibration: dict | None = None  # the report's calibration section


def quantize_with_options(
    model: bytes,
    calibration: SampleSet,
    opts: QdqOptions,
    progress,
    *,
    symmetric_activations: bool,
    what: str,
    activations: Literal["int8", "uint8"] = "int8",
    operator_format_too: bool = False,
    holdout: SampleSet | None = None,
) -> Quantized:
    """Pre-process and statically quantize per ``opts`` (temp files in a TemporaryDirectory); with
    calibration_method=auto every method in AUTO_METHODS is tried and the one agreeing best with fp32 on
    `holdout` (else the calibration samples) is kept. Also measures how stable the activation ranges are."""
    with tempfile.TemporaryDirectory(prefix="edgemart-qdq-") as tmp:
        progress(0.05, "pre-processing (shape inference, opset)")
        fp32, meta = prepare_for_qdq(model, tmp, opts.preprocess, calibration.fixed)
        progress(0.2, what)

        def quantize(method: str, operator_format: bool):
            return quantize_qdq(
                fp32,
                calibration,
                tmp,
                per_channel=opts.per_channel,
                method=method,
                percentile=opts.percentile,
                nodes_to_exclude=opts.nodes_to_exclude,
                symmetric_activations=symmetric_activations,
                activations=activations,
                operator_format=operator_format,
                op_types=opts.op_types,
            )

        started = time.perf_counter()
        if opts.calibration_method == "auto":
            candidates = {}
            for i, method in enumerate(AUTO_METHODS):
                progress(0.2 + 0.08 * i, f"auto calibration: quantizing with {method}")
                candidates[method] = quantize(method, False)
            progress(0.45, "auto calibration: measuring each method's agreement with fp32")
            choice = choose_method_for(fp32, candidates, calibration, holdout, opts.max_quality_samples)
            qdq = candidates[choice["chosen"]]
        else:
            qdq = quantize(opts.calibration_method, False)
            choice = {"chosen": opts.calibration_method, "why": f"option calibration_method={opts.calibration_method}",
                      "candidates": []}  # fmt: skip
        choice["seconds"] = round(time.perf_counter() - started, 3)
        qoperator = None
        if operator_format_too:
            progress(0.5, "quantizing in operator format too (QLinear ops), to keep the smaller equal one")
            qoperator = quantize(choice["chosen"], True)
        progress(
            0.55, "measuring how stable the activation ranges are across resamples of the calibration set"
        )
        tensors = activation_tensors(qdq, fp32)
        stability = range_stability(
            _with_outputs(fp32, tensors),
            tensors,
            calibration,
            symmetric=symmetric_activations,
            threshold=opts.max_range_spread,
        )
    meta.update(
        calibration_method=choice["chosen"],
        calibration_method_requested=opts.calibration_method,
        per_channel=opts.per_channel,
        nodes_excluded=list(opts.nodes_to_exclude),
        activations=activations,
        op_types_quantized=list(opts.op_types) or "every op onnxruntime quantizes",
    )
    section = {
        "samples": calibration.count,
        "requested": opts.calibration_method,
        "method": choice.pop("chosen"),
        "method_choice": choice,
        "stability": stability,
    }
    return Quantized(fp32, qdq, qoperator, meta, section)


def compact(model, *, keep_node_names: bool = False) -> bytes:
    """The model's bytes without what no runtime reads: value_info and doc strings dropped, tensor names
    shortened (graph inputs and outputs keep theirs; subgraphs are renamed consistently). Copies first."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    keep = {i.name for i in graph.input} | {o.name for o in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            candidate = format(len(names), "x")
            while candidate in keep:  # a graph input or output may be called "a" or "1f"
                candidate += "_"
            names[name] = candidate
        return names[name]

    counter = iter(range(1 << 30))

    def walk(g, top: bool) -> None:
        del g.value_info[:]
        g.doc_string = ""
        for init in g.initializer:
            init.name = short(init.name)
            init.doc_string = ""
        if not top:
            for vi in [*g.input, *g.output]:
                vi.name = short(vi.name)
        for node in g.node:
            node.doc_string = ""
            if not keep_node_names:
                node.name = format(next(counter), "x")
            node.input[:] = [short(i) for i in node.input]
            node.output[:] = [short(o) for o in node.output]
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(sub, False)

    walk(graph, True)
    copy.doc_string = ""
    return copy.SerializeToString()


def smaller_equal_format(
    quantized: Quantized, calibration: SampleSet, samples: int = LAYER_SAMPLES
) -> tuple[bytes, dict]:
    """The compacted payload to ship: QOperator when it measures smaller than QDQ and its outputs agree with
    fp32 as well as QDQ's do (top-1 agreement not lower, SNR within 0.5 dB), else QDQ. Returns the figures."""
    qdq_bytes = compact(quantized.qdq)
    if quantized.qoperator is None:
        return qdq_bytes, {"format": "QDQ", "qdq_bytes": len(qdq_bytes), "why": "option format=qdq"}
    qop_bytes = compact(quantized.qoperator)
    subset = calibration.take(slice(0, samples))
    reference = OnnxRunner(quantized.fp32.SerializeToString()).run_all(subset)  # type: ignore[attr-defined]
    figures = {
        "QDQ": compare_outputs(reference, OnnxRunner(qdq_bytes).run_all(subset)),
        "QOperator": compare_outputs(reference, OnnxRunner(qop_bytes).run_all(subset)),
    }
    equal = all(
        fig.get("agreement", 1.0) >= figures["QDQ"][name].get("agreement", 1.0)
        and (fig.get("snr_db") or EXACT_SNR_DB) >= (figures["QDQ"][name].get("snr_db") or EXACT_SNR_DB) - 0.5
        for name, fig in figures["QOperator"].items()
    )
    smaller = len(qop_bytes) < len(qdq_bytes)
    chosen = "QOperator" if smaller and equal else "QDQ"
    choice = {
        "format": chosen,
        "qdq_bytes": len(qdq_bytes),
        "qoperator_bytes": len(qop_bytes),
        "why": (
            "QOperator measured smaller with agreement equal to QDQ's"
            if chosen == "QOperator"
            else "QOperator was "
            + ("not smaller" if not smaller else "less accurate on the calibration samples")
        ),
    }
    return (qop_bytes if chosen == "QOperator" else qdq_bytes), choice


def qdq_conversion(
    quantized: Quantized,
    calibration: SampleSet,
    *,
    layer_samples: int = LAYER_SAMPLES,
    notes: list[str] | None = None,
    payload: bytes | None = None,
) -> Conversion:
    """The quality evidence every QDQ target reports: worst layers by SNR, suggested exclusions, op coverage
    (measured on the QDQ quantization); the payload is the compacted QDQ model unless given."""
    worst, suggested = layer_errors(quantized.fp32, quantized.qdq, calibration.take(slice(0, layer_samples)))
    floats, quantized_ops = op_coverage(quantized.qdq)
    return Conversion(
        payload=payload if payload is not None else compact(quantized.qdq, keep_node_names=True),
        format="onnx",
        metadata=quantized.meta,
        worst_layers=worst,
        suggested_nodes_to_exclude=suggested,
        float_ops=floats,
        quantized_ops=quantized_ops,
        notes=notes or [],
        calibration=quantized.calibration,
    )
