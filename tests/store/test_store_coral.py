"""An ONNX upload for coral-edgetpu is converted by onnx2tf inside the store's sandbox (an exec'd converter
child under Landlock and the task's limits) and listed with a full-int8 TFLite build."""

from __future__ import annotations

import pytest

from packagers._onnx2tf import converter_available


@pytest.mark.slow
@pytest.mark.skipif(
    not converter_available(),
    reason="coral-edgetpu converts with onnx2tf: pip install -e '.[coral]' (make venv)",
)
def test_onnx_upload_becomes_a_coral_build_inside_the_sandbox(store, digits_base, digits_calibration):
    r = store.upload(
        "sally", digits_base, name="Coral digits", targets="coral-edgetpu", calibration=digits_calibration
    )
    assert r.status_code == 202, r.json
    store.wait()
    listing = store.client.get(f"/api/v1/listings/{r.json['listing']['id']}").json
    (build,) = listing["builds"]
    assert build["status"] == "done", build
    quality = build["quality"]
    assert quality["format"] == "tflite" and quality["passed"], quality
    assert quality["agreement"]["calibration"]["probabilities"]["agreement"] >= 0.97
    assert quality["op_compatibility"]["source"] == "tflite"
    assert any(row["mapped_to"] == "FULLY_CONNECTED" for row in quality["op_compatibility"]["ops"])
