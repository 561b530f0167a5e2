"""A streaming voice-activity model like the ones sellers have, built with onnx.helper (no download):
audio chunk `input` [N, 576], recurrent `state` [2, N, 128] -> `stateN`, scalar `sr` and an `If` on it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHUNK = 576
HIDDEN = 128
FEATURES = 64


def _branch(prefix: str, rng: np.random.Generator) -> onnx.GraphProto:
    """One rate's network: features, two tanh recurrent layers over the state, a sigmoid speech probability."""

    def weight(name: str, shape: tuple[int, ...], gain: float = 1.0) -> onnx.TensorProto:
        scale = gain / np.sqrt(shape[0]) if len(shape) > 1 else 0.1
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), prefix + name)

    inits = [
        weight("w_feat", (CHUNK, FEATURES), 2.0), weight("b_feat", (FEATURES,)),
        weight("wx1", (FEATURES, HIDDEN)), weight("wh1", (HIDDEN, HIDDEN), 0.6), weight("b1", (HIDDEN,)),
        weight("wx2", (HIDDEN, HIDDEN)), weight("wh2", (HIDDEN, HIDDEN), 0.6), weight("b2", (HIDDEN,)),
        weight("w_out", (HIDDEN, 1), 2.0), weight("b_out", (1,)),
        numpy_helper.from_array(np.array(0, np.int64), prefix + "i0"),
        numpy_helper.from_array(np.array(1, np.int64), prefix + "i1"),
        numpy_helper.from_array(np.array([0], np.int64), prefix + "axis0"),
    ]  # fmt: skip
    p = prefix
    nodes = [
        helper.make_node("MatMul", ["input", p + "w_feat"], [p + "feat_mm"], name=p + "feat_mm"),
        helper.make_node("Add", [p + "feat_mm", p + "b_feat"], [p + "feat_pre"], name=p + "feat_add"),
        helper.make_node("Relu", [p + "feat_pre"], [p + "feat"], name=p + "feat_relu"),
        helper.make_node("Gather", ["state", p + "i0"], [p + "h1"], axis=0, name=p + "h1"),
        helper.make_node("Gather", ["state", p + "i1"], [p + "h2"], axis=0, name=p + "h2"),
        helper.make_node("MatMul", [p + "feat", p + "wx1"], [p + "x1"], name=p + "x1"),
        helper.make_node("MatMul", [p + "h1", p + "wh1"], [p + "r1"], name=p + "r1"),
        helper.make_node("Add", [p + "x1", p + "r1"], [p + "s1"], name=p + "s1"),
        helper.make_node("Add", [p + "s1", p + "b1"], [p + "z1"], name=p + "z1"),
        helper.make_node("Tanh", [p + "z1"], [p + "h1n"], name=p + "h1n"),
        helper.make_node("MatMul", [p + "h1n", p + "wx2"], [p + "x2"], name=p + "x2"),
        helper.make_node("MatMul", [p + "h2", p + "wh2"], [p + "r2"], name=p + "r2"),
        helper.make_node("Add", [p + "x2", p + "r2"], [p + "s2"], name=p + "s2"),
        helper.make_node("Add", [p + "s2", p + "b2"], [p + "z2"], name=p + "z2"),
        helper.make_node("Tanh", [p + "z2"], [p + "h2n"], name=p + "h2n"),
        helper.make_node("MatMul", [p + "h2n", p + "w_out"], [p + "logit_mm"], name=p + "logit_mm"),
        helper.make_node("Add", [p + "logit_mm", p + "b_out"], [p + "logit"], name=p + "logit"),
        helper.make_node("Sigmoid", [p + "logit"], [p + "prob"], name=p + "prob"),
        helper.make_node("Unsqueeze", [p + "h1n", p + "axis0"], [p + "h1u"], name=p + "h1u"),
        helper.make_node("Unsqueeze", [p + "h2n", p + "axis0"], [p + "h2u"], name=p + "h2u"),
        helper.make_node("Concat", [p + "h1u", p + "h2u"], [p + "state_next"], axis=0, name=p + "state_next"),
    ]
    outputs = [
        helper.make_tensor_value_info(p + "prob", TensorProto.FLOAT, ["N", 1]),
        helper.make_tensor_value_info(p + "state_next", TensorProto.FLOAT, [2, "N", HIDDEN]),
    ]
    return helper.make_graph(nodes, prefix + "branch", [], outputs, inits)


def streaming_vad(seed: int = 0) -> bytes:
    """The VAD model's bytes: `If(sr == 16000)` picks the 16 kHz or the 8 kHz network."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Equal", ["sr", "sr_16k"], ["is_16k"], name="is_16k"),
            helper.make_node(
                "If",
                ["is_16k"],
                ["output", "stateN"],
                then_branch=_branch("hi_", rng),
                else_branch=_branch("lo_", rng),
                name="rate_switch",
            ),
        ],
        "streaming_vad",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CHUNK]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", HIDDEN]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "N", HIDDEN]),
        ],
        [numpy_helper.from_array(np.array(16000, np.int64), "sr_16k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def vad_sequences(sequences: int = 4, steps: int = 40, seed: int = 1) -> dict[str, np.ndarray]:
    """Chunks of synthetic audio (silence, noise, tone bursts), one sequence per recording, rank = input rank
    (one row per step) with `sequence_start` marking where each recording begins."""
    rng = np.random.default_rng(seed)
    chunks, starts = [], []
    t = np.arange(CHUNK) / 16000.0
    for _ in range(sequences):
        for step in range(steps):
            voiced = (step // 8) % 2 == 1
            noise = rng.standard_normal(CHUNK) * 0.01
            tone = (
                0.3 * np.sin(2 * np.pi * rng.uniform(120, 400) * (t + step * CHUNK / 16000.0))
                if voiced
                else 0
            )
            chunks.append((noise + tone).astype(np.float32))
            starts.append(step == 0)
    return {"input": np.stack(chunks), "sequence_start": np.array(starts, dtype=np.int8)}
