"""Builds shared by the packagers tests: each corpus model is packaged once per target per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from packagers import load_calibration, package_model
from packagers._onnx2tf import converter_available

FAST = {"latency_runs": 3}


@pytest.fixture(scope="session")
def digits_bytes(digits_base: Path) -> bytes:
    return digits_base.read_bytes()


@pytest.fixture(scope="session")
def digits_cal(digits_calibration: Path) -> dict[str, np.ndarray]:
    return load_calibration(digits_calibration)


@pytest.fixture(scope="session")
def digits_hold(digits_test: Path) -> dict[str, np.ndarray]:
    return load_calibration(digits_test)


@pytest.fixture(scope="session")
def cls_model(corpus: Path) -> bytes:
    return (corpus / "models" / "rapidocr" / "ch_ppocr_mobile_v2.0_cls_infer.onnx").read_bytes()


@pytest.fixture(scope="session")
def cls_samples(corpus: Path) -> dict[str, np.ndarray]:
    return load_calibration(corpus / "data" / "rapidocr" / "ch_ppocr_mobile_v2.0_cls_infer.npz")


@pytest.fixture(scope="session")
def digits_builds(digits_bytes, digits_cal, digits_hold):
    return {
        target: package_model(digits_bytes, target, calibration=digits_cal, holdout=digits_hold, options=FAST)
        for target in ("onnx-fp32", "arm-cpu", "x86-cpu", "fpga-xint8", "coral-edgetpu")
        if target != "coral-edgetpu" or converter_available()  # the `coral` extra (onnx2tf + TensorFlow)
    }


@pytest.fixture(scope="session")
def cls_builds(cls_model, cls_samples):
    # 12 rendered text lines: the first 8 calibrate, the last 4 are held out.
    cal = {k: v[:8] for k, v in cls_samples.items()}
    hold = {k: v[8:] for k, v in cls_samples.items()}
    return {
        target: package_model(cls_model, target, calibration=cal, holdout=hold, options=FAST)
        for target in ("onnx-fp32", "arm-cpu", "x86-cpu", "fpga-xint8")
    }
