"""Model readers for the compliance gate: detect ONNX or TFLite by content and extract weight layers.

Each weight layer comes out as a float32 array (out_units, in_channels, kernel) in one canonical layout
for both formats, dequantized (int8, fp16), densified (TFLite sparse) and BN-folded, plus the index of
the weight layer that produces its input channels, so fingerprints can follow unit permutations."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from drm.errors import UsageError
from drm.model_safety import check_model_bytes

# Graph ops that carry channels from their (first) activation input to their output unchanged in order.
_ONNX_CHANNEL_PRESERVING = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
        "BatchNormalization", "Add", "Sub", "Mul", "Div", "Pad", "MaxPool", "AveragePool", "GlobalAveragePool",
        "GlobalMaxPool", "QuantizeLinear", "DequantizeLinear", "Cast", "Identity", "Dropout", "Flatten",
        "Reshape", "Squeeze", "Unsqueeze", "Resize", "Upsample", "Softmax", "Relu6", "Gelu", "Erf",
    }
)  # fmt: skip
_TFLITE_CHANNEL_PRESERVING = frozenset(
    {
        "PAD", "PADV2", "ADD", "SUB", "MUL", "DIV", "RELU", "RELU6", "RELU_N1_TO_1", "LOGISTIC", "HARD_SWISH",
        "PRELU", "LEAKY_RELU", "TANH", "MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN", "DEQUANTIZE", "QUANTIZE",
        "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "SQUEEZE", "SOFTMAX", "GELU",
    }
)  # fmt: skip
_MAX_WALK = 64


@dataclass
class WeightLayer:
    """One weight-bearing op: canonical weight (out, in_channels, kernel) and its channel source."""

    name: str
    kind: str  # "dense" | "conv" | "depthwise"
    weight: np.ndarray
    source: int | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        o, c, k = self.weight.shape
        return int(o), int(c), int(k)


@dataclass
class ParsedModel:
    format: str  # "onnx" | "tflite"
    sha256: str
    layers: list[WeightLayer]
    metadata: dict[str, str] = field(default_factory=dict)


def detect_format(model: bytes) -> str:
    """'tflite' or 'onnx' from the bytes themselves; UsageError for anything else."""
    if len(model) >= 8 and model[4:8] == b"TFL3":
        return "tflite"
    if model[:1] == b"\x08":  # ONNX ModelProto serializes ir_version (field 1, varint) first
        return "onnx"
    raise UsageError("unrecognized model format: expected ONNX or TFLite bytes")


def parse_model(model: bytes) -> ParsedModel:
    if not model:
        raise UsageError("empty model file")
    fmt = detect_format(model)
    check_model_bytes(model)  # before any reader: external data, out-of-file buffers, oversized declarations
    sha = hashlib.sha256(model).hexdigest()
    if fmt == "tflite":
        layers, meta = _read_tflite(model)
    else:
        layers, meta = _read_onnx(model)
    return ParsedModel(format=fmt, sha256=sha, layers=layers, metadata=meta)


# --------------------------------------------------------------------------------------------- ONNX


def _read_onnx(model: bytes) -> tuple[list[WeightLayer], dict[str, str]]:
    import onnx
    from onnx import numpy_helper

    try:
        proto = onnx.load_model_from_string(model)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
        raise UsageError(f"malformed ONNX model: {exc}") from exc
    graph = proto.graph
    raw: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    raw[node.output[0]] = numpy_helper.to_array(attr.t)

    memo: dict[str, np.ndarray | None] = {}

    def const(name: str, depth: int = 0) -> np.ndarray | None:
        if not name:
            return None
        if name in raw:
            return raw[name]
        if name in memo:
            return memo[name]
        memo[name] = None
        node = producer.get(name)
        value = None
        if node is not None and depth < _MAX_WALK:
            value = _onnx_fold(node, lambda n: const(n, depth + 1))
        memo[name] = value
        return value

    layers: list[WeightLayer] = []
    layer_of_output: dict[str, int] = {}
    data_input: list[str] = []
    for node in graph.node:
        weight, kind, x_name = _onnx_weight(node, const)
        if weight is None:
            continue
        out_name = node.output[0]
        weight, out_name = _fold_bn(weight, out_name, consumers, const)
        layer_of_output[out_name] = len(layers)
        layer_of_output[node.output[0]] = len(layers)
        layers.append(WeightLayer(name=node.name or node.output[0], kind=kind, weight=weight))
        data_input.append(x_name)

    def source_of(tensor: str) -> int | None:
        seen: set[str] = set()
        frontier = [tensor]
        while frontier and len(seen) < _MAX_WALK:
            name = frontier.pop(0)
            if name in seen:
                continue
            seen.add(name)
            if name in layer_of_output:
                return layer_of_output[name]
            node = producer.get(name)
            if node is None or node.op_type not in _ONNX_CHANNEL_PRESERVING:
                continue
            frontier.extend(i for i in node.input if i and const(i) is None)
        return None

    for index, x_name in enumerate(data_input):
        layers[index].source = source_of(x_name)

    meta: dict[str, str] = {}
    if proto.producer_name:
        meta["producer_name"] = proto.producer_name
    if proto.producer_version:
        meta["producer_version"] = proto.producer_version
    if proto.doc_string:
        meta["doc_string"] = proto.doc_string
    if graph.doc_string:
        meta["graph_doc_string"] = graph.doc_string
    for prop in proto.metadata_props:
        meta[prop.key] = prop.value
    return layers, meta


def _onnx_fold(node, const) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    """Constant-fold the few ops that sit between a stored weight and its consumer."""
    op = node.op_type
    args = [const(i) for i in node.input]
    attrs = {a.name: a for a in node.attribute}
    if op in ("Identity", "Cast") and args and args[0] is not None:
        return np.asarray(args[0], dtype=np.float32) if op == "Cast" else args[0]
    if op == "DequantizeLinear" and args and args[0] is not None and args[1] is not None:
        axis = attrs["axis"].i if "axis" in attrs else 1
        return _dequantize(args[0], args[1], args[2] if len(args) > 2 else None, axis)
    if op == "QuantizeLinear" and args and args[0] is not None and args[1] is not None:
        axis = attrs["axis"].i if "axis" in attrs else 1
        zero = args[2] if len(args) > 2 else None
        dtype = zero.dtype if zero is not None else np.uint8
        info = np.iinfo(dtype)
        scale = np.asarray(args[1], np.float32)
        zp = np.zeros_like(scale) if zero is None else np.asarray(zero, np.float32)
        if scale.size > 1:
            shape = [1] * args[0].ndim
            shape[axis % args[0].ndim] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        q = np.rint(np.asarray(args[0], np.float32) / scale) + zp
        return np.clip(q, info.min, info.max).astype(dtype)
    if op == "Transpose" and args[0] is not None:
        perm = list(attrs["perm"].ints) if "perm" in attrs else None
        return np.transpose(args[0], perm)
    if op == "Reshape" and args[0] is not None and args[1] is not None:
        return np.reshape(args[0], [int(d) for d in args[1]])
    if op in ("Unsqueeze", "Squeeze") and args[0] is not None:
        return args[0]
    return None


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    q = q.astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.zeros_like(scale) if zero is None else np.asarray(zero, dtype=np.float32)
    if scale.ndim == 0 or scale.size == 1:
        return (q - zp.reshape(())) * scale.reshape(())
    shape = [1] * q.ndim
    shape[axis % q.ndim] = -1
    return (q - zp.reshape(shape)) * scale.reshape(shape)


def _onnx_weight(node, const) -> tuple[np.ndarray | None, str, str]:  # type: ignore[no-untyped-def]
    """(canonical weight, kind, activation input name) for weight-bearing nodes, else (None, '', '')."""
    op = node.op_type
    attrs = {a.name: a for a in node.attribute}
    inputs = list(node.input)
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        if op == "QLinearConv":
            w = const(inputs[3])
            if w is not None:
                w = _dequantize(w, const(inputs[4]), const(inputs[5]), 0)
        else:
            w = const(inputs[1])
            if w is not None and op == "ConvInteger":
                zp = const(inputs[3]) if len(inputs) > 3 else None
                w = _dequantize(w, np.asarray(1.0, np.float32), zp, 0)
        if w is None or w.ndim < 3:
            return None, "", ""
        group = attrs["group"].i if "group" in attrs else 1
        o, c = w.shape[0], w.shape[1]
        kind = "depthwise" if group > 1 and c == 1 else "conv"
        return np.asarray(w, np.float32).reshape(o, c, -1), kind, inputs[0]
    if op == "ConvTranspose":
        w = const(inputs[1])
        if w is None or w.ndim < 3:
            return None, "", ""
        w = np.swapaxes(np.asarray(w, np.float32), 0, 1)
        return w.reshape(w.shape[0], w.shape[1], -1), "conv", inputs[0]
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        if op == "QLinearMatMul":
            w = const(inputs[3])
            if w is not None:
                w = _dequantize(w, const(inputs[4]), const(inputs[5]), 1)
            x_name = inputs[0]
        else:
            w = const(inputs[1])
            x_name = inputs[0]
            if w is not None and op == "MatMulInteger":
                zp = const(inputs[3]) if len(inputs) > 3 else None
                w = _dequantize(w, np.asarray(1.0, np.float32), zp, 1)
        if w is None or w.ndim != 2 or const(x_name) is not None:
            return None, "", ""
        w = np.asarray(w, np.float32)
        trans_b = op == "Gemm" and "transB" in attrs and attrs["transB"].i == 1
        matrix = w if trans_b else w.T  # -> (out, in)
        return matrix[:, :, None], "dense", x_name
    return None, "", ""


def _fold_bn(weight, out_name, consumers, const):  # type: ignore[no-untyped-def]
    """Fold a directly following BatchNormalization into the weight rows (per-unit scale)."""
    users = consumers.get(out_name, [])
    if len(users) != 1 or users[0].op_type != "BatchNormalization":
        return weight, out_name
    bn = users[0]
    gamma, _beta, _mean, var = (const(i) for i in bn.input[1:5])
    if gamma is None or var is None or np.size(gamma) != weight.shape[0]:
        return weight, out_name
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    scale = np.asarray(gamma, np.float32) / np.sqrt(np.maximum(np.asarray(var, np.float32), 0) + eps)
    return weight * scale[:, None, None], bn.output[0]


# ------------------------------------------------------------------------------------------- TFLite


def _tflite_schema():  # type: ignore[no-untyped-def]
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover - exercised only where ai-edge-litert is absent
        try:
            from tflite_runtime import schema_py_generated as schema  # type: ignore[no-redef]
        except ImportError as exc:
            raise UsageError(
                "reading TFLite models needs ai-edge-litert (pip install edgemart[device])"
            ) from exc
    return schema


_TFLITE_DTYPES = {
    0: np.float32,
    1: np.float16,
    2: np.int32,
    3: np.uint8,
    4: np.int64,
    7: np.int16,
    9: np.int8,
}


def _read_tflite(model: bytes) -> tuple[list[WeightLayer], dict[str, str]]:
    schema = _tflite_schema()
    try:
        root = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    except Exception as exc:  # noqa: BLE001 - flatbuffers raises bare errors on garbage
        raise UsageError(f"malformed TFLite model: {exc}") from exc
    if not root.subgraphs:
        raise UsageError("malformed TFLite model: no subgraphs")
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = root.subgraphs[0]
    tensors = graph.tensors or []
    ops = graph.operators or []

    def op_name(op) -> str:  # type: ignore[no-untyped-def]
        code = root.operatorCodes[op.opcodeIndex]
        return op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")

    def buffer_bytes(index: int) -> bytes:
        buf = root.buffers[index] if 0 <= index < len(root.buffers) else None
        if buf is None:
            return b""
        if buf.data is not None and len(buf.data):
            return bytes(np.asarray(buf.data, np.uint8))
        if getattr(buf, "offset", 0) and getattr(buf, "size", 0):
            return model[buf.offset : buf.offset + buf.size]
        return b""

    producer: dict[int, int] = {}
    for i, op in enumerate(ops):
        for out in op.outputs if op.outputs is not None else []:
            producer[int(out)] = i

    memo: dict[int, np.ndarray | None] = {}

    def const(t: int, depth: int = 0) -> np.ndarray | None:
        if t < 0:
            return None
        if t in memo:
            return memo[t]
        memo[t] = None
        tensor = tensors[t]
        data = buffer_bytes(tensor.buffer)
        value: np.ndarray | None = None
        if data:
            value = _tflite_tensor_value(tensor, data)
        elif t in producer and depth < _MAX_WALK:
            op = ops[producer[t]]
            name = op_name(op)
            if name in ("DEQUANTIZE", "DENSIFY") and op.inputs is not None and len(op.inputs):
                value = const(int(op.inputs[0]), depth + 1)
                if value is not None:
                    value = value.astype(np.float32)
        memo[t] = value
        return value

    layers: list[WeightLayer] = []
    layer_of_tensor: dict[int, int] = {}
    data_input: list[int] = []
    for op in ops:
        name = op_name(op)
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D"):
            continue
        inputs = [int(i) for i in op.inputs]
        w_index, x_index = (1, 2) if name == "TRANSPOSE_CONV" else (1, 0)
        if len(inputs) <= max(w_index, x_index):
            continue
        w = const(inputs[w_index])
        if w is None or const(inputs[x_index]) is not None:
            continue
        w = np.asarray(w, np.float32)
        if name == "FULLY_CONNECTED":
            if w.ndim != 2:
                continue
            canon, kind = w[:, :, None], "dense"
        elif name == "DEPTHWISE_CONV_2D":
            canon, kind = np.transpose(w.reshape(-1, w.shape[-1])).reshape(w.shape[-1], 1, -1), "depthwise"
        else:  # OHWI
            canon = np.moveaxis(w, -1, 1)
            canon, kind = canon.reshape(canon.shape[0], canon.shape[1], -1), "conv"
        out_t = int(op.outputs[0])
        layer_of_tensor[out_t] = len(layers)
        layers.append(WeightLayer(name=_decode(tensors[out_t].name), kind=kind, weight=canon))
        data_input.append(inputs[x_index])

    def source_of(t: int) -> int | None:
        seen: set[int] = set()
        frontier = [t]
        while frontier and len(seen) < _MAX_WALK:
            cur = frontier.pop(0)
            if cur in seen or cur < 0:
                continue
            seen.add(cur)
            if cur in layer_of_tensor:
                return layer_of_tensor[cur]
            if cur not in producer:
                continue
            op = ops[producer[cur]]
            if op_name(op) not in _TFLITE_CHANNEL_PRESERVING:
                continue
            frontier.extend(int(i) for i in op.inputs if int(i) >= 0 and const(int(i)) is None)
        return None

    for index, t in enumerate(data_input):
        layers[index].source = source_of(t)

    meta: dict[str, str] = {}
    if root.description:
        meta["description"] = _decode(root.description)
    for entry in root.metadata or []:
        key = _decode(entry.name)
        meta[key] = _printable_text(buffer_bytes(entry.buffer))
    return layers, meta


def _decode(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _printable_text(data: bytes, limit: int = 4096) -> str:
    """Readable text of a metadata buffer: the whole of it if UTF-8 text, else its ASCII runs."""
    try:
        text = data.decode("utf-8")
        if text.isprintable() or all(ch.isprintable() or ch in "\r\n\t" for ch in text):
            return text[:limit]
    except UnicodeDecodeError:
        pass
    runs = re.findall(rb"[\x20-\x7e]{4,}", data)
    return " | ".join(r.decode("ascii") for r in runs)[:limit]


def _tflite_tensor_value(tensor, data: bytes) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    dtype = _TFLITE_DTYPES.get(int(tensor.type))
    if dtype is None:
        return None
    flat = np.frombuffer(data, dtype=dtype)
    shape = [int(d) for d in tensor.shape] if tensor.shape is not None else [flat.size]
    if tensor.sparsity is not None:
        values = _densify(flat, shape, tensor.sparsity)
    else:
        if int(np.prod(shape)) != flat.size:
            return None
        values = flat.reshape(shape)
    q = tensor.quantization
    if dtype in (np.int8, np.uint8, np.int16) and q is not None and q.scale is not None and len(q.scale):
        zero = np.asarray(q.zeroPoint) if q.zeroPoint is not None else None
        return _dequantize(values, np.asarray(q.scale), zero, int(q.quantizedDimension or 0))
    return values


def _densify(values: np.ndarray, shape: list[int], sparsity) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Expand a TFLite sparse tensor (DENSE / SPARSE_CSR dims with optional blocks) to its dense form."""
    order = [int(d) for d in sparsity.traversalOrder]
    block_map = [int(d) for d in sparsity.blockMap] if sparsity.blockMap is not None else []
    metas = sparsity.dimMetadata
    rank = len(shape)
    block_sizes = [int(metas[rank + i].denseSize) for i in range(len(block_map))]
    dense = np.zeros(int(np.prod(shape)), dtype=values.dtype)
    strides = np.cumprod([1] + shape[::-1])[:-1][::-1]
    cursor = 0

    def vector(v) -> np.ndarray:  # type: ignore[no-untyped-def]
        return np.asarray(v.values if v is not None and v.values is not None else [], dtype=np.int64)

    segments = [vector(m.arraySegments) for m in metas]
    indices = [vector(m.arrayIndices) for m in metas]
    path = [0] * len(order)

    def visit(level: int, prev: int) -> None:
        nonlocal cursor
        if level == len(order):
            orig = [0] * rank
            for i in range(rank):
                orig[order[i]] = path[i]
            for i in range(rank, len(order)):
                b = order[i] - rank
                orig[block_map[b]] = orig[block_map[b]] * block_sizes[b] + path[i]
            dense[int(np.dot(orig, strides))] = values[cursor]
            cursor += 1
            return
        meta = metas[level]
        if int(meta.format) == 0:  # DENSE
            size = int(meta.denseSize)
            for i in range(size):
                path[level] = i
                visit(level + 1, prev * size + i)
        else:  # SPARSE_CSR
            seg, idx = segments[level], indices[level]
            if prev + 1 >= len(seg):
                return
            for i in range(int(seg[prev]), int(seg[prev + 1])):
                path[level] = int(idx[i])
                visit(level + 1, i)

    visit(0, 0)
    return dense.reshape(shape)
