"""coral-edgetpu from ONNX through onnx2tf + TensorFlow (the `coral` extra): the builds load in LiteRT, are
full-integer, agree with fp32 and carry the Edge TPU op report. One conversion per model per module."""

from __future__ import annotations

import sys
import tempfile

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
