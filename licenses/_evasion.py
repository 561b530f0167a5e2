"""The evasion suite of issue #17: open bases, derivatives hidden by graph rewrites, and independents put
through the same rewrites. Generated from corpus models and from small models trained here (licenses._zoo);
used by tests/licenses/test_evasion.py and bench/licenses.py, never by the gate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from licenses import _transforms as T
from licenses import _zoo as Z


@dataclass(frozen=True)
class Case:
    label: str  # "<model>:<transform>"
    transform: str
    model: bytes
    base: str | None  # the indexed base it derives from; None for an independent model
    partial: bool = False  # keeps only part of the base (new head, layers inserted or removed)


# Each rewrite takes model bytes and returns model bytes; the same rewrite is applied to an independent model.
GRAPH_REWRITES: dict[str, Callable[[bytes], bytes]] = {
    "if_wrapped": T.wrap_in_if,
    "concat_split_columns": T.split_columns,
    "concat_constant_halves": T.concat_constant_halves,
    "fp16_cast_transpose_reshape": T.weights_via_cast_transpose,
    "bf16_cast_transpose_reshape": lambda m: T.weights_via_cast_transpose(m, dtype="bfloat16"),
    "constant_and_sparse_attributes": T.weights_as_constants,
    "sparse_initializers": T.sparse_initializers,
    "function_body": T.weights_in_function,
    "loop_body": T.weights_in_loop,
    "qdq_int8_per_channel": T.qdq_weights,
    "if_wrapped_concat_split": lambda m: T.wrap_in_if(T.split_columns(m)),
    "if_wrapped_qdq": lambda m: T.qdq_weights(T.wrap_in_if(m)),
    "to_tflite": T.mlp_to_tflite,
    "to_tflite_int8": T.mlp_to_tflite_int8,
}
PARTIAL_REWRITES: dict[str, Callable[[bytes], bytes]] = {
    "new_head": lambda m: T.replace_head(m, seed=21),
    "inserted_layer": lambda m: T.insert_layer(m, seed=22),
    "removed_layer": T.drop_last_layer,
    "inserted_layer_if_wrapped": lambda m: T.wrap_in_if(T.insert_layer(m, seed=23)),
}
VAD_EXPORTS: dict[str, Callable[[Z.VadWeights], bytes]] = {
    "if_less_export": Z.vad_streaming_plain,
    "fixed_shape_export": lambda w: Z.vad_streaming_plain(w, fixed_shape=True),
    "batched_lstm_onnx_gate_order": Z.vad_sequence_lstm,
}
VAD_REWRITES: dict[str, Callable[[bytes], bytes]] = {
    "opset_changed": lambda m: T.reexport_opset(m, 19),
    "qdq_int8_per_channel": T.qdq_weights,
    "fp16_cast_transpose_reshape": T.weights_via_cast_transpose,
    "concat_split_columns": T.split_columns,
}


@dataclass(frozen=True)
class Suite:
    bases: list[tuple[str, bytes, str]]  # (name, model, SPDX license) to index
    cases: list[Case]

    @property
    def derivatives(self) -> list[Case]:
        return [c for c in self.cases if c.base is not None]

    @property
    def independents(self) -> list[Case]:
        return [c for c in self.cases if c.base is None]


def build_suite(corpus: Path) -> Suite:
    digits = (corpus / "models/digits/digits_mlp_base.onnx").read_bytes()
    digits_independent = (corpus / "models/digits/digits_mlp_independent.onnx").read_bytes()
    vad, vad_independent = Z.train_vad(0), Z.train_vad(1)
    mlp_tflite = T.mlp_to_tflite(Z.mlp_onnx(Z.train_mlp(0)))
    mlp_tflite_independent = T.mlp_to_tflite(Z.mlp_onnx(Z.train_mlp(1)))
    bases = [
        ("digits-nc", digits, "CC-BY-NC-4.0"),
        ("vad-stream", Z.vad_streaming_if(vad), "MIT"),
        ("mlp-tflite", mlp_tflite, "Apache-2.0"),
    ]
    cases: list[Case] = []

    def pair(
        transform: str,
        fn: Callable[[bytes], bytes],
        base: bytes,
        other: bytes,
        name: str,
        *,
        partial: bool = False,
    ) -> None:
        cases.append(Case(f"{name}:{transform}", transform, fn(base), name, partial))
        cases.append(Case(f"{name}-independent:{transform}", transform, fn(other), None, partial))

    for transform, fn in GRAPH_REWRITES.items():
        pair(transform, fn, digits, digits_independent, "digits-nc")
    for transform, fn in PARTIAL_REWRITES.items():
        pair(transform, fn, digits, digits_independent, "digits-nc", partial=True)
    for transform, export in VAD_EXPORTS.items():
        cases.append(Case(f"vad-stream:{transform}", transform, export(vad), "vad-stream"))
        cases.append(Case(f"vad-stream-independent:{transform}", transform, export(vad_independent), None))
    cases.append(
        Case(
            "vad-stream-independent:same_if_export",
            "same_if_export",
            Z.vad_streaming_if(vad_independent),
            None,
        )
    )
    for transform, fn in VAD_REWRITES.items():
        pair(transform, fn, Z.vad_streaming_if(vad), Z.vad_streaming_if(vad_independent), "vad-stream")
    pair(
        "batched_lstm_qdq",
        T.qdq_weights,
        Z.vad_sequence_lstm(vad),
        Z.vad_sequence_lstm(vad_independent),
        "vad-stream",
    )
    pair(
        "batched_lstm_if_wrapped",
        T.wrap_in_if,
        Z.vad_sequence_lstm(vad),
        Z.vad_sequence_lstm(vad_independent),
        "vad-stream",
    )
    pair("tflite_to_onnx", T.tflite_mlp_to_onnx, mlp_tflite, mlp_tflite_independent, "mlp-tflite")
    pair(
        "tflite_to_onnx_if_wrapped",
        lambda m: T.wrap_in_if(T.tflite_mlp_to_onnx(m)),
        mlp_tflite,
        mlp_tflite_independent,
        "mlp-tflite",
    )
    return Suite(bases=bases, cases=cases)


def case_labels() -> list[str]:
    """The labels build_suite produces, in order, without building anything (for test parametrization)."""
    labels: list[str] = []
    for transform in (*GRAPH_REWRITES, *PARTIAL_REWRITES):
        labels += [f"digits-nc:{transform}", f"digits-nc-independent:{transform}"]
    for transform in VAD_EXPORTS:
        labels += [f"vad-stream:{transform}", f"vad-stream-independent:{transform}"]
    labels.append("vad-stream-independent:same_if_export")
    for transform in (*VAD_REWRITES, "batched_lstm_qdq", "batched_lstm_if_wrapped"):
        labels += [f"vad-stream:{transform}", f"vad-stream-independent:{transform}"]
    for transform in ("tflite_to_onnx", "tflite_to_onnx_if_wrapped"):
        labels += [f"mlp-tflite:{transform}", f"mlp-tflite-independent:{transform}"]
    return labels
