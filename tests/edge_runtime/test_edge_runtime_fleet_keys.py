"""Fleet keys on a device: `device add-fleet-key` installs only X25519 private keys, 0600 under DIR/fleet/<id>.key;
the device refuses key files that name another fleet, that group or others can read, or that are links, and
runs fleet-bound licenses (metered and capped like any other) only while it holds their key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

import drm
from drm.keys import private_key_to_pem
from edge_runtime import Device

NOW = int(time.time())  # the conftest factory's licenses are issued at its own import time, a moment earlier


def _kid(key: x25519.X25519PrivateKey) -> str:
    return drm.key_id(key.public_key().public_bytes_raw())


def _fleet_license(
    factory: Any,
    build: Any,
    key: x25519.X25519PrivateKey,
    *,
    max_runs: int | None = None,
    days: float | None = None,
) -> bytes:
    raw = key.public_key().public_bytes_raw()
    return drm.issue_license(
        issuer=factory.issuer,
        cek=build.cek,
        recipient=drm.KemKeys(x25519=raw, mlkem768=None),
        kind="production",
        listing="fleet-digits",
        build_hash=build.build_hash,
        target=build.target,
        now=NOW,
        days=days,
        max_runs=max_runs,
        fleet_key_id=drm.key_id(raw),
    )


def _activate(factory: Any, device: Device, token: bytes, *, seat: int = 1) -> dict[str, Any]:
    """The store's seat activation of this device on the fleet license (a fleet license runs only once
    activated: tests/edge_runtime/test_seat_activation.py)."""
    claims = drm.LicenseClaims.from_dict(drm.parse_envelope(token, "edgemart-license/1")[0])
    assert claims.fleet_key_id is not None
    act = drm.Activation(device.device_id, claims.license_id, claims.fleet_key_id, seat, NOW)
    return device.install_activation(drm.sign_activation(factory.issuer, act), now=NOW)


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgemart", "device", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _pem_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _plain(build: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(build.plaintext, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"x": x}), strict=True))


def test_add_fleet_key_takes_only_x25519_private_keys(device: Device, tmp_path: Path) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    x_pub = x25519.X25519PrivateKey.generate().public_key()
    encrypted = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    cases = {
        "ed25519.pem": (private_key_to_pem(ed), "expected an X25519 private key"),
        "x25519.pub.pem": (
            x_pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "not an unencrypted PEM private key",
        ),
        "encrypted.pem": (encrypted, "not an unencrypted PEM private key"),
        "garbage.pem": (os.urandom(200), "not an unencrypted PEM private key"),
        "huge.pem": (b"-" * (64 * 1024), "larger than"),
    }
    for name, (data, message) in cases.items():
        r = _cli("add-fleet-key", "--device-dir", device.dir, _pem_file(tmp_path / name, data))
        assert r.returncode == 2 and message in r.stderr, (name, r.stderr)
    r = _cli("add-fleet-key", "--device-dir", device.dir, tmp_path / "missing.pem")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _cli("add-fleet-key", "--device-dir", tmp_path / "not-a-device", tmp_path / "ed25519.pem")
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not (device.dir / "fleet").exists() or not list((device.dir / "fleet").iterdir())
    assert device.fleet_key_ids() == frozenset()

    key = x25519.X25519PrivateKey.generate()
    r = _cli(
        "add-fleet-key",
        "--device-dir",
        device.dir,
        _pem_file(tmp_path / "fleet.pem", private_key_to_pem(key)),
    )
    assert r.returncode == 0, r.stderr
    assert f"holds fleet key {_kid(key)}" in r.stdout
    assert device.fleet_key_ids() == {_kid(key)}
    assert [p.name for p in (device.dir / "fleet").iterdir()] == [f"{_kid(key)}.key"]  # no temp file left


def test_a_fleet_license_runs_with_its_key_and_is_capped_like_any_license(
    device: Device, factory: Any, digits_build: Any, digits_test: Path
) -> None:
    key = x25519.X25519PrivateKey.generate()
    device.add_fleet_key(private_key_to_pem(key))
    token = _fleet_license(factory, digits_build, key, max_runs=2, days=1)
    entry = device.install(build=digits_build.container, license=token, now=NOW + 60)
    assert entry["kind"] == "production"
    _activate(factory, device, token)
    x = np.load(digits_test)["x"][:16]
    want = _plain(digits_build, x)
    with device.open_model(listing="fleet-digits", now=NOW + 60) as model:
        assert model.runs_left() == 2
        for _ in range(2):
            got = model.run({"x": x})
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])
        with pytest.raises(drm.LicenseRefused) as info:
            model.run({"x": x})
        assert info.value.reason == "run cap exhausted: 2 of 2 runs used"
    with pytest.raises(drm.LicenseRefused) as info:
        device.open_model(listing="fleet-digits", now=NOW + 2 * 86400)
    assert info.value.reason == "license has expired"
    report = device.verify_log()
    assert report["ok"] and report["matches_state"]


def test_a_key_file_holding_another_fleets_key_is_refused(
    device: Device, factory: Any, digits_build: Any, digits_test: Path
) -> None:
    named, actual = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    token = _fleet_license(factory, digits_build, named)
    (device.dir / "fleet").mkdir(mode=0o700)
    _pem_file(device.dir / "fleet" / f"{_kid(named)}.key", private_key_to_pem(actual))
    message = f"holds the key of fleet {_kid(actual)}, not {_kid(named)}"
    with pytest.raises(drm.UsageError, match=message):
        device.fleet_key_ids()
    with pytest.raises(drm.UsageError, match=message):
        device.install(build=digits_build.container, license=token, now=NOW + 60)
    assert device.installed() == {}
    status = device.status(now=NOW + 60)
    assert status["fleet_keys"] == [] and message in status["fleet_key_problem"]
    r = _cli("status", "--device-dir", device.dir)
    assert r.returncode == 0 and f"fleet      PROBLEM: {device.dir}" in r.stdout

    # A license bound to this device never reads DIR/fleet: it still installs and runs.
    own = factory.license(device, digits_build, listing="own-digits")
    device.install(build=digits_build.container, license=own, now=NOW + 60)
    x = np.load(digits_test)["x"][:4]
    with device.open_model(listing="own-digits", now=NOW + 60) as model:
        np.testing.assert_array_equal(
            model.run({"x": x})["probabilities"], _plain(digits_build, x)["probabilities"]
        )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_fleet_key_readable_by_others_is_refused_until_reinstalled(
    device: Device, factory: Any, digits_build: Any, digits_test: Path, mode: int
) -> None:
    key = x25519.X25519PrivateKey.generate()
    device.add_fleet_key(private_key_to_pem(key))
    token = _fleet_license(factory, digits_build, key)
    device.install(build=digits_build.container, license=token, now=NOW)
    _activate(factory, device, token)
    held = device.dir / "fleet" / f"{_kid(key)}.key"
    held.chmod(mode)
    with pytest.raises(drm.UsageError, match=f"accessible to group or others \\(mode {mode:04o}\\)"):
        device.open_model(listing="fleet-digits", now=NOW + 60)
    assert held.stat().st_mode & 0o777 == mode  # refused, not silently tightened
    r = _cli(
        "add-fleet-key",
        "--device-dir",
        device.dir,
        _pem_file(device.dir.parent / "k.pem", private_key_to_pem(key)),
    )
    assert r.returncode == 0 and "(replaced)" in r.stdout, r.stderr
    assert held.stat().st_mode & 0o777 == 0o600
    x = np.load(digits_test)["x"][:4]
    with device.open_model(listing="fleet-digits", now=NOW + 60) as model:
        np.testing.assert_array_equal(model.run({"x": x})["label"], _plain(digits_build, x)["label"])


def test_a_linked_fleet_key_is_refused(device: Device, factory: Any, digits_build: Any) -> None:
    key = x25519.X25519PrivateKey.generate()
    elsewhere = _pem_file(device.dir.parent / "elsewhere.key", private_key_to_pem(key))
    (device.dir / "fleet").mkdir(mode=0o700)
    link = device.dir / "fleet" / f"{_kid(key)}.key"
    link.symlink_to(elsewhere)
    with pytest.raises(drm.UsageError, match="cannot be opened"):
        device.install(
            build=digits_build.container, license=_fleet_license(factory, digits_build, key), now=NOW
        )
    r = _cli("add-fleet-key", "--device-dir", device.dir, elsewhere)
    assert r.returncode == 2 and "is not a regular file" in r.stderr
    assert link.is_symlink() and elsewhere.read_bytes() == private_key_to_pem(key)


def test_removing_the_fleet_key_stops_its_licenses(
    device: Device, factory: Any, digits_build: Any, refused, audit_reasons
) -> None:
    key = x25519.X25519PrivateKey.generate()
    device.add_fleet_key(private_key_to_pem(key))
    device.install(build=digits_build.container, license=_fleet_license(factory, digits_build, key), now=NOW)
    (device.dir / "fleet" / f"{_kid(key)}.key").unlink()
    refused(
        device,
        lambda: device.open_model(listing="fleet-digits", now=NOW + 60),
        "license is bound to a fleet key this device does not hold",
    )
    records = [json.loads(line)["rec"] for line in (device.dir / "usage.log").read_text().splitlines()]
    assert records[-1]["event"] == "refused"
