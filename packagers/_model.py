"""Model format detection by content and the input/output signature of ONNX and TFLite models.

Owns `inspect_model` and the one place where ONNX bytes are parsed and checked."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from edgemart.core.errors import UsageError
from edgemart.core.model_safety import check_model_bytes

TFLITE_IDENTIFIER = b"TFL3"
# Oldest default-domain opset we accept; ORT's quantizer and version converter handle >= 7.
MIN_ONNX_OPSET = 7


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, shape (None = dynamic dim) and numpy dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    dim_names: tuple[str | None, ...] = ()  # ONNX dim_param of each dynamic dim (None when unnamed)

    def shape_text(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ModelInfo:
    """What `inspect_model` learns from the bytes alone."""

    format: str  # "onnx" | "tflite"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    size: int
    opsets: dict[str, int] = field(default_factory=dict)  # ONNX only: domain -> version
    op_counts: dict[str, int] = field(default_factory=dict)  # op type (ONNX) or builtin name (TFLite)
    quantized: bool = False  # TFLite: every op works on int8/uint8 tensors; ONNX: QDQ / QLinear int8 ops

    @property
    def default_opset(self) -> int | None:
        return self.opsets.get("") if self.format == "onnx" else None

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise UsageError(f"model has no input '{name}' (inputs: {', '.join(s.name for s in self.inputs)})")

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "size": self.size,
            "opsets": dict(self.opsets),
            "op_counts": dict(self.op_counts),
            "quantized": self.quantized,
        }


def detect_format(model: bytes) -> str:
    if not isinstance(model, bytes | bytearray | memoryview):
        raise UsageError(f"model must be bytes, got {type(model).__name__}")
    if len(model) == 0:
        raise UsageError("model file is empty")
    if len(model) >= 8 and bytes(model[4:8]) == TFLITE_IDENTIFIER:
        return "tflite"
    return "onnx"


def inspect_model(model: bytes) -> ModelInfo:
    """Detect ONNX vs TFLite by content and read the signature; UsageError with a precise reason otherwise."""
    if detect_format(model) == "tflite":
        return _inspect_tflite(bytes(model))
    return _inspect_onnx(parse_onnx(bytes(model)), len(model))


def parse_onnx(model: bytes):  # -> onnx.ModelProto
    """Parse and check ONNX bytes; every failure is a one-line UsageError.

    The model-safety walk runs first: nothing below may see a model that points at files outside itself."""
    import onnx
    from google.protobuf.message import DecodeError

    check_model_bytes(model)
    try:
        proto = onnx.load_model_from_string(model)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise UsageError(
            f"not a model: neither ONNX (protobuf parse failed: {exc}) nor TFLite (no 'TFL3' identifier)"
        ) from None
    # Protobuf parses many random byte strings "successfully" into an empty message.
    if proto.ir_version <= 0 or not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise UsageError("not a model: no ONNX graph with nodes and no TFLite 'TFL3' identifier")
    opsets = {imp.domain if imp.domain != "ai.onnx" else "": imp.version for imp in proto.opset_import}
    default = opsets.get("")
    max_opset = onnx.defs.onnx_opset_version()
    if default is None:
        raise UsageError("ONNX model imports no default-domain (ai.onnx) opset")
    if default < MIN_ONNX_OPSET or default > max_opset:
        raise UsageError(
            f"unsupported ONNX opset {default}: edgemart handles ai.onnx opsets {MIN_ONNX_OPSET}..{max_opset}"
        )
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "validation error"
        raise UsageError(f"ONNX checker rejected the model: {first}") from None
    return proto


def _onnx_dtype(elem_type: int) -> str:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError):
        return f"onnx_type_{elem_type}"


def _onnx_spec(value_info) -> TensorSpec:
    ttype = value_info.type.tensor_type
    dims: list[int | None] = []
    names: list[str | None] = []
    for d in ttype.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
        names.append(d.dim_param if d.HasField("dim_param") and d.dim_param else None)
    return TensorSpec(value_info.name, tuple(dims), _onnx_dtype(ttype.elem_type), tuple(names))


def _inspect_onnx(proto, size: int) -> ModelInfo:
    initializers = {init.name for init in proto.graph.initializer}
    inputs = tuple(_onnx_spec(vi) for vi in proto.graph.input if vi.name not in initializers)
    outputs = tuple(_onnx_spec(vi) for vi in proto.graph.output)
    opsets = {imp.domain if imp.domain != "ai.onnx" else "": imp.version for imp in proto.opset_import}
    ops = Counter(n.op_type for n in proto.graph.node)
    int8_weights = any(init.data_type in (2, 3) for init in proto.graph.initializer)  # uint8 / int8
    quantized = int8_weights and any(op in ops for op in PRE_QUANTIZED_ONNX_OPS)
    return ModelInfo("onnx", inputs, outputs, size, opsets, dict(ops), quantized)


# Ops that only a quantized ONNX graph has (QDQ pairs or operator-format integer kernels).
PRE_QUANTIZED_ONNX_OPS = ("DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")


def full_int8_problems(model: bytes, limit: int = 5) -> list[str]:
    """Tensors of a TFLite model that are neither int8 nor int32 (graph inputs and outputs may be float,
    with QUANTIZE/DEQUANTIZE at the edges): what keeps it from being a full-int8 build."""
    schema = tflite_schema()
    graph = schema.ModelT.InitFromPackedBuf(model, 0).subgraphs[0]
    io = set(graph.inputs if graph.inputs is not None else []) | set(
        graph.outputs if graph.outputs is not None else []
    )
    problems = []
    for index, tensor in enumerate(graph.tensors or []):
        if index in io or tensor.type in (9, 2):  # int8, int32
            continue
        name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
        problems.append(f"{name[:60]} ({_TFLITE_DTYPES.get(tensor.type, tensor.type)})")
    return problems[:limit] + ([f"... {len(problems) - limit} more"] if len(problems) > limit else [])


_TFLITE_DTYPES = {
    0: "float32",
    1: "float16",
    2: "int32",
    3: "uint8",
    4: "int64",
    5: "string",
    6: "bool",
    7: "int16",
    9: "int8",
    10: "float64",
}


def tflite_schema():
    """The generated TFLite flatbuffer schema shipped with ai-edge-litert."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        raise UsageError("reading TFLite needs ai-edge-litert: pip install edgemart[packagers]") from None
    return schema_py_generated


def tflite_tree(model: bytes):
    """The TFLite model as the schema's object tree, constant data kept outside the flatbuffer (offset/size
    buffers, as large-model writers and ai-edge-quantizer emit them) read in, so that it packs whole again."""
    tree = tflite_schema().ModelT.InitFromPackedBuf(model, 0)
    for buffer in tree.buffers or []:
        if buffer.offset:
            end = buffer.offset + buffer.size
            if end > len(model):
                raise UsageError(
                    f"TFLite buffer data runs past the end of the file ({end} > {len(model)} bytes)"
                )
            buffer.data = np.frombuffer(model, np.uint8, buffer.size, buffer.offset)
            buffer.offset = buffer.size = 0
    return tree


def builtin_op_names() -> dict[int, str]:
    schema = tflite_schema()
    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _inspect_tflite(model: bytes) -> ModelInfo:
    check_model_bytes(model)
    schema = tflite_schema()
    try:
        tfl = schema.ModelT.InitFromPackedBuf(model, 0)
    except Exception as exc:  # noqa: BLE001 - flatbuffers raises anything on corrupt offsets
        raise UsageError(f"TFLite flatbuffer is corrupt: {type(exc).__name__}") from None
    if not tfl.subgraphs:
        raise UsageError("TFLite model has no subgraph")
    graph = tfl.subgraphs[0]
    tensors = graph.tensors or []

    def spec(index: int) -> TensorSpec:
        t = tensors[index]
        sig = t.shapeSignature if t.shapeSignature is not None and len(t.shapeSignature) else t.shape
        shape = tuple(None if int(d) < 0 else int(d) for d in (sig if sig is not None else []))
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        return TensorSpec(name, shape, _TFLITE_DTYPES.get(t.type, f"tflite_type_{t.type}"))

    names = builtin_op_names()
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in tfl.operatorCodes or []]
    ops: Counter[str] = Counter()
    integer_ops = compute_ops = 0
    operators = graph.operators or []
    for op in operators:
        name = names.get(codes[op.opcodeIndex], f"CUSTOM_{op.opcodeIndex}")
        ops[name] += 1
        if name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        compute_ops += 1
        data_types = {tensors[i].type for i in list(op.inputs if op.inputs is not None else []) if i >= 0}
        if data_types & {3, 9}:  # uint8 / int8
            integer_ops += 1
    # Full-integer models keep at most a QUANTIZE/DEQUANTIZE pair at the edges in float.
    quantized = compute_ops > 0 and integer_ops * 2 >= compute_ops
    inputs = tuple(spec(i) for i in (graph.inputs if graph.inputs is not None else []))
    outputs = tuple(spec(i) for i in (graph.outputs if graph.outputs is not None else []))
    return ModelInfo("tflite", inputs, outputs, len(model), {}, dict(ops), quantized)
