"""coral-edgetpu from ONNX through onnx2tf + TensorFlow (the `coral` extra): the builds load in LiteRT, are
full-integer, agree with fp32 and carry the Edge TPU op report. One conversion per model per module."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from onnx import TensorProto, helper, numpy_helper

import packagers._onnx2tf as onnx2tf_module
from edgemart.core.errors import UsageError
from packagers import package_model
from packagers._onnx2tf import LOG_CHARS, converter_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_models import HIDDEN as VAD_HIDDEN  # noqa: E402
from streaming_models import streaming_vad, vad_sequences  # noqa: E402

FAST = {"latency_runs": 3}

needs_converter = pytest.mark.skipif(
    not converter_available(),
    reason="coral-edgetpu converts with onnx2tf + TensorFlow: pip install -e '.[coral]' (make venv installs it)",
)


def _litert_outputs(payload: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sample by sample (the build has a static batch of 1), outputs joined."""
    interpreter = Interpreter(model_content=payload)
    interpreter.allocate_tensors()
    rows = len(next(iter(feeds.values())))
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(rows):
        for d in interpreter.get_input_details():
            interpreter.set_tensor(d["index"], feeds[d["name"]][i : i + 1])
        interpreter.invoke()
        for d in interpreter.get_output_details():
            parts.setdefault(d["name"], []).append(interpreter.get_tensor(d["index"]))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _assert_full_integer(payload: bytes) -> None:
    interpreter = Interpreter(model_content=payload)
    interpreter.allocate_tensors()
    io = {d["index"] for d in interpreter.get_input_details() + interpreter.get_output_details()}
    inner = [d for d in interpreter.get_tensor_details() if d["index"] not in io]
    assert inner and all(d["dtype"] in (np.int8, np.int32) for d in inner), [
        (d["name"], d["dtype"]) for d in inner if d["dtype"] not in (np.int8, np.int32)
    ]
    assert all(d["dtype"] == np.float32 for d in interpreter.get_input_details())  # float I/O


def _check_build(build, model: bytes, hold: dict[str, np.ndarray], output: str) -> float:
    assert build.format == "tflite"
    _assert_full_integer(build.payload)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    reference = session.run([output], hold)[0]
    got = _litert_outputs(build.payload, hold)[output]
    top1 = float(np.mean(reference.argmax(-1) == got.argmax(-1)))
    assert top1 >= 0.97
    assert build.quality.agreement["holdout"][output]["agreement"] == pytest.approx(top1)
    compat = build.quality.op_compatibility
    assert compat["source"] == "tflite" and compat["edgetpu_ops"] + compat["cpu_ops"] == len(compat["ops"])
    placement = {row["mapped_to"]: row["placement"] for row in compat["ops"]}
    assert placement["QUANTIZE"] == placement["DEQUANTIZE"] == "cpu"  # the float I/O edges
    assert build.metadata["converter"].startswith("onnx2tf 1.28.8 + TensorFlow 2.21")
    assert 0 < len(build.metadata["converter_log"]) <= LOG_CHARS
    return top1


def _small_cnn(seed: int = 0, batch: int | str = "N") -> bytes:
    """Conv(3->8, 3x3)+Relu+GlobalAveragePool+Flatten+Gemm(8->3): filters 0-2 pass channel k through, so
    logit k follows the mean of channel k; the other filters and weights are random."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (8, 3, 3, 3)).astype(np.float32)
    for k in range(3):
        w[k] = 0
        w[k, k, 1, 1] = 1.0
    fc = rng.normal(0, 0.05, (3, 8)).astype(np.float32)
    fc[np.arange(3), np.arange(3)] = 2.0
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"], transB=1, name="fc"),
        ],
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(rng.normal(0, 0.01, 8).astype(np.float32), "b"),
            numpy_helper.from_array(fc, "fc"),
            numpy_helper.from_array(np.zeros(3, np.float32), "fb"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _cnn_samples(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 3, 16, 16)).astype(np.float32)
    x[np.arange(n), rng.integers(0, 3, n)] += 0.5  # one brighter channel: the class
    return {"x": x}


@pytest.fixture(scope="module")
def cls_coral(cls_model, cls_samples):
    cal = {k: v[:8] for k, v in cls_samples.items()}
    hold = {k: v[8:] for k, v in cls_samples.items()}
    return package_model(cls_model, "coral-edgetpu", calibration=cal, holdout=hold, options=FAST), hold


@pytest.fixture(scope="module")
def cnn_coral():
    model = _small_cnn()
    hold = _cnn_samples(64, seed=2)
    build = package_model(
        model, "coral-edgetpu", calibration=_cnn_samples(64, seed=1), holdout=hold, options=FAST
    )
    return build, model, hold


@needs_converter
@pytest.mark.slow
def test_ppocr_cls_becomes_full_int8_tflite_that_agrees_with_fp32(cls_coral, cls_model):
    build, hold = cls_coral
    (output,) = build.quality.agreement["holdout"]
    _check_build(build, cls_model, hold, output)
    ops = build.quality.op_compatibility["ops"]
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "HARD_SWISH"} <= {row["mapped_to"] for row in ops}
    # HardSigmoid becomes RELU_0_TO_1, which is not on the Edge TPU list: the report names the fallback.
    assert [r for r in ops if r["mapped_to"] == "RELU_0_TO_1" and r["placement"] == "cpu"]
    assert "RELU_0_TO_1" in build.quality.notes[0]


@needs_converter
def test_digits_mlp_becomes_full_int8_tflite_that_agrees_with_fp32(digits_builds, digits_bytes, digits_hold):
    build = digits_builds["coral-edgetpu"]
    top1 = _check_build(build, digits_bytes, {"x": digits_hold["x"]}, "probabilities")
    assert build.quality.agreement["holdout"]["label"]["agreement"] == pytest.approx(top1)
    placement = [(row["mapped_to"], row["placement"]) for row in build.quality.op_compatibility["ops"]]
    assert placement.count(("FULLY_CONNECTED", "edgetpu")) == 3
    assert ("ARG_MAX", "cpu") in placement  # not on the Edge TPU list


@needs_converter
@pytest.mark.slow
def test_small_cnn_built_with_onnx_helper_converts(cnn_coral):
    build, model, hold = cnn_coral
    _check_build(build, model, hold, "logits")
    placement = {row["mapped_to"]: row["placement"] for row in build.quality.op_compatibility["ops"]}
    assert placement["CONV_2D"] == "edgetpu" and placement["FULLY_CONNECTED"] == "edgetpu"
    # The conversion ran in a child: TensorFlow never loaded here (beside it SoftHSM's PKCS#11 login
    # segfaulted later in the same test process).
    assert "tensorflow" not in sys.modules and "onnx2tf" not in sys.modules


@needs_converter
@pytest.mark.slow
def test_fixed_batch_one_model_with_one_sample_per_run_converts():
    model = _small_cnn(batch=1)  # input [1, 3, 16, 16]: samples come as [N, 1, 3, 16, 16], one run each
    cal = {"x": _cnn_samples(32, seed=1)["x"][:, None]}
    hold = {"x": _cnn_samples(32, seed=2)["x"][:, None]}
    build = package_model(model, "coral-edgetpu", calibration=cal, holdout=hold, options=FAST)
    _assert_full_integer(build.payload)
    figures = build.quality.agreement["holdout"]["logits"]
    assert figures["samples"] == 32 and figures["agreement"] >= 0.97


@needs_converter
@pytest.mark.slow
def test_op_the_converter_lacks_is_a_usage_error_naming_it_and_leaves_no_files(tmp_path, monkeypatch):
    graph = helper.make_graph(
        [helper.make_node("Scaler", ["x"], ["y"], domain="ai.onnx.ml", offset=[0.5] * 4, scale=[2.0] * 4)],
        "scaler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    model.ir_version = 8
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cal = {"x": np.random.default_rng(0).uniform(0, 1, (16, 4)).astype(np.float32)}
    with pytest.raises(UsageError, match=r"op Scaler is not supported by onnx2tf") as err:
        package_model(model.SerializeToString(), "coral-edgetpu", calibration=cal)
    assert "edgemart package MODEL.onnx --target arm-cpu --calibration CAL.npz --out DIR" in err.value.message
    assert err.value.details["op_compatibility"]["source"].startswith("onnx")
    assert "Scaler" in err.value.details["converter_log"]
    assert list(tmp_path.iterdir()) == []  # the converter's temporary directory is gone


def test_without_the_converter_the_error_names_the_install_command(digits_bytes, digits_cal, monkeypatch):
    monkeypatch.setattr(onnx2tf_module, "converter_available", lambda: False)  # as on a machine without it
    with pytest.raises(UsageError, match=r"pip install -e '\.\[coral\]' in the edgemart checkout"):
        package_model(digits_bytes, "coral-edgetpu", calibration=digits_cal)


# -- recurrent models: LSTM / GRU nodes unrolled into cell math, and a streaming VAD ------------------------

STEPS, FEATURES, HIDDEN, CLASSES = 5, 8, 16, 4


def _recurrent_classifier(op: str, seed: int = 0, **attrs) -> bytes:
    """x [N, T, 8] -> Transpose (time-major) -> `op` (hidden 16, forward) -> Y_h -> Gemm(16->4) logits."""
    rng = np.random.default_rng(seed)
    gates = {"LSTM": 4, "GRU": 3}[op] * HIDDEN
    outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["x_tm"], perm=[1, 0, 2], name="time_major"),
            helper.make_node(op, ["x_tm", "W", "R", "B"], outputs, hidden_size=HIDDEN, name="rnn", **attrs),
            helper.make_node("Squeeze", ["Y_h", "axis0"], ["h"], name="last_state"),
            helper.make_node("Gemm", ["h", "fc", "fb"], ["logits"], transB=1, name="head"),
        ],
        f"small_{op.lower()}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", STEPS, FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        _recurrent_weights(rng, gates),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _recurrent_weights(rng: np.random.Generator, gates: int) -> list[onnx.TensorProto]:
    """W, R, B of a one-direction recurrent node with ``gates`` rows, the Squeeze axis and the Gemm head."""
    return [
        numpy_helper.from_array(rng.normal(0, 0.4, (1, gates, FEATURES)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 0.4, (1, gates, HIDDEN)).astype(np.float32), "R"),
        numpy_helper.from_array(rng.normal(0, 0.2, (1, 2 * gates)).astype(np.float32), "B"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(rng.normal(0, 0.5, (CLASSES, HIDDEN)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(CLASSES, np.float32), "fb"),
    ]


def _sequences(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (n, STEPS, FEATURES)).astype(np.float32)}


def _snr_db(reference: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - got) ** 2)))


@pytest.fixture(
    scope="module", params=[("LSTM", {}), ("GRU", {"linear_before_reset": 1})], ids=["lstm", "gru"]
)
def recurrent_coral(request):
    op, attrs = request.param
    model = _recurrent_classifier(op, **attrs)
    hold = _sequences(64, seed=2)
    build = package_model(
        model, "coral-edgetpu", calibration=_sequences(128, seed=1), holdout=hold, options=FAST
    )
    return op, build, model, hold


@needs_converter
@pytest.mark.slow
def test_lstm_and_gru_models_become_full_int8_tflite_that_agrees_with_fp32(recurrent_coral):
    op, build, model, hold = recurrent_coral
    _assert_full_integer(build.payload)
    reference = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(["logits"], hold)[0]
    got = _litert_outputs(build.payload, hold)["logits"]
    snr = _snr_db(reference, got)
    assert snr >= 20, snr
    assert build.quality.agreement["holdout"]["logits"]["snr_db"] == pytest.approx(snr, abs=0.01)
    assert build.metadata["recurrent_unrolled"] == [
        {"node": "rnn", "op": op, "direction": "forward", "steps": 5}
    ]
    assert f"recurrent node rnn ({op}, forward) unrolled into cell math over 5 step(s) before conversion" in (
        build.quality.notes
    )
    compat = build.quality.op_compatibility
    assert compat["source"] == "tflite" and compat["edgetpu_ops"] + compat["cpu_ops"] == len(compat["ops"])
    mapped = {row["mapped_to"] for row in compat["ops"]}
    assert {"FULLY_CONNECTED", "LOGISTIC", "TANH", "MUL"} <= mapped
    assert not mapped & {"UNIDIRECTIONAL_SEQUENCE_LSTM", "WHILE", "GATHER"}  # plain cell math, steps sliced


def _vad_stream_litert(payload: bytes, chunks: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Independent of the packagers: the coral build frame by frame in LiteRT, the state carried by hand."""
    interpreter = Interpreter(model_content=payload)
    interpreter.allocate_tensors()
    inputs = {d["name"]: d["index"] for d in interpreter.get_input_details()}
    outputs = {d["name"]: d["index"] for d in interpreter.get_output_details()}
    assert set(inputs) == {"input", "state"} and set(outputs) == {"output", "stateN"}  # sr is folded in
    probs, state = [], np.zeros((2, 1, VAD_HIDDEN), np.float32)
    for chunk, start in zip(chunks, starts, strict=True):
        if start:
            state = np.zeros_like(state)
        interpreter.set_tensor(inputs["input"], chunk[None])
        interpreter.set_tensor(inputs["state"], state)
        interpreter.invoke()
        probs.append(interpreter.get_tensor(outputs["output"]))
        state = interpreter.get_tensor(outputs["stateN"])
    return np.concatenate(probs)


@pytest.fixture(scope="module")
def vad_parts():
    return streaming_vad(), vad_sequences(sequences=4, steps=30)


@pytest.fixture(scope="module")
def vad_coral(vad_parts):
    vad, sequences = vad_parts
    cal = {k: v[:90] for k, v in sequences.items()}  # three recordings calibrate, the fourth is held out
    hold = {k: v[90:] for k, v in sequences.items()}
    options = {**FAST, "fixed": "sr=16000"}
    return package_model(vad, "coral-edgetpu", calibration=cal, holdout=hold, options=options)


@needs_converter
@pytest.mark.slow
def test_streaming_vad_with_fixed_rate_becomes_full_int8_and_frames_compare_with_fp32(vad_coral, vad_parts):
    vad, sequences = vad_parts
    build = vad_coral
    _assert_full_integer(build.payload)
    assert build.metadata["fixed_inputs"] == {"sr": 16000}
    assert build.metadata["if_nodes_resolved"] == [
        {"node": "rate_switch", "condition": "is_16k", "took": "then"}
    ]
    chunks, starts = sequences["input"][90:], sequences["sequence_start"][90:]
    session = ort.InferenceSession(vad, providers=["CPUExecutionProvider"])
    reference, state = [], np.zeros((2, 1, VAD_HIDDEN), np.float32)
    for chunk, start in zip(chunks, starts, strict=True):
        state = np.zeros_like(state) if start else state
        prob, state = session.run(
            ["output", "stateN"], {"input": chunk[None], "state": state, "sr": np.array(16000, np.int64)}
        )
        reference.append(prob)
    reference = np.concatenate(reference)
    got = _vad_stream_litert(build.payload, chunks, starts)
    figures = build.quality.agreement["holdout"]["output"]
    assert figures["samples"] == 30 == len(reference)
    assert figures["max_abs_error"] == pytest.approx(float(np.abs(reference - got).max()), abs=1e-6)
    assert figures["decision_agreement"] == pytest.approx(float(np.mean((reference > 0.5) == (got > 0.5))))
    assert figures["decision_agreement"] >= 0.9 and figures["snr_db"] >= 20
    assert "stateN" in build.quality.agreement["holdout"]
    assert any("state <- stateN" in n and "step by step" in n for n in build.quality.notes)
    assert build.quality.passed, build.quality.verdict_reason
    # The state's per-layer Gathers became Slice + Squeeze (GATHER would end the Edge TPU region first):
    # the whole network, both layers and the head, is placed on the Edge TPU.
    placement = [(r["mapped_to"], r["placement"]) for r in build.quality.op_compatibility["ops"]]
    assert not [p for p in placement if p[0] == "GATHER"]
    compute = [p for p in placement if p[0] in ("FULLY_CONNECTED", "TANH", "LOGISTIC", "STRIDED_SLICE")]
    assert len(compute) >= 9 and all(where == "edgetpu" for _, where in compute), compute


@needs_converter
def test_vad_with_the_rate_as_data_is_refused_naming_the_option(vad_parts, tmp_path, monkeypatch):
    vad, sequences = vad_parts
    n = len(sequences["input"])
    with_rate = dict(sequences, sr=np.full(n, 16000, np.int64))  # sr fed per step: the If stays
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(UsageError) as err:
        package_model(vad, "coral-edgetpu", calibration=with_rate, options=FAST)
    assert err.value.message.startswith(
        "coral-edgetpu: node rate_switch (If) picks its branch at run time from input(s) 'sr'; "
    )
    assert (
        "edgemart package MODEL.onnx --target coral-edgetpu --calibration CAL.npz --fixed sr=VALUE --out DIR"
        in (err.value.message)
    )
    assert list(tmp_path.iterdir()) == []  # refused before any conversion


@needs_converter
def test_lstm_longer_than_the_unrolling_bound_is_refused_naming_it():
    from packagers._unroll_rnn import MAX_STEPS

    graph = onnx.load_from_string(_recurrent_classifier("LSTM"))
    graph.graph.input[0].type.tensor_type.shape.dim[1].dim_value = MAX_STEPS + 6
    cal = {"x": np.zeros((4, MAX_STEPS + 6, FEATURES), np.float32)}
    with pytest.raises(
        UsageError, match=rf"sequence length {MAX_STEPS + 6} is above the unrolling bound of {MAX_STEPS}"
    ):
        package_model(graph.SerializeToString(), "coral-edgetpu", calibration=cal, options=FAST)


def _streaming_lstm(seed: int = 0) -> bytes:
    """One step per call, as streaming models run: x [N, 8] -> LSTM(seq_len 1, initial_h h0, initial_c c0)
    -> hn, cn (fed back as h0, c0) and a Gemm head on hn."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["x", "axis0"], ["x_tm"], name="one_step"),
            helper.make_node(
                "LSTM",
                ["x_tm", "W", "R", "B", "", "h0", "c0"],
                ["", "hn", "cn"],
                hidden_size=HIDDEN,
                name="rnn",
            ),
            helper.make_node("Squeeze", ["hn", "axis0"], ["h"], name="last_state"),
            helper.make_node("Gemm", ["h", "fc", "fb"], ["logits"], transB=1, name="head"),
        ],
        "streaming_lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])]
        + [helper.make_tensor_value_info(s, TensorProto.FLOAT, [1, "N", HIDDEN]) for s in ("h0", "c0")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])]
        + [helper.make_tensor_value_info(s, TensorProto.FLOAT, [1, "N", HIDDEN]) for s in ("hn", "cn")],
        _recurrent_weights(rng, 4 * HIDDEN),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _steps(sequences: int, steps: int, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(0, 1, (sequences * steps, FEATURES)).astype(np.float32)
    return {"x": x, "sequence_start": np.tile(np.arange(steps) == 0, sequences).astype(np.int8)}


@needs_converter
@pytest.mark.slow
def test_streaming_lstm_with_initial_states_carries_its_state_in_the_int8_build():
    model = _streaming_lstm()
    hold = _steps(2, 25, seed=2)
    options = {**FAST, "state": "h0=hn,c0=cn"}
    build = package_model(
        model, "coral-edgetpu", calibration=_steps(4, 25, seed=1), holdout=hold, options=options
    )
    _assert_full_integer(build.payload)
    assert build.metadata["recurrent_unrolled"] == [
        {"node": "rnn", "op": "LSTM", "direction": "forward", "steps": 1}
    ]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    interpreter = Interpreter(model_content=build.payload)
    interpreter.allocate_tensors()
    ins = {d["name"]: d["index"] for d in interpreter.get_input_details()}
    outs = {d["name"]: d["index"] for d in interpreter.get_output_details()}
    reference, got = [], []
    for x, start in zip(hold["x"], hold["sequence_start"], strict=True):
        if start:  # each side carries its own state from zeros
            fp32 = {s: np.zeros((1, 1, HIDDEN), np.float32) for s in ("h0", "c0")}
            int8 = {s: np.zeros((1, 1, HIDDEN), np.float32) for s in ("h0", "c0")}
        logits, fp32["h0"], fp32["c0"] = session.run(["logits", "hn", "cn"], {"x": x[None], **fp32})
        reference.append(logits)
        interpreter.set_tensor(ins["x"], x[None])
        for s in ("h0", "c0"):
            interpreter.set_tensor(ins[s], int8[s])
        interpreter.invoke()
        got.append(interpreter.get_tensor(outs["logits"]))
        int8 = {"h0": interpreter.get_tensor(outs["hn"]), "c0": interpreter.get_tensor(outs["cn"])}
    snr = _snr_db(np.concatenate(reference), np.concatenate(got))
    assert snr >= 20, snr
    figures = build.quality.agreement["holdout"]["logits"]
    assert figures["samples"] == 50 and figures["snr_db"] == pytest.approx(snr, abs=0.01)
    assert {"hn", "cn"} <= set(build.quality.agreement["holdout"])
