# Why this is one module: one reader per format (ONNX with every subgraph and constant fold, TFLite) producing the same canonical weight layers; the two share the layout rules.
"""Model readers for the compliance gate: detect ONNX or TFLite by content and find every learned tensor.

Weights come from wherever a model keeps them: every ONNX graph at any depth (If/Loop/Scan bodies, inlined
functions), initializers, sparse initializers, Constant nodes, constant-folded Cast/Transpose/Reshape/Concat/
DequantizeLinear chains, and every TFLite subgraph's buffers (fp16, int8 per-tensor and per-channel, sparse).
Each comes out as a float32 array (out_units, in_channels, kernel) in one layout for both formats (recurrent
gates split into one block per gate in a fixed gate order), plus the weight layer feeding its input channels,
and a flag for tensors fixed by construction (DFT/mel bases, positional encodings, grids, fills)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgemart.core.errors import UsageError
from edgemart.core.model_safety import check_model_bytes

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
_MAX_DEPTH = 16  # graph nesting / function inlining depth followed (drm.model_safety caps nesting too)
_MIN_LOOSE_TENSOR = 64  # a constant no known op consumes counts as learned from this many elements


@dataclass
class WeightLayer:
    """One learned tensor: canonical weight (out, in_channels, kernel), its channel source, where it was found."""

    name: str
    kind: str  # "dense" | "conv" | "depthwise" | "tensor" (learned-looking constant no known op consumes)
    weight: np.ndarray
    source: int | None = None
    storage: str = "float32"  # how it was stored: float32, float16, int8-per-channel, sparse, ...
    location: str = "graph"  # graph path: "graph", "graph/If.then_branch", "subgraph 1", ...
    fixed: bool = False  # fixed by construction (DFT/mel basis, positional encoding, grid, fill): no evidence

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
    graphs: int = 1

    @property
    def learned(self) -> list[WeightLayer]:
        return [layer for layer in self.layers if not layer.fixed]

    def summary(self) -> dict[str, Any]:
        """What the reader found, for `index add` reports: learned tensors, parameters, storage formats."""
        learned = self.learned
        return {
            "format": self.format,
            "graphs": self.graphs,
            "learned_tensors": len(learned),
            "parameters": int(sum(layer.weight.size for layer in learned)),
            "fixed_tensors": len(self.layers) - len(learned),
            "storage": sorted({part for layer in learned for part in layer.storage.split("+")}),
            "locations": sorted({layer.location for layer in learned}),
        }


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
        layers, meta, graphs = _read_tflite(model)
    else:
        layers, meta, graphs = _read_onnx(model)
    for layer in layers:
        layer.weight = np.nan_to_num(np.asarray(layer.weight, np.float32))
        layer.fixed = is_fixed_tensor(layer.weight)
    return ParsedModel(format=fmt, sha256=sha, layers=layers, metadata=meta, graphs=graphs)


# ------------------------------------------------------------------------------ tensors fixed by design


def is_fixed_tensor(weight: np.ndarray) -> bool:
    """True for tensors independent models share by construction, which therefore prove no lineage.

    Fills and identities (a handful of distinct values), grids and anchor tables (arithmetic progressions
    along an axis), triangular filter banks (piecewise linear), and sinusoid bases along either axis (DFT/
    STFT kernels, positional encodings). Trained weights are none of these."""
    flat = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    if flat.size == 0 or not np.isfinite(flat).all():
        return True
    if np.unique(flat).size <= min(16, flat.size // 4):
        return True
    for matrix in (flat, flat.T):
        if matrix.shape[1] >= 8 and (_piecewise_linear(matrix) or _sinusoidal(matrix)):
            return True
    return False


def _piecewise_linear(rows: np.ndarray) -> bool:
    """Most second differences along the rows vanish (grids, ramps, triangular filter banks)."""
    second = np.abs(np.diff(rows, n=2, axis=1))
    scale = np.abs(rows).max() or 1.0
    return float(np.mean(second <= 1e-5 * scale)) >= 0.8


def _sinusoidal(rows: np.ndarray) -> bool:
    """Nearly every row puts its energy in a few neighbouring frequency bins (a windowed or plain sinusoid)."""
    rows = rows[np.linalg.norm(rows, axis=1) > 0]
    if rows.shape[0] < 2:
        return False
    power = np.abs(np.fft.rfft(rows, axis=1)) ** 2
    total = power.sum(axis=1)
    peak = np.argmax(power, axis=1)
    band = np.zeros_like(total)
    for offset in (-2, -1, 0, 1, 2):
        idx = peak + offset
        ok = (idx >= 0) & (idx < power.shape[1])
        band[ok] += power[np.nonzero(ok)[0], idx[ok]]
    concentrated = band >= 0.9 * total
    return float(np.mean(concentrated)) >= 0.9 and power.shape[1] >= 12


def _maybe_learned(value: np.ndarray) -> bool:
    """A constant that could be a weight: floating point, a matrix or more, not tiny."""
    return (
        value.dtype.kind == "f"
        and value.ndim >= 2
        and value.size >= _MIN_LOOSE_TENSOR
        and sum(1 for d in value.shape if d > 1) >= 2
    )


# --------------------------------------------------------------------------------------------- ONNX


class _Scope:
    """One ONNX graph's names (initializers, Constant outputs, node outputs), chained to the enclosing graph."""

    def __init__(self, parent: _Scope | None, location: str) -> None:
        self.parent = parent
        self.location = location
        self.raw: dict[str, np.ndarray] = {}
        self.storage: dict[str, str] = {}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        self.aliases: dict[str, str] = {}  # loop-carried inputs that pass through unchanged -> outer name

    def owner(self, name: str) -> _Scope | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.raw or name in scope.producer or name in scope.aliases:
                return scope
            scope = scope.parent
        return None


def _onnx_attr_tensor(attr) -> tuple[np.ndarray | None, str]:  # type: ignore[no-untyped-def]
    """The tensor a Constant-style attribute holds (value, value_float(s), value_int(s), sparse_value)."""
    from onnx import AttributeProto

    if attr.type == AttributeProto.TENSOR:
        return _tensor_array(attr.t), _storage_of(attr.t)
    if attr.type == AttributeProto.SPARSE_TENSOR:
        return _sparse_array(attr.sparse_tensor), "sparse"
    if attr.name == "value_float":
        return np.asarray(attr.f, np.float32), "float32"
    if attr.name == "value_floats":
        return np.asarray(list(attr.floats), np.float32), "float32"
    if attr.name == "value_int":
        return np.asarray(attr.i, np.int64), "int64"
    if attr.name == "value_ints":
        return np.asarray(list(attr.ints), np.int64), "int64"
    return None, ""


def _tensor_array(tensor) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    from onnx import numpy_helper

    try:
        value = numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - onnx raises several types for dtypes it cannot convert
        return None
    if value.dtype.kind == "V" or value.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        value = value.astype(np.float32)
    return np.asarray(value)


def _sparse_array(sparse) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    values = _tensor_array(sparse.values)
    indices = _tensor_array(sparse.indices)
    dims = [int(d) for d in sparse.dims]
    if values is None or indices is None or any(d < 0 for d in dims):
        return None
    dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
    flat_values = values.reshape(-1)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        flat = (
            np.ravel_multi_index(tuple(indices.T.astype(np.int64)), dims) if indices.size else indices[:, 0]
        )
    else:  # [NNZ] linear indices
        flat = indices.astype(np.int64)
    if flat.size != flat_values.size or (flat.size and (flat.min() < 0 or flat.max() >= dense.size)):
        return None
    dense[flat] = flat_values
    return dense.reshape(dims)


def _storage_of(tensor) -> str:  # type: ignore[no-untyped-def]
    from onnx import TensorProto

    names: dict[int, str] = {
        TensorProto.FLOAT: "float32",
        TensorProto.FLOAT16: "float16",
        TensorProto.BFLOAT16: "bfloat16",
        TensorProto.DOUBLE: "float64",
        TensorProto.INT8: "int8",
        TensorProto.UINT8: "uint8",
        TensorProto.INT4: "int4",
        TensorProto.UINT4: "uint4",
    }
    return names.get(int(tensor.data_type), "other")


def _read_onnx(model: bytes) -> tuple[list[WeightLayer], dict[str, str], int]:
    import onnx
    from onnx import AttributeProto

    try:
        proto = onnx.load_model_from_string(model)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
        raise UsageError(f"malformed ONNX model: {exc}") from exc
    functions = {(f.domain, f.name): f for f in proto.functions}
    nodes: list[tuple[Any, _Scope]] = []
    scopes: list[_Scope] = []

    def add_node(node, scope: _Scope) -> None:  # type: ignore[no-untyped-def]
        for out in node.output:
            if out:
                scope.producer[out] = node
        for inp in node.input:
            scope.consumers.setdefault(inp, []).append(node)
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                value, storage = _onnx_attr_tensor(attr)
                if value is not None:
                    scope.raw[node.output[0]] = value
                    scope.storage[node.output[0]] = storage

    def walk(graph, scope: _Scope, depth: int) -> None:  # type: ignore[no-untyped-def]
        scopes.append(scope)
        for init in graph.initializer:
            value = _tensor_array(init)
            if value is not None:
                scope.raw[init.name] = value
                scope.storage[init.name] = _storage_of(init)
        for sparse in graph.sparse_initializer:
            value = _sparse_array(sparse)
            if value is not None:
                scope.raw[sparse.values.name] = value
                scope.storage[sparse.values.name] = "sparse"
        for node in graph.node:
            visit(node, scope, depth, "")

    def visit(node, scope: _Scope, depth: int, prefix: str) -> None:  # type: ignore[no-untyped-def]
        function = functions.get((node.domain, node.op_type))
        if function is not None and depth < _MAX_DEPTH:
            for inner in _inline(node, function, prefix):
                visit(inner, scope, depth + 1, prefix + (node.name or node.output[0]) + "/")
            return
        add_node(node, scope)
        nodes.append((node, scope))
        for attr in node.attribute:
            graphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for sub in graphs:
                if depth >= _MAX_DEPTH:
                    continue
                child = _Scope(scope, f"{scope.location}/{node.op_type}.{attr.name}")
                _alias_carried(node, sub, child)
                walk(sub, child, depth + 1)

    walk(proto.graph, _Scope(None, "graph"), 0)

    memo: dict[tuple[int, str], np.ndarray | None] = {}
    reached: set[tuple[int, str]] = set()
    leaf_storage: dict[tuple[int, str], set[str]] = {}

    def resolve(scope: _Scope, name: str, depth: int = 0) -> tuple[np.ndarray | None, set[str]]:
        owner = scope.owner(name) if name else None
        if owner is None or depth > _MAX_WALK:
            return None, set()
        key = (id(owner), name)
        reached.add(key)
        if name in owner.raw:
            return owner.raw[name], {owner.storage.get(name, "float32")}
        if name in owner.aliases:
            assert owner.parent is not None
            return resolve(owner.parent, owner.aliases[name], depth + 1)
        if key in memo:
            return memo[key], leaf_storage.get(key, set())
        memo[key] = None
        node = owner.producer[name]
        storages: set[str] = set()

        def arg(n: str) -> np.ndarray | None:
            value, found = resolve(owner, n, depth + 1)
            storages.update(found)
            return value

        value = None
        if node.op_type in _ONNX_FOLDABLE:
            try:
                value = _onnx_fold(node, arg, list(node.output).index(name))
            except (ValueError, IndexError, TypeError, KeyError):
                value = None
        if value is not None and node.op_type in ("DequantizeLinear", "QLinearMatMul"):
            scale = arg(node.input[1])
            per_channel = scale is not None and np.size(scale) > 1
            storages = {s + ("-per-channel" if per_channel else "") for s in storages}
        memo[key] = value
        leaf_storage[key] = storages
        return value, storages

    layers: list[WeightLayer] = []
    layer_of_output: dict[tuple[int, str], int] = {}
    data_input: list[tuple[_Scope, str]] = []
    for node, scope in nodes:
        found: set[str] = set()

        def const(name: str, scope: _Scope = scope, found: set[str] = found) -> np.ndarray | None:
            value, storages = resolve(scope, name)
            if value is not None:
                found.update(storages)
            return value

        for weight, kind, x_name, suffix in _onnx_weights(node, const):
            out_name = node.output[0] if node.output else ""
            if suffix == "" and kind != "recurrent":
                weight, out_name = _fold_bn(weight, out_name, scope.consumers, const)
                layer_of_output[(id(scope), out_name)] = len(layers)
                layer_of_output[(id(scope), node.output[0])] = len(layers)
            label = (node.name or node.output[0]) + suffix
            layers.append(
                WeightLayer(
                    name=label,
                    kind="dense" if kind == "recurrent" else kind,
                    weight=weight,
                    storage="+".join(sorted(found)) or "float32",
                    location=scope.location,
                )
            )
            data_input.append((scope, x_name))

    # Learned tensors no recognised op consumes (custom ops, Einsum, elementwise tricks): kept as raw rows.
    for scope in scopes:
        for name, value in scope.raw.items():
            if (id(scope), name) in reached or not _maybe_learned(value):
                continue
            weight = np.asarray(value, np.float32)
            layers.append(
                WeightLayer(
                    name=name,
                    kind="tensor",
                    weight=weight.reshape(weight.shape[0], -1, 1),
                    storage=scope.storage.get(name, "float32"),
                    location=scope.location,
                )
            )
            data_input.append((scope, ""))

    def source_of(scope: _Scope, tensor: str) -> int | None:
        seen: set[tuple[int, str]] = set()
        frontier = [(scope, tensor)]
        while frontier and len(seen) < _MAX_WALK:
            cur_scope, name = frontier.pop(0)
            owner = cur_scope.owner(name) if name else None
            if owner is None or (id(owner), name) in seen:
                continue
            seen.add((id(owner), name))
            if (id(owner), name) in layer_of_output:
                return layer_of_output[(id(owner), name)]
            node = owner.producer.get(name)
            if node is None or node.op_type not in _ONNX_CHANNEL_PRESERVING:
                continue
            frontier.extend((owner, i) for i in node.input if i and resolve(owner, i)[0] is None)
        return None

    for index, (scope, x_name) in enumerate(data_input):
        if x_name:
            layers[index].source = source_of(scope, x_name)

    meta: dict[str, str] = {}
    if proto.producer_name:
        meta["producer_name"] = proto.producer_name
    if proto.producer_version:
        meta["producer_version"] = proto.producer_version
    if proto.doc_string:
        meta["doc_string"] = proto.doc_string
    if proto.graph.doc_string:
        meta["graph_doc_string"] = proto.graph.doc_string
    for prop in proto.metadata_props:
        meta[prop.key] = prop.value
    return layers, meta, len(scopes)


def _inline(call, function, prefix: str) -> list[Any]:  # type: ignore[no-untyped-def]
    """The function body with its formal inputs/outputs renamed to the call's and its internals prefixed."""
    import onnx

    tag = prefix + (call.name or call.output[0]) + "::"
    names = dict(zip(function.input, call.input, strict=False))
    names.update(dict(zip(function.output, call.output, strict=False)))
    body = []
    for node in function.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, n in enumerate(copy.input):
            copy.input[i] = names.get(n, tag + n if n else n)
        for i, n in enumerate(copy.output):
            copy.output[i] = names.get(n, tag + n if n else n)
        body.append(copy)
    return body


def _alias_carried(node, body, scope: _Scope) -> None:  # type: ignore[no-untyped-def]
    """Loop/Scan state a body passes through unchanged is the outer constant: let the body see it."""
    if node.op_type == "Loop":
        formal, actual, skip_out = list(body.input)[2:], list(node.input)[2:], 1
    elif node.op_type == "Scan":
        n_state = len(node.input) - next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
        formal, actual, skip_out = list(body.input)[:n_state], list(node.input)[:n_state], 0
    else:
        return
    outputs = [o.name for o in body.output][skip_out:]
    identity = {n.output[0]: n.input[0] for n in body.node if n.op_type == "Identity" and n.input}
    for i, (inner, outer) in enumerate(zip(formal, actual, strict=False)):
        name = inner.name
        if i < len(outputs) and outer and (outputs[i] == name or identity.get(outputs[i]) == name):
            scope.aliases[name] = outer


_ONNX_FOLDABLE = frozenset(
    {
        "Identity", "Cast", "CastLike", "DequantizeLinear", "QuantizeLinear", "Transpose", "Reshape",
        "Unsqueeze", "Squeeze", "Flatten", "Concat", "Split", "Slice", "Mul", "Div", "Add", "Sub", "Neg",
    }
)  # fmt: skip


def _onnx_fold(node, const, output: int = 0) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    """Constant-fold the ops that sit between a stored weight and its consumer (output `output` of node)."""
    op = node.op_type
    attrs = {a.name: a for a in node.attribute}
    inputs = list(node.input)
    first = const(inputs[0]) if inputs and inputs[0] else None
    if first is None:
        return None
    if op == "Identity":
        return first
    if op in ("Cast", "CastLike"):
        return np.asarray(first, np.float32) if first.dtype.kind == "f" else first
    if op == "DequantizeLinear":
        scale = const(inputs[1])
        if scale is None:
            return None
        zero = const(inputs[2]) if len(inputs) > 2 and inputs[2] else None
        axis = attrs["axis"].i if "axis" in attrs else 1
        block = attrs["block_size"].i if "block_size" in attrs else 0
        return _dequantize(first, scale, zero, axis, block)
    if op == "QuantizeLinear":
        scale = const(inputs[1])
        if scale is None:
            return None
        axis = attrs["axis"].i if "axis" in attrs else 1
        zero = const(inputs[2]) if len(inputs) > 2 and inputs[2] else None
        dtype = zero.dtype if zero is not None else np.uint8
        info = np.iinfo(dtype)
        scale = np.asarray(scale, np.float32)
        zp = np.zeros_like(scale) if zero is None else np.asarray(zero, np.float32)
        if scale.size > 1:
            shape = [1] * first.ndim
            shape[axis % first.ndim] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        q = np.rint(np.asarray(first, np.float32) / scale) + zp
        return np.clip(q, info.min, info.max).astype(dtype)
    if op == "Transpose":
        perm = list(attrs["perm"].ints) if "perm" in attrs else None
        return np.transpose(first, perm)
    if op == "Reshape":
        shape = const(inputs[1])
        if shape is None:
            return None
        dims = [int(d) for d in np.asarray(shape).reshape(-1)]
        dims = [first.shape[i] if d == 0 and i < first.ndim else d for i, d in enumerate(dims)]
        return np.reshape(first, dims)
    if op == "Flatten":
        axis = attrs["axis"].i if "axis" in attrs else 1
        axis %= max(first.ndim, 1)
        return first.reshape(int(np.prod(first.shape[:axis])), -1)
    if op in ("Unsqueeze", "Squeeze"):
        axes = list(attrs["axes"].ints) if "axes" in attrs else None
        if axes is None and len(inputs) > 1 and inputs[1]:
            value = const(inputs[1])
            axes = None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
        if op == "Squeeze":
            return np.squeeze(first, axis=tuple(axes)) if axes else np.squeeze(first)
        if axes is None:
            return None
        out = first
        for a in sorted(a % (first.ndim + len(axes)) for a in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Concat":
        parts = [const(i) for i in inputs]
        if any(p is None for p in parts):
            return None
        return np.concatenate(parts, axis=attrs["axis"].i)  # type: ignore[arg-type]
    if op == "Split":
        axis = attrs["axis"].i if "axis" in attrs else 0
        sizes = list(attrs["split"].ints) if "split" in attrs else None
        if sizes is None and len(inputs) > 1 and inputs[1]:
            value = const(inputs[1])
            sizes = None if value is None else [int(s) for s in np.asarray(value).reshape(-1)]
        if sizes is None:
            return np.array_split(first, len(node.output), axis=axis)[output]
        return np.split(first, np.cumsum(sizes)[:-1], axis=axis)[output]
    if op == "Slice":
        starts, ends = const(inputs[1]), const(inputs[2])
        if starts is None or ends is None:
            return None
        given_axes = const(inputs[3]) if len(inputs) > 3 and inputs[3] else None
        given_steps = const(inputs[4]) if len(inputs) > 4 and inputs[4] else None
        slice_axes = np.arange(len(starts)) if given_axes is None else given_axes
        slice_steps = np.ones(len(starts), np.int64) if given_steps is None else given_steps
        index = [slice(None)] * first.ndim
        for s, e, a, st in zip(starts, ends, slice_axes, slice_steps, strict=True):
            index[int(a)] = slice(int(s), int(e), int(st))
        return first[tuple(index)]
    if op == "Neg":
        return -first
    if op in ("Mul", "Div", "Add", "Sub"):
        second = const(inputs[1]) if len(inputs) > 1 else None
        if second is None:
            return None
        a, b = np.asarray(first, np.float32), np.asarray(second, np.float32)
        return {"Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract}[op](a, b)
    return None


def _dequantize(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int = 0
) -> np.ndarray:
    q = q.astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.zeros_like(scale) if zero is None else np.asarray(zero, dtype=np.float32)
    if scale.ndim == 0 or scale.size == 1:
        return (q - zp.reshape(())) * scale.reshape(())
    axis %= q.ndim
    if block and scale.ndim == q.ndim:  # blocked quantization: repeat each scale over its block
        scale = np.repeat(scale, block, axis=axis)[tuple(slice(0, d) for d in q.shape)]
        zp = np.repeat(zp, block, axis=axis)[tuple(slice(0, d) for d in q.shape)]
        return (q - zp) * scale
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q - zp.reshape(shape)) * scale.reshape(shape)


# ONNX recurrent gate orders -> one canonical order per op (LSTM i,f,c,o as PyTorch writes it; GRU z,r,h).
_GATES = {"LSTM": ("i", "o", "f", "c"), "GRU": ("z", "r", "h"), "RNN": ("h",)}
_CANONICAL_GATES = {"LSTM": ("i", "f", "c", "o"), "GRU": ("z", "r", "h"), "RNN": ("h",)}


def _onnx_weights(node, const) -> list[tuple[np.ndarray, str, str, str]]:  # type: ignore[no-untyped-def]
    """[(canonical weight, kind, activation input, name suffix)] for a weight-bearing node."""
    op = node.op_type
    if op in _GATES:
        out = []
        gates = _GATES[op]
        for slot, what in ((1, "W"), (2, "R")):
            w = const(node.input[slot]) if len(node.input) > slot and node.input[slot] else None
            if w is None or w.ndim != 3 or w.shape[1] % len(gates):
                continue
            hidden = w.shape[1] // len(gates)
            for direction in range(w.shape[0]):
                blocks = dict(
                    zip(gates, np.split(np.asarray(w[direction], np.float32), len(gates)), strict=True)
                )
                for gate in _CANONICAL_GATES[op]:
                    block = blocks[gate].reshape(hidden, -1)[:, :, None]
                    out.append((block, "recurrent", node.input[0], f":{what}[{direction}].{gate}"))
        return out
    weight, kind, x_name = _onnx_weight(node, const)
    return [] if weight is None else [(weight, kind, x_name, "")]


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
        if w is None and op == "MatMul" and len(inputs) > 1:  # W @ x: the stored matrix is already (out, in)
            w, x_name = const(inputs[0]), inputs[1]
            if w is None or w.ndim != 2 or const(x_name) is not None:
                return None, "", ""
            return np.asarray(w, np.float32)[:, :, None], "dense", x_name
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
_TFLITE_STORAGE = {0: "float32", 1: "float16", 3: "uint8", 7: "int16", 9: "int8"}
_TFLITE_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D")
# Input slots of the LSTM ops that hold input->gate (1..4) and recurrent->gate (5..8) weights, gates i,f,c,o.
_TFLITE_LSTM = ("LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM")
_TFLITE_LSTM_SLOTS = ((1, "W", "i"), (2, "W", "f"), (3, "W", "c"), (4, "W", "o"),
                      (5, "R", "i"), (6, "R", "f"), (7, "R", "c"), (8, "R", "o"))  # fmt: skip


def _read_tflite(model: bytes) -> tuple[list[WeightLayer], dict[str, str], int]:
    schema = _tflite_schema()
    try:
        root = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    except Exception as exc:  # noqa: BLE001 - flatbuffers raises bare errors on garbage
        raise UsageError(f"malformed TFLite model: {exc}") from exc
    if not root.subgraphs:
        raise UsageError("malformed TFLite model: no subgraphs")
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

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

    layers: list[WeightLayer] = []
    for number, graph in enumerate(root.subgraphs):
        location = "graph" if number == 0 else f"subgraph {number}"
        layers.extend(_tflite_subgraph(graph, location, op_name, buffer_bytes))

    meta: dict[str, str] = {}
    if root.description:
        meta["description"] = _decode(root.description)
    for entry in root.metadata or []:
        key = _decode(entry.name)
        meta[key] = _printable_text(buffer_bytes(entry.buffer))
    return layers, meta, len(root.subgraphs)


def _tflite_subgraph(graph, location: str, op_name, buffer_bytes) -> list[WeightLayer]:  # type: ignore[no-untyped-def]
    tensors = graph.tensors or []
    ops = graph.operators or []
    producer: dict[int, int] = {}
    for i, op in enumerate(ops):
        for out in op.outputs if op.outputs is not None else []:
            producer[int(out)] = i

    memo: dict[int, tuple[np.ndarray | None, str]] = {}
    reached: set[int] = set()

    def const_storage(t: int, depth: int = 0) -> tuple[np.ndarray | None, str]:
        if t < 0 or t >= len(tensors):
            return None, ""
        reached.add(t)
        if t in memo:
            return memo[t]
        memo[t] = (None, "")
        tensor = tensors[t]
        data = buffer_bytes(tensor.buffer)
        result: tuple[np.ndarray | None, str] = (None, "")
        if data:
            result = (_tflite_tensor_value(tensor, data), _tflite_storage(tensor))
        elif t in producer and depth < _MAX_WALK:
            op = ops[producer[t]]
            name = op_name(op)
            args = [int(i) for i in op.inputs] if op.inputs is not None else []
            if name in ("DEQUANTIZE", "DENSIFY", "CAST") and args:
                value, storage = const_storage(args[0], depth + 1)
                result = (None if value is None else value.astype(np.float32), storage)
            elif name in ("TRANSPOSE", "RESHAPE") and len(args) >= 2:
                value, storage = const_storage(args[0], depth + 1)
                second, _ = const_storage(args[1], depth + 1)
                if value is not None and second is not None:
                    dims = [int(d) for d in np.asarray(second).reshape(-1)]
                    try:
                        folded = np.transpose(value, dims) if name == "TRANSPOSE" else value.reshape(dims)
                        result = (folded, storage)
                    except ValueError:
                        result = (None, "")
        memo[t] = result
        return result

    def const(t: int) -> np.ndarray | None:
        return const_storage(t)[0]

    layers: list[WeightLayer] = []
    layer_of_tensor: dict[int, int] = {}
    data_input: list[int] = []
    for op in ops:
        name = op_name(op)
        inputs = [int(i) for i in op.inputs] if op.inputs is not None else []
        if name in _TFLITE_LSTM:
            for slot, what, gate in _TFLITE_LSTM_SLOTS:
                if slot >= len(inputs):
                    continue
                w, storage = const_storage(inputs[slot])
                if w is None or w.ndim != 2:
                    continue
                label = f"{_decode(tensors[int(op.outputs[0])].name)}:{what}.{gate}"
                layers.append(
                    WeightLayer(
                        label, "dense", np.asarray(w, np.float32)[:, :, None], None, storage, location
                    )
                )
                data_input.append(-1)
            continue
        if name not in _TFLITE_WEIGHT_OPS:
            continue
        w_index, x_index = (1, 2) if name == "TRANSPOSE_CONV" else (1, 0)
        if len(inputs) <= max(w_index, x_index):
            continue
        w, storage = const_storage(inputs[w_index])
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
        layers.append(WeightLayer(_decode(tensors[out_t].name), kind, canon, None, storage, location))
        data_input.append(inputs[x_index])

    for t, tensor in enumerate(tensors):
        if t in reached or tensor.buffer <= 0:
            continue
        value, storage = const_storage(t)
        if value is None or not _maybe_learned(np.asarray(value, np.float32)):
            continue
        value = np.asarray(value, np.float32)
        layers.append(
            WeightLayer(
                _decode(tensor.name), "tensor", value.reshape(value.shape[0], -1, 1), None, storage, location
            )
        )
        data_input.append(-1)

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
        if t >= 0:
            layers[index].source = source_of(t)
    return layers


def _tflite_storage(tensor) -> str:  # type: ignore[no-untyped-def]
    storage = _TFLITE_STORAGE.get(int(tensor.type), "other")
    q = tensor.quantization
    if storage in ("int8", "uint8", "int16") and q is not None and q.scale is not None and len(q.scale) > 1:
        storage += "-per-channel"
    if tensor.sparsity is not None:
        storage = "sparse-" + storage
    return storage


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
