"""Fixtures for the compliance gate tests: corpus model bytes and a small index of open models."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# pytest's rootdir-relative sys.path insertion makes tests/licenses a namespace package named
# `licenses` that shadows the editable install; the project root first lets the real package win.
# (Drop this once pyproject's pytest options set pythonpath = ["."].)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from licenses import LicenseIndex  # noqa: E402


@pytest.fixture(scope="session")
def model_bytes(corpus: Path):
    def read(relative: str) -> bytes:
        return (corpus / "models" / relative).read_bytes()

    return read


@pytest.fixture(scope="session")
def digits_bytes(model_bytes) -> bytes:
    return model_bytes("digits/digits_mlp_base.onnx")


@pytest.fixture(scope="session")
def digits_calibration_x(digits_calibration: Path) -> dict[str, np.ndarray]:
    return {"x": np.load(digits_calibration)["x"][:64]}


@pytest.fixture(scope="session")
def open_index(model_bytes) -> Iterator[LicenseIndex]:
    """Open models as a store would index them; licenses chosen to exercise the policy."""
    with tempfile.TemporaryDirectory() as tmp:
        index = LicenseIndex(Path(tmp) / "index")
        index.add(model_bytes("digits/digits_mlp_base.onnx"), name="digits-base", license="CC-BY-4.0")
        index.add(
            model_bytes("mediapipe/face_detection_full_range.tflite"),
            name="blazeface-full",
            license="Apache-2.0",
        )
        index.add(
            model_bytes("mediapipe/face_detection_front.tflite"), name="blazeface-front", license="Apache-2.0"
        )
        index.add(
            model_bytes("rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            name="ppocr-cls",
            license="Apache-2.0",
        )
        yield LicenseIndex(Path(tmp) / "index")
