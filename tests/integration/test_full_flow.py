"""The walking skeleton end to end, through the CLI, against a real store subprocess on localhost.

Runs `edgemart.demo` (seller upload → gate → arm-cpu int8 → sealed build → enroll → eval license →
on-device eval with JSON/HTML reports), then attacks the result: wrong device, expired license,
tampered build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.slow


def edgemart(
    *args: str, env: dict | None = None, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "edgemart", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("flow") / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "edgemart.demo", "--corpus", str(corpus), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def _installed(device: Path) -> dict:
    return json.loads((device / "installed.json").read_text())["digits-mlp"]


def test_report_matches_an_independent_computation(flow: Path, corpus: Path) -> None:
    report = json.loads((flow / "report.json").read_text())
    data = np.load(corpus / "data/digits/digits_test.npz")
    # The int8 build is what ran; fp32 accuracy of the same model bounds it closely.
    sess = ort.InferenceSession(str(corpus / "models/digits/digits_mlp_finetuned.onnx"))
    labels = sess.run(["label"], {"x": data["x"]})[0]
    fp32_acc = float((labels == data["y"]).mean())
    acc = report["classification"]["accuracy"]
    assert abs(acc - fp32_acc) < 0.03, (acc, fp32_acc)
    assert report["samples"] == len(data["y"])
    assert report["model"]["target"] == "arm-cpu"
    assert report["latency_ms"]["p99"] >= report["latency_ms"]["p50"] > 0
    html = (flow / "report.html").read_text()
    assert "<svg" in html and "http://" not in html and "https://" not in html


def test_blocked_upload_was_refused_with_evidence(flow: Path) -> None:
    log = (flow / "store.log").read_text(errors="replace")
    assert "Traceback" not in log


def test_license_for_another_device_is_refused(flow: Path, corpus: Path, tmp_path: Path) -> None:
    inst = _installed(flow / "device")
    other = tmp_path / "other-device"
    root = flow / "device" / "root.crt"
    assert edgemart("device", "init", "--device-dir", str(other), "--trust", str(root)).returncode == 0
    dev = flow / "device"
    proc = edgemart(
        "device",
        "eval",
        "--build",
        str(dev / inst["build"]),
        "--license",
        str(dev / inst["license"]),
        "--device-dir",
        str(other),
        "--data",
        str(corpus / "data/digits/digits_test.npz"),
    )
    assert proc.returncode == 1, proc.stderr
    assert "license refused" in proc.stderr


def test_expired_license_is_refused(flow: Path, corpus: Path) -> None:
    if shutil.which("faketime") is None:
        pytest.skip("faketime not installed (make test installs it)")
    dev = flow / "device"
    proc = edgemart(
        "device",
        "eval",
        "digits-mlp",
        "--device-dir",
        str(dev),
        "--data",
        str(corpus / "data/digits/digits_test.npz"),
        prefix=["faketime", "-f", "+400d"],
    )
    assert proc.returncode == 1, proc.stderr
    assert "license refused" in proc.stderr


def test_tampered_build_is_refused(flow: Path, corpus: Path, tmp_path: Path) -> None:
    dev = tmp_path / "device"
    shutil.copytree(flow / "device", dev)
    inst = json.loads((dev / "installed.json").read_text())["digits-mlp"]
    build = dev / inst["build"]
    blob = bytearray(build.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    build.write_bytes(bytes(blob))
    proc = edgemart(
        "device",
        "eval",
        "--build",
        str(build),
        "--license",
        str(dev / inst["license"]),
        "--device-dir",
        str(dev),
        "--data",
        str(corpus / "data/digits/digits_test.npz"),
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    # The opaque refusal's precise reason is in the local audit log only.
    assert "integrity" in (dev / "audit.log").read_text().splitlines()[-1]
    assert "integrity" not in proc.stderr
