"""Decrypting a sealed corpus model gives the original bytes, and the model computes bit-identical outputs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnxruntime as ort

import drm

KEY = bytes(range(32))


def test_every_corpus_model_round_trips(corpus: Path) -> None:
    models = sorted(p for p in (corpus / "models").rglob("*") if p.suffix in (".onnx", ".tflite"))
    assert models
    for path in models:
        data = path.read_bytes()
        sealed = drm.seal(data, key=KEY, target="arm-cpu", chunk_size=64 * 1024)
        _, plain = drm.open_sealed(io.BytesIO(sealed), key=KEY, expected_build_hash=drm.sha256_tag(data))
        assert plain == data, path.name


def test_decrypted_digits_model_outputs_are_bit_identical(digits_base: Path, digits_test: Path) -> None:
    original = digits_base.read_bytes()
    _, plain = drm.open_sealed(drm.seal(original, key=KEY, target="onnx-fp32", chunk_size=4096), key=KEY)
    x = np.load(digits_test)["x"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    ref = ort.InferenceSession(original, opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(bytes(plain), opts, providers=["CPUExecutionProvider"])
    for a, b in zip(ref.run(None, {"x": x}), dec.run(None, {"x": x}), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
