"""A streaming VAD (recurrent state, scalar sr, an If on it) sold through the store: its samples are checked
against the model at upload by the sample contract, and all three packaging jobs finish."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_models import streaming_vad, vad_sequences  # noqa: E402

TARGETS = "arm-cpu,fpga-xint8,onnx-fp32"


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_streaming_vad_packages_for_three_targets(store):
    options = {t: {"fixed": "sr=16000", "latency_runs": "2"} for t in TARGETS.split(",")}
    r = store.upload(
        "sally",
        streaming_vad(),
        name="Streaming VAD",
        targets=TARGETS,
        calibration=_npz(vad_sequences(sequences=8, steps=10)),
        options=json.dumps(options),
    )
    assert r.status_code == 202, r.json
    store.wait()
    jobs = [store.client.get(f"/api/v1/jobs/{j}", headers=store.auth("sally")).json for j in r.json["jobs"]]
    assert [j["state"] for j in jobs] == ["done"] * 3, jobs
    listing = store.client.get(f"/api/v1/listings/{r.json['listing']['id']}").json
    for build in listing["builds"]:
        quality = build["quality"]
        assert quality["passed"] is True, quality["verdict_reason"]
        assert quality["latency"]["per"] == "step"
        assert set(quality["agreement"]) == {"calibration", "holdout"}  # 2 of 8 recordings held out
        assert quality["agreement"]["holdout"]["output"]["samples"] == 20
        assert any("state <- stateN" in note for note in quality["notes"])


def test_samples_that_do_not_fit_are_refused_at_upload_with_nothing_created(store):
    before = store.counts()
    bad = vad_sequences(sequences=2, steps=10)
    bad["input"] = bad["input"][:, :512]
    r = store.upload("sally", streaming_vad(), name="VAD", targets="arm-cpu,onnx-fp32", calibration=_npz(bad))
    assert r.status_code == 422, r.json
    (problem,) = [p for p in r.json["error"]["problems"] if p["field"] == "calibration"]
    assert problem["code"] == "samples_do_not_fit"
    message = problem["message"]
    assert message.startswith("calibration data does not fit the model inputs: ")
    assert "'input' expects float32 [?, 576]" in message and "given [20, 512] float32" in message
    assert "'sr' expects int64 [n] (n samples on axis 0) (or --fixed sr=VALUE), given none" in message
    assert store.counts() == before
    # Fixed for one target only: the other target's contract still wants sr, and says which target.
    options = json.dumps({"arm-cpu": {"fixed": "sr=16000"}})
    r = store.upload(
        "sally", streaming_vad(), name="VAD", targets="arm-cpu,onnx-fp32",
        calibration=_npz(vad_sequences(sequences=2, steps=10)), options=options,
    )  # fmt: skip
    assert r.status_code == 422, r.json
    (problem,) = [p for p in r.json["error"]["problems"] if p["field"] == "calibration"]
    assert (
        problem["message"].startswith("onnx-fp32: calibration data does not fit")
        and "'sr'" in problem["message"]
    )
    assert store.counts() == before


def test_the_card_declares_fixed_inputs_and_state(store):
    card = "---\nlicense: MIT\nfixed:\n  sr: 16000\nstate:\n  state: stateN\n---\n# Streaming VAD\n"
    r = store.upload(
        "sally", streaming_vad(), name="Carded VAD", targets="onnx-fp32",
        calibration=_npz(vad_sequences(sequences=2, steps=10)), card=card,
    )  # fmt: skip
    assert r.status_code == 202, r.json
    store.wait()
    listing = store.client.get(f"/api/v1/listings/{r.json['listing']['id']}").json
    (build,) = listing["builds"]
    assert build["status"] == "done", build
    assert any("state <- stateN (declared)" in n for n in build["quality"]["notes"])
    bad = "---\nlicense: MIT\nstate: [state]\n---\n"
    r = store.upload("sally", streaming_vad(), name="Bad card", targets="onnx-fp32", card=bad)
    assert r.status_code == 422 and "'state' must map state inputs" in r.json["error"]["message"]
