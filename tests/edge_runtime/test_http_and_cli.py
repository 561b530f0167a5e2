"""Enrollment, fetch and sync against a tiny real HTTP store; the CLI end to end (with faketime); no plaintext on disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import drm
from edge_runtime import Device
from tests.plaintext_scan import files_containing, windows

TOKEN = "tok-buyer"


def _variant(model: bytes) -> bytes:
    """The same network with one more metadata entry: a different build hash, the same outputs."""
    import onnx

    proto = onnx.load_from_string(model)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "edgemart.target", "arm-cpu"
    return proto.SerializeToString()


class MiniStore:
    """Just enough of the store's device API, built on drm, served by http.server on 127.0.0.1."""

    def __init__(self, factory, build, now: int) -> None:
        self.factory, self.build, self.now = factory, build, now
        # One sealed build per target, as the real store keeps them: an arm-cpu build is not the onnx-fp32
        # container under another name (a license runs only with a container sealed for its target).
        self.builds = {
            build.target: build,
            "arm-cpu": factory.seal(_variant(build.plaintext), target="arm-cpu"),
        }
        self.devices: dict[str, object] = {}
        self.usage: list[bytes] = []
        self.revocations = factory.revocations(version=1, revoked=[])
        store = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, body, ctype="application/json"):
                data = json.dumps(body).encode() if ctype == "application/json" else body
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self):
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._send(
                        401, {"error": {"code": "unauthorized", "message": "bad token", "problems": []}}
                    )
                    return False
                return True

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path == "/api/v1/revocations":
                    return self._send(200, store.revocations, "application/octet-stream")
                for b in store.builds.values():
                    if self.path == "/api/v1/builds/" + b.build_hash.split(":")[1]:
                        return self._send(200, b.container, "application/octet-stream")
                self._send(404, {"error": {"code": "not_found", "message": "no such thing", "problems": []}})

            def do_POST(self):
                if not self._authorized():
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/api/v1/devices/enroll":
                    cert = store.factory.authority.issue_device_cert(
                        json.loads(body)["csr"].encode(), now=store.now
                    )
                    device_id = drm.cert_device_id(cert)
                    store.devices[device_id] = cert
                    return self._send(
                        201,
                        {
                            "device_id": device_id,
                            "certificate": drm.cert_to_pem(cert).decode(),
                            "root": store.factory.root_pem.decode(),
                        },
                    )
                if self.path == "/api/v1/listings/digits/eval-license":
                    req = json.loads(body)
                    cert = store.devices[req["device_id"]]
                    b = store.builds.get(req["target"])
                    if b is None:
                        return self._send(
                            404, {"error": {"code": "not_found", "message": "no such build", "problems": []}}
                        )
                    lic = drm.issue_license(
                        issuer=store.factory.issuer,
                        cek=b.cek,
                        recipient=drm.cert_kem_keys(cert),
                        kind="eval",
                        listing="digits",
                        build_hash=b.build_hash,
                        target=req["target"],
                        now=store.now,
                        days=7,
                        max_runs=50,
                        device_id=req["device_id"],
                    )
                    claims = drm.verify_license(
                        lic, root=store.factory.authority.cert, now=store.now, device_id=req["device_id"]
                    ).claims
                    return self._send(
                        201,
                        {
                            "license": lic.decode(),
                            "license_id": claims.license_id,
                            "build_hash": b.build_hash,
                            "build_url": "/api/v1/builds/" + b.build_hash.split(":")[1],
                        },
                    )
                if self.path.startswith("/api/v1/devices/") and self.path.endswith("/usage"):
                    device_id = self.path.split("/")[4]
                    pub = store.devices[device_id].public_key()
                    report = drm.verify_log(body, pub, device_id=device_id)
                    store.usage.append(body)
                    return self._send(
                        200,
                        {
                            "ok": report.ok,
                            "accepted": len(report.records),
                            "first_bad": report.first_bad,
                            "reason": report.reason,
                        },
                    )
                self._send(404, {"error": {"code": "not_found", "message": "no route", "problems": []}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store(factory, digits_build, now):
    # The store seals the *fp32* digits build under target onnx-fp32.
    with MiniStore(factory, digits_build, now) as s:
        yield s


def _cli(*args, env_extra=None, faketime=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, "-m", "edgemart", "device", *map(str, args)]
    if faketime:
        cmd = ["faketime", "-f", faketime, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_enroll_fetch_eval_sync(tmp_path, store, digits_test, now):
    d = tmp_path / "board"
    device = Device.init(d, now=now)
    result = device.enroll(store.url, TOKEN)
    assert result["device_id"] == device.device_id
    cert = drm.cert_from_bytes((d / "device.crt").read_bytes())
    assert cert.issuer == store.factory.authority.cert.subject  # store-issued now
    assert (d / "root.crt").read_bytes() == store.factory.root_pem
    assert oct((d / "store.json").stat().st_mode & 0o777) == "0o600"
    assert (
        store.devices[device.device_id].public_key() == device.keys.sign.public_key()
    )  # only public keys left

    entry = device.fetch("digits", "onnx-fp32")
    assert entry["listing"] == "digits" and (d / entry["build"]).is_file()
    assert json.loads((d / "installed.json").read_text())["digits"]["license_id"] == entry["license_id"]
    assert (d / "revocation.bin").read_bytes() == store.revocations

    with device.open_model(listing="digits") as model:
        model.run({"x": np.load(digits_test)["x"][:4]})
    synced = device.sync()
    assert synced["store"]["ok"] and synced["store"]["accepted"] == synced["uploaded"] >= 2
    assert device.verify_log()["ok"]


def test_enroll_bad_token_and_root_mismatch(tmp_path, store, factory, now):
    d = tmp_path / "board"
    with pytest.raises(drm.AuthError, match="bad token"):
        Device.init(d, now=now).enroll(store.url, "wrong")
    other = type(factory)()
    d2 = tmp_path / "pinned"
    device = Device.init(d2, trust=other.root_pem, now=now)
    with pytest.raises(drm.ForbiddenError, match="differs from the root pinned"):
        device.enroll(store.url, TOKEN)


def test_cli_enroll_fetch_eval_status_sync(tmp_path, store, digits_test):
    d = tmp_path / "board"
    r = _cli("enroll", "--store", store.url, "--token", TOKEN, "--device-dir", d, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["device_id"]
    r = _cli("fetch", "digits", "--target", "onnx-fp32", "--device-dir", d)
    assert r.returncode == 0, r.stderr
    r = _cli("eval", "digits", "--device-dir", d, "--data", digits_test, "--json", "--batch-size", "50")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["samples"] == 450 and report["classification"]["accuracy"] > 0.9
    r = _cli("status", "--device-dir", d, "--json")
    lic = json.loads(r.stdout)["licenses"][0]
    assert lic["runs_left"] == 50 - report["runs_used"] and lic["expires"]
    r = _cli("sync", "--device-dir", d)
    assert r.returncode == 0 and "ok=True" in r.stdout, r.stdout + r.stderr


def test_cli_eval_picks_the_target_asked_for_and_takes_npy(tmp_path, store, digits_test):
    d = tmp_path / "board"
    assert _cli("enroll", "--store", store.url, "--token", TOKEN, "--device-dir", d).returncode == 0
    for target in ("arm-cpu", "onnx-fp32"):
        r = _cli("fetch", "digits", "--target", target, "--device-dir", d)
        assert r.returncode == 0, r.stderr
    npy = tmp_path / "x.npy"
    np.save(npy, np.load(digits_test)["x"][:20])
    r = _cli("eval", "digits", "--device-dir", d, "--data", npy, "--quiet")
    assert r.returncode == 2 and "arm-cpu, onnx-fp32" in r.stderr and "--target" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    for target in ("arm-cpu", "onnx-fp32"):
        r = _cli("eval", "digits", "--target", target, "--device-dir", d, "--data", npy, "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["model"]["target"] == target and report["samples"] == 20
        assert report["model"]["license_expires"].endswith("Z") and report["model"]["max_runs"] == 50
    r = _cli("eval", "digits", "--target", "onnx-fp32", "--device-dir", d, "--data", npy)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\d+ of 50 runs left; expires \d{4}-\d\d-\d\dT", r.stdout), r.stdout
    r = _cli("eval", "digits", "--target", "coral-edgetpu", "--device-dir", d, "--data", npy)
    assert r.returncode == 2 and "no coral-edgetpu build on this device" in r.stderr


def test_cli_eval_compares_two_builds_on_the_buyers_data(tmp_path, store, digits_test):
    """A buyer compares the int8 arm-cpu build with the onnx-fp32 baseline on their own data, in one report."""
    d = tmp_path / "board"
    assert _cli("enroll", "--store", store.url, "--token", TOKEN, "--device-dir", d).returncode == 0
    for target in ("arm-cpu", "onnx-fp32"):
        assert _cli("fetch", "digits", "--target", target, "--device-dir", d).returncode == 0
    data = tmp_path / "mine.npz"
    with np.load(digits_test) as z:
        np.savez(data, x=z["x"][:40], y=z["y"][:40])
    html = tmp_path / "compare.html"
    r = _cli("eval", "digits", "--target", "arm-cpu", "--compare", "onnx-fp32", "--device-dir", d,
             "--data", data, "--json", "--quiet", "--warmup", "0", "--html", html)  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["compare"]["candidate"] == "arm-cpu" and doc["compare"]["baseline"] == "onnx-fp32"
    assert (
        doc["candidate"]["model"]["target"] == "arm-cpu" and doc["baseline"]["model"]["target"] == "onnx-fp32"
    )
    assert doc["candidate"]["samples"] == doc["baseline"]["samples"] == 40
    (name, figures), *_ = doc["compare"]["agreement"].items()
    assert 0.9 <= figures["label_agreement"] <= 1.0  # same 40 samples (this mini store seals fp32 for both)
    rows = {row["figure"]: row for row in doc["compare"]["figures"]}
    assert rows["top-1 accuracy"]["candidate"] > 0.8 and rows["top-1 accuracy"]["baseline"] > 0.8
    assert doc["compare"]["latency_p50_ratio"] > 0
    page = html.read_text()
    assert "arm-cpu vs onnx-fp32" in page and page.count("<svg") >= 2  # both reports' plots on one page
    text = _cli("eval", "digits", "--target", "arm-cpu", "--compare", "onnx-fp32", "--device-dir", d,
                "--data", data, "--quiet", "--warmup", "0")  # fmt: skip
    assert text.returncode == 0 and "candidate" in text.stdout and "labels agree" in text.stdout
    bad = _cli(
        "eval", "digits", "--target", "arm-cpu", "--compare", "arm-cpu", "--device-dir", d, "--data", data
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.fixture
def sideload(tmp_path, factory, digits_build, now):
    d = tmp_path / "dev"
    device = Device.init(d, trust=factory.root_pem, now=now)
    build = tmp_path / "digits.emdl"
    build.write_bytes(digits_build.container)
    lic = tmp_path / "digits.lic"
    lic.write_bytes(factory.license(device, digits_build, days=1, max_runs=40))
    return d, build, lic


def test_cli_sideload_eval_outputs_html(tmp_path, sideload, digits_test, digits_base):
    import onnxruntime as ort

    d, build, lic = sideload
    out, html = tmp_path / "out.npz", tmp_path / "report.html"
    r = _cli(
        "eval",
        "--build",
        build,
        "--license",
        lic,
        "--device-dir",
        d,
        "--data",
        digits_test,
        "--save-outputs",
        out,
        "--html",
        html,
        "--batch-size",
        "45",
    )
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "p99" in r.stdout
    plain = ort.InferenceSession(str(digits_base), providers=["CPUExecutionProvider"])
    x = np.load(digits_test)["x"]
    with np.load(out) as saved:
        for name, ref in zip(("label", "probabilities"), plain.run(None, {"x": x}), strict=True):
            np.testing.assert_array_equal(saved[name], ref)
    page = html.read_text()
    assert "<svg" in page and page.count("<svg") >= 3
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # Shape mismatch: exit 2 with the input named.
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 63), np.float32))
    r = _cli("eval", "--build", build, "--license", lic, "--device-dir", d, "--data", bad)
    assert r.returncode == 2 and "'x' expects float32 [?, 64]" in r.stderr and "given [4, 63]" in r.stderr


@pytest.mark.skipif(
    shutil.which("faketime") is None, reason="faketime is not installed (make apt installs it)"
)
def test_cli_clock_rollback_and_expiry_with_faketime(sideload, digits_test):
    d, build, lic = sideload
    base = [
        "eval",
        "--build",
        build,
        "--license",
        lic,
        "--device-dir",
        d,
        "--data",
        digits_test,
        "--batch-size",
        "450",
        "--warmup",
        "0",
        "--quiet",
    ]
    assert _cli(*base, faketime="+2h").returncode == 0
    r = _cli(*base, faketime="-1h")  # the clock was wound back
    assert r.returncode == 1
    assert (
        r.stderr.strip()
        == f"edgemart: license refused: device clock went back (details in {d / 'audit.log'})"
    )
    assert "clock rollback" in (d / "audit.log").read_text().splitlines()[-1]
    r = _cli(*base, faketime="+2d")  # one-day license
    assert r.returncode == 1 and "expired" in (d / "audit.log").read_text().splitlines()[-1]
    assert r.stderr.strip() == f"edgemart: license refused: license expired (details in {d / 'audit.log'})"
    r = _cli("verify-log", "--device-dir", d, "--json")
    report = json.loads(r.stdout)
    # The one evaluation reserved all 40 runs and gave back the 39 it did not use.
    assert r.returncode == 0 and report["events"] == {"run": 2, "refused": 2}
    assert list(report["runs_by_license"].values()) == [1]


@pytest.mark.parametrize("which", ["digits", "blazeface"])
def test_no_plaintext_on_disk(
    tmp_path, factory, digits_build, blazeface_build, digits_test, blazeface_data, which, now
):
    build, data = (digits_build, digits_test) if which == "digits" else (blazeface_build, blazeface_data)
    d = tmp_path / "dev"
    device = Device.init(d, trust=factory.root_pem, now=now)
    (tmp_path / "in").mkdir()
    build_path, lic_path = tmp_path / "in" / "b.emdl", tmp_path / "in" / "l.lic"
    build_path.write_bytes(build.container)
    lic_path.write_bytes(factory.license(device, build, max_runs=100))
    device.install(build=build.container, license=lic_path.read_bytes(), listing="m")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    r = _cli(
        "eval",
        "m",
        "--device-dir",
        d,
        "--data",
        data,
        "--warmup",
        "1",
        "--quiet",
        env_extra={"TMPDIR": str(private_tmp)},
    )
    assert r.returncode == 0, r.stderr
    needles = windows(build.plaintext)
    control = tmp_path / "control"
    control.mkdir()
    (control / "plain.bin").write_bytes(build.plaintext)
    assert files_containing(control, needles) == [str(control / "plain.bin")]  # the scan does find plaintext
    assert (
        len(needles) >= 8
        and files_containing(d, needles) == []
        and files_containing(private_tmp, needles) == []
    )
    assert (
        files_containing(tmp_path / "in", needles) == []
    )  # the container itself holds no plaintext run either
