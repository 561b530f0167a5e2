"""ONNX graph helpers shared by the QDQ targets: preparation for quantization, per-layer error, op coverage.

Per-layer error compares intermediate activations of the fp32 and the QDQ model by exposing them as outputs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from packagers._runtime import OnnxRunner
from packagers.quality import snr_db

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
        from drm.errors import UsageError

        raise UsageError(f"cannot upgrade ONNX opset {current} -> {target} for QDQ quantization: {exc}") from None
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
    for name in names:
        if name not in existing:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy.SerializeToString()


def layer_errors(
    fp32_model, qdq_model, feeds: Mapping[str, np.ndarray], top: int = 5, suggest: int = 3
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
    ref = OnnxRunner(_with_outputs(fp32_model, ref_names), output_names=ref_names).run(feeds)
    got = OnnxRunner(_with_outputs(qdq_model, q_names), output_names=q_names).run(feeds)
    snr: dict[str, float] = {}
    for r_name, g_name in zip(ref_names, q_names, strict=True):
        if ref[r_name].shape != got[g_name].shape:
            continue
        value = snr_db(ref[r_name], got[g_name])
        snr[r_name] = 300.0 if value is None else value  # identical tensors: effectively infinite SNR

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
        drop = (min(upstream) if upstream else 300.0) - snr[tensor]
        rows.append(
            {
                "node": node.name,  # type: ignore[attr-defined]
                "op_type": node.op_type,  # type: ignore[attr-defined]
                "tensor": tensor,
                "snr_db": round(snr[tensor], 2),
                "snr_drop_db": round(min(drop, 300.0), 2),
                "quantized": node.name in quantized_nodes,  # type: ignore[attr-defined]
            }
        )
    worst = sorted(rows, key=lambda r: r["snr_db"])[:top]
    candidates = sorted(
        (r for r in rows if r["quantized"] and r["op_type"] in QUANTIZABLE_OPS and r["snr_drop_db"] > 1.0),
        key=lambda r: -r["snr_drop_db"],
    )
    return worst, [r["node"] for r in candidates[:suggest]]
