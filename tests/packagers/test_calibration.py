"""Calibration quality (#18 item 7): range stability over resamples of the calibration set, and the
calibration method chosen per model by measured agreement with fp32."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemart.core.errors import UsageError
from packagers import package_model
from packagers.cli import register

FAST = {"latency_runs": 2, "format": "qdq"}


def _matmul_model(features: int, outputs: int, hidden: int = 0, seed: int = 0) -> bytes:
    """x [N, features] -> MatMul (-> Relu -> MatMul when hidden) -> y [N, outputs] scores."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    last, width = "x", features
    if hidden:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (features, hidden)).astype(np.float32), "w0"))
        nodes += [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Relu", ["h"], ["r"])]
        last, width = "r", hidden
    inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (width, outputs)).astype(np.float32), "w1"))
    nodes.append(helper.make_node("MatMul", [last, "w1"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "calibration-test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, outputs])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _heavy_tailed(n: int, seed: int) -> np.ndarray:
    """Student-t (2 degrees of freedom) inputs: most values small, a few very large."""
    return np.random.default_rng(seed).standard_t(2.0, (n, 32)).astype(np.float32)


def _varying_amplitude(n: int, seed: int) -> np.ndarray:
    """Samples whose amplitude varies from one to the next (contrast, loudness), as real inputs do."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.5, (n, 1)) * rng.normal(0.0, 1.0, (n, 16))).astype(np.float32)


@pytest.fixture(scope="module")
def heavy_tail():
    model = _matmul_model(32, 8)
    cal, hold = {"x": _heavy_tailed(512, 1)}, {"x": _heavy_tailed(256, 2)}
    # percentile 99.9 clips the t tail (99.999 keeps every value of 16k: it would be minmax here).
    options = {**FAST, "percentile": 99.9}
    auto = package_model(model, "arm-cpu", calibration=cal, holdout=hold, options=options)
    forced = package_model(
        model, "arm-cpu", calibration=cal, holdout=hold, options={**options, "calibration_method": "minmax"}
    )
    return model, cal, hold, auto, forced


def test_auto_picks_percentile_where_minmax_is_measurably_worse(heavy_tail):
    _, _, _, auto, _ = heavy_tail
    cal = auto.quality.calibration
    rows = {r["method"]: r for r in cal["method_choice"]["candidates"]}
    assert cal["requested"] == "auto" and set(rows) >= {"minmax", "percentile"}
    # The pick is the best measured candidate, and on this heavy tail that is percentile by a clear margin.
    best = max(rows.values(), key=lambda r: (r["agreement"], r["snr_db"]))
    assert cal["method"] == best["method"] == "percentile"
    assert rows["percentile"]["agreement"] >= rows["minmax"]["agreement"] + 0.03
    assert "holdout" in cal["method_choice"]["evaluated_on"] and "percentile" in cal["method_choice"]["why"]
    # The shipped build is that candidate: the report's own holdout figure equals the one measured for it.
    assert auto.quality.agreement["holdout"]["y"]["agreement"] == pytest.approx(
        rows["percentile"]["agreement"], abs=1e-4
    )
    assert auto.metadata["calibration_method"] == "percentile"
    assert auto.metadata["calibration_method_requested"] == "auto"


def test_explicit_method_is_respected(heavy_tail):
    _, cal, _, auto, forced = heavy_tail
    section = forced.quality.calibration
    assert section["method"] == section["requested"] == "minmax"
    assert (
        section["method_choice"]["candidates"] == []
        and "calibration_method=minmax" in section["method_choice"]["why"]
    )
    minmax = next(
        r for r in auto.quality.calibration["method_choice"]["candidates"] if r["method"] == "minmax"
    )
    assert forced.quality.agreement["holdout"]["y"]["agreement"] == pytest.approx(
        minmax["agreement"], abs=1e-4
    )
    # minmax really was used: the input's scale spans the calibration set's whole range (asymmetric int8).
    x = cal["x"]
    expected = (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 255.0
    assert _input_scale(forced.payload) == pytest.approx(expected, rel=1e-3)


def _input_scale(payload: bytes) -> float:
    q = onnx.load_from_string(payload)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    quant_x = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    return float(inits[quant_x.input[1]])


def test_explicit_entropy_searches_a_threshold_instead_of_falling_back_to_minmax(heavy_tail):
    """quantize_static's default histogram (128 bins for 128 quantized bins) leaves the KL search a single
    candidate, the min/max range: entropy must clip the t tail where minmax cannot."""
    model, cal, hold, _, forced = heavy_tail
    entropy = package_model(
        model, "arm-cpu", calibration=cal, holdout=hold, options={**FAST, "calibration_method": "entropy"}
    )
    assert entropy.quality.calibration["method"] == "entropy"
    assert _input_scale(entropy.payload) < 0.5 * _input_scale(forced.payload)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_or_three_samples_are_too_small_with_a_larger_suggestion(n, seed):
    build = package_model(
        _matmul_model(16, 4, hidden=16),
        "arm-cpu",
        calibration={"x": _varying_amplitude(n, seed)},
        options={**FAST, "calibration_method": "minmax"},
    )
    st = build.quality.calibration["stability"]
    assert st["samples"] == n and st["verdict"] == "too_small"
    assert st["spread_upper_max"] > st["threshold"] and st["unstable_tensors"] >= 1
    assert st["suggested_samples"] > n
    assert f"{st['suggested_samples']} samples" in st["message"] and "rough estimate" in st["message"]
    assert any(
        note.startswith("calibration: the calibration set is too small") for note in build.quality.notes
    )


def test_a_large_set_of_the_same_inputs_is_stable():
    build = package_model(
        _matmul_model(16, 4, hidden=16),
        "arm-cpu",
        calibration={"x": _varying_amplitude(1000, 9)},
        options={**FAST, "calibration_method": "minmax"},
    )
    st = build.quality.calibration["stability"]
    assert st["verdict"] == "stable" and st["suggested_samples"] is None
    assert 0.0 < st["spread_max"] <= st["spread_upper_max"] <= st["threshold"]
    # Every activation around the two MatMuls that arm-cpu quantizes: inputs x and r, outputs h and y.
    assert sorted(w["tensor"] for w in st["worst_tensors"]) == ["h", "r", "x", "y"] and st["tensors"] == 4
    assert not any(note.startswith("calibration:") for note in build.quality.notes)


def test_the_suggested_count_brings_the_spread_down():
    """The suggestion is an estimate from how the spread shrinks; a set of that size must at least be far
    more stable than the small one it was suggested for."""
    model = _matmul_model(16, 4, hidden=16)
    small = package_model(model, "arm-cpu", calibration={"x": _varying_amplitude(4, 3)},
                          options={**FAST, "calibration_method": "minmax"})  # fmt: skip
    st = small.quality.calibration["stability"]
    assert st["verdict"] == "too_small"
    bigger = package_model(
        model,
        "arm-cpu",
        calibration={"x": _varying_amplitude(st["suggested_samples"], 4)},
        options={**FAST, "calibration_method": "minmax"},
    )
    after = bigger.quality.calibration["stability"]
    assert after["spread_max"] < st["spread_max"] / 2
    assert after["spread_max"] <= st["threshold"] * 1.5


def test_one_sample_cannot_measure_a_spread():
    build = package_model(_matmul_model(16, 4), "arm-cpu", calibration={"x": _varying_amplitude(1, 0)},
                          options={**FAST, "calibration_method": "minmax"})  # fmt: skip
    st = build.quality.calibration["stability"]
    assert st["verdict"] == "too_small" and st["spread_max"] is None and st["suggested_samples"] > 1
    assert "no spread can be measured" in st["message"]


def test_options_are_checked():
    with pytest.raises(UsageError, match="max_range_spread must be in"):
        package_model(_matmul_model(4, 2), "arm-cpu", options={"max_range_spread": "0"})
    with pytest.raises(UsageError, match="calibration_method=auto is for arm-cpu and x86-cpu"):
        package_model(_matmul_model(4, 2), "fpga-xint8", options={"calibration_method": "auto"})


def test_max_range_spread_sets_the_verdict(heavy_tail):
    model, cal, _, auto, _ = heavy_tail
    spread = auto.quality.calibration["stability"]["spread_upper_max"]  # the verdict's figure
    loose = package_model(model, "arm-cpu", calibration=cal,
                          options={**FAST, "calibration_method": "minmax", "max_range_spread": min(1.0, spread * 1.01)})  # fmt: skip
    assert loose.quality.calibration["stability"]["verdict"] == "stable"
    tight = package_model(model, "arm-cpu", calibration=cal,
                          options={**FAST, "calibration_method": "minmax", "max_range_spread": spread * 0.99})  # fmt: skip
    assert tight.quality.calibration["stability"]["verdict"] == "too_small"


def test_cli_json_and_html_carry_the_calibration_section(tmp_path, capsys):
    model_path, cal_path, hold_path = tmp_path / "m.onnx", tmp_path / "cal.npz", tmp_path / "hold.npz"
    model_path.write_bytes(_matmul_model(32, 8))
    np.savez(cal_path, x=_heavy_tailed(128, 1))
    np.savez(hold_path, x=_heavy_tailed(64, 2))
    parser = argparse.ArgumentParser(prog="edgemart")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["package", str(model_path), "--target", "x86-cpu", "--calibration", str(cal_path),
                              "--holdout", str(hold_path), "--option", "latency_runs=2", "--out",
                              str(tmp_path / "out"), "--json"])  # fmt: skip
    args.func(args)
    result = json.loads(capsys.readouterr().out)  # one JSON object: the calibrators' prints stay off stdout
    cal = result["quality"]["calibration"]
    assert cal["samples"] == 128 and cal["requested"] == "auto"
    assert cal["method"] in {r["method"] for r in cal["method_choice"]["candidates"]}
    assert all({"method", "agreement", "snr_db"} <= set(r) for r in cal["method_choice"]["candidates"])
    st = cal["stability"]
    assert {"spread_max", "verdict", "suggested_samples", "worst_tensors", "threshold", "seconds"} <= set(st)
    page = (tmp_path / "out" / "quality.html").read_text()
    assert "<h2>Calibration</h2>" in page and "lowest top-1 agreement" in page
    # The build runs and was quantized with what the report names.
    session = ort.InferenceSession(
        str(tmp_path / "out" / "m.x86-cpu.onnx"), providers=["CPUExecutionProvider"]
    )
    assert session.run(None, {"x": _heavy_tailed(3, 5)})[0].shape == (3, 8)


def test_digits_mlp_realistic_run(digits_builds):
    """The corpus MLP with its 200-sample calibration set: auto measured every candidate on the held-out set."""
    build = digits_builds["arm-cpu"]
    cal = build.quality.calibration
    rows = cal["method_choice"]["candidates"]
    assert cal["samples"] == 200 and len(rows) >= 2
    best = max(rows, key=lambda r: (r["agreement"], r["snr_db"]))
    assert cal["method"] == best["method"] or (best["agreement"], best["snr_db"]) == next(
        (r["agreement"], r["snr_db"]) for r in rows if r["method"] == cal["method"]
    )
    assert cal["method_choice"]["evaluated_on"].endswith("holdout samples")
    st = cal["stability"]
    assert st["tensors"] >= 3 and st["verdict"] in {"stable", "too_small"}
    assert (st["verdict"] == "too_small") == (st["spread_upper_max"] > st["threshold"])
    # fpga-xint8 keeps its explicit default and reports stability too.
    fpga = digits_builds["fpga-xint8"].quality.calibration
    assert fpga["requested"] == fpga["method"] == "minmax" and fpga["stability"]["samples"] == 200


@pytest.mark.slow
def test_ppocr_cls_eight_samples_are_flagged(cls_builds):
    """PP-OCR cls calibrated on 8 rendered text lines: some activation ranges move >10% across resamples."""
    cal = cls_builds["arm-cpu"].quality.calibration
    st = cal["stability"]
    assert st["samples"] == 8 and st["tensors"] > 50
    assert st["verdict"] == "too_small" and st["suggested_samples"] > 8
    assert len(cal["method_choice"]["candidates"]) >= 2


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_methods_take_a_set_that_is_not_a_whole_number_of_batches(method):
    """onnxruntime's histogram calibrators stacked every run's activations and raised ValueError when the
    last batch of 16 was shorter (the digits corpus's 200 samples did)."""
    build = package_model(
        _matmul_model(16, 4, hidden=16),
        "arm-cpu",
        calibration={"x": _varying_amplitude(20, 0)},
        options={**FAST, "calibration_method": method},
    )
    assert build.quality.calibration["method"] == method and build.metadata["calibration_method"] == method
