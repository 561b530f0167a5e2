"""Fleet-bound production licenses on the device: a bundle whose license is wrapped to a fleet key installs on
every device holding that key (`edgemart device add-fleet-key`), runs there with outputs identical to plain
onnxruntime, is metered like any license, leaves no plaintext on disk, and is refused without the key, for
another device's seat, and once revoked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from _bundle_fixtures import (
    NOW,
    Model,
    Pki,
    build_args,
    device_license,
    fleet_license,
    lay_out_inputs,
    seat_activation,
)
from cryptography.hazmat.primitives.asymmetric import x25519

import drm
from drm.keys import private_key_to_pem
from edge_runtime import Device
from edge_runtime.bundle import install_bundle
from edgemart.cli import main
from tests.plaintext_scan import files_containing, windows


@pytest.fixture(autouse=True)
def anchors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Rollback anchors of the devices made here stay in the test's temp dir (also for CLI subprocesses)."""
    path = tmp_path / "anchors"
    monkeypatch.setenv("EDGEMART_ANCHOR_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def fleet_key() -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.generate()


def _kid(key: x25519.X25519PrivateKey) -> str:
    return drm.key_id(key.public_key().public_bytes_raw())


def _bundle(
    root: Path,
    model: Model,
    licenses: list[bytes],
    builder: Path,
    activations: list[bytes] = (),  # type: ignore[assignment]
) -> Path:
    dirs = lay_out_inputs(root / "in", {model.listing: model}, licenses, chains=False, cards=False)
    extra: list[str] = []
    if activations:
        folder = root / "in" / "activations"
        folder.mkdir()
        for i, token in enumerate(activations):
            (folder / f"seat-{i}.act").write_bytes(token)
        extra = ["--activations", str(folder)]
    out = root / "fleet.tar.gz"
    assert main(build_args(dirs, out, builder, *extra)) == 0
    return out


def _key_file(directory: Path, key: x25519.X25519PrivateKey) -> Path:
    """The fleet key as the firmware builder hands it over: a PEM file outside any device."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fleet.pem"
    path.write_bytes(private_key_to_pem(key))
    path.chmod(0o600)
    return path


def _device(path: Path, pki: Pki) -> Device:
    return Device.init(path, trust=pki.root_pem, now=NOW)


def _cli(*args: object, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, "-m", "edgemart", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _plain_outputs(model: Model, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """The plain model under onnxruntime, in the same batches the device evaluation uses."""
    session = ort.InferenceSession(model.plain, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(None, {"x": x[i : i + batch]}) for i in range(0, len(x), batch)]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}


def test_fleet_bundle_installs_and_runs_on_every_fleet_device(
    tmp_path: Path,
    pki: Pki,
    models: dict[str, Model],
    builder_key: tuple[Path, Path],
    fleet_key: x25519.X25519PrivateKey,
    digits_test: Path,
) -> None:
    model = models["digits-mlp"]
    token = fleet_license(pki, model, fleet_key, seats=2)
    lid = drm.LicenseClaims.from_dict(drm.parse_envelope(token, "edgemart-license/1")[0]).license_id
    boards = [_device(tmp_path / name, pki) for name in ("board-1", "board-2")]
    acts = [seat_activation(pki, token, b.device_id, seat) for seat, b in enumerate(boards, 1)]
    bundle = _bundle(tmp_path, model, [token], builder_key[0], acts)
    key_pem = _key_file(tmp_path / "secrets", fleet_key)
    kid = _kid(fleet_key)
    x = np.load(digits_test)["x"]
    expected = _plain_outputs(model, x, 64)
    needles = windows(model.plain)

    for name in ("board-1", "board-2"):  # one fleet license, two devices with their own keys and seats
        d = tmp_path / name
        r = _cli("device", "add-fleet-key", "--device-dir", d, key_pem, "--json")
        assert r.returncode == 0, r.stderr
        added = json.loads(r.stdout)
        assert added["fleet_key_id"] == kid and not added["replaced"]
        held = d / "fleet" / f"{kid}.key"
        assert (held.stat().st_mode & 0o777, (d / "fleet").stat().st_mode & 0o777) == (0o600, 0o700)
        assert held.read_bytes() == private_key_to_pem(fleet_key)

        r = _cli("bundle", "install", bundle, "--device-dir", d, "--builder-key", builder_key[1], "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert [(i["listing"], i["binding"], i["license_id"]) for i in report["installed"]] == [
            ("digits-mlp", "fleet", lid)
        ]
        assert report["skipped"] == []

        private_tmp = tmp_path / f"{name}-tmp"
        private_tmp.mkdir()
        outputs = tmp_path / f"{name}-outputs.npz"
        r = _cli(
            "device", "eval", "digits-mlp", "--device-dir", d, "--data", digits_test, "--batch-size", "64",
            "--warmup", "1", "--quiet", "--save-outputs", outputs, "--json",
            env_extra={"TMPDIR": str(private_tmp)},
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        evaluated = json.loads(r.stdout)
        assert evaluated["samples"] == len(x) and evaluated["batch_size"] == 64
        with np.load(outputs) as got:
            assert set(got.files) == set(expected)
            for output, want in expected.items():
                np.testing.assert_array_equal(got[output], want)

        # In-process too: the model from Device.open_model equals plain onnxruntime on the same rows.
        device = Device.open(d)
        with device.open_model(listing="digits-mlp") as licensed:
            assert licensed.max_runs is None and licensed.runs_left() is None
            got_rows = licensed.run({"x": x[:32]})
        for output, want in _plain_outputs(model, x[:32], 32).items():
            np.testing.assert_array_equal(got_rows[output], want)

        # Metered like any license: signed reserve/release records, the state agrees with the log.
        log = device.verify_log()
        assert log["ok"] and log["matches_state"] and log["events"]["run"] >= 2
        assert log["runs_by_license"] == {lid: 1 + 8 + 1}  # warm-up + 450 rows in batches of 64 + one run
        status = device.status(now=NOW + 60)
        assert status["fleet_keys"] == [kid]
        (entry,) = status["licenses"]
        assert (entry["binding"], entry["max_runs"], entry["expires"]) == (f"fleet:{kid}", None, None)

        # Decrypted weights only ever in memory; the fleet key only in DIR/fleet.
        assert files_containing(d, needles) == [] and files_containing(private_tmp, needles) == []
        pem = private_key_to_pem(fleet_key).splitlines()[1]
        assert files_containing(d, [pem]) == [str(held)] and files_containing(private_tmp, [pem]) == []


def test_a_device_without_the_fleet_key_is_refused(
    tmp_path: Path,
    pki: Pki,
    models: dict[str, Model],
    builder_key: tuple[Path, Path],
    fleet_key: x25519.X25519PrivateKey,
) -> None:
    model = models["digits-mlp"]
    token = fleet_license(pki, model, fleet_key)
    bundle = _bundle(tmp_path, model, [token], builder_key[0])
    d = tmp_path / "outsider"
    device = _device(d, pki)
    other = x25519.X25519PrivateKey.generate()  # the device belongs to another fleet
    device.add_fleet_key(private_key_to_pem(other))

    r = _cli("bundle", "install", bundle, "--device-dir", d)
    assert r.returncode == 1
    assert "not in this bundle's license set" in r.stderr and f"fleet keys held: {_kid(other)}" in r.stderr
    assert device.installed() == {} and not list((d / "builds").iterdir())

    # Sideloading the build and license directly is refused by the device itself, with the reason audited.
    with pytest.raises(drm.LicenseRefused) as info:
        device.install(build=model.sealed, license=token, now=NOW + 60)
    assert info.value.reason == "license is bound to a fleet key this device does not hold"
    build = tmp_path / "digits.emdl"
    build.write_bytes(model.sealed)
    with pytest.raises(drm.LicenseRefused) as info:
        device.open_model(build_path=build, license_bytes=token, now=NOW + 60)
    assert str(info.value) == f"license refused: wrong device (details in {d / 'audit.log'})"
    last = json.loads((d / "audit.log").read_text().splitlines()[-1])
    assert last["reason"] == "license is bound to a fleet key this device does not hold"


def test_another_devices_seat_is_still_refused_beside_a_fleet_seat(
    tmp_path: Path,
    pki: Pki,
    models: dict[str, Model],
    builder_key: tuple[Path, Path],
    fleet_key: x25519.X25519PrivateKey,
) -> None:
    model = models["digits-mlp"]
    beta = _device(tmp_path / "beta", pki)
    beta_token = device_license(pki, model, (beta.dir / "device.crt").read_bytes())
    fleet_token = fleet_license(pki, model, fleet_key)
    bundle = _bundle(tmp_path, model, [beta_token, fleet_token], builder_key[0])

    alpha = _device(tmp_path / "alpha", pki)
    alpha.add_fleet_key(private_key_to_pem(fleet_key))
    result = install_bundle(bundle.read_bytes(), alpha.dir)
    assert [i["binding"] for i in result["installed"]] == ["fleet"]
    assert [s["reason"] for s in result["skipped"]] == [f"bound to device {beta.device_id}"]

    with pytest.raises(drm.LicenseRefused) as info:
        alpha.install(build=model.sealed, license=beta_token, now=NOW + 60)
    assert info.value.reason == "license is bound to another device"
    build = tmp_path / "digits.emdl"
    build.write_bytes(model.sealed)
    with pytest.raises(drm.LicenseRefused) as info:
        alpha.open_model(build_path=build, license_bytes=beta_token, now=NOW + 60)
    assert info.value.reason == "license is bound to another device"

    # beta, holding no fleet key, gets exactly its own seat.
    result = install_bundle(bundle.read_bytes(), beta.dir)
    assert [i["binding"] for i in result["installed"]] == ["device"]
    assert [s["reason"] for s in result["skipped"]] == [
        f"bound to fleet key {_kid(fleet_key)}, which this device does not hold"
    ]


def test_a_revoked_fleet_license_is_refused_once_the_list_is_installed(
    tmp_path: Path,
    pki: Pki,
    models: dict[str, Model],
    builder_key: tuple[Path, Path],
    fleet_key: x25519.X25519PrivateKey,
    digits_test: Path,
) -> None:
    model = models["digits-mlp"]
    token = fleet_license(pki, model, fleet_key)
    lid = drm.LicenseClaims.from_dict(drm.parse_envelope(token, "edgemart-license/1")[0]).license_id
    device = _device(tmp_path / "board", pki)
    bundle = _bundle(
        tmp_path, model, [token], builder_key[0], [seat_activation(pki, token, device.device_id)]
    )
    device.add_fleet_key(private_key_to_pem(fleet_key))
    install_bundle(bundle.read_bytes(), device.dir)
    x = np.load(digits_test)["x"][:8]

    licensed = device.open_model(listing="digits-mlp")
    licensed.run({"x": x})  # runs before the revocation list arrives
    revocations = drm.sign_revocation_list(pki.issuer, version=1, issued_at=NOW, revoked=[lid])
    assert device.install_revocations(revocations)["updated"]

    with pytest.raises(drm.LicenseRefused) as info:  # the model already open stops at its next run
        licensed.run({"x": x})
    assert info.value.reason == f"license {lid} is revoked"
    licensed.close()
    with pytest.raises(drm.LicenseRefused) as info:
        device.open_model(listing="digits-mlp")
    assert info.value.reason == f"license {lid} is revoked"
    with pytest.raises(drm.LicenseRefused):  # and it cannot be installed again
        install_bundle(bundle.read_bytes(), device.dir)
    reasons = [json.loads(line)["reason"] for line in (device.dir / "audit.log").read_text().splitlines()]
    assert reasons[-3:] == [f"license {lid} is revoked"] * 3
