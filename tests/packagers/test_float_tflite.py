"""A float TFLite upload quantized to full int8 (ai-edge-quantizer static_wi8_ai8) for coral-edgetpu and arm-cpu.

A tiny float TFLite written here (schema-v3 op codes, fp16 weights behind DEQUANTIZE, like MediaPipe's files)
covers the flatbuffer preparation quickly; the corpus BlazeFace detector is the real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemart.cli import main
from edgemart.core.errors import UsageError
from packagers import load_calibration, package_model
from packagers._model import full_int8_problems, inspect_model, tflite_schema
from packagers._runtime import TfliteRunner, make_litert_interpreter
from packagers._tflite_quant import HOW, prepare_float_tflite
from packagers.quality import snr_db

pytest.importorskip("ai_edge_quantizer")


def _fast(target: str) -> dict:
    return {"latency_runs": 2, **({"run_compiler": False} if target == "coral-edgetpu" else {})}


# ---------------------------------------------------------------- a tiny float TFLite, written here


def _tiny_float_tflite(weight: np.ndarray, bias: np.ndarray) -> bytes:
    """x[N, IN] -> FULLY_CONNECTED(W as fp16 + DEQUANTIZE, b fp32) -> RELU -> y[1, OUT], schema-v3 op codes."""
    import flatbuffers

    s = tflite_schema()
    out_dim, in_dim = weight.shape

    def buffer(data: bytes | None):
        b = s.BufferT()
        b.data = None if data is None else np.frombuffer(data, np.uint8)
        return b

    def tensor(name: str, shape, dtype: int, buf: int):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), list(shape), dtype, buf
        if buf > 2:  # activations: any batch
            t.shapeSignature = [-1, *shape[1:]]
        return t

    def code(op: int):
        c = s.OperatorCodeT()
        c.deprecatedBuiltinCode, c.builtinCode, c.version = op, 0, 1  # as old converters wrote them
        return c

    def operator(index: int, inputs, outputs, options_type=0, options=None):
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = index, list(inputs), list(outputs)
        o.builtinOptionsType, o.builtinOptions = options_type, options
        return o

    fp16, fp32 = 1, 0
    model = s.ModelT()
    model.version, model.description = 3, b"edgemart test"
    model.buffers = [
        buffer(None),
        buffer(weight.astype("<f2").tobytes()),
        buffer(bias.astype("<f4").tobytes()),
    ]
    model.buffers += [buffer(None), buffer(None), buffer(None)]
    graph = s.SubGraphT()
    graph.tensors = [
        tensor("x", [1, in_dim], fp32, 3),
        tensor("fc/weights_fp16", [out_dim, in_dim], fp16, 1),
        tensor("fc/weights", [out_dim, in_dim], fp32, 0),
        tensor("fc/bias", [out_dim], fp32, 2),
        tensor("fc", [1, out_dim], fp32, 4),
        tensor("y", [1, out_dim], fp32, 5),
    ]
    fc_options = s.FullyConnectedOptionsT()
    model.operatorCodes = [
        code(s.BuiltinOperator.DEQUANTIZE),
        code(s.BuiltinOperator.FULLY_CONNECTED),
        code(s.BuiltinOperator.RELU),
    ]
    graph.operators = [
        operator(0, [1], [2]),
        operator(1, [0, 2, 3], [4], s.BuiltinOptions.FullyConnectedOptions, fc_options),
        operator(2, [4], [5]),
    ]
    graph.inputs, graph.outputs, graph.name = [0], [5], b"main"
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.fixture(scope="module")
def tiny() -> tuple[bytes, dict, dict]:
    rng = np.random.default_rng(7)
    weight = rng.normal(0, 0.3, (6, 16)).astype(np.float32)
    bias = rng.normal(0, 0.1, 6).astype(np.float32)
    model = _tiny_float_tflite(weight, bias)
    cal = {"x": rng.normal(0, 1, (64, 16)).astype(np.float32)}
    hold = {"x": rng.normal(0, 1, (32, 16)).astype(np.float32)}
    return model, cal, hold


def test_tiny_float_tflite_runs_and_is_float(tiny):
    model, cal, _ = tiny
    info = inspect_model(model)
    assert info.format == "tflite" and not info.quantized
    assert full_int8_problems(model)  # fp16 weights, float activations
    x = cal["x"][:1]
    got = TfliteRunner(model).run({"x": x})["y"]
    s = tflite_schema()
    tree = s.ModelT.InitFromPackedBuf(model, 0)
    weight = np.frombuffer(bytes(tree.buffers[1].data), "<f2").astype(np.float32).reshape(6, 16)
    bias = np.frombuffer(bytes(tree.buffers[2].data), "<f4")
    np.testing.assert_allclose(got, np.maximum(x @ weight.T + bias, 0), rtol=1e-5, atol=1e-5)


def test_prepare_folds_fp16_weights_and_adds_a_signature(tiny):
    model, cal, _ = tiny
    prepared, folded, key = prepare_float_tflite(model)
    assert folded == 1 and key == "serving_default"
    tree = tflite_schema().ModelT.InitFromPackedBuf(prepared, 0)
    graph = tree.subgraphs[0]
    assert len(graph.operators) == 2 and len(graph.tensors) == 5  # DEQUANTIZE and its fp16 input gone
    assert {t.type for t in graph.tensors} == {0}  # all fp32 now
    assert [
        c.builtinCode for c in tree.operatorCodes if c.builtinCode
    ] != []  # names the ops for the quantizer
    assert make_litert_interpreter(prepared).get_signature_list() == {
        "serving_default": {"inputs": ["x"], "outputs": ["y"]}
    }
    x = cal["x"][:4]
    np.testing.assert_array_equal(
        TfliteRunner(model).run({"x": x})["y"], TfliteRunner(prepared).run({"x": x})["y"]
    )


@pytest.mark.parametrize("target", ["coral-edgetpu", "arm-cpu"])
def test_tiny_float_tflite_is_quantized_to_full_int8(tiny, target):
    model, cal, hold = tiny
    build = package_model(model, target, calibration=cal, holdout=hold, options=_fast(target))
    assert build.format == "tflite" and build.metadata["quantization"] == HOW
    assert build.metadata["as_uploaded"] is False and build.metadata["folded_fp16_weights"] == 1
    assert full_int8_problems(build.payload) == []
    interpreter = make_litert_interpreter(build.payload)
    interpreter.allocate_tensors()
    inner = [d for d in interpreter.get_tensor_details() if d["name"] not in ("x", "y")]
    assert inner and all(d["dtype"] in (np.int8, np.int32) for d in inner)
    # Agreement with the float TFLite on held-out rows, measured here and in the report alike.
    ref = TfliteRunner(model).run(hold)["y"]
    got = TfliteRunner(build.payload).run(hold)["y"]
    measured = snr_db(ref, got)
    assert measured is not None and measured >= 25.0  # 30 dB measured: one FC + ReLU at int8
    figures = build.quality.agreement["holdout"]["y"]
    assert figures["snr_db"] == pytest.approx(measured, abs=1e-6)
    assert build.quality.passed
    assert any(n.startswith(HOW) for n in build.quality.notes)
    if target == "coral-edgetpu":
        compat = build.quality.op_compatibility
        assert compat["source"] == "tflite" and compat["edgetpu_ops"] > 0
    else:  # the arm-cpu copy names its target, so the two builds never share a hash
        assert b"edgemart.target" in build.payload and build.quality.op_compatibility is None
        assert build.quality.latency["made_for"] == "aarch64 CPU (LiteRT)"  # not onnxruntime: a LiteRT build


# ---------------------------------------------------------------- refusals


def test_float_tflite_without_calibration_is_exit_2_naming_the_command(tiny, tmp_path: Path, capsys):
    model, _, _ = tiny
    path = tmp_path / "tiny.tflite"
    path.write_bytes(model)
    out = tmp_path / "out"
    for target in ("coral-edgetpu", "arm-cpu"):
        assert main(["package", str(path), "--target", target, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"target {target} quantizes a float TFLite to full int8 and needs calibration samples" in err
        assert f"edgemart package MODEL.tflite --target {target} --calibration samples.npz --out DIR" in err
        assert "Traceback" not in err
    assert not out.exists()  # bad input leaves no partial files


def test_float_tflite_is_refused_by_onnx_only_targets_naming_the_ones_that_take_it(tiny):
    model, cal, _ = tiny
    with pytest.raises(UsageError, match=r"x86-cpu takes ONNX models; this is a float TFLite model .*"
                       r"edgemart package MODEL.tflite --target arm-cpu --calibration samples.npz"):  # fmt: skip
        package_model(model, "x86-cpu", calibration=cal)


def test_onnx_quantization_options_on_a_tflite_upload_are_an_error(tiny):
    model, cal, _ = tiny
    with pytest.raises(UsageError, match=r"option nodes_to_exclude of target arm-cpu applies to ONNX input"):
        package_model(model, "arm-cpu", calibration=cal, options={"nodes_to_exclude": "fc"})


def test_sparse_float_tflite_is_refused_before_any_work(corpus: Path):
    model = (corpus / "models" / "mediapipe" / "face_detection_full_range_sparse.tflite").read_bytes()
    images = load_calibration(corpus / "data" / "mediapipe" / "face_detection_full_range_sparse.npz")[
        "input_1"
    ]
    with pytest.raises(UsageError, match=r"46 sparse weight tensors \(DENSIFY ops\).*export it dense"):
        package_model(model, "coral-edgetpu", calibration={"input_1": images}, options=_fast("coral-edgetpu"))


# ---------------------------------------------------------------- BlazeFace (corpus)


def _augmented(images: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """Brightness, contrast, noise and mirror variants of the corpus images, in the model's [-1, 1] range."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(copies):
        for image in images:
            x = image * rng.uniform(0.6, 1.1) + rng.uniform(-0.15, 0.15) + rng.normal(0, 0.04, image.shape)
            out.append(np.clip(x[:, ::-1] if i % 2 else x, -1.0, 1.0))
    return np.stack(out).astype(np.float32)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(v, -80, 80)))


@pytest.fixture(scope="module")
def blazeface(corpus: Path):
    model = (corpus / "models" / "mediapipe" / "face_detection_front.tflite").read_bytes()
    images = load_calibration(corpus / "data" / "mediapipe" / "face_detection_front.npz")["input"]
    # The corpus holds two photos (a face, no face): calibration uses 32 altered copies of them, the
    # untouched photos are held out (never seen as such by the calibration).
    return model, {"input": _augmented(images, 16, seed=3)}, {"input": images}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["coral-edgetpu", "arm-cpu"])
def test_blazeface_float_tflite_is_quantized_to_full_int8(blazeface, target):
    model, cal, hold = blazeface
    assert not inspect_model(model).quantized
    build = package_model(model, target, calibration=cal, holdout=hold, options=_fast(target))
    assert build.format == "tflite" and build.metadata["quantization"] == HOW
    assert build.metadata["folded_fp16_weights"] == 74 and build.metadata["calibration_samples"] == 32
    assert full_int8_problems(build.payload) == []
    assert build.quality.size["build_bytes"] < build.quality.size["fp32_bytes"]
    ref, got = TfliteRunner(model), TfliteRunner(build.payload)
    for image in hold["input"]:
        a, b = ref.run({"input": image[None]}), got.run({"input": image[None]})
        # Box regressors: 12-20 dB measured on these photos; 15 dB is the floor asserted here.
        assert snr_db(a["regressors"], b["regressors"]) >= 15.0
        # Scores: background anchors sit at logits near -100 where int8 clips; what a detector uses is
        # which anchors pass 0.5 and the best score.
        sa, sb = _sigmoid(a["classificators"].ravel()), _sigmoid(b["classificators"].ravel())
        assert np.mean((sa > 0.5) == (sb > 0.5)) >= 0.995
        assert (sa.max() > 0.5) == (sb.max() > 0.5) and abs(float(sa.max() - sb.max())) <= 0.25
    figures = build.quality.agreement["holdout"]["regressors"]
    assert figures["samples"] == 2 and figures["snr_db"] >= 15.0
    assert any(n.startswith(HOW + " (32 calibration samples)") for n in build.quality.notes)
    if target == "coral-edgetpu":
        compat = build.quality.op_compatibility
        assert compat["source"] == "tflite" and compat["edgetpu_ops"] > 0
        assert build.quality.quantized_ops.get("CONV_2D", 0) > 0


@pytest.mark.slow
def test_full_range_blazeface_keeps_the_constants_the_quantizer_writes_after_the_flatbuffer(corpus: Path):
    """ai-edge-quantizer stores this model's constants after the flatbuffer (offset buffers): the arm-cpu
    copy, re-serialized with its target entry, must carry them (else LiteRT refuses an out-of-range offset)."""
    model = (corpus / "models" / "mediapipe" / "face_detection_full_range.tflite").read_bytes()
    images = load_calibration(corpus / "data" / "mediapipe" / "face_detection_full_range.npz")["input"]
    cal, hold = {"input": _augmented(images, 8, seed=3)}, {"input": images}
    coral = package_model(
        model, "coral-edgetpu", calibration=cal, holdout=hold, options=_fast("coral-edgetpu")
    )
    tree = tflite_schema().ModelT.InitFromPackedBuf(coral.payload, 0)
    assert any(b.offset for b in tree.buffers)  # the case this test is about
    arm = package_model(model, "arm-cpu", calibration=cal, holdout=hold, options=_fast("arm-cpu"))
    assert b"edgemart.target" in arm.payload and full_int8_problems(arm.payload) == []
    for build in (coral, arm):
        figures = build.quality.agreement["holdout"]
        # 21-28 dB measured on the two corpus photos; 18 dB asserted.
        assert all(f["snr_db"] >= 18.0 for f in figures.values()), figures
    ref, got = TfliteRunner(model), TfliteRunner(arm.payload)
    for image in images:  # the face photo is found by both, the other by neither
        a = _sigmoid(ref.run({"input": image[None]})["reshaped_classifier_face_4"]).max()
        b = _sigmoid(got.run({"input": image[None]})["reshaped_classifier_face_4"]).max()
        assert (a > 0.5) == (b > 0.5) and abs(float(a - b)) <= 0.1


@pytest.mark.slow
def test_ops_the_quantizer_leaves_float_are_refused_naming_them(corpus: Path):
    model = (corpus / "models" / "mediapipe" / "face_landmark.tflite").read_bytes()
    images = load_calibration(corpus / "data" / "mediapipe" / "face_landmark.npz")["input_1"]
    with pytest.raises(UsageError, match=r"left tensors that are not int8/int32: p_re_lu.*ops still float: .*PRELU"
                       r".*edgemart package MODEL_int8.tflite --target arm-cpu"):  # fmt: skip
        package_model(
            model, "arm-cpu", calibration={"input_1": _augmented(images, 2, seed=1)}, options=_fast("arm-cpu")
        )
