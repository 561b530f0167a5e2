"""Derivative generators for evaluating the fingerprint: what a seller could do to hide an open model.

Each takes model bytes and returns new model bytes (ONNX unless stated). Used by bench/licenses.py and
tests/licenses; never by the gate itself. Deterministic for a given seed."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _load(model: bytes):  # type: ignore[no-untyped-def]
    """Parse, moving Constant-node tensors into initializers so weight edits reach every exporter's style."""
    import onnx

    proto = onnx.load_model_from_string(model)
    graph = proto.graph
    constants = [
        n for n in graph.node if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute)
    ]
    for node in constants:
        tensor = next(a.t for a in node.attribute if a.name == "value")
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
    return proto


def _save(proto) -> bytes:  # type: ignore[no-untyped-def]
    import onnx

    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _float_initializers(proto):  # type: ignore[no-untyped-def]
    import onnx

    return [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 1]


def rename_tensors(model: bytes, seed: int = 0) -> bytes:
    """Every initializer, node and intermediate tensor gets a meaningless name; I/O names stay."""
    proto = _load(model)
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    rng = np.random.default_rng(seed)
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = f"t{rng.integers(1 << 40):x}_{len(names)}"
        return names[name]

    for init in graph.initializer:
        init.name = rename(init.name)
    for node in graph.node:
        node.name = rename(node.name or node.output[0])
        for i, name in enumerate(node.input):
            node.input[i] = rename(name)
        for i, name in enumerate(node.output):
            node.output[i] = rename(name)
    for info in graph.value_info:
        info.name = rename(info.name)
    del proto.metadata_props[:]
    proto.producer_name = "renamed"
    return _save(proto)


def reexport_opset(model: bytes, opset: int | None = None) -> bytes:
    """Convert to another default-domain opset with onnx's version converter (default: 13, or 21 if >= 13)."""
    import onnx
    from onnx import version_converter

    proto = _load(model)
    if opset is None:
        current = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        opset = 13 if current < 13 else 21
    converted = version_converter.convert_version(proto, opset)
    onnx.checker.check_model(converted)
    return converted.SerializeToString()


def to_fp16(model: bytes) -> bytes:
    """Store every float weight as float16 behind a Cast node (the usual half-precision export)."""
    import onnx
    from onnx import helper, numpy_helper

    proto = _load(model)
    graph = proto.graph
    casts = []
    for init in _float_initializers(proto):
        if int(np.prod(init.dims)) < 2:
            continue
        value = numpy_helper.to_array(init).astype(np.float16)
        name = init.name
        init.CopyFrom(numpy_helper.from_array(value, name + "_fp16"))
        casts.append(helper.make_node("Cast", [name + "_fp16"], [name], to=onnx.TensorProto.FLOAT))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return _save(proto)


def int8_qdq(model: bytes, calibration: dict[str, np.ndarray], *, per_channel: bool = True) -> bytes:
    """Static int8 quantization in QDQ format with onnxruntime.quantization."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = len(next(iter(calibration.values())))
            self._items = iter([{k: v[i : i + 1] for k, v in calibration.items()} for i in range(n)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self._items, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(model)
        quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8,
        )
        return dst.read_bytes()


def add_noise(model: bytes, *, relative: float = 0.05, seed: int = 0) -> bytes:
    """Synthetic fine-tune: every weight moves by `relative` of its tensor's RMS."""
    from onnx import numpy_helper

    proto = _load(model)
    rng = np.random.default_rng(seed)
    for init in _float_initializers(proto):
        value = numpy_helper.to_array(init)
        if value.ndim < 2:  # biases, BN statistics: a fine-tune keeps variances positive
            continue
        rms = float(np.sqrt(np.mean(np.square(value)))) or 1.0
        moved = value + rng.normal(0.0, relative * rms, value.shape).astype(value.dtype)
        init.CopyFrom(numpy_helper.from_array(moved.astype(value.dtype), init.name))
    return _save(proto)


def prune(model: bytes, *, sparsity: float = 0.5) -> bytes:
    """Zero the smallest-magnitude fraction of each weight matrix (no retraining)."""
    from onnx import numpy_helper

    proto = _load(model)
    for init in _float_initializers(proto):
        value = numpy_helper.to_array(init)
        if value.ndim < 2:
            continue
        cut = np.quantile(np.abs(value), sparsity)
        init.CopyFrom(
            numpy_helper.from_array(np.where(np.abs(value) < cut, 0, value).astype(value.dtype), init.name)
        )
    return _save(proto)


# --------------------------------------------------------------------- dense-chain transforms (MLPs)


def _dense_chain(proto):  # type: ignore[no-untyped-def]
    """[(weight initializer (in, out), bias initializer or None)] for MatMul(+Add) layers in order."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    chain = []
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        bias = None
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = [n for n in users[0].input if n != node.output[0]]
            if other and other[0] in inits:
                bias = inits[other[0]]
        chain.append((inits[node.input[1]], bias))
    for w, b in chain:
        assert numpy_helper.to_array(w).ndim == 2
        assert b is None or numpy_helper.to_array(b).size == numpy_helper.to_array(w).shape[1]
    return chain


def _set(init, value: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    from onnx import numpy_helper

    init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))


def permute_hidden(model: bytes, seed: int = 0) -> bytes:
    """Shuffle the hidden units of every inner dense layer (and the next layer's inputs to match)."""
    from onnx import numpy_helper

    proto = _load(model)
    chain = _dense_chain(proto)
    rng = np.random.default_rng(seed)
    for (w, b), (w_next, _b_next) in zip(chain, chain[1:], strict=False):
        value, nxt = numpy_helper.to_array(w), numpy_helper.to_array(w_next)
        perm = rng.permutation(value.shape[1])
        _set(w, value[:, perm])
        if b is not None:
            bias = numpy_helper.to_array(b)
            _set(b, bias.reshape(-1)[perm].reshape(bias.shape))
        _set(w_next, nxt[perm, :])
    return _save(proto)


def relu_rescale(model: bytes, seed: int = 0) -> bytes:
    """Scale each hidden unit by a random positive factor and undo it in the next layer (ReLU invariance)."""
    from onnx import numpy_helper

    proto = _load(model)
    chain = _dense_chain(proto)
    rng = np.random.default_rng(seed)
    for (w, b), (w_next, _b_next) in zip(chain, chain[1:], strict=False):
        value, nxt = numpy_helper.to_array(w), numpy_helper.to_array(w_next)
        scale = np.exp(rng.uniform(-2.0, 2.0, value.shape[1])).astype(np.float32)
        _set(w, value * scale[None, :])
        if b is not None:
            bias = numpy_helper.to_array(b)
            _set(b, (bias.reshape(-1) * scale).reshape(bias.shape))
        _set(w_next, nxt / scale[:, None])
    return _save(proto)


def append_layer(model: bytes, seed: int = 0) -> bytes:
    """Add a dense layer after the last one (before the softmax): a new head on top of the base."""
    from onnx import helper, numpy_helper

    proto = _load(model)
    graph = proto.graph
    chain = _dense_chain(proto)
    w_last, b_last = chain[-1]
    tail_name = b_last.name if b_last is not None else w_last.name
    last_out = next(n.output[0] for n in graph.node if tail_name in n.input)
    width = numpy_helper.to_array(w_last).shape[1]
    rng = np.random.default_rng(seed)
    new_w = numpy_helper.from_array(rng.normal(0, 0.3, (width, width)).astype(np.float32), "appended_w")
    new_b = numpy_helper.from_array(np.zeros((1, width), np.float32), "appended_b")
    graph.initializer.extend([new_w, new_b])
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == last_out:
                node.input[i] = "appended_out"
    insert_at = next(i for i, n in enumerate(graph.node) if last_out in n.output) + 1
    new_nodes = [
        helper.make_node("Relu", [last_out], ["appended_relu"]),
        helper.make_node("MatMul", ["appended_relu", "appended_w"], ["appended_mm"]),
        helper.make_node("Add", ["appended_mm", "appended_b"], ["appended_out"]),
    ]
    for offset, node in enumerate(new_nodes):
        graph.node.insert(insert_at + offset, node)
    return _save(proto)


def replace_head(model: bytes, seed: int = 0) -> bytes:
    """Remove the last dense layer and train-from-scratch a new one in its place (transfer learning)."""
    from onnx import numpy_helper

    proto = _load(model)
    w_last, b_last = _dense_chain(proto)[-1]
    rng = np.random.default_rng(seed)
    shape = numpy_helper.to_array(w_last).shape
    _set(w_last, rng.normal(0, 0.3, shape))
    if b_last is not None:
        _set(b_last, np.zeros(numpy_helper.to_array(b_last).shape))
    return _save(proto)


def drop_last_layer(model: bytes) -> bytes:
    """Cut the last dense layer off: the model ends at the previous layer's activations."""
    import onnx
    from onnx import helper

    proto = _load(model)
    graph = proto.graph
    w_last, _b = _dense_chain(proto)[-1]
    mm = next(n for n in graph.node if n.op_type == "MatMul" and n.input[1] == w_last.name)
    features = mm.input[0]
    kept = []
    for node in graph.node:
        if node is mm:
            break
        kept.append(node)
    width = onnx.numpy_helper.to_array(next(i for i in graph.initializer if i.name == w_last.name)).shape[0]
    new_graph = helper.make_graph(
        kept + [helper.make_node("Identity", [features], ["features"])],
        graph.name,
        list(graph.input),
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [None, width])],
        [i for i in graph.initializer if i.name != w_last.name],
    )
    new = helper.make_model(new_graph, opset_imports=list(proto.opset_import))
    new.ir_version = proto.ir_version
    used = {name for node in new.graph.node for name in node.input}
    keep_inits = [i for i in new.graph.initializer if i.name in used]
    del new.graph.initializer[:]
    new.graph.initializer.extend(keep_inits)
    return _save(new)


# -------------------------------------------------------------------------------------- ONNX -> TFLite


def mlp_to_tflite(model: bytes) -> bytes:
    """Write a dense MatMul/Add/Relu chain as a TFLite flatbuffer (FULLY_CONNECTED ops + SOFTMAX)."""
    import flatbuffers
    from onnx import numpy_helper

    from licenses._formats import _tflite_schema

    s = _tflite_schema()
    proto = _load(model)
    chain = _dense_chain(proto)
    root = s.ModelT()
    root.version = 3
    root.description = "converted"
    root.buffers = [s.BufferT()]
    root.operatorCodes = []
    for code in (s.BuiltinOperator.FULLY_CONNECTED, s.BuiltinOperator.SOFTMAX):
        oc = s.OperatorCodeT()
        oc.builtinCode = code
        oc.deprecatedBuiltinCode = min(code, 127)
        oc.version = 1
        root.operatorCodes.append(oc)
    graph = s.SubGraphT()
    graph.tensors, graph.operators = [], []

    def tensor(name: str, shape: list[int], data: np.ndarray | None = None) -> int:
        t = s.TensorT()
        t.name, t.shape, t.type = name, shape, s.TensorType.FLOAT32
        if data is None:
            t.buffer = 0
        else:
            buf = s.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data, np.float32).tobytes(), np.uint8)
            root.buffers.append(buf)
            t.buffer = len(root.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    first_in = numpy_helper.to_array(chain[0][0]).shape[0]
    x = tensor("x", [1, first_in])
    graph.inputs = [x]
    for i, (w, b) in enumerate(chain):
        weight = numpy_helper.to_array(w).T  # (out, in)
        bias = (
            numpy_helper.to_array(b).reshape(-1) if b is not None else np.zeros(weight.shape[0], np.float32)
        )
        wt = tensor(f"dense_{i}/kernel", list(weight.shape), weight)
        bt = tensor(f"dense_{i}/bias", [weight.shape[0]], bias)
        out = tensor(f"dense_{i}", [1, weight.shape[0]])
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, [x, wt, bt], [out]
        op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
        opts = s.FullyConnectedOptionsT()
        opts.fusedActivationFunction = (
            s.ActivationFunctionType.RELU if i < len(chain) - 1 else s.ActivationFunctionType.NONE
        )
        op.builtinOptions = opts
        graph.operators.append(op)
        x = out
    probs = tensor("probabilities", [1, graph.tensors[x].shape[1]])
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 1, [x], [probs]
    op.builtinOptionsType = s.BuiltinOptions.SoftmaxOptions
    opts = s.SoftmaxOptionsT()
    opts.beta = 1.0
    op.builtinOptions = opts
    graph.operators.append(op)
    graph.outputs = [probs]
    root.subgraphs = [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# ------------------------------------------------------------------------------------- the catalogue


def onnx_transforms(calibration: dict[str, np.ndarray] | None = None) -> dict[str, Callable[[bytes], bytes]]:
    """Name -> transform for any float ONNX model (conv or dense)."""
    transforms: dict[str, Callable[[bytes], bytes]] = {
        "renamed": rename_tensors,
        "opset_changed": reexport_opset,
        "fp16": to_fp16,
        "finetune_noise": lambda m: add_noise(m, relative=0.05, seed=1),
        "pruned50": lambda m: prune(m, sparsity=0.5),
    }
    if calibration is not None:
        transforms["int8_qdq"] = lambda m: int8_qdq(m, calibration)
    return transforms


def mlp_transforms() -> dict[str, Callable[[bytes], bytes]]:
    """Name -> transform that needs a dense MatMul chain (hidden-unit order and scale, ends)."""
    return {
        "permuted": lambda m: permute_hidden(m, seed=3),
        "relu_rescaled": lambda m: relu_rescale(m, seed=4),
        "permuted_rescaled_renamed": lambda m: rename_tensors(
            relu_rescale(permute_hidden(m, seed=5), seed=6)
        ),
        "layer_appended": lambda m: append_layer(m, seed=7),
        "head_replaced": lambda m: replace_head(m, seed=8),
        "last_layer_dropped": drop_last_layer,
        "to_tflite": mlp_to_tflite,
        "to_tflite_permuted": lambda m: mlp_to_tflite(permute_hidden(m, seed=9)),
    }
