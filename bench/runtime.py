"""Device runtime overhead, measured side by side in one process on real corpus models.

drm.run_overhead_ratio: LicensedModel.run (check + count + signed log record, durably written while the
model computes) vs plain onnxruntime session.run, interleaved, median per call.
drm.cold_load_ratio: verify + unwrap + decrypt + session vs a plain InferenceSession from the same bytes."""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CORPUS = Path(os.environ.get("EDGEMART_CORPUS", Path.home() / ".cache" / "edgemart-corpus"))
MODELS = {  # name -> (model, data file, input key); the last one is the largest (headline)
    "digits_mlp": ("models/digits/digits_mlp_base.onnx", "data/digits/digits_test.npz", "x"),
    "ppocr_det": (
        "models/rapidocr/ch_PP-OCRv4_det_infer.onnx",
        "data/rapidocr/ch_PP-OCRv4_det_infer.npz",
        "x",
    ),
    "ppocr_rec": (
        "models/rapidocr/ch_PP-OCRv4_rec_infer.onnx",
        "data/rapidocr/ch_PP-OCRv4_rec_infer.npz",
        "x",
    ),
}
HEADLINE = "ppocr_rec"
RUN_TARGET, LOAD_TARGET = 1.02, 1.15


def _measure(name: str, quick: bool, work: Path, authority: Any, issuer: Any) -> dict[str, float]:
    import onnxruntime as ort

    import drm
    from edge_runtime import Device

    model_rel, data_rel, key = MODELS[name]
    plaintext = (CORPUS / model_rel).read_bytes()
    x = np.load(CORPUS / data_rel)[key][:1]
    now = int(time.time())
    cek = drm.generate_content_key()
    build = work / f"{name}.emdl"
    build.write_bytes(drm.seal(plaintext, key=cek, target="onnx-fp32"))
    device = Device.init(
        work / name, trust=drm.cert_to_pem(authority.cert), now=now, anchor_dir=work / "anchors"
    )
    lic = drm.issue_license(
        issuer=issuer,
        cek=cek,
        recipient=device.keys.kem_public(),
        kind="eval",
        listing=name,
        build_hash="sha256:" + hashlib.sha256(plaintext).hexdigest(),
        target="onnx-fp32",
        now=now,
        days=1,
        max_runs=None,
        device_id=device.device_id,
    )

    loads = 3 if quick else 7
    plain_load, licensed_load = [], []
    model = None
    for _ in range(loads):
        t0 = time.perf_counter()
        plain = ort.InferenceSession(plaintext, providers=["CPUExecutionProvider"])
        plain_load.append(time.perf_counter() - t0)
        if model is not None:
            model.close()
        t0 = time.perf_counter()
        model = device.open_model(build_path=build, license_bytes=lic)
        licensed_load.append(time.perf_counter() - t0)
    assert model is not None

    calls = {"digits_mlp": 300, "ppocr_det": 30, "ppocr_rec": 30}[name] // (3 if quick else 1)
    names = [o.name for o in plain.get_outputs()]
    for _ in range(3):
        plain.run(names, {key: x})
        model.run({key: x})
    plain_t, licensed_t = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        plain.run(names, {key: x})
        plain_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.run({key: x})
        licensed_t.append(time.perf_counter() - t0)
    model.close()
    return {
        "run": statistics.median(licensed_t) / statistics.median(plain_t),
        "run_plain_ms": statistics.median(plain_t) * 1000,
        "run_licensed_ms": statistics.median(licensed_t) * 1000,
        "load": statistics.median(licensed_load) / statistics.median(plain_load),
        "load_plain_ms": statistics.median(plain_load) * 1000,
        "load_licensed_ms": statistics.median(licensed_load) * 1000,
    }


def _entry(value: float, target: float, note: str) -> dict[str, Any]:
    return {
        "value": round(value, 4),
        "target": f"<= {target}",
        "unit": "x",
        "met": value <= target,
        "note": note,
    }


def run(quick: bool) -> dict[str, dict[str, Any]]:
    import drm

    now = int(time.time())
    authority = drm.Authority.generate(now=now - 3600)
    issuer = authority.issue_issuer(now=now - 3600)
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgemart-bench-runtime-") as tmp:
        figures = {name: _measure(name, quick, Path(tmp), authority, issuer) for name in MODELS}
    for name, f in figures.items():
        out[f"drm.run_overhead_ratio.{name}"] = _entry(
            f["run"],
            RUN_TARGET,
            f"median per call: licensed {f['run_licensed_ms']:.3f} ms vs plain {f['run_plain_ms']:.3f} ms"
            " (licensed = check + counter + signed usage record, fsync'd before the result returns)",
        )
        out[f"drm.cold_load_ratio.{name}"] = _entry(
            f["load"],
            LOAD_TARGET,
            f"median: licensed {f['load_licensed_ms']:.1f} ms vs plain {f['load_plain_ms']:.1f} ms",
        )
    h = figures[HEADLINE]
    out["drm.run_overhead_ratio"] = _entry(h["run"], RUN_TARGET, f"headline on {HEADLINE} (largest model)")
    out["drm.cold_load_ratio"] = _entry(h["load"], LOAD_TARGET, f"headline on {HEADLINE} (largest model)")
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
