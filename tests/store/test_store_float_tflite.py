"""A float TFLite upload with calibration samples is sellable for coral-edgetpu and arm-cpu: the store's
worker quantizes it to full int8 (ai-edge-quantizer), and the reports say how."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytest.importorskip("ai_edge_quantizer")


@pytest.mark.slow
def test_float_tflite_upload_is_quantized_for_coral_and_arm(store, corpus):
    model = (corpus / "models" / "mediapipe" / "face_detection_front.tflite").read_bytes()
    images = np.load(corpus / "data" / "mediapipe" / "face_detection_front.npz")["input"]
    rng = np.random.default_rng(5)
    variants = [np.clip(im * rng.uniform(0.6, 1.1) + rng.normal(0, 0.04, im.shape), -1, 1) for im in images]
    samples = np.stack([v[:, ::-1] if i % 2 else v for i, v in enumerate(variants * 10)]).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, input=samples)
    r = store.upload(
        "sally",
        model,
        name="BlazeFace front",
        license="Apache-2.0",
        targets="coral-edgetpu,arm-cpu",
        filename="face.tflite",
        calibration=buf.getvalue(),
        # BlazeFace's score logits measure 15-19 dB against the float model at int8 (tests/packagers/
        # test_float_tflite.py checks the detections agree); the seller accepts that floor explicitly.
        options=json.dumps({t: {"min_snr_db": "12"} for t in ("coral-edgetpu", "arm-cpu")}),
    )
    assert r.status_code == 202, r.json
    store.wait()
    path = f"/api/v1/listings/{r.json['listing']['id']}"
    listing = store.client.get(path, headers=store.auth("sally")).json
    assert listing["status"] == "listed", listing
    builds = {b["target"]: b for b in listing["builds"]}
    assert set(builds) == {"coral-edgetpu", "arm-cpu"}
    for build in builds.values():
        assert build["status"] == "done", build
        quality = build["quality"]
        assert any(n.startswith("quantized from the uploaded float TFLite with ai-edge-quantizer static_wi8_ai8")
                   for n in quality["notes"])  # fmt: skip
        assert quality["format"] == "tflite" and quality["size"]["ratio"] < 0.9
        assert quality["agreement"], quality  # measured against the uploaded float TFLite
