# Why this is one module: the small models the evasion suite trains with numpy, side by side so their independents are built the same way.
"""Small models trained here with numpy, for the evasion suite: a streaming LSTM voice-activity detector and
MLPs, written as ONNX (several exports of the same weights) or TFLite. Used by tests and bench, never the gate.

Everything is deterministic for a given seed and takes well under a second per model on one core."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

FRAME = 64  # audio samples per frame
BINS = 32  # DFT bins used as features (1..32)
HIDDEN = 32  # LSTM width
HEAD = 16  # dense layer on top of the LSTM
OPSET = 17


# ------------------------------------------------------------------------------------ shared fixed front end


def dft_basis() -> np.ndarray:
    """(2*BINS, FRAME) Hann-windowed cos/sin rows: fixed by construction, every VAD of this design has it."""
    n = np.arange(FRAME)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / FRAME)
    k = np.arange(1, BINS + 1)[:, None]
    return np.concatenate(
        [window * np.cos(2 * np.pi * k * n / FRAME), window * np.sin(2 * np.pi * k * n / FRAME)]
    ).astype(np.float32)


def pair_sum() -> np.ndarray:
    """(2*BINS, BINS) 0/1 matrix adding cos^2 and sin^2 of a bin: a fixed fill."""
    return np.concatenate([np.eye(BINS), np.eye(BINS)]).astype(np.float32)


def _features(frames: np.ndarray) -> np.ndarray:
    spec = frames @ dft_basis().T
    return np.log1p((spec * spec) @ pair_sum()).astype(np.float32)


# --------------------------------------------------------------------------------------------- LSTM VAD


@dataclass(frozen=True)
class VadWeights:
    """PyTorch layout: w_ih (4H, I) and w_hh (4H, H) in gate order i, f, g, o; separate biases."""

    w_ih: np.ndarray
    w_hh: np.ndarray
    b_ih: np.ndarray
    b_hh: np.ndarray
    w1: np.ndarray  # (HEAD, H)
    b1: np.ndarray
    w2: np.ndarray  # (1, HEAD)
    b2: np.ndarray


def _vad_data(rng: np.random.Generator, batch: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames of noise, some carrying a harmonic 'voice' (label 1), in runs."""
    t = np.arange(FRAME)
    labels = np.zeros((batch, steps), np.float32)
    frames = rng.normal(0, 0.3, (batch, steps, FRAME)).astype(np.float32)
    for b in range(batch):
        start, length = int(rng.integers(0, steps)), int(rng.integers(2, steps))
        labels[b, start : start + length] = 1
        f0 = rng.uniform(3, 9)
        for s in range(start, min(start + length, steps)):
            voice = sum(np.sin(2 * np.pi * f0 * h * t / FRAME + rng.uniform(0, 6)) / h for h in (1, 2, 3))
            frames[b, s] += rng.uniform(0.4, 1.0) * voice
    return frames, labels


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


@lru_cache(maxsize=8)
def train_vad(seed: int, steps: int = 60) -> VadWeights:
    """Train the VAD by backpropagation through time (Adam) on synthetic speech-like frames."""
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(HIDDEN)
    p = {
        "w_ih": rng.uniform(-bound, bound, (4 * HIDDEN, BINS)),
        "w_hh": rng.uniform(-bound, bound, (4 * HIDDEN, HIDDEN)),
        "b_ih": rng.uniform(-bound, bound, 4 * HIDDEN),
        "b_hh": rng.uniform(-bound, bound, 4 * HIDDEN),
        "w1": rng.uniform(-bound, bound, (HEAD, HIDDEN)),
        "b1": np.zeros(HEAD),
        "w2": rng.uniform(-0.25, 0.25, (1, HEAD)),
        "b2": np.zeros(1),
    }
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    data_rng = np.random.default_rng(seed + 1000)
    for step in range(1, steps + 1):
        frames, labels = _vad_data(data_rng, 32, 12)
        grads = _vad_grads(p, _features(frames).astype(np.float64), labels)
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
            p[k] -= 0.02 * (m[k] / (1 - 0.9**step)) / (np.sqrt(v[k] / (1 - 0.999**step)) + 1e-8)
    return VadWeights(**{k: np.asarray(val, np.float32) for k, val in p.items()})


def _vad_grads(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    batch, steps, _ = x.shape
    h = np.zeros((batch, HIDDEN))
    c = np.zeros((batch, HIDDEN))
    tape = []
    for t in range(steps):
        a = x[:, t] @ p["w_ih"].T + p["b_ih"] + h @ p["w_hh"].T + p["b_hh"]
        ai, af, ag, ao = np.split(a, 4, axis=1)
        i, f, g, o = _sigmoid(ai), _sigmoid(af), np.tanh(ag), _sigmoid(ao)
        c_new = f * c + i * g
        tanh_c = np.tanh(c_new)
        h_new = o * tanh_c
        z_pre = h_new @ p["w1"].T + p["b1"]
        z = np.maximum(z_pre, 0)
        prob = _sigmoid(z @ p["w2"].T + p["b2"])[:, 0]
        tape.append((x[:, t], h, c, i, f, g, o, tanh_c, h_new, z_pre, z, prob))
        h, c = h_new, c_new
    grads = {k: np.zeros_like(val) for k, val in p.items()}
    dh_next = np.zeros((batch, HIDDEN))
    dc_next = np.zeros((batch, HIDDEN))
    scale = 1.0 / (batch * steps)
    for t in reversed(range(steps)):
        xt, h_prev, c_prev, i, f, g, o, tanh_c, h_t, z_pre, z, prob = tape[t]
        dlogit = ((prob - y[:, t]) * scale)[:, None]
        grads["w2"] += dlogit.T @ z
        grads["b2"] += dlogit.sum(axis=0)
        dz = (dlogit @ p["w2"]) * (z_pre > 0)
        grads["w1"] += dz.T @ h_t
        grads["b1"] += dz.sum(axis=0)
        dh = dz @ p["w1"] + dh_next
        do = dh * tanh_c
        dc = dh * o * (1 - tanh_c**2) + dc_next
        da = np.concatenate(
            [dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g**2), do * o * (1 - o)], axis=1
        )
        dc_next = dc * f
        grads["w_ih"] += da.T @ xt
        grads["w_hh"] += da.T @ h_prev
        grads["b_ih"] += da.sum(axis=0)
        grads["b_hh"] += da.sum(axis=0)
        dh_next = da @ p["w_hh"]
    return grads


def vad_accuracy(weights: VadWeights, seed: int = 99) -> float:
    frames, labels = _vad_data(np.random.default_rng(seed), 64, 12)
    x = _features(frames)
    h = np.zeros((64, HIDDEN))
    c = np.zeros((64, HIDDEN))
    correct = 0
    for t in range(12):
        a = x[:, t] @ weights.w_ih.T + weights.b_ih + h @ weights.w_hh.T + weights.b_hh
        ai, af, ag, ao = np.split(a, 4, axis=1)
        c = _sigmoid(af) * c + _sigmoid(ai) * np.tanh(ag)
        h = _sigmoid(ao) * np.tanh(c)
        z = np.maximum(h @ weights.w1.T + weights.b1, 0)
        prob = _sigmoid(z @ weights.w2.T + weights.b2)[:, 0]
        correct += int(((prob > 0.5) == (labels[:, t] > 0.5)).sum())
    return correct / (64 * 12)


# ------------------------------------------------------------------------------------------ VAD exports


def _init(name: str, value: np.ndarray):  # type: ignore[no-untyped-def]
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def _cell(w: VadWeights, tag: str) -> tuple[list, list]:  # type: ignore[type-arg]
    """One streaming step (x [1,FRAME], h, c -> prob, h_out, c_out) as MatMul/Add/Split nodes, PyTorch layout."""
    from onnx import helper

    inits = [
        _init(f"{tag}dft", dft_basis().T.copy()),
        _init(f"{tag}pairs", pair_sum()),
        _init(f"{tag}one", np.ones(1, np.float32)),
        _init(f"{tag}w_ih_t", w.w_ih.T.copy()),
        _init(f"{tag}w_hh_t", w.w_hh.T.copy()),
        _init(f"{tag}b_ih", w.b_ih),
        _init(f"{tag}b_hh", w.b_hh),
        _init(f"{tag}w1_t", w.w1.T.copy()),
        _init(f"{tag}b1", w.b1),
        _init(f"{tag}w2_t", w.w2.T.copy()),
        _init(f"{tag}b2", w.b2),
    ]
    n = helper.make_node
    t = tag
    nodes = [
        n("MatMul", ["x", f"{t}dft"], [f"{t}spec"]),
        n("Mul", [f"{t}spec", f"{t}spec"], [f"{t}power2"]),
        n("MatMul", [f"{t}power2", f"{t}pairs"], [f"{t}power"]),
        n("Add", [f"{t}power", f"{t}one"], [f"{t}power1"]),
        n("Log", [f"{t}power1"], [f"{t}feats"]),
        n("MatMul", [f"{t}feats", f"{t}w_ih_t"], [f"{t}gx"]),
        n("Add", [f"{t}gx", f"{t}b_ih"], [f"{t}gxb"]),
        n("MatMul", ["h", f"{t}w_hh_t"], [f"{t}gh"]),
        n("Add", [f"{t}gh", f"{t}b_hh"], [f"{t}ghb"]),
        n("Add", [f"{t}gxb", f"{t}ghb"], [f"{t}gates"]),
        n("Split", [f"{t}gates"], [f"{t}ai", f"{t}af", f"{t}ag", f"{t}ao"], axis=1),
        n("Sigmoid", [f"{t}ai"], [f"{t}i"]),
        n("Sigmoid", [f"{t}af"], [f"{t}f"]),
        n("Tanh", [f"{t}ag"], [f"{t}g"]),
        n("Sigmoid", [f"{t}ao"], [f"{t}o"]),
        n("Mul", [f"{t}f", "c"], [f"{t}fc"]),
        n("Mul", [f"{t}i", f"{t}g"], [f"{t}ig"]),
        n("Add", [f"{t}fc", f"{t}ig"], [f"{t}c_out"]),
        n("Tanh", [f"{t}c_out"], [f"{t}tc"]),
        n("Mul", [f"{t}o", f"{t}tc"], [f"{t}h_out"]),
        n("MatMul", [f"{t}h_out", f"{t}w1_t"], [f"{t}z0"]),
        n("Add", [f"{t}z0", f"{t}b1"], [f"{t}z1"]),
        n("Relu", [f"{t}z1"], [f"{t}z"]),
        n("MatMul", [f"{t}z", f"{t}w2_t"], [f"{t}l0"]),
        n("Add", [f"{t}l0", f"{t}b2"], [f"{t}logit"]),
        n("Sigmoid", [f"{t}logit"], [f"{t}prob"]),
    ]
    return nodes, inits


def _stream_io(fixed: bool):  # type: ignore[no-untyped-def]
    from onnx import TensorProto, helper

    batch = 1 if fixed else "batch"
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, FRAME]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [batch, HIDDEN]),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [batch, HIDDEN]),
    ]
    outputs = [
        helper.make_tensor_value_info("prob", TensorProto.FLOAT, [batch, 1]),
        helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [batch, HIDDEN]),
        helper.make_tensor_value_info("c_out", TensorProto.FLOAT, [batch, HIDDEN]),
    ]
    return inputs, outputs


def _model(graph) -> bytes:  # type: ignore[no-untyped-def]
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def vad_streaming_if(w: VadWeights) -> bytes:
    """The 'public' export: one step per call, weights only inside the branches of an If on the sample rate."""
    from onnx import TensorProto, helper

    inputs, outputs = _stream_io(False)
    inputs.append(helper.make_tensor_value_info("sr", TensorProto.INT64, []))
    branches = []
    for tag in ("k16_", "k8_"):
        nodes, inits = _cell(w, tag)
        nodes += [
            helper.make_node("Identity", [f"{tag}{name}"], [f"{tag}out_{name}"])
            for name in ("prob", "h_out", "c_out")
        ]
        branch_out = [
            helper.make_tensor_value_info(f"{tag}out_{o.name}", TensorProto.FLOAT, None) for o in outputs
        ]
        branches.append(helper.make_graph(nodes, f"branch_{tag}", [], branch_out, inits))
    main = [
        helper.make_node(
            "Constant", [], ["sr16k"], value=helper.make_tensor("v", TensorProto.INT64, [], [16000])
        ),
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
        helper.make_node(
            "If", ["is16k"], [o.name for o in outputs], then_branch=branches[0], else_branch=branches[1]
        ),
    ]
    return _model(helper.make_graph(main, "vad_stream_if", inputs, outputs))


def vad_streaming_plain(w: VadWeights, *, fixed_shape: bool = False) -> bytes:
    """The same step exported without the If (and optionally with batch 1 fixed)."""
    from onnx import helper

    inputs, outputs = _stream_io(fixed_shape)
    nodes, inits = _cell(w, "")  # untagged: the cell's outputs are the graph's outputs
    return _model(helper.make_graph(nodes, "vad_stream", inputs, outputs, inits))


def vad_sequence_lstm(w: VadWeights) -> bytes:
    """A batched export over whole sequences with the ONNX LSTM op: weights re-laid out in ONNX gate order
    (i, o, f, c) and the two biases concatenated into B."""
    from onnx import TensorProto, helper

    order = [0, 3, 1, 2]  # PyTorch i,f,g,o -> ONNX i,o,f,c

    def relayout(matrix: np.ndarray) -> np.ndarray:
        return np.concatenate([np.split(matrix, 4)[k] for k in order])

    inits = [
        _init("dft", dft_basis().T.copy()),
        _init("pairs", pair_sum()),
        _init("one", np.ones(1, np.float32)),
        _init("W", relayout(w.w_ih)[None]),
        _init("R", relayout(w.w_hh)[None]),
        _init("B", np.concatenate([relayout(w.b_ih), relayout(w.b_hh)])[None]),
        _init("w1_t", w.w1.T.copy()),
        _init("b1", w.b1),
        _init("w2_t", w.w2.T.copy()),
        _init("b2", w.b2),
        _init("axis1", np.asarray([1], np.int64)),
    ]
    n = helper.make_node
    nodes = [
        n("MatMul", ["frames", "dft"], ["spec"]),
        n("Mul", ["spec", "spec"], ["power2"]),
        n("MatMul", ["power2", "pairs"], ["power"]),
        n("Add", ["power", "one"], ["power1"]),
        n("Log", ["power1"], ["feats"]),
        n("LSTM", ["feats", "W", "R", "B"], ["Y"], hidden_size=HIDDEN),
        n("Squeeze", ["Y", "axis1"], ["hseq"]),
        n("MatMul", ["hseq", "w1_t"], ["z0"]),
        n("Add", ["z0", "b1"], ["z1"]),
        n("Relu", ["z1"], ["z"]),
        n("MatMul", ["z", "w2_t"], ["l0"]),
        n("Add", ["l0", "b2"], ["logit"]),
        n("Sigmoid", ["logit"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vad_sequence",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["time", "batch", FRAME])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["time", "batch", 1])],
        inits,
    )
    return _model(graph)


def run_vad_step(model: bytes, frame: np.ndarray, h: np.ndarray, c: np.ndarray, sr: int | None = None):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {"x": frame, "h": h, "c": c}
    if sr is not None:
        feeds["sr"] = np.asarray(sr, np.int64)
    return session.run(None, feeds)


# -------------------------------------------------------------------------------------------------- MLPs


@lru_cache(maxsize=8)
def train_mlp(
    seed: int, widths: tuple[int, ...] = (64, 48, 24, 10), steps: int = 150
) -> tuple[np.ndarray, ...]:
    """A ReLU MLP on scikit-learn-free digits-like data: returns (w0, b0, w1, b1, ...) with w as (out, in)."""
    rng = np.random.default_rng(seed)
    data = np.random.default_rng(7)  # the same task for every seed
    centers = data.normal(0, 1, (widths[-1], widths[0]))
    labels = data.integers(0, widths[-1], 600)
    x = (centers[labels] + data.normal(0, 0.8, (600, widths[0]))).astype(np.float64)
    params = []
    for fan_in, fan_out in zip(widths, widths[1:], strict=False):
        params += [rng.normal(0, np.sqrt(2 / fan_in), (fan_out, fan_in)), np.zeros(fan_out)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    onehot = np.eye(widths[-1])[labels]
    for step in range(1, steps + 1):
        acts = [x]
        for i in range(0, len(params), 2):
            z = acts[-1] @ params[i].T + params[i + 1]
            acts.append(np.maximum(z, 0) if i + 2 < len(params) else z)
        logits = acts[-1] - acts[-1].max(axis=1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        delta = (probs - onehot) / len(x)
        grads: list[np.ndarray] = [np.zeros(0)] * len(params)
        for i in range(len(params) - 2, -1, -2):
            grads[i] = delta.T @ acts[i // 2]
            grads[i + 1] = delta.sum(axis=0)
            if i:
                delta = (delta @ params[i]) * (acts[i // 2] > 0)
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g**2
            params[i] -= 0.01 * (m[i] / (1 - 0.9**step)) / (np.sqrt(v[i] / (1 - 0.999**step)) + 1e-8)
    return tuple(np.asarray(p, np.float32) for p in params)


def mlp_onnx(params: tuple[np.ndarray, ...]) -> bytes:
    """MatMul/Add/Relu chain, input x [N, in], output probabilities (the digits corpus models' layout)."""
    from onnx import TensorProto, helper

    nodes, inits = [], []
    x = "x"
    layers = len(params) // 2
    for i in range(layers):
        w, b = params[2 * i], params[2 * i + 1]
        inits += [_init(f"coef_{i}", w.T.copy()), _init(f"intercept_{i}", b[None, :])]
        nodes += [
            helper.make_node("MatMul", [x, f"coef_{i}"], [f"mm_{i}"]),
            helper.make_node(
                "Add", [f"mm_{i}", f"intercept_{i}"], [f"act_{i}" if i + 1 < layers else "logits"]
            ),
        ]
        if i + 1 < layers:
            nodes.append(helper.make_node("Relu", [f"act_{i}"], [f"relu_{i}"]))
            x = f"relu_{i}"
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, params[0].shape[1]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, params[-1].shape[0]])],
        inits,
    )
    return _model(graph)
