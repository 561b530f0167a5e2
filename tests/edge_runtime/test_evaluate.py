"""The evaluation harness on real models: metrics match an independent computation; reports are self-contained."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import drm
from edge_runtime import evaluate


@pytest.fixture
def digits_model(device, factory, digits_build, build_file, now):
    lic = factory.license(device, digits_build, max_runs=200)
    with device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=now) as model:
        yield model


def test_classifier_metrics_match_plain_model(digits_model, digits_test, digits_base):
    data = dict(np.load(digits_test))
    seen = []
    report = evaluate(
        digits_model, data, progress=lambda done, total: seen.append((done, total)), warmup=2, batch_size=30
    )
    plain = ort.InferenceSession(str(digits_base), providers=["CPUExecutionProvider"])
    labels, probs = plain.run(None, {"x": data["x"]})
    assert report.calls == 15 and report.samples == 450 and seen[-1] == (15, 15)
    c = report.classification
    assert c["output"] == "label" and c["accuracy"] == pytest.approx(float((labels == data["y"]).mean()))
    top5 = np.argsort(-probs, axis=1)[:, :5]
    assert c["top_k_accuracy"] == pytest.approx(float((top5 == data["y"][:, None]).any(axis=1).mean()))
    assert np.asarray(c["confusion"]).sum() == 450 and np.trace(c["confusion"]) == int(
        (labels == data["y"]).sum()
    )
    lat = report.latency
    assert len(report.latencies_ms) == 15 and lat["p50"] <= lat["p90"] <= lat["p99"]
    assert report.throughput > 0 and report.peak_rss_mb > 0 and report.load_seconds > 0
    assert digits_model.runs_left() == 200 - 17
    d = json.loads(report.to_json())
    assert d["runs_used"] == 17 and d["classification"]["accuracy"] == c["accuracy"]
    text = report.to_text()
    assert "top-1" in text and "p99" in text


def test_agreement_with_reference(digits_model, digits_test, digits_base):
    data = dict(np.load(digits_test))
    plain = ort.InferenceSession(str(digits_base), providers=["CPUExecutionProvider"])
    labels, probs = plain.run(None, {"x": data["x"]})
    report = evaluate(
        digits_model,
        {"x": data["x"]},
        warmup=0,
        batch_size=450,
        reference={"label": labels, "probabilities": probs},
    )
    for figures in report.agreement["outputs"].values():
        assert (
            figures["bit_identical"] and figures["max_abs_diff"] == 0.0 and figures["label_agreement"] == 1.0
        )
    noisy = probs + np.float32(0.01)
    report = evaluate(
        digits_model, {"x": data["x"]}, warmup=0, batch_size=450, reference={"probabilities": noisy}
    )
    assert report.agreement["outputs"]["probabilities"]["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
    assert report.agreement["missing"] == ["label"]


def test_fixed_batch_tflite_runs_sample_by_sample(
    device, factory, blazeface_build, blazeface_data, build_file, now
):
    lic = factory.license(device, blazeface_build, max_runs=20)
    data = dict(np.load(blazeface_data))
    with device.open_model(build_path=build_file(blazeface_build), license_bytes=lic, now=now) as model:
        report = evaluate(model, data, warmup=1)
    assert report.batch_size == 1 and report.calls == 2 and report.ignored_keys == ["has_face"]
    assert report.outputs["regressors"].shape == (2, 896, 16)
    assert report.classification is None
    page = report.to_html()
    assert page.count("<svg") == 2 and "http://" not in page and "https://" not in page


def test_html_has_confusion_heatmap_and_no_external_assets(digits_model, digits_test):
    report = evaluate(digits_model, dict(np.load(digits_test)), warmup=0, batch_size=90)
    page = report.to_html()
    assert page.count("<svg") == 3 and "confusion" in page.lower()
    for forbidden in ("http://", "https://", "<script", "<link", "src="):
        assert forbidden not in page


def test_data_mismatches_are_usage_errors_naming_the_input(digits_model):
    expects = r"eval data does not fit the model inputs: 'x' expects float32 \[\?, 64\] \(batch on axis 0\)"
    with pytest.raises(drm.UsageError, match=expects + r".*given \[3, 64\] float64"):
        evaluate(digits_model, {"x": np.zeros((3, 64))})
    with pytest.raises(drm.UsageError, match=expects + r".*given \[3, 60\] float32"):
        evaluate(digits_model, {"x": np.zeros((3, 60), np.float32)})
    with pytest.raises(drm.UsageError, match=expects + r".*given none"):
        evaluate(digits_model, {"pixels": np.zeros((3, 64), np.float32), "other": np.zeros(3)})
    assert digits_model.runs_left() == 200


def test_budget_checked_before_running(device, factory, digits_build, digits_test, build_file, now):
    lic = factory.license(device, digits_build, max_runs=5)
    with device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=now) as model:
        with pytest.raises(drm.UsageError, match="needs 32 runs"):
            evaluate(model, dict(np.load(digits_test)))
        assert model.runs_left() == 5


def test_streaming_model_runs_its_sequences_carrying_state(device, factory, build_file, now):
    """device eval on a stateful model: one licensed run per step, the state carried, reset per recording."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from streaming_models import streaming_vad, vad_sequences

    model_bytes = streaming_vad()
    build = factory.seal(model_bytes, target="onnx-fp32")
    data = vad_sequences(sequences=2, steps=12)
    data["sr"] = np.full(24, 16000, np.int64)  # a scalar input: one value per step
    data["notes"] = np.zeros(3)  # not an input: ignored, not refused
    lic = factory.license(device, build, max_runs=100)
    with device.open_model(build_path=build_file(build), license_bytes=lic, now=now) as model:
        report = evaluate(model, data, warmup=1)
        assert model.runs_left() == 100 - 25
        with pytest.raises(drm.UsageError, match="--batch-size applies to data batched on axis 0"):
            evaluate(model, data, warmup=0, batch_size=4)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    expected, state = [], np.zeros((2, 1, 128), np.float32)
    for step in range(24):
        if data["sequence_start"][step]:
            state = np.zeros_like(state)
        feed = {"input": data["input"][step : step + 1], "state": state, "sr": np.array(16000, np.int64)}
        prob, state = session.run(["output", "stateN"], feed)
        expected.append(prob)
    np.testing.assert_allclose(report.outputs["output"], np.concatenate(expected), rtol=1e-5, atol=1e-6)
    assert report.calls == 24 and report.batch_size == 1 and report.ignored_keys == ["notes"]
    assert report.contract["sequences"] == 2
    assert report.contract["state"] == [
        {"input": "state", "output": "stateN", "how": "detected by name and shape"}
    ]
    assert "2 sequence(s), one call per step, state carried (state <- stateN)" in report.to_text()
