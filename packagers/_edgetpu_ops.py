"""Edge TPU op compatibility: which ops the Edge TPU compiler maps to the TPU and which fall back to CPU.

Data table from Coral's published list of supported operations (coral.ai/docs/edgetpu/models-intro);
works on TFLite op codes or, before conversion, on ONNX op types mapped to their TFLite equivalents."""

from __future__ import annotations

from packagers._model import ModelInfo

# TFLite builtins the Edge TPU compiler can map (all need int8/uint8 tensors and static shapes).
EDGETPU_SUPPORTED_OPS = frozenset(
    {"ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
     "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "UNIDIRECTIONAL_SEQUENCE_LSTM", "MAXIMUM",
     "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX",
     "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
     "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE",
     "STRIDED_SLICE", "SUB", "SUM", "SQUARED_DIFFERENCE", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
     "HARD_SWISH"}
)  # fmt: skip

# ONNX op type -> the TFLite op(s) a converter emits for it. None: folded away at conversion.
ONNX_TO_TFLITE: dict[str, tuple[str, ...] | None] = {
    "Conv": ("CONV_2D",), "ConvTranspose": ("TRANSPOSE_CONV",), "Gemm": ("FULLY_CONNECTED",),
    "MatMul": ("FULLY_CONNECTED",), "Add": ("ADD",), "Sub": ("SUB",), "Mul": ("MUL",), "Div": ("DIV",),
    "Relu": ("RELU",), "Sigmoid": ("LOGISTIC",), "Tanh": ("TANH",), "HardSwish": ("HARD_SWISH",),
    "HardSigmoid": ("MUL", "ADD", "RELU6"), "PRelu": ("PRELU",), "LeakyRelu": ("LEAKY_RELU",),
    "Softmax": ("SOFTMAX",), "GlobalAveragePool": ("MEAN",), "ReduceMean": ("MEAN",),
    "AveragePool": ("AVERAGE_POOL_2D",), "MaxPool": ("MAX_POOL_2D",), "Concat": ("CONCATENATION",),
    "Reshape": ("RESHAPE",), "Flatten": ("RESHAPE",), "Squeeze": ("SQUEEZE",), "Unsqueeze": ("EXPAND_DIMS",),
    "Transpose": ("TRANSPOSE",), "Pad": ("PAD",), "Slice": ("STRIDED_SLICE",), "Split": ("SPLIT",),
    "Resize": ("RESIZE_BILINEAR",), "Sqrt": ("SQRT",), "Pow": ("POW",), "ArgMax": ("ARG_MAX",),
    "ReduceMax": ("REDUCE_MAX",), "Max": ("MAXIMUM",), "Min": ("MINIMUM",), "Exp": ("EXP",),
    "Log": ("LOG",), "Gather": ("GATHER",), "LSTM": ("UNIDIRECTIONAL_SEQUENCE_LSTM",),
    "Clip": ("RELU6",), "Cast": ("CAST",), "ArrayFeatureExtractor": ("GATHER",),
    "Identity": None, "Constant": None, "BatchNormalization": None, "Shape": None, "Dropout": None,
}  # fmt: skip
_FOLDED_REASON = "folded away at conversion (constant, identity or merged into the previous layer)"


def _placement_rows(ops: list[tuple[str, str, bool | None, str]]) -> dict:
    """ops: (source op, TFLite op, supported?, reason). The compiler maps ops until the first unsupported
    one; everything after it runs on the CPU even if supported (single-subgraph compilation)."""
    rows = []
    started = cut = False
    for source, tfl, supported, reason in ops:
        if supported is None:
            placement = "none"
        elif supported and not cut:
            placement, started = "edgetpu", True
        elif not supported:
            placement = "cpu"
            cut = cut or started  # CPU ops in front of the TPU region (input QUANTIZE) do not cut it
        else:
            placement, reason = (
                "cpu",
                "supported, but after an unsupported op: the compiler cuts the graph there",
            )
        rows.append({"op": source, "mapped_to": tfl, "placement": placement, "reason": reason})
    tpu = sum(r["placement"] == "edgetpu" for r in rows)
    cpu = sum(r["placement"] == "cpu" for r in rows)
    fallback = sorted({r["mapped_to"] for r in rows if r["placement"] == "cpu"})
    summary = f"{tpu} ops would run on the Edge TPU, {cpu} on the CPU" + (
        f" ({', '.join(fallback)})" if fallback else ""
    )
    return {
        "edgetpu_ops": tpu,
        "cpu_ops": cpu,
        "cpu_fallback_op_types": fallback,
        "summary": summary,
        "ops": rows,
    }


def tflite_compatibility(model: bytes) -> dict:
    """Op-by-op placement for a TFLite flatbuffer, from its op codes and tensor types."""
    from packagers._model import builtin_op_names, tflite_schema

    schema = tflite_schema()
    tfl = schema.ModelT.InitFromPackedBuf(model, 0)
    names = builtin_op_names()
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in tfl.operatorCodes or []]
    graph = tfl.subgraphs[0]
    ops = []
    for op in graph.operators or []:
        name = names.get(codes[op.opcodeIndex], "CUSTOM")
        tensor_types = {
            graph.tensors[i].type
            for i in [*(op.inputs if op.inputs is not None else []), *op.outputs]
            if i >= 0
        }
        data_types = tensor_types - {2, 4}  # int32 biases / int64 indices are fine
        if name not in EDGETPU_SUPPORTED_OPS:
            ops.append((name, name, False, "not in the Edge TPU supported-ops list"))
        elif not data_types <= {3, 9}:
            ops.append(
                (name, name, False, "works on float tensors: the Edge TPU needs 8-bit quantized tensors")
            )
        else:
            ops.append((name, name, True, "supported (int8)"))
    report = _placement_rows(ops)
    report["source"] = "tflite"
    return report


def onnx_compatibility(proto) -> dict:
    """Placement estimate for an ONNX graph, assuming full-integer quantization at conversion."""
    ops = []
    constants = {i.name for i in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    for node in proto.graph.node:
        mapped = ONNX_TO_TFLITE.get(node.op_type, ())
        if node.op_type == "Div" and len(node.input) > 1 and node.input[1] in constants:
            mapped = ("MUL",)  # division by a constant becomes a multiplication by its reciprocal
        if mapped is None:
            ops.append((node.op_type, "-", None, _FOLDED_REASON))
        elif not mapped:
            ops.append((node.op_type, "?", False, "no TFLite builtin equivalent known"))
        else:
            unsupported = [m for m in mapped if m not in EDGETPU_SUPPORTED_OPS]
            if node.op_type == "Clip":
                unsupported = []  # Clip(0, 6) is RELU6; other ranges become MINIMUM/MAXIMUM, both supported
            ok = not unsupported
            reason = (
                "supported once quantized to int8" if ok else f"{', '.join(unsupported)} is not supported"
            )
            ops.append((node.op_type, "+".join(mapped), ok, reason))
    report = _placement_rows(ops)
    report["source"] = "onnx (estimate before conversion)"
    return report


def model_compatibility(model: bytes, info: ModelInfo) -> dict:
    if info.format == "tflite":
        return tflite_compatibility(model)
    from packagers._model import parse_onnx

    return onnx_compatibility(parse_onnx(model))
