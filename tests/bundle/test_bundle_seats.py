"""Seat activations in firmware bundles (#20 item 4, offline): `bundle build --activations` ships one
store-signed activation per fleet device as `activations/<license>.<device>.act`; `bundle install` places the
installing device's own, and the fleet license then runs on exactly those devices. A device without one in the
bundle is refused; activations that do not belong to the bundle's fleet licenses stop the build with nothing
written, and a re-signed bundle whose activation members lie is refused by the verifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _bundle_fixtures import NOW, Model, Pki, build_args, fleet_license, lay_out_inputs, seat_activation
from cryptography.hazmat.primitives.asymmetric import x25519

import drm
from drm.bundle import (
    FileEntry,
    activation_member_name,
    iter_archive,
    load_builder_private_key,
    make_manifest,
    sign_manifest,
)
from drm.bundle_reader import read_bundle, verify_bundle
from drm.keys import private_key_to_pem
from edge_runtime import Device
from edge_runtime.bundle import install_bundle
from edgemart.cli import main


@pytest.fixture
def fleet(tmp_path: Path, pki: Pki, models: dict[str, Model]) -> dict:
    key = x25519.X25519PrivateKey.generate()
    model = models["digits-mlp"]
    token = fleet_license(pki, model, key, seats=2)
    boards = {}
    for name in ("a", "b", "c"):
        device = Device.init(tmp_path / name, trust=pki.root_pem, now=NOW)
        device.add_fleet_key(private_key_to_pem(key))
        boards[name] = device
    lid = drm.LicenseClaims.from_dict(drm.parse_envelope(token, "edgemart-license/1")[0]).license_id
    return {"key": key, "model": model, "token": token, "lid": lid, **boards}


def _build(
    tmp_path: Path, fleet: dict, activations: list[bytes], builder: Path, *extra: str
) -> tuple[int, Path]:
    dirs = lay_out_inputs(
        tmp_path / "in", {"digits-mlp": fleet["model"]}, [fleet["token"]], chains=False, cards=False
    )
    folder = tmp_path / "in" / "activations"
    folder.mkdir(exist_ok=True)
    for i, token in enumerate(activations):
        (folder / f"{i}.act").write_bytes(token)
    out = tmp_path / "fleet.tar"
    return main(build_args(dirs, out, builder, "--activations", str(folder), *extra)), out


def _run(device: Device, digits_test: Path) -> int:
    with device.open_model(listing="digits-mlp", now=NOW + 60) as model:
        return len(model.run({"x": np.load(digits_test)["x"][:5]})["label"])


def test_a_bundle_with_seats_for_two_devices_runs_on_those_two_and_refuses_a_third(
    tmp_path: Path, pki: Pki, fleet: dict, builder_key: tuple[Path, Path], digits_test: Path
) -> None:
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    acts = [
        seat_activation(pki, fleet["token"], a.device_id, 1),
        seat_activation(pki, fleet["token"], b.device_id, 2),
    ]
    (tmp_path / "root.crt").write_bytes(pki.root_pem)
    code, out = _build(tmp_path, fleet, acts, builder_key[0], "--root", str(tmp_path / "root.crt"))
    assert code == 0
    report = verify_bundle(out.read_bytes(), now=NOW, root=pki.authority.cert).report()
    assert sorted((x["device_id"], x["seat"]) for x in report["activations"]) == sorted(
        [(a.device_id, 1), (b.device_id, 2)]
    )
    for device, seat in ((a, 1), (b, 2)):
        result = install_bundle(out.read_bytes(), device.dir, now=NOW)
        assert [(i["binding"], i["seat"]) for i in result["installed"]] == [("fleet", seat)]
        assert _run(device, digits_test) == 5
    # The third board holds the fleet key but no seat in the bundle: nothing installed...
    with pytest.raises(drm.Refusal, match="not in this bundle's license set"):
        install_bundle(out.read_bytes(), c.dir, now=NOW)
    assert c.installed() == {}
    # ...and sideloading the license and build anyway leaves it without an activation: refused.
    c.install(build=fleet["model"].sealed, license=fleet["token"], now=NOW + 60)
    with pytest.raises(drm.LicenseRefused) as info:
        _run(c, digits_test)
    assert info.value.reason == f"no seat activation for this device on fleet license {fleet['lid']}"


@pytest.mark.parametrize(
    "case", ["other-license", "past-count", "one-seat-twice", "other-authority", "garbage"]
)
def test_bundle_build_refuses_activations_that_do_not_belong_and_writes_nothing(
    tmp_path: Path,
    pki: Pki,
    other_pki: Pki,
    fleet: dict,
    builder_key: tuple[Path, Path],
    case: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = fleet["a"], fleet["b"]
    token = fleet["token"]
    if case == "other-license":
        stray = fleet_license(pki, fleet["model"], fleet["key"], seats=2)  # not in the bundle
        acts, needle = [seat_activation(pki, stray, a.device_id)], "is not in the bundle"
    elif case == "past-count":
        acts, needle = [seat_activation(pki, token, a.device_id, 3)], "seat 3 of a 2-seat license"
    elif case == "one-seat-twice":
        acts = [seat_activation(pki, token, a.device_id, 1), seat_activation(pki, token, b.device_id, 1)]
        needle = "held by two devices"
    elif case == "other-authority":
        acts, needle = [seat_activation(other_pki, token, a.device_id)], "does not verify against the root"
    else:
        acts, needle = [b"not a token"], "not a seat activation token"
    (tmp_path / "root.crt").write_bytes(pki.root_pem)
    code, out = _build(tmp_path, fleet, acts, builder_key[0], "--root", str(tmp_path / "root.crt"))
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob("fleet.tar*")) == []


def test_a_resigned_bundle_whose_activation_lies_about_its_device_is_refused(
    tmp_path: Path, pki: Pki, fleet: dict, builder_key: tuple[Path, Path]
) -> None:
    """Whoever holds a builder key can re-sign anything: the verifier still reads each activation member and
    refuses one whose token is for another device than its name (or signed under another root)."""
    a, c = fleet["a"], fleet["c"]
    code, out = _build(tmp_path, fleet, [seat_activation(pki, fleet["token"], a.device_id)], builder_key[0])
    assert code == 0
    members = {m.name: m.data for m in read_bundle(out.read_bytes())}
    verified = verify_bundle(out.read_bytes(), now=NOW, root=pki.authority.cert)
    # Rename A's activation for the outsider C and re-sign the manifest with the builder key.
    old, new = (
        activation_member_name(fleet["lid"], a.device_id),
        activation_member_name(fleet["lid"], c.device_id),
    )
    members[new] = members.pop(old)
    files = [
        FileEntry(n, len(d), drm.sha256_tag(d)) for n, d in members.items() if not n.startswith("manifest.")
    ]
    manifest = make_manifest(files, list(verified.manifest.builds), list(verified.manifest.licenses))
    body = manifest.to_bytes()
    key = load_builder_private_key(builder_key[0].read_bytes())
    members.update({"manifest.json": body, "manifest.sig": sign_manifest(body, key)})
    forged = b"".join(iter_archive((n, members[n]) for n in manifest.member_names()))
    with pytest.raises(drm.BundleInvalid, match="holds the activation of"):
        verify_bundle(forged, now=NOW)
    with pytest.raises(drm.BundleInvalid, match="holds the activation of"):
        install_bundle(forged, c.dir, now=NOW)
    assert c.installed() == {} and not (c.dir / "activations").exists()
