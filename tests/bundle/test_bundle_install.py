"""`edgemart bundle install`: verify against the device's pinned root, install what is bound to this device
(or its fleet key), refuse outsiders, and run the installed models with outputs identical to the plain models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from _bundle_fixtures import NOW, Model, Pki, build_args, device_license, fleet_license, lay_out_inputs
from cryptography.hazmat.primitives.asymmetric import x25519

import drm
from drm.keys import private_key_to_pem
from edge_runtime import Device
from edge_runtime.bundle import fleet_keys, install_bundle, verify_bundle
from edgemart.cli import main


def _litert_outputs(model: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - the device extra pins ai-edge-litert on x86_64/aarch64
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
    interp = Interpreter(model_content=model)
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], feeds[d["name"]])
    interp.invoke()
    return {d["name"]: interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()}


@pytest.fixture(scope="module")
def fleet_key() -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.generate()


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    pki: Pki,
    models: dict[str, Model],
    builder_key: tuple[Path, Path],
) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("install")
    devices = {}
    for name in ("alpha", "beta", "outsider"):
        Device.init(d / name, trust=pki.root_pem, now=NOW)
        devices[name] = d / name
    alpha_cert = (devices["alpha"] / "device.crt").read_bytes()
    beta_cert = (devices["beta"] / "device.crt").read_bytes()
    licenses = [device_license(pki, m, alpha_cert) for m in models.values()]
    licenses.append(device_license(pki, models["digits-mlp"], beta_cert))
    dirs = lay_out_inputs(d / "in", models, licenses)
    assert main(build_args(dirs, d / "fleet.tar.gz", builder_key[0])) == 0
    return {**devices, "bundle": d / "fleet.tar.gz", "dir": d}


def test_install_then_run_matches_plain_models(
    setup: dict[str, Path],
    models: dict[str, Model],
    digits_test: Path,
    corpus: Path,
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    capsys.readouterr()
    args = ["bundle", "install", str(setup["bundle"]), "--device-dir", str(setup["alpha"]), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(i["listing"] for i in report["installed"]) == ["digits-mlp", "face-detect"]
    assert len(report["skipped"]) == 1 and "bound to device" in report["skipped"][0]["reason"]

    device = Device.open(setup["alpha"])
    assert set(device.installed()) == {"digits-mlp", "face-detect"}

    x = np.load(digits_test)["x"][:32]
    plain = ort.InferenceSession(models["digits-mlp"].plain, providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, {"x": x}), strict=True))
    with device.open_model(listing="digits-mlp") as model:
        got = model.run({"x": x})
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])

    sample = np.load(corpus / "data/mediapipe/face_detection_front.npz")
    feeds = {"input": sample["input"][:1]}
    expected = _litert_outputs(models["face-detect"].plain, feeds)
    with device.open_model(listing="face-detect") as model:
        got = model.run(feeds)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_other_device_gets_only_its_license(setup: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    with setup["bundle"].open("rb") as fh:
        result = install_bundle(fh, setup["beta"])
    assert [i["listing"] for i in result["installed"]] == ["digits-mlp"]
    assert len(result["skipped"]) == 2
    assert set(Device.open(setup["beta"]).installed()) == {"digits-mlp"}


def test_device_outside_the_license_set_is_refused(setup: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    assert main(["bundle", "install", str(setup["bundle"]), "--device-dir", str(setup["outsider"])]) == 1
    assert "not in this bundle's license set" in capsys.readouterr().err
    assert Device.open(setup["outsider"]).installed() == {}


def test_device_with_another_root_refuses_the_bundle(
    setup: dict[str, Path],
    other_pki: Pki,
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    d = setup["dir"] / "foreign"
    Device.init(d, trust=other_pki.root_pem, now=NOW)
    capsys.readouterr()
    assert main(["bundle", "install", str(setup["bundle"]), "--device-dir", str(d)]) == 1
    assert "does not verify against the root" in capsys.readouterr().err


def test_tampered_bundle_is_not_installed(setup: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import gzip

    raw = bytearray(gzip.decompress(setup["bundle"].read_bytes()))
    raw[-4096] ^= 0x01  # inside NOTICE or the ML-BOM
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    d = tmp_path / "dev"
    Device.init(d, trust=(setup["alpha"] / "root.crt").read_bytes(), now=NOW)
    capsys.readouterr()
    assert main(["bundle", "install", str(bad), "--device-dir", str(d)]) == 1
    assert "sha256 does not match the manifest" in capsys.readouterr().err
    assert Device.open(d).installed() == {}


def test_fleet_key_license(
    pki: Pki,
    models: dict[str, Model],
    builder_key: tuple[Path, Path],
    fleet_key: x25519.X25519PrivateKey,
    tmp_path: Path,
) -> None:
    model = models["digits-mlp"]
    dirs = lay_out_inputs(
        tmp_path / "in", {"digits-mlp": model}, [fleet_license(pki, model, fleet_key)], cards=False
    )
    out = tmp_path / "fleet.tar"
    assert main(build_args(dirs, out, builder_key[0])) == 0
    verified = verify_bundle(out.read_bytes(), now=NOW + 60, root=pki.authority.cert)
    (claims,) = verified.claims.values()
    kid = drm.key_id(fleet_key.public_key().public_bytes_raw())
    assert claims.fleet_key_id == kid and claims.device_id is None
    assert verified.report()["licenses"][0]["binding"] == {"id": kid, "kind": "fleet"}

    # The fleet key opens the build: the bundle is usable by any device holding it.
    cek = drm.unwrap_cek(claims, fleet_key)
    _, plain = drm.open_sealed(verified.members[f"builds/{model.build_hash[7:]}.emdl"], key=cek)
    assert bytes(plain) == model.plain

    dev_dir = tmp_path / "fleet-device"
    device = Device.init(dev_dir, trust=pki.root_pem, now=NOW)
    with pytest.raises(drm.Refusal, match="not in this bundle's license set"):
        install_bundle(out.read_bytes(), dev_dir)
    (dev_dir / "fleet").mkdir(mode=0o700)
    key_file = dev_dir / "fleet" / f"{kid}.key"
    key_file.write_bytes(private_key_to_pem(fleet_key))
    key_file.chmod(0o600)
    assert list(fleet_keys(dev_dir)) == [kid] and device.fleet_key_ids() == {kid}
    result = install_bundle(out.read_bytes(), dev_dir)
    assert [i["binding"] for i in result["installed"]] == ["fleet"]
