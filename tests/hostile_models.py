"""Hostile models, generated: what a seller account uploads to make the store read its own files or blow up.

Every builder returns model bytes. The exfiltration models point at `SECRET_RELATIVE`, a path relative to the
processing's working directory (no `..`, not absolute, so onnx's own path checks pass); `plant_secret(dir)`
writes that file so a test can prove nothing read it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SECRET_RELATIVE = "keys/kek.key"
SECRET = b"EDGEMART-TEST-SECRET-" + bytes(range(48, 48 + 43))  # 64 bytes: 8 float64 values


def plant_secret(directory: Path) -> Path:
    path = directory / SECRET_RELATIVE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SECRET)
    return path


def external_tensor(name: str, *, location: str = SECRET_RELATIVE, count: int = 8) -> TensorProto:
    """A float64 tensor whose data is `count` values read from `location`: the exfiltration primitive."""
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = TensorProto.DOUBLE
    tensor.dims.extend([count])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(count * 8))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _model(nodes, inputs, outputs, initializers=(), **kw) -> bytes:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "main", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], **kw)
    model.ir_version = 8
    return model.SerializeToString()


def _io(name: str, shape: list[int], dtype: int = TensorProto.DOUBLE):  # type: ignore[no-untyped-def]
    return helper.make_tensor_value_info(name, dtype, shape)


def exfil_gemm_bias() -> bytes:
    """The reported attack: a Gemm whose float64 bias is the store's key file, so y = 0·x + key bytes."""
    weight = numpy_helper.from_array(np.zeros((8, 8)), "w")
    return _model(
        [helper.make_node("Gemm", ["x", "w", "bias"], ["y"], name="gemm")],
        [_io("x", [1, 8])],
        [_io("y", [1, 8])],
        [weight, external_tensor("bias")],
    )


def exfil_constant_node() -> bytes:
    return _model(
        [
            helper.make_node("Constant", [], ["c"], value=external_tensor("c_value"), name="const"),
            helper.make_node("Add", ["x", "c"], ["y"], name="add"),
        ],
        [_io("x", [8])],
        [_io("y", [8])],
    )


def exfil_if_branch(depth: int = 1) -> bytes:
    """External data inside an `If` branch, `depth` Ifs deep (a streaming-VAD style graph)."""

    def branch(level: int, tag: str) -> onnx.GraphProto:
        if level == depth:
            tensor = (
                external_tensor(f"w_{tag}_{level}")
                if tag == "then"
                else numpy_helper.from_array(np.ones(8), f"w_{tag}_{level}")
            )
            return helper.make_graph(
                [helper.make_node("Identity", [tensor.name], [f"out_{tag}_{level}"])],
                f"{tag}_{level}",
                [],
                [_io(f"out_{tag}_{level}", [8])],
                [tensor],
            )
        return helper.make_graph(
            [
                helper.make_node(
                    "If",
                    ["cond"],
                    [f"out_{tag}_{level}"],
                    then_branch=branch(level + 1, "then"),
                    else_branch=branch(level + 1, "else"),
                )
            ],
            f"{tag}_{level}",
            [],
            [_io(f"out_{tag}_{level}", [8])],
        )

    return _model(
        [
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=branch(1, "then"), else_branch=branch(1, "else"), name="if"
            )
        ],
        [_io("cond", [], TensorProto.BOOL)],
        [_io("y", [8])],
    )


def exfil_sparse_initializer() -> bytes:
    values = external_tensor("sparse_values")
    indices = numpy_helper.from_array(np.arange(8, dtype=np.int64), "sparse_indices")
    sparse = helper.make_sparse_tensor(values, indices, [8])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "sparse_values"], ["y"])], "main", [_io("x", [8])], [_io("y", [8])]
    )
    graph.sparse_initializer.append(sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def exfil_function_body() -> bytes:
    body = helper.make_function(
        "evil.domain",
        "Leak",
        ["x"],
        ["y"],
        [
            helper.make_node("Constant", [], ["c"], value=external_tensor("fn_value")),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("Leak", ["x"], ["y"], domain="evil.domain")],
        "main",
        [_io("x", [8])],
        [_io("y", [8])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("evil.domain", 1)],
        functions=[body],
    )
    model.ir_version = 8
    return model.SerializeToString()


def location_flag_only() -> bytes:
    """`data_location: EXTERNAL` with no external_data entries (onnx then looks for a file named after the tensor)."""
    tensor = external_tensor("bias")
    del tensor.external_data[:]
    weight = numpy_helper.from_array(np.zeros((8, 8)), "w")
    return _model(
        [helper.make_node("Gemm", ["x", "w", "bias"], ["y"])],
        [_io("x", [1, 8])],
        [_io("y", [1, 8])],
        [weight, tensor],
    )


def dangling_reference() -> bytes:
    """External data at a path that does not exist: once a 500 and a file-exists oracle."""
    weight = numpy_helper.from_array(np.zeros((8, 8)), "w")
    return _model(
        [helper.make_node("Gemm", ["x", "w", "bias"], ["y"])],
        [_io("x", [1, 8])],
        [_io("y", [1, 8])],
        [weight, external_tensor("bias", location="no/such/file.bin")],
    )


def huge_declared_tensor() -> bytes:
    """A 2^40-element initializer declared with almost no data: allocation bomb for naive readers."""
    tensor = TensorProto()
    tensor.name = "bias"
    tensor.data_type = TensorProto.FLOAT
    tensor.dims.extend([1 << 20, 1 << 20])
    tensor.raw_data = b"\x00" * 16
    return _model(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        [_io("x", [1, 1], TensorProto.FLOAT)],
        [_io("y", [1, 1], TensorProto.FLOAT)],
        [tensor],
    )


def deep_nesting(depth: int = 24) -> bytes:
    """Ifs nested deeper than any real model: recursion bombs for parsers that recurse per graph."""

    def leaf() -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Constant", [], ["v"], value=numpy_helper.from_array(np.ones(1), "v"))],
            "leaf",
            [],
            [_io("v", [1])],
        )

    inner = leaf()
    for level in range(depth):  # one branch nests, the other is a leaf: linear size, `depth` levels
        inner = helper.make_graph(
            [helper.make_node("If", ["cond"], ["v"], then_branch=inner, else_branch=leaf())],
            f"level{level}",
            [],
            [_io("v", [1])],
        )
    return _model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=leaf())],
        [_io("cond", [], TensorProto.BOOL)],
        [_io("y", [1])],
    )


def _tflite_edit(base: bytes, edit: Callable) -> bytes:  # type: ignore[type-arg]
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(base), 0)
    edit(model, schema)
    builder = flatbuffers.Builder(len(base) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tflite_buffer_outside_file(base: bytes) -> bytes:
    """A TFLite whose largest weight buffer uses the >2 GiB layout with an offset past the end of the file."""

    def edit(model, schema) -> None:  # type: ignore[no-untyped-def]
        index = max(
            range(len(model.buffers)),
            key=lambda i: 0 if model.buffers[i].data is None else len(model.buffers[i].data),
        )
        model.buffers[index].data = None
        model.buffers[index].offset = 1 << 40
        model.buffers[index].size = 4096

    return _tflite_edit(base, edit)


def tflite_tensor_names_missing_buffer(base: bytes) -> bytes:
    def edit(model, schema) -> None:  # type: ignore[no-untyped-def]
        model.subgraphs[0].tensors[0].buffer = len(model.buffers) + 1000

    return _tflite_edit(base, edit)


# name -> (builder taking the corpus TFLite bytes or nothing, the words the refusal must contain)
ONNX_CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "gemm_bias_exfiltration": (exfil_gemm_bias, "tensor 'bias'"),
    "constant_node": (exfil_constant_node, "tensor 'c_value'"),
    "if_branch": (exfil_if_branch, "tensor 'w_then_1'"),
    "if_branch_depth_3": (lambda: exfil_if_branch(3), "tensor 'w_then_3'"),
    "sparse_initializer": (exfil_sparse_initializer, "tensor 'sparse_values'"),
    "function_body": (exfil_function_body, "tensor 'fn_value'"),
    "location_flag_only": (location_flag_only, "tensor 'bias'"),
    "dangling_reference": (dangling_reference, "tensor 'bias'"),
    "huge_declared_tensor": (huge_declared_tensor, "limit per tensor"),
    "deep_nesting": (deep_nesting, "nests graphs"),
}
TFLITE_CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "tflite_buffer_outside_file": (tflite_buffer_outside_file, "points outside the model file"),
    "tflite_missing_buffer": (tflite_tensor_names_missing_buffer, "names buffer"),
}
