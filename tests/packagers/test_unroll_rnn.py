"""Recurrent ONNX nodes rewritten as cell math (packagers/_unroll_rnn.py) compute what onnxruntime computes
with the original node: LSTM, GRU (linear_before_reset 0 and 1), RNN, every direction and layout, with and
without initial states; the limits are precise refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemart.core.errors import UsageError
from packagers._unroll_rnn import MAX_STEPS, unroll_recurrent

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
FEATURES, HIDDEN, BATCH = 8, 16, 1


def recurrent_model(
    op: str,
    steps: int,
    *,
    direction: str = "forward",
    layout: int = 0,
    initial: bool = False,
    peepholes: bool = False,
    seq_lens: bool = False,
    seed: int = 0,
    **attrs,
) -> onnx.ModelProto:
    """One `op` node with static shapes and every output (Y, Y_h, and Y_c for LSTM) a graph output."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op] * HIDDEN
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.4, (dirs, g, FEATURES)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 0.4, (dirs, g, HIDDEN)).astype(np.float32), "R"),
        numpy_helper.from_array(rng.normal(0, 0.3, (dirs, 2 * g)).astype(np.float32), "B"),
    ]
    x_shape = [BATCH, steps, FEATURES] if layout else [steps, BATCH, FEATURES]
    state_shape = [BATCH, dirs, HIDDEN] if layout else [dirs, BATCH, HIDDEN]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    names = ["X", "W", "R", "B", "", "", "", ""]
    if seq_lens:
        inits.append(numpy_helper.from_array(np.full(BATCH, steps, np.int32), "lens"))
        names[4] = "lens"
    if initial:
        names[5] = "h0"
        graph_inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, state_shape))
        if op == "LSTM":
            names[6] = "c0"
            graph_inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, state_shape))
    if peepholes:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.4, (dirs, 3 * HIDDEN)).astype(np.float32), "P"))
        names[7] = "P"
    names = names[
        : 8 if peepholes else 7 if op == "LSTM" and initial else 6 if initial else 5 if seq_lens else 4
    ]
    outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    y_shape = [BATCH, steps, dirs, HIDDEN] if layout else [steps, dirs, BATCH, HIDDEN]
    node = helper.make_node(
        op, names, outputs, name="rnn", hidden_size=HIDDEN, direction=direction, layout=layout, **attrs
    )
    graph = helper.make_graph(
        [node],
        "recurrent",
        graph_inputs,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)]
        + [helper.make_tensor_value_info(o, TensorProto.FLOAT, state_shape) for o in outputs[1:]],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)


def _feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        vi.name: rng.normal(0, 1, [d.dim_value for d in vi.type.tensor_type.shape.dim]).astype(np.float32)
        for vi in model.graph.input
    }


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _unrolled(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[dict]]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rows = unroll_recurrent(copy)
    onnx.checker.check_model(copy)
    return copy, rows


CASES = [
    ("LSTM", {}),
    ("GRU", {"linear_before_reset": 0}),
    ("GRU", {"linear_before_reset": 1}),
    ("RNN", {}),
]


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize(("op", "attrs"), CASES, ids=["lstm", "gru_lbr0", "gru_lbr1", "rnn"])
def test_unrolled_cell_math_matches_onnxruntime(op, attrs, initial, steps):
    model = recurrent_model(op, steps, initial=initial, **attrs)
    unrolled, rows = _unrolled(model)
    assert rows == [{"node": "rnn", "op": op, "direction": "forward", "steps": steps}]
    kinds = {n.op_type for n in unrolled.graph.node}
    assert not kinds & {"LSTM", "GRU", "RNN"} and "MatMul" in kinds and "Tanh" in kinds
    feeds = _feeds(model, seed=steps)
    expected, got = _run(model, feeds), _run(unrolled, feeds)
    assert [o.name for o in unrolled.graph.output] == [o.name for o in model.graph.output]
    for want, have in zip(expected, got, strict=True):
        assert have.shape == want.shape
        assert np.abs(want - have).max() < 1e-5
    assert np.abs(expected[0]).max() > 0.1  # the check compares real activity, not zeros


@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
@pytest.mark.parametrize(("op", "attrs"), CASES, ids=["lstm", "gru_lbr0", "gru_lbr1", "rnn"])
def test_reverse_and_bidirectional_match(op, attrs, direction):
    model = recurrent_model(op, 4, direction=direction, initial=True, seq_lens=True, **attrs)
    unrolled, _ = _unrolled(model)
    feeds = _feeds(model, seed=3)
    for want, have in zip(_run(model, feeds), _run(unrolled, feeds), strict=True):
        assert have.shape == want.shape and np.abs(want - have).max() < 1e-5


@pytest.mark.parametrize(("op", "attrs"), CASES, ids=["lstm", "gru_lbr0", "gru_lbr1", "rnn"])
def test_batch_major_layout_matches_the_time_major_reference(op, attrs):
    """onnxruntime refuses layout=1, so the reference is the same weights time-major, inputs and outputs
    transposed (X, states [B, T|D, ...] <-> [T|D, B, ...]; Y [B, T, D, H] <-> [T, D, B, H])."""
    batch_major = recurrent_model(op, 4, direction="bidirectional", layout=1, initial=True, **attrs)
    time_major = recurrent_model(op, 4, direction="bidirectional", layout=0, initial=True, **attrs)
    unrolled, _ = _unrolled(batch_major)
    feeds = _feeds(batch_major, seed=5)
    got = _run(unrolled, feeds)
    want = _run(time_major, {k: v.transpose(1, 0, 2) for k, v in feeds.items()})
    assert got[0].shape == (BATCH, 4, 2, HIDDEN)
    assert np.abs(got[0] - want[0].transpose(2, 0, 1, 3)).max() < 1e-5
    for state_want, state_got in zip(want[1:], got[1:], strict=True):
        assert np.abs(state_got - state_want.transpose(1, 0, 2)).max() < 1e-5


def test_lstm_peepholes_match():
    model = recurrent_model("LSTM", 5, initial=True, peepholes=True)
    unrolled, _ = _unrolled(model)
    feeds = _feeds(model, seed=4)
    for want, have in zip(_run(model, feeds), _run(unrolled, feeds), strict=True):
        assert np.abs(want - have).max() < 1e-5


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            lambda: recurrent_model("LSTM", MAX_STEPS + 1),
            rf"sequence length {MAX_STEPS + 1} is above the unrolling bound of {MAX_STEPS} steps",
        ),
        (lambda: recurrent_model("LSTM", 3, clip=5.0), r"attribute clip is set"),
        (lambda: recurrent_model("LSTM", 3, input_forget=1), r"input_forget=1"),
        (
            lambda: recurrent_model("GRU", 3, activations=["Relu", "Tanh"]),
            r"activations \['relu', 'tanh'\] are not the default \['sigmoid', 'tanh'\]",
        ),
    ],
    ids=["too_long", "clip", "input_forget", "activations"],
)
def test_limits_are_refusals_naming_the_cause_and_a_target_that_works(model, message):
    with pytest.raises(UsageError, match=message) as err:
        unroll_recurrent(model())
    assert err.value.message.startswith("coral-edgetpu: node rnn (")
    assert err.value.message.endswith(
        "edgemart package MODEL.onnx --target arm-cpu --calibration CAL.npz --out DIR"
    )


def test_computed_weights_and_unknown_lengths_are_refused():
    model = recurrent_model("GRU", 3)
    model.graph.node.insert(0, helper.make_node("Identity", ["W"], ["W2"], name="copy"))
    model.graph.node[1].input[1] = "W2"
    with pytest.raises(UsageError, match=r"its W input 'W2' is computed, not a constant"):
        unroll_recurrent(model)
    lens = recurrent_model("LSTM", 3, seq_lens=True)
    lens.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([2], np.int32), "lens"))
    with pytest.raises(UsageError, match=r"sequence_lens \[2\] differ from the sequence length 3"):
        unroll_recurrent(lens)


def test_a_graph_without_recurrent_nodes_is_left_alone():
    model = recurrent_model("LSTM", 2)
    model.graph.node[0].op_type = "Identity"
    before = model.SerializeToString()
    assert unroll_recurrent(model) == [] and model.SerializeToString() == before
