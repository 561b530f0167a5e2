"""Any input signature: the sample contract, fixed inputs, and a streaming VAD (state + scalar sr + If) packaged
for arm-cpu, fpga-xint8 and onnx-fp32 with figures that compare every frame against fp32."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_runtime.evaluation.samples import Contract, bind, run_samples, state_pairs
from edgemart.core.errors import UsageError
from packagers import inspect_model, package_model
from packagers.cli import register

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_models import HIDDEN, streaming_vad, vad_sequences  # noqa: E402

FAST = {"latency_runs": 2, "fixed": "sr=16000"}


@pytest.fixture(scope="module")
def vad() -> bytes:
    return streaming_vad()


@pytest.fixture(scope="module")
def sequences() -> dict[str, np.ndarray]:
    return vad_sequences(sequences=4, steps=30)


@pytest.fixture(scope="module")
def vad_builds(vad, sequences):
    cal = {k: v[:90] for k, v in sequences.items()}  # three recordings calibrate, the fourth is held out
    hold = {k: v[90:] for k, v in sequences.items()}
    return {
        target: package_model(vad, target, calibration=cal, holdout=hold, options=FAST)
        for target in ("onnx-fp32", "arm-cpu", "fpga-xint8")
    }


def _stream(payload: bytes, chunks: np.ndarray, starts: np.ndarray, sr: int | None) -> np.ndarray:
    """Independent of the packagers: run the recordings frame by frame, carrying the state by hand."""
    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    takes_sr = "sr" in {i.name for i in session.get_inputs()}
    probs, state = [], np.zeros((2, 1, HIDDEN), np.float32)
    for chunk, start in zip(chunks, starts, strict=True):
        if start:
            state = np.zeros_like(state)
        feed = {"input": chunk[None], "state": state}
        if takes_sr:
            feed["sr"] = np.array(sr, np.int64)
        prob, state = session.run(["output", "stateN"], feed)
        probs.append(prob)
    return np.concatenate(probs)


@pytest.mark.parametrize("target", ["onnx-fp32", "arm-cpu", "fpga-xint8"])
def test_streaming_vad_packages_and_frames_compare_with_fp32(vad_builds, vad, sequences, target):
    build = vad_builds[target]
    q = build.quality
    assert q.passed, q.verdict_reason
    chunks, starts = sequences["input"][90:], sequences["sequence_start"][90:]
    reference = _stream(vad, chunks, starts, 16000)
    got = _stream(build.payload, chunks, starts, 16000)
    figures = q.agreement["holdout"]["output"]
    assert figures["samples"] == 30 == len(reference)
    assert figures["max_abs_error"] == pytest.approx(float(np.abs(reference - got).max()), abs=1e-6)
    assert figures["decision_agreement"] == pytest.approx(float(np.mean((reference > 0.5) == (got > 0.5))))
    assert "stateN" in q.agreement["holdout"]  # the carried state itself is compared too
    assert any("state <- stateN" in n and "step by step" in n for n in q.notes)
    assert q.latency["per"] == "step"
    samples = build.metadata["samples"]
    assert samples["state"] == [{"input": "state", "output": "stateN", "how": "detected by name and shape"}]
    assert samples["fixed_inputs"] == {"sr": 16000} and samples["sequences"] == 3


def test_int8_vad_builds_are_specialized_for_the_fixed_rate(vad_builds, vad):
    assert vad_builds["onnx-fp32"].payload == vad
    for target in ("arm-cpu", "fpga-xint8"):
        build = vad_builds[target]
        info = inspect_model(build.payload)
        assert [s.name for s in info.inputs] == ["input", "state"]  # sr is folded in
        assert build.metadata["fixed_inputs"] == {"sr": 16000}
        assert build.metadata["if_nodes_resolved"] == [
            {"node": "rate_switch", "condition": "is_16k", "took": "then"}
        ]
        model = onnx.load_from_string(build.payload)
        assert "If" not in {n.op_type for n in model.graph.node}
        assert not any(i.name.startswith("lo_") for i in model.graph.initializer)  # the 8 kHz branch is gone
        assert build.quality.size["ratio"] < 0.3
        assert build.quality.quantized_ops.get("MatMul", 0) + build.quality.quantized_ops.get("Gemm", 0) >= 5


def test_fp32_vad_needs_no_samples_and_takes_sr_as_data(vad, sequences):
    timed = package_model(vad, "onnx-fp32", options={"latency_runs": 1})
    assert timed.quality.agreement == {} and timed.quality.latency["per"] == "step"
    n = len(sequences["input"])
    with_rate = dict(sequences, sr=np.full(n, 16000, np.int64))  # scalar input: one value per step
    build = package_model(vad, "onnx-fp32", calibration=with_rate, options={"latency_runs": 1})
    assert build.metadata["samples"]["sequences"] == 4 and "fixed_inputs" not in build.metadata["samples"]


def test_contract_failure_lists_every_input_expected_and_given(vad):
    bad = {"input": np.zeros((10, 512), np.float32), "state": np.zeros((10, 2, 1, HIDDEN), np.float32)}
    with pytest.raises(UsageError) as err:
        package_model(vad, "arm-cpu", calibration=bad)
    message = err.value.message
    assert "\n" not in message
    assert message.startswith("calibration data does not fit the model inputs: ")
    assert (
        "'input' expects float32 [?, 576] (batch on axis 0) or [n, ?, 576] (n samples on axis 0), given [10, 512] float32"
        in message
    )
    assert (
        "'state' is recurrent state (fed by output 'stateN'): give no array for it, given [10, 2, 1, 128] float32"
        in message
    )
    assert "'sr' expects int64 [n] (n samples on axis 0) (or --fixed sr=VALUE), given none" in message
    with pytest.raises(UsageError, match="fixed input 'rate' is not a model input"):
        package_model(vad, "arm-cpu", calibration=bad, options={"fixed": "rate=16000"})
    with pytest.raises(UsageError, match="option fixed expects NAME=VALUE"):
        package_model(vad, "arm-cpu", options={"fixed": "sr"})


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgemart")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_packages_the_vad_with_fixed_and_state(vad, sequences, tmp_path: Path, capsys):
    model = tmp_path / "vad.onnx"
    model.write_bytes(vad)
    cal = tmp_path / "sequences.npz"
    np.savez(cal, **sequences)
    out = tmp_path / "out"
    argv = ["package", str(model), "--target", "arm-cpu", "--calibration", str(cal), "--fixed", "sr=16000",
            "--state", "state=stateN", "--option", "latency_runs=1", "--out", str(out), "--json"]  # fmt: skip
    assert _run_cli(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quality"]["passed"]
    written = json.loads((out / "quality.json").read_text())
    assert written["metadata"]["samples"]["state"][0]["how"] == "declared"
    with pytest.raises(UsageError, match="--fixed and --option fixed"):
        _run_cli(argv[:-3] + ["--option", "fixed=sr=8000", "--out", str(out)])


# ---------------------------------------------------------------- the contract on its own


class _Spec:
    def __init__(self, name, shape, dtype="float32", dim_names=()):
        self.name, self.shape, self.dtype, self.dim_names = name, tuple(shape), dtype, tuple(dim_names)


def test_scalars_and_fixed_leading_one_inputs_enumerate_samples_on_axis_0():
    inputs = [_Spec("x", (1, 3)), _Spec("gain", (), "float32")]
    samples = bind(
        inputs, [], {"x": np.ones((5, 1, 3), np.float32), "gain": np.arange(5, dtype=np.float32)}, "t"
    )
    assert samples.per_run and samples.count == 5
    feeds = list(samples.runs())
    assert feeds[2][1]["x"].shape == (1, 3) and feeds[2][1]["gain"] == 2.0
    outputs = run_samples(lambda f: {"y": f["x"] * f["gain"]}, samples)
    assert outputs["y"].shape == (5, 3) and outputs["y"][4, 0] == 4.0
    # A rank-equal array on a fixed batch of 1 is the same data, batched.
    batched = bind([_Spec("x", (1, 3))], [], {"x": np.ones((5, 3), np.float32)}, "t")
    assert not batched.per_run and batched.fixed_batch == 1 and len(list(batched.runs())) == 5


def test_state_pairs_by_name_and_shape_and_declared():
    ins = [_Spec("x", (None, 4)), _Spec("h0", (1, None, 8)), _Spec("c0", (1, None, 8)), _Spec("cache", (3,))]
    outs = [
        _Spec("y", (None, 2)),
        _Spec("hn", (1, None, 8)),
        _Spec("cn", (1, None, 8)),
        _Spec("cache_out", (4,)),
    ]
    pairs = {(p.input, p.output) for p in state_pairs(ins, outs, Contract())}
    assert pairs == {("h0", "hn"), ("c0", "cn")}  # cache_out has another shape
    with pytest.raises(UsageError, match=r"state cache=y: input \[3\] float32 cannot take output \[\?, 2\]"):
        state_pairs(ins, outs, Contract(state={"cache": "y"}))
    assert state_pairs(ins, outs, Contract(detect_state=False)) == ()


def test_sequences_reset_state_and_split_between_recordings():
    ins = [_Spec("x", (None, 1), dim_names=("N", None)), _Spec("acc", (None, 1), dim_names=("N", None))]
    outs = [_Spec("y", (None, 1)), _Spec("acc_out", (None, 1))]
    data = {"x": np.ones((6, 1), np.float32), "sequence_start": np.array([1, 0, 0, 1, 0, 0])}
    samples = bind(ins, outs, data, "t")
    assert samples.sequences == [(0, 3), (3, 6)] and samples.initial["acc"].shape == (1, 1)
    out = run_samples(lambda f: {"y": f["acc"] + f["x"], "acc_out": f["acc"] + f["x"]}, samples)
    assert out["y"].ravel().tolist() == [1, 2, 3, 1, 2, 3]
    first, rest = samples.split_tail(2)
    assert first.count == 3 and rest is not None and rest.sequences == [(0, 3)]
    with pytest.raises(UsageError, match="'sequence_start' but the model has no recurrent state"):
        bind(ins[:1], outs[:1], data, "t")


def test_edgemart_package_process_exits_0_on_the_vad(vad, sequences, tmp_path: Path):
    """The command a seller types (was: exit 70 with an IndexError)."""
    import os
    import subprocess

    (tmp_path / "vad.onnx").write_bytes(vad)
    np.savez(tmp_path / "rec.npz", **sequences)
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, "-m", "edgemart", "package", str(tmp_path / "vad.onnx"), "--target", "fpga-xint8",
         "--calibration", str(tmp_path / "rec.npz"), "--fixed", "sr=16000", "--option", "latency_runs=1",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)}, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "verdict: PASSED" in r.stdout and (tmp_path / "out" / "vad.fpga-xint8.onnx").is_file()
