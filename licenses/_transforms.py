# Why this is one module: the catalogue of derivative rewrites the evasion suite and the bench draw from; each is a few lines, kept side by side so the suite lists them in one place.
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


# ------------------------------------------------------------------------ graph rewrites (issue #17 suite)


def _all_graphs(graph):  # type: ignore[no-untyped-def]
    """The graph and every subgraph at any depth."""
    from onnx import AttributeProto

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                yield from _all_graphs(sub)


def _weight_initializers(graph):  # type: ignore[no-untyped-def]
    """Float initializers of this graph that are matrices or larger (weights, not biases or shapes)."""
    import onnx

    return [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2]


def wrap_in_if(model: bytes) -> bytes:
    """Move the whole graph (nodes and weights) into both branches of an If on a constant-true condition."""
    import onnx
    from onnx import TensorProto, helper

    proto = _load(model)
    graph = proto.graph
    branches = []
    for tag in ("then", "else"):
        copy = onnx.GraphProto()
        copy.CopyFrom(graph)
        del copy.input[:]
        for out in copy.output:
            copy.node.append(helper.make_node("Identity", [out.name], [f"{tag}_{out.name}"]))
            out.name = f"{tag}_{out.name}"
        copy.name = f"{graph.name}_{tag}"
        branches.append(copy)
    cond = helper.make_node(
        "Constant", [], ["always"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True])
    )
    wrapper = helper.make_node(
        "If", ["always"], [o.name for o in graph.output], then_branch=branches[0], else_branch=branches[1]
    )
    new = helper.make_graph([cond, wrapper], graph.name, list(graph.input), list(graph.output))
    out = helper.make_model(new, opset_imports=list(proto.opset_import))
    out.ir_version = proto.ir_version
    return _save(out)


def split_columns(model: bytes) -> bytes:
    """Every MatMul weight (in, out) becomes two column halves, two MatMuls and a Concat of their outputs."""
    from onnx import helper, numpy_helper

    proto = _load(model)
    for graph in _all_graphs(proto.graph):
        inits = {i.name: i for i in graph.initializer}
        nodes = []
        for node in graph.node:
            w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
            value = numpy_helper.to_array(w) if w is not None else None
            if w is None or value is None or value.ndim != 2 or value.shape[1] < 2:
                nodes.append(node)
                continue
            half = value.shape[1] // 2
            names = [f"{w.name}_cols{j}" for j in (0, 1)]
            graph.initializer.extend(
                [numpy_helper.from_array(value[:, :half].copy(), names[0]),
                 numpy_helper.from_array(value[:, half:].copy(), names[1])]
            )  # fmt: skip
            outs = [f"{node.output[0]}_part{j}" for j in (0, 1)]
            nodes += [
                helper.make_node("MatMul", [node.input[0], names[0]], [outs[0]]),
                helper.make_node("MatMul", [node.input[0], names[1]], [outs[1]]),
                helper.make_node("Concat", outs, [node.output[0]], axis=-1),
            ]
        del graph.node[:]
        graph.node.extend(nodes)
        used = {name for node in graph.node for name in node.input}
        keep = [i for i in graph.initializer if i.name in used or i.name not in inits]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return _save(proto)


def concat_constant_halves(model: bytes) -> bytes:
    """Every weight matrix stored as two row halves joined by a Concat node (the consumer sees one tensor)."""
    from onnx import helper, numpy_helper

    proto = _load(model)
    for graph in _all_graphs(proto.graph):
        concats = []
        for init in list(_weight_initializers(graph)):
            value = numpy_helper.to_array(init)
            half = value.shape[0] // 2
            name = init.name
            graph.initializer.remove(init)
            graph.initializer.extend(
                [numpy_helper.from_array(value[:half].copy(), name + "_a"),
                 numpy_helper.from_array(value[half:].copy(), name + "_b")]
            )  # fmt: skip
            concats.append(helper.make_node("Concat", [name + "_a", name + "_b"], [name], axis=0))
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(concats + nodes)
    return _save(proto)


def weights_via_cast_transpose(model: bytes, *, dtype: str = "float16") -> bytes:
    """Every weight stored transposed, in half precision (fp16 or bf16), reaching its op through
    Cast -> Transpose -> Reshape."""
    import onnx
    from onnx import helper, numpy_helper

    proto = _load(model)
    for graph in _all_graphs(proto.graph):
        prologue = []
        for init in list(_weight_initializers(graph)):
            value = numpy_helper.to_array(init)
            name = init.name
            stored = value.reshape(value.shape[0], -1).T.copy()
            graph.initializer.remove(init)
            if dtype == "bfloat16":
                tensor = helper.make_tensor(
                    name + "_t", onnx.TensorProto.BFLOAT16, stored.shape, stored.astype(np.float32).ravel()
                )
            else:
                tensor = numpy_helper.from_array(stored.astype(np.float16), name + "_t")
            shape = numpy_helper.from_array(np.asarray(value.shape, np.int64), name + "_shape")
            graph.initializer.extend([tensor, shape])
            prologue += [
                helper.make_node("Cast", [name + "_t"], [name + "_f"], to=onnx.TensorProto.FLOAT),
                helper.make_node("Transpose", [name + "_f"], [name + "_ft"], perm=[1, 0]),
                helper.make_node("Reshape", [name + "_ft", name + "_shape"], [name]),
            ]
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(prologue + nodes)
    return _save(proto)


def weights_as_constants(model: bytes) -> bytes:
    """Initializers become Constant nodes; every other weight as a sparse_value attribute (pruned 30 %)."""
    from onnx import helper, numpy_helper

    proto = _load(model)
    for graph in _all_graphs(proto.graph):
        constants = []
        for number, init in enumerate(list(graph.initializer)):
            graph.initializer.remove(init)
            value = numpy_helper.to_array(init)
            if value.ndim == 2 and value.dtype == np.float32 and number % 2:
                cut = np.quantile(np.abs(value), 0.3)
                kept = np.where(np.abs(value) >= cut, value, 0).astype(np.float32)
                flat = np.flatnonzero(kept)
                sparse = helper.make_sparse_tensor(
                    numpy_helper.from_array(kept.ravel()[flat], init.name + "_values"),
                    numpy_helper.from_array(flat.astype(np.int64), init.name + "_indices"),
                    list(value.shape),
                )
                constants.append(helper.make_node("Constant", [], [init.name], sparse_value=sparse))
            else:
                constants.append(helper.make_node("Constant", [], [init.name], value=init))
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(constants + nodes)
    return proto.SerializeToString()  # the checker rejects sparse Constant values ORT accepts


def sparse_initializers(model: bytes, *, sparsity: float = 0.5) -> bytes:
    """Prune every weight matrix and store it as a sparse initializer (COO, linear indices)."""
    from onnx import helper, numpy_helper

    proto = _load(model)
    graph = proto.graph
    for init in list(_weight_initializers(graph)):
        value = numpy_helper.to_array(init)
        cut = np.quantile(np.abs(value), sparsity)
        flat = np.flatnonzero(np.abs(value) >= cut)
        graph.initializer.remove(init)
        graph.sparse_initializer.append(
            helper.make_sparse_tensor(
                numpy_helper.from_array(value.ravel()[flat], init.name),
                numpy_helper.from_array(flat.astype(np.int64), init.name + "_idx"),
                list(value.shape),
            )
        )
    return proto.SerializeToString()


def weights_in_function(model: bytes) -> bytes:
    """Each MatMul with its weight becomes a call to a local function that holds the weight as a Constant."""
    from onnx import helper, numpy_helper

    proto = _load(model)
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    functions, nodes = [], []
    for number, node in enumerate(graph.node):
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is None:
            nodes.append(node)
            continue
        fname = f"Dense{number}"
        body = [
            helper.make_node(
                "Constant", [], ["w"], value=numpy_helper.from_array(numpy_helper.to_array(w), "w")
            ),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ]
        functions.append(
            helper.make_function("local.dense", fname, ["x"], ["y"], body, list(proto.opset_import))
        )
        nodes.append(helper.make_node(fname, [node.input[0]], [node.output[0]], domain="local.dense"))
        graph.initializer.remove(w)
    del graph.node[:]
    graph.node.extend(nodes)
    proto.functions.extend(functions)
    proto.opset_import.append(helper.make_opsetid("local.dense", 1))
    return _save(proto)


def weights_in_loop(model: bytes) -> bytes:
    """The whole computation runs inside a one-iteration Loop; weights are the body's own initializers."""
    import onnx
    from onnx import TensorProto, helper

    proto = _load(model)
    graph = proto.graph
    body = onnx.GraphProto()
    body.CopyFrom(graph)
    del body.input[:]
    body.input.extend(
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])]
    )  # fmt: skip
    del body.output[:]
    body.node.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    outs = [o.name for o in graph.output]
    body.node.extend(helper.make_node("Identity", [o], [f"{o}_scan"]) for o in outs)
    body.output.extend([helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
    body.output.extend(helper.make_tensor_value_info(f"{o}_scan", TensorProto.FLOAT, None) for o in outs)
    consts = [
        helper.make_node(
            "Constant", [], ["trips"], value=helper.make_tensor("n", TensorProto.INT64, [], [1])
        ),
        helper.make_node("Constant", [], ["go"], value=helper.make_tensor("g", TensorProto.BOOL, [], [True])),
    ]
    loop = helper.make_node("Loop", ["trips", "go"], [f"{o}_stacked" for o in outs], body=body)
    squeeze = [
        helper.make_node(
            "Constant", [], ["zero_axis"], value=helper.make_tensor("z", TensorProto.INT64, [1], [0])
        )
    ] + [helper.make_node("Squeeze", [f"{o}_stacked", "zero_axis"], [o]) for o in outs]
    new = helper.make_graph(consts + [loop] + squeeze, graph.name, list(graph.input), list(graph.output))
    out = helper.make_model(new, opset_imports=list(proto.opset_import))
    out.ir_version = proto.ir_version
    return _save(out)


def qdq_weights(model: bytes) -> bytes:
    """int8 per-channel weights behind DequantizeLinear in every graph and subgraph (the QDQ weight layout
    quantizers write), without onnxruntime: works on If/Loop bodies too."""
    from onnx import helper, numpy_helper

    proto = _load(model)
    for graph in _all_graphs(proto.graph):
        prologue = []
        for init in list(_weight_initializers(graph)):
            value = numpy_helper.to_array(init).astype(np.float32)
            axis = value.ndim - 1 if value.ndim == 2 else 0  # MatMul (in, out): per output column
            reduce = tuple(d for d in range(value.ndim) if d != axis)
            scale = np.maximum(np.abs(value).max(axis=reduce), 1e-12) / 127.0
            shape = [1] * value.ndim
            shape[axis] = -1
            q = np.clip(np.rint(value / scale.reshape(shape)), -127, 127).astype(np.int8)
            name = init.name
            graph.initializer.remove(init)
            graph.initializer.extend(
                [numpy_helper.from_array(q, name + "_q"),
                 numpy_helper.from_array(scale.astype(np.float32), name + "_scale"),
                 numpy_helper.from_array(np.zeros(scale.size, np.int8), name + "_zp")]
            )  # fmt: skip
            prologue.append(
                helper.make_node(
                    "DequantizeLinear", [name + "_q", name + "_scale", name + "_zp"], [name], axis=axis
                )
            )
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(prologue + nodes)
    return _save(proto)


def insert_layer(model: bytes, seed: int = 0) -> bytes:
    """Insert a new dense layer (fresh weights) after the first dense layer: a partial derivative."""
    from onnx import helper, numpy_helper

    proto = _load(model)
    graph = proto.graph
    w_first, b_first = _dense_chain(proto)[0]
    tail = b_first.name if b_first is not None else w_first.name
    out = next(n.output[0] for n in graph.node if tail in n.input)
    width = numpy_helper.to_array(w_first).shape[1]
    rng = np.random.default_rng(seed)
    graph.initializer.append(
        numpy_helper.from_array(
            rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32), "inserted_w"
        )
    )
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == out:
                node.input[i] = "inserted_out"
    at = next(i for i, n in enumerate(graph.node) if out in n.output) + 1
    for offset, node in enumerate(
        [helper.make_node("Relu", [out], ["inserted_relu"]),
         helper.make_node("MatMul", ["inserted_relu", "inserted_w"], ["inserted_out"])]
    ):  # fmt: skip
        graph.node.insert(at + offset, node)
    return _save(proto)


def mlp_to_tflite_int8(model: bytes) -> bytes:
    """mlp_to_tflite with int8 per-channel weights (scales in the tensor quantization parameters)."""
    from licenses._formats import _tflite_schema

    s = _tflite_schema()
    root = s.ModelT.InitFromPackedBuf(bytearray(mlp_to_tflite(model)), 0)
    graph = root.subgraphs[0]
    for op in graph.operators:
        if op.opcodeIndex != 0:
            continue
        tensor = graph.tensors[op.inputs[1]]
        buf = root.buffers[tensor.buffer]
        weight = np.frombuffer(bytes(np.asarray(buf.data, np.uint8)), np.float32).reshape(tensor.shape)
        scale = np.maximum(np.abs(weight).max(axis=1), 1e-12) / 127.0
        q = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
        buf.data = np.frombuffer(q.tobytes(), np.uint8)
        tensor.type = s.TensorType.INT8
        quant = s.QuantizationParametersT()
        quant.scale = scale.astype(np.float32).tolist()
        quant.zeroPoint = [0] * scale.size
        quant.quantizedDimension = 0
        tensor.quantization = quant
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tflite_mlp_to_onnx(model: bytes) -> bytes:
    """Convert a TFLite FULLY_CONNECTED chain to ONNX Gemm(transB=1) nodes (weights keep TFLite's (out, in))."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from licenses._formats import _tflite_schema, _tflite_tensor_value

    s = _tflite_schema()
    root = s.ModelT.InitFromPackedBuf(bytearray(model), 0)
    graph = root.subgraphs[0]
    nodes, inits = [], []
    x = "x"
    fcs = [
        op
        for op in graph.operators
        if root.operatorCodes[op.opcodeIndex].builtinCode == s.BuiltinOperator.FULLY_CONNECTED
    ]
    for i, op in enumerate(fcs):
        w_t, b_t = graph.tensors[op.inputs[1]], graph.tensors[op.inputs[2]]
        weight = _tflite_tensor_value(w_t, bytes(np.asarray(root.buffers[w_t.buffer].data, np.uint8)))
        bias = _tflite_tensor_value(b_t, bytes(np.asarray(root.buffers[b_t.buffer].data, np.uint8)))
        inits += [numpy_helper.from_array(np.asarray(weight, np.float32), f"fc{i}.weight"),
                  numpy_helper.from_array(np.asarray(bias, np.float32), f"fc{i}.bias")]  # fmt: skip
        out = f"fc{i}"
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [out], transB=1))
        if (
            op.builtinOptions is not None
            and op.builtinOptions.fusedActivationFunction == s.ActivationFunctionType.RELU
        ):
            nodes.append(helper.make_node("Relu", [out], [out + "_relu"]))
            out += "_relu"
        x = out
    nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=1))
    first_in = np.asarray(graph.tensors[graph.inputs[0]].shape)[-1]
    new = helper.make_graph(
        nodes,
        "from_tflite",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, int(first_in)])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, None])],
        inits,
    )
    out_model = helper.make_model(new, opset_imports=[helper.make_opsetid("", 17)])
    out_model.ir_version = 8
    onnx.checker.check_model(out_model)
    return out_model.SerializeToString()
