"""Helpers for the fault-injection tests (a module of its own: `conftest` is ambiguous across test dirs)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import drm

ROOT = Path(__file__).resolve().parents[2]
NOW = int(time.time())
DAY = 86400


@dataclass
class Licensed:
    """A device directory with a sideloaded digits build and a license for it."""

    device_dir: Path
    build: Path
    license: Path
    anchor_dir: Path
    device_id: str

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "EDGEMART_ANCHOR_DIR": str(self.anchor_dir), "PYTHONPATH": str(ROOT)}
        env.pop("EDGEMART_FAULT_AT", None)
        env.update(extra)
        return env

    def open(self):
        from edge_runtime import Device

        return Device.open(self.device_dir, anchor_dir=self.anchor_dir)

    def claims(self) -> drm.LicenseClaims:
        from edge_runtime.device import _parse_claims

        return _parse_claims(self.license.read_bytes())

    def runs_left(self) -> int:
        left = self.open().runs_left(self.claims())
        assert left is not None
        return left


def make_licensed(
    base: Path, authority, model: bytes, *, device_dir: Path | None = None, max_runs: int = 100
) -> Licensed:
    """Init a device (in ``device_dir`` or base/device), seal ``model`` and issue it a license (files in base)."""
    from edge_runtime import Device

    auth, issuer = authority
    anchors = base / "anchors"
    device = Device.init(
        device_dir or base / "device", trust=drm.cert_to_pem(auth.cert), now=NOW, anchor_dir=anchors
    )
    cek = drm.generate_content_key()
    build = base / "build.emdl"
    build.write_bytes(drm.seal(model, key=cek, target="onnx-fp32"))
    token = drm.issue_license(
        issuer=issuer,
        cek=cek,
        recipient=device.keys.kem_public(),
        kind="eval",
        listing="digits",
        build_hash="sha256:" + hashlib.sha256(model).hexdigest(),
        target="onnx-fp32",
        now=NOW,
        days=7,
        max_runs=max_runs,
        device_id=device.device_id,
    )
    lic = base / "digits.lic"
    lic.write_bytes(token)
    return Licensed(device.dir, build, lic, anchors, device.device_id)


# Runs the licensed model N times (printing "ran" after each computed run), then closes it (a release).
RUNNER = """
import sys, numpy as np
from edge_runtime import Device
device_dir, build, lic, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = Device.open(device_dir).open_model(build_path=build, license_bytes=open(lic, "rb").read())
for _ in range(n):
    model.run({"x": np.zeros((1, 64), np.float32)})
    print("ran", flush=True)
model.close()
print("closed", flush=True)
"""


def run_device(licensed: Licensed, runs: int, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            RUNNER,
            str(licensed.device_dir),
            str(licensed.build),
            str(licensed.license),
            str(runs),
        ],
        env=licensed.env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )
