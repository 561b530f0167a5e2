"""`edgemart package` through its argparse registration, and the verdict thresholds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgemart.core.errors import UsageError
from packagers import package_model
from packagers.cli import register


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgemart")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_build_and_reports(digits_base, digits_calibration, digits_test, tmp_path: Path, capsys):
    out = tmp_path / "out"
    argv = ["package", str(digits_base), "--target", "arm-cpu", "--calibration", str(digits_calibration),
            "--holdout", str(digits_test), "--option", "latency_runs=2", "--out", str(out), "--json"]  # fmt: skip
    assert _run(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    model_path = Path(result["paths"]["model"])
    assert model_path == out / "digits_mlp_base.arm-cpu.onnx"
    assert result["build_hash"].startswith("sha256:")
    assert json.loads((out / "quality.json").read_text())["quality"] == result["quality"]
    assert (out / "quality.html").read_text().startswith("<!DOCTYPE html>")
    assert "%" in captured.err  # progress goes to stderr
    # The written build really runs.
    session = ort.InferenceSession(model_path.read_bytes(), providers=["CPUExecutionProvider"])
    labels = session.run(["label"], {"x": np.load(digits_test)["x"][:5]})[0]
    assert labels.shape == (5,)


def test_cli_exit_1_when_quality_fails_but_files_are_written(
    digits_base, digits_calibration, digits_test, tmp_path, capsys
):
    out = tmp_path / "strict"
    argv = ["package", str(digits_base), "--target", "fpga-xint8", "--calibration", str(digits_calibration),
            "--holdout", str(digits_test), "--option", "min_agreement=1.0", "--option", "latency_runs=1",
            "--out", str(out)]  # fmt: skip
    code = _run(argv)
    report = json.loads((out / "quality.json").read_text())["quality"]
    holdout = report["agreement"]["holdout"]["label"]["agreement"]
    assert code == (0 if holdout == 1.0 else 1)
    if code == 1:
        err = capsys.readouterr().err
        assert "quality verdict failed" in err and "< min_agreement 1.0" in err
    assert (out / "digits_mlp_base.fpga-xint8.onnx").is_file() and (out / "quality.json").is_file()


def test_cli_bad_input_raises_usage_error(tmp_path: Path):
    with pytest.raises(UsageError, match="model file not found"):
        _run(["package", str(tmp_path / "nope.onnx"), "--target", "arm-cpu", "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="KEY=VALUE"):
        _run(["package", "m.onnx", "--target", "arm-cpu", "--option", "oops", "--out", str(tmp_path)])


def test_verdict_names_the_figure_and_suggests_nodes(digits_bytes, digits_cal, digits_hold):
    build = package_model(
        digits_bytes,
        "arm-cpu",
        calibration=digits_cal,
        holdout=digits_hold,
        options={"min_agreement": 1.0, "latency_runs": 1},
    )
    q = build.quality
    holdout = q.agreement["holdout"]["label"]["agreement"]
    assert q.passed is (holdout == 1.0)
    if not q.passed:
        assert f"holdout top-1 agreement of 'label' is {holdout:.4f} < min_agreement 1.0" in q.verdict_reason
    if q.suggested_nodes_to_exclude:
        assert "nodes_to_exclude=" in q.verdict_reason
    # Excluding the suggested nodes is accepted as an option and gives a valid build.
    excluded = package_model(
        digits_bytes,
        "arm-cpu",
        calibration=digits_cal,
        options={"nodes_to_exclude": list(q.suggested_nodes_to_exclude), "latency_runs": 1},
    )
    assert excluded.metadata["nodes_excluded"] == list(q.suggested_nodes_to_exclude)


@pytest.mark.slow
def test_ppocr_rec_naive_int8_degradation_is_detected(corpus: Path):
    """PP-OCRv4 rec loses precision under naive int8; the report must say so (SNR figure, worst layers)."""
    from packagers import load_calibration

    name = "ch_PP-OCRv4_rec_infer"
    samples = load_calibration(corpus / "data" / "rapidocr" / f"{name}.npz")
    model = (corpus / "models" / "rapidocr" / f"{name}.onnx").read_bytes()
    build = package_model(model, "arm-cpu", calibration=samples, holdout=samples, options={"latency_runs": 2})
    q = build.quality
    (figures,) = q.agreement["holdout"].values()
    assert figures["kind"] == "error" and figures["snr_db"] is not None
    assert q.passed is (figures["snr_db"] >= 20.0)
    assert q.worst_layers
    if not q.passed:
        assert "SNR" in q.verdict_reason
