"""Pre-quantized uploads are sellable: a full-int8 TFLite is sealed as uploaded for coral-edgetpu and arm-cpu,
without calibration samples, and the reports say "as uploaded"."""

from __future__ import annotations

import numpy as np
import pytest

from packagers import load_calibration, package_model
from packagers._onnx2tf import converter_available


@pytest.mark.skipif(
    not converter_available(),
    reason="the int8 TFLite comes from onnx2tf: pip install -e '.[coral]' (make venv)",
)
def test_full_int8_tflite_upload_sealed_as_uploaded(store, digits_base, digits_calibration):
    cal = load_calibration(digits_calibration)
    int8_tflite = package_model(digits_base.read_bytes(), "coral-edgetpu", calibration=cal).payload
    r = store.upload(
        "sally", int8_tflite, name="Int8 digits", targets="coral-edgetpu,arm-cpu", filename="model.tflite"
    )
    assert r.status_code == 202, r.json
    store.wait()
    listing = store.client.get(f"/api/v1/listings/{r.json['listing']['id']}").json
    assert listing["status"] == "listed"
    for build in listing["builds"]:
        assert build["status"] == "done", build
        assert build["quality"]["verdict_reason"].startswith("as uploaded")
        assert 1.0 <= build["quality"]["size"]["ratio"] < 1.02  # arm-cpu's copy names its target
    assert np.isfinite(listing["builds"][0]["quality"]["latency"]["fp32_ms"])
