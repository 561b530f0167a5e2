"""Builds of real corpus models load and run in their runtimes, and the reports are honest."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from onnx import numpy_helper

from packagers import TARGETS, Build, inspect_model
from packagers.fpga_xint8 import is_power_of_two


def _onnx_run(payload: bytes, feeds: dict) -> dict:
    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _tflite_run(payload: bytes, x: np.ndarray) -> dict:
    """Sample by sample: the coral-edgetpu build has a static batch of 1, as the Edge TPU compiler needs."""
    interpreter = Interpreter(model_content=payload)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.allocate_tensors()
    parts: dict[str, list] = {}
    for row in x:
        interpreter.set_tensor(index, row[None])
        interpreter.invoke()
        for d in interpreter.get_output_details():
            parts.setdefault(d["name"], []).append(interpreter.get_tensor(d["index"]))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _built(builds: dict, target: str) -> Build:
    if target not in builds:
        pytest.skip(
            f"{target} converts with onnx2tf + TensorFlow: pip install -e '.[coral]' (make venv installs it)"
        )
    return builds[target]


def test_targets_are_the_four_of_the_design_and_x86():
    assert set(TARGETS) == {"arm-cpu", "coral-edgetpu", "fpga-xint8", "onnx-fp32", "x86-cpu"}


@pytest.mark.parametrize("target", ["onnx-fp32", "arm-cpu", "x86-cpu", "fpga-xint8", "coral-edgetpu"])
def test_digits_build_is_consistent(digits_builds, target):
    build: Build = _built(digits_builds, target)
    assert build.target == target
    assert build.build_hash == "sha256:" + hashlib.sha256(build.payload).hexdigest()
    assert inspect_model(build.payload).format == build.format
    assert build.format == ("tflite" if target == "coral-edgetpu" else "onnx")
    assert build.metadata["packaging_seconds"] >= 0
    assert build.metadata["input_signature"][0]["name"] == "x"
    report = build.quality.to_dict()
    json.dumps(report, allow_nan=False)  # strictly JSON-able
    assert report["size"]["build_bytes"] == len(build.payload)
    page = build.quality.to_html()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page


def test_fp32_payload_is_the_original(digits_builds, digits_bytes):
    assert digits_builds["onnx-fp32"].payload == digits_bytes
    assert digits_builds["onnx-fp32"].quality.passed


@pytest.mark.parametrize("target", ["arm-cpu", "x86-cpu", "fpga-xint8", "coral-edgetpu"])
def test_quantized_digits_is_smaller_and_reported_agreement_is_recomputable(
    digits_builds, digits_bytes, digits_hold, target
):
    build = _built(digits_builds, target)
    x = digits_hold["x"]
    reference = _onnx_run(digits_bytes, {"x": x})
    got = _tflite_run(build.payload, x) if build.format == "tflite" else _onnx_run(build.payload, {"x": x})
    agreement = float(np.mean(reference["label"] == got["label"]))
    top1 = float(np.mean(reference["probabilities"].argmax(1) == got["probabilities"].argmax(1)))
    figures = build.quality.agreement["holdout"]
    assert figures["label"]["agreement"] == pytest.approx(agreement)
    assert figures["probabilities"]["agreement"] == pytest.approx(top1)
    assert figures["label"]["samples"] == len(x)
    assert len(build.payload) < len(digits_bytes)
    # The quantized model is not bit-identical to fp32, and the report says so.
    assert figures["probabilities"]["max_abs_error"] > 0
    assert build.quality.passed is (agreement >= 0.98 and top1 >= 0.98)


def test_arm_cpu_build_is_int8_with_per_channel_weights_in_the_smaller_equal_format(digits_builds):
    build = digits_builds["arm-cpu"]
    model = onnx.load_from_string(build.payload)
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    choice = build.metadata["format_choice"]
    assert choice["format"] in ("QDQ", "QOperator")
    if choice["format"] == "QOperator":
        assert ops & {"QLinearMatMul", "QGemm", "QLinearConv", "MatMulInteger"}
        assert choice["qoperator_bytes"] == len(build.payload) < choice["qdq_bytes"]
    else:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 for i in model.graph.initializer)
    scales = [
        numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
    ]
    assert any(v.ndim == 1 and v.size > 1 for v in scales), "per-channel weight scales expected"
    assert not model.graph.value_info  # nothing a runtime never reads
    assert all(len(i.name) <= 4 for i in model.graph.initializer)  # short tensor names
    q = build.quality
    assert q.worst_layers and all("snr_db" in w and "node" in w for w in q.worst_layers)
    assert q.quantized_ops


def test_latency_is_labelled_with_where_it_was_measured(digits_builds):
    import platform

    here = platform.machine()
    for target, build in digits_builds.items():
        lat = build.quality.latency
        assert lat["machine"] == here and here in lat["measured_on"] and lat["made_for"]
        native = {"arm-cpu": here in ("aarch64", "arm64"), "x86-cpu": here in ("x86_64", "AMD64"),
                  "onnx-fp32": True, "fpga-xint8": False, "coral-edgetpu": False}[target]  # fmt: skip
        assert lat["representative"] is native
        if native:
            assert lat["build_ms"] == lat["host_build_ms"] and lat["ratio"] == lat["host_ratio"]
        else:  # an x86 run of an ARM/DPU/TPU build is a host check, never the build's latency
            assert lat["build_ms"] is None and lat["ratio"] is None and lat["host_build_ms"] > 0
            assert "not measured here" in lat["note"]
            assert "host check, NOT this build" in build.quality.to_html()


@pytest.mark.parametrize("builds", ["digits_builds", "cls_builds"])
def test_fpga_scales_are_exact_powers_of_two_with_zero_points_zero(request, builds):
    model = onnx.load_from_string(request.getfixturevalue(builds)["fpga-xint8"].payload)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        scale = inits[node.input[1]].astype(np.float64)
        mantissa, _ = np.frexp(scale)
        assert np.all(mantissa == 0.5), f"{node.input[1]} = {scale} is not a power of two"
        assert is_power_of_two(scale)
        if len(node.input) > 2:
            assert np.all(inits[node.input[2]] == 0), f"{node.input[2]} is not 0"


def test_fpga_metadata_reports_the_least_error_choice(digits_builds):
    stats = digits_builds["fpga-xint8"].metadata["power_of_two"]
    assert stats["scales"] > 0
    assert set(stats["chose"]) <= {"floor", "ceil", "degenerate", "nearest"}


@pytest.mark.parametrize("target", ["onnx-fp32", "arm-cpu", "x86-cpu", "fpga-xint8"])
def test_ppocr_cls_builds_run_and_figures_recompute(cls_builds, cls_model, cls_samples, target):
    build = cls_builds[target]
    x = cls_samples["x"][8:]
    ref = _onnx_run(cls_model, {"x": x})
    got = _onnx_run(build.payload, {"x": x})
    (name,) = ref
    figures = build.quality.agreement["holdout"][name]
    assert figures["kind"] == "top1"
    assert figures["agreement"] == pytest.approx(float(np.mean(ref[name].argmax(1) == got[name].argmax(1))))
    if target != "onnx-fp32":
        assert build.quality.float_ops is not None
        assert build.quality.worst_layers
        assert build.metadata["opset_before"] == 11 and build.metadata["opset"] >= 13


def test_fpga_build_follows_the_vitis_xint8_rules_node_by_node(cls_builds):
    build = cls_builds["fpga-xint8"]
    rows = build.quality.constraints
    assert rows and not [r for r in rows if r["status"] == "violated"]
    rules = {(r["op"], r["rule"]) for r in rows}
    assert {("Conv", "shift_cut"), ("Conv", "shift_bias"), ("Add", "shift_read"), ("Add", "shift_write"),
            ("Mul", "shift_write"), ("GlobalAveragePool", "input pos == output pos"),
            ("HardSigmoid", "shift_sigmoid")} <= rules  # fmt: skip
    model = onnx.load_from_string(build.payload)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    quantizer = {n.input[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    nodes = {n.name: n for n in model.graph.node}
    pools = [n for n in model.graph.node if n.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool")
             and producer[n.input[0]].op_type == "DequantizeLinear" and n.output[0] in quantizer]  # fmt: skip
    assert pools
    for pool in pools:  # recomputed from the payload: pooling keeps its input position
        assert inits[producer[pool.input[0]].input[1]] == inits[quantizer[pool.output[0]].input[1]]
    for row in rows:  # the table names the payload's own nodes
        assert row["node"] in nodes
    for node in model.graph.node:
        if node.op_type == "HardSigmoid":
            alpha = next(a.f for a in node.attribute if a.name == "alpha")
            assert alpha == pytest.approx(2731 / 16384)  # the DPU's slope
    assert build.metadata["xint8_constraints"]["violated"] == 0
    page = build.quality.to_html()
    assert "Vitis AI XINT8 constraints, node by node" in page and "shift_cut" in page


def test_fpga_int8_power_of_two_biases(digits_bytes, digits_cal):
    from packagers import package_model

    build = package_model(digits_bytes, "fpga-xint8", calibration=digits_cal,
                          options={"int8_biases": "true", "latency_runs": 1})  # fmt: skip
    model = onnx.load_from_string(build.payload)
    inits = {i.name: i for i in model.graph.initializer}
    bias_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and len(inits[n.input[0]].dims) == 1 and any(c.input[2:] == [n.output[0]][:1] for c in model.graph.node
                if c.op_type in ("Gemm", "Conv"))]  # fmt: skip
    assert bias_dqs and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in bias_dqs)
    assert all(is_power_of_two(numpy_helper.to_array(inits[n.input[1]])) for n in bias_dqs)
    shift_bias = [r for r in build.quality.constraints if r["rule"] == "shift_bias"]
    assert shift_bias and all(r["status"] != "violated" for r in shift_bias)
    assert build.metadata["biases"] == "int8, power of two"
