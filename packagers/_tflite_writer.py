"""A minimal ONNX -> full-integer int8 TFLite writer for dense classifiers (MLPs).

Covers MatMul/Gemm(+Add)(+Relu), Relu, Softmax, ArgMax and the identity-like glue skl2onnx emits
(Cast, Identity, Reshape, ArrayFeatureExtractor over arange classes). Anything else is a UsageError."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edgemart.core.errors import UsageError

CONVERTER_HINT = (
    "is outside the in-house writer (dense classifiers only): convert the model to a full-int8 TFLite "
    "(onnx2tf -i MODEL.onnx -oiqt, in its own environment), then: "
    "edgemart package MODEL_full_integer_quant.tflite --target coral-edgetpu"
)
SUPPORTED_ONNX_OPS = ("MatMul", "Gemm", "Add", "Relu", "Softmax", "ArgMax", "Cast", "Identity", "Reshape",
                      "ArrayFeatureExtractor")  # fmt: skip


@dataclass
class _Layer:
    kind: str  # "fc" | "relu" | "softmax" | "argmax"
    inputs: list[str]
    output: str  # ONNX tensor whose values this layer produces
    weight: np.ndarray | None = None  # [out, in]
    bias: np.ndarray | None = None
    fused_relu: bool = False
    nodes: list[str] = field(default_factory=list)


def lower_onnx(proto) -> tuple[list[_Layer], dict[str, str]]:
    """The ONNX graph as TFLite-shaped layers, plus aliases (tensor -> the tensor it equals)."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    graph_outputs = {o.name for o in proto.graph.output}
    alias: dict[str, str] = {}
    layers: list[_Layer] = []
    done: set[int] = set()

    def real(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    def sole_consumer(name: str, op_type: str):
        users = consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == op_type and name not in graph_outputs:
            return users[0]
        return None

    def attr(node, name, default):
        for a in node.attribute:
            if a.name == name:
                return a.i if a.type == a.INT else a.f if a.type == a.FLOAT else default
        return default

    def unsupported(node, why: str = "") -> UsageError:
        detail = f" ({why})" if why else ""
        return UsageError(f"coral-edgetpu conversion of op {node.op_type}{detail} {CONVERTER_HINT}")

    foreign = sorted({n.op_type for n in proto.graph.node} - set(SUPPORTED_ONNX_OPS))
    if foreign:
        raise UsageError(f"coral-edgetpu conversion of op {', '.join(foreign)} {CONVERTER_HINT}")
    for node in proto.graph.node:
        if id(node) in done:
            continue
        op = node.op_type
        if op in ("Identity",) or (op == "Cast" and attr(node, "to", 0) in (1, 7)):
            alias[node.output[0]] = node.input[0]  # float->float cast, or int64 label cast (ARG_MAX is int64)
        elif op == "Reshape":
            shape = inits.get(node.input[1])
            if shape is None or list(shape) != [-1]:
                raise unsupported(node, "only the label flattening Reshape(-1) is handled")
            alias[node.output[0]] = node.input[0]
        elif op == "ArrayFeatureExtractor":
            classes = inits.get(node.input[0])
            if classes is None or not np.array_equal(classes.ravel(), np.arange(classes.size)):
                raise unsupported(node, "only class ids 0..N-1 are handled")
            alias[node.output[0]] = node.input[1]
        elif op in ("MatMul", "Gemm"):
            a, b = node.input[0], node.input[1]
            if b not in inits:
                raise unsupported(node, "weights must be constant")
            w = inits[b].astype(np.float32)
            bias = None
            if op == "Gemm":
                if (
                    attr(node, "transA", 0)
                    or attr(node, "alpha", 1.0) != 1.0
                    or attr(node, "beta", 1.0) != 1.0
                ):
                    raise unsupported(node, "transA/alpha/beta")
                w = w if attr(node, "transB", 0) else w.T
                if len(node.input) > 2 and node.input[2]:
                    bias = inits[node.input[2]].astype(np.float32).ravel()
            else:
                if w.ndim != 2:
                    raise unsupported(node, "only 2-D weights")
                w = w.T
            out = node.output[0]
            names = [node.name]
            add = sole_consumer(out, "Add") if bias is None else None
            if add is not None:
                other = add.input[1] if add.input[0] == out else add.input[0]
                if other in inits:
                    bias = inits[other].astype(np.float32).ravel()
                    done.add(id(add))
                    out, names = add.output[0], [*names, add.name]
            relu = sole_consumer(out, "Relu")
            fused = relu is not None
            if relu is not None:
                done.add(id(relu))
                out, names = relu.output[0], [*names, relu.name]
            if bias is None:
                bias = np.zeros(w.shape[0], np.float32)
            layers.append(_Layer("fc", [real(a)], out, w, bias, fused, names))
        elif op == "Relu":
            layers.append(_Layer("relu", [real(node.input[0])], node.output[0], nodes=[node.name]))
        elif op == "Softmax":
            if attr(node, "axis", -1) not in (-1, 1):
                raise unsupported(node, "only the last axis")
            layers.append(_Layer("softmax", [real(node.input[0])], node.output[0], nodes=[node.name]))
        elif op == "ArgMax":
            if attr(node, "axis", 0) not in (-1, 1) or attr(node, "select_last_index", 0):
                raise unsupported(node, "only the last axis")
            layers.append(_Layer("argmax", [real(node.input[0])], node.output[0], nodes=[node.name]))
        else:
            raise unsupported(node)
    return layers, alias


def _affine_params(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 scale/zero point for a range (always including 0, as TFLite requires)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = int(np.clip(round(-128 - lo / scale), -128, 127))
    return float(scale), zero


def write_int8_tflite(proto, ranges: Mapping[str, tuple[float, float]], input_shapes: Mapping) -> bytes:
    """Serialize the lowered graph as a full-integer TFLite flatbuffer with float I/O at the edges."""
    import flatbuffers

    from packagers._model import tflite_schema

    s = tflite_schema()
    layers, alias = lower_onnx(proto)
    model = s.ModelT()
    model.version = 3
    model.description = "edgemart coral-edgetpu int8"
    model.buffers = [s.BufferT()]
    graph = s.SubGraphT()
    graph.tensors, graph.operators, graph.inputs, graph.outputs = [], [], [], []
    opcodes: dict[int, int] = {}
    model.operatorCodes = []
    tensor_of: dict[str, int] = {}  # ONNX tensor name -> TFLite tensor index
    qparams: dict[str, tuple[float, int]] = {}

    def real(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    def add_tensor(name, shape, dtype, scale=None, zero=None, data: np.ndarray | None = None, signature=None):
        t = s.TensorT()
        t.name = name
        t.shape = list(shape)
        if signature is not None:
            t.shapeSignature = list(signature)
        t.type = dtype
        t.buffer = 0
        if data is not None:
            buf = s.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            model.buffers.append(buf)
            t.buffer = len(model.buffers) - 1
        if scale is not None:
            q = s.QuantizationParametersT()
            q.scale = list(np.atleast_1d(np.asarray(scale, np.float32)))
            q.zeroPoint = list(np.atleast_1d(np.asarray(zero, np.int64)))
            t.quantization = q
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    def add_op(code: int, version: int, inputs, outputs, options_type=0, options=None):
        if code not in opcodes:
            oc = s.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = version
            model.operatorCodes.append(oc)
            opcodes[code] = len(model.operatorCodes) - 1
        op = s.OperatorT()
        op.opcodeIndex = opcodes[code]
        op.inputs, op.outputs = list(inputs), list(outputs)
        op.builtinOptionsType = options_type
        op.builtinOptions = options
        graph.operators.append(op)

    def batch_shape(rest):
        return [1, *rest], [-1, *rest]

    B, Opt = s.BuiltinOperator, s.BuiltinOptions
    for inp in proto.graph.input:
        if inp.name not in input_shapes:
            continue
        rest = list(input_shapes[inp.name][1:])
        shape, sig = batch_shape(rest)
        f_idx = add_tensor(inp.name, shape, s.TensorType.FLOAT32, signature=sig)
        graph.inputs.append(f_idx)
        scale, zero = _affine_params(*ranges[inp.name])
        q_idx = add_tensor(f"{inp.name}/int8", shape, s.TensorType.INT8, scale, zero, signature=sig)
        add_op(B.QUANTIZE, 2, [f_idx], [q_idx], Opt.QuantizeOptions, s.QuantizeOptionsT())
        tensor_of[inp.name], qparams[inp.name] = q_idx, (scale, zero)

    for layer in layers:
        src = real(layer.inputs[0])
        in_idx = tensor_of[src]
        in_scale, _ = qparams.get(src, (1.0, 0))
        width = graph.tensors[in_idx].shape[-1]
        if layer.kind == "fc":
            w = layer.weight
            w_scale = float(np.max(np.abs(w))) / 127.0 or 1.0
            w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
            b_scale = in_scale * w_scale
            b_q = np.round(layer.bias / b_scale).astype(np.int32)
            w_idx = add_tensor(f"{layer.output}/weights", w.shape, s.TensorType.INT8, w_scale, 0, w_q)
            b_idx = add_tensor(f"{layer.output}/bias", b_q.shape, s.TensorType.INT32, b_scale, 0, b_q)
            scale, zero = _affine_params(*ranges[layer.output])
            shape, sig = batch_shape([w.shape[0]])
            out_idx = add_tensor(layer.output, shape, s.TensorType.INT8, scale, zero, signature=sig)
            opts = s.FullyConnectedOptionsT()
            opts.fusedActivationFunction = s.ActivationFunctionType.RELU if layer.fused_relu else 0
            add_op(B.FULLY_CONNECTED, 4, [in_idx, w_idx, b_idx], [out_idx], Opt.FullyConnectedOptions, opts)
        elif layer.kind == "relu":
            scale, zero = qparams[src]
            shape, sig = batch_shape([width])
            out_idx = add_tensor(layer.output, shape, s.TensorType.INT8, scale, zero, signature=sig)
            add_op(B.RELU, 2, [in_idx], [out_idx])
        elif layer.kind == "softmax":
            scale, zero = 1.0 / 256.0, -128  # TFLite's fixed int8 softmax output quantization
            shape, sig = batch_shape([width])
            out_idx = add_tensor(layer.output, shape, s.TensorType.INT8, scale, zero, signature=sig)
            opts = s.SoftmaxOptionsT()
            opts.beta = 1.0
            add_op(B.SOFTMAX, 2, [in_idx], [out_idx], Opt.SoftmaxOptions, opts)
        else:  # argmax over the last axis, int64 class ids
            axis_idx = add_tensor(
                f"{layer.output}/axis", [1], s.TensorType.INT32, data=np.array([1], np.int32)
            )
            shape, sig = batch_shape([])
            out_idx = add_tensor(layer.output, shape, s.TensorType.INT64, signature=sig)
            opts = s.ArgMaxOptionsT()
            opts.outputType = s.TensorType.INT64
            add_op(B.ARG_MAX, 2, [in_idx, axis_idx], [out_idx], Opt.ArgMaxOptions, opts)
            scale = zero = None
        tensor_of[layer.output] = out_idx
        if scale is not None:
            qparams[layer.output] = (scale, zero)

    for out in proto.graph.output:
        src = real(out.name)
        if src not in tensor_of:
            raise UsageError(
                f"coral-edgetpu conversion: output {out.name!r} is not produced by a converted op"
            )
        idx = tensor_of[src]
        t = graph.tensors[idx]
        if t.type == s.TensorType.INT8:
            f_idx = add_tensor(out.name, t.shape, s.TensorType.FLOAT32, signature=t.shapeSignature)
            add_op(B.DEQUANTIZE, 2, [idx], [f_idx], Opt.DequantizeOptions, s.DequantizeOptionsT())
            graph.outputs.append(f_idx)
        else:
            t.name = out.name  # int64 label: exposed under the ONNX output name
            graph.outputs.append(idx)
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
