"""Bundle anti-rollback (#20 item 5): a bundle's signed release (fleet, version) is recorded in the device's
sealed state; `bundle install` refuses an older release unless the builder signed a downgrade allowance, and
the release cannot be edited without breaking the builder's signature."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from _bundle_fixtures import NOW, Model, Pki, build_args, device_license, keys_cert_pem, lay_out_inputs

import drm
from edge_runtime import Device
from edgemart.cli import main


@pytest.fixture(autouse=True)
def anchors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "anchors"
    monkeypatch.setenv("EDGEMART_ANCHOR_DIR", str(path))
    return path


def _build(tmp: Path, name: str, model: Model, token: bytes, key: Path, *release: str) -> Path:
    dirs = lay_out_inputs(tmp / f"in-{name}", {model.listing: model}, [token], chains=False, cards=False)
    out = tmp / f"{name}.tar"
    assert main(build_args(dirs, out, key, *release)) == 0
    return out


def _install(bundle: Path, device: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgemart", "bundle", "install", str(bundle), "--device-dir", str(device),
           "--builder-key", str(pub), "--now", str(NOW), "--json"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_an_older_release_does_not_reinstall_without_a_signed_allowance(
    tmp_path: Path, pki: Pki, models: dict[str, Model], builder_key: tuple[Path, Path]
) -> None:
    model = models["digits-mlp"]
    device = Device.init(tmp_path / "board", trust=pki.root_pem, now=NOW)
    token = device_license(pki, model, keys_cert_pem(device.keys))
    v1 = _build(tmp_path, "v1", model, token, builder_key[0], "--release", "gate-cam:1")
    v2 = _build(tmp_path, "v2", model, token, builder_key[0], "--release", "gate-cam:2")
    back = _build(tmp_path, "back", model, token, builder_key[0], "--release", "gate-cam:1",
                  "--allow-downgrade-from", "2")  # fmt: skip
    other_fleet = _build(tmp_path, "other", model, token, builder_key[0], "--release", "door-cam:1")

    r = _install(v1, device.dir, builder_key[1])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["release"] == {"fleet": "gate-cam", "version": 1}
    assert _install(v2, device.dir, builder_key[1]).returncode == 0
    assert _install(v2, device.dir, builder_key[1]).returncode == 0  # the same release again is fine
    r = _install(v1, device.dir, builder_key[1])
    assert r.returncode == 1 and r.stdout == ""
    assert (
        r.stderr.count("\n") == 1
        and "release 1 of fleet 'gate-cam' is older than the installed release 2" in r.stderr
    )
    assert Device.open(device.dir).status()["state"]["bundle_releases"] == {"gate-cam": 2}
    # Another fleet's line is its own; a builder-signed downgrade to 1 is allowed over 2 (and only over <= 2).
    assert _install(other_fleet, device.dir, builder_key[1]).returncode == 0
    assert _install(back, device.dir, builder_key[1]).returncode == 0
    st = Device.open(device.dir).status()["state"]["bundle_releases"]
    assert st == {"door-cam": 1, "gate-cam": 1}
    v3 = _build(tmp_path, "v3", model, token, builder_key[0], "--release", "gate-cam:3")
    assert _install(v3, device.dir, builder_key[1]).returncode == 0
    r = _install(back, device.dir, builder_key[1])
    assert r.returncode == 1 and "downgrade allowance reaches only 2" in r.stderr
    # The release survives a reopen and is carried by the signed usage log (verify-log replays it).
    assert Device.open(device.dir).verify_log()["matches_state"]


def test_the_release_is_signed_with_the_manifest(
    tmp_path: Path, pki: Pki, models: dict[str, Model], builder_key: tuple[Path, Path]
) -> None:
    """Attack: raise the release of an old bundle by editing manifest.json: the signature no longer covers it."""
    model = models["digits-mlp"]
    device = Device.init(tmp_path / "board", trust=pki.root_pem, now=NOW)
    token = device_license(pki, model, keys_cert_pem(device.keys))
    assert _install(_build(tmp_path, "v5", model, token, builder_key[0], "--release", "cam:5"),
                    device.dir, builder_key[1]).returncode == 0  # fmt: skip
    old = _build(tmp_path, "v4", model, token, builder_key[0], "--release", "cam:4")
    with tarfile.open(old) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    forged = tmp_path / "forged.tar"
    with tarfile.open(forged, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == "manifest.json":
                data = data.replace(b'"version":4', b'"version":9')
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    r = _install(forged, device.dir, builder_key[1])
    assert r.returncode != 0 and "manifest" in r.stderr
    assert Device.open(device.dir).status()["state"]["bundle_releases"] == {"cam": 5}


@pytest.mark.parametrize(
    "args, message",
    [
        (("--release", "cam"), "--release must be FLEET:VERSION"),
        (("--release", "cam:0"), "between 1 and"),
        (("--release", "c a m:1"), "fleet must be"),
        (("--release", "cam:2", "--allow-downgrade-from", "2"), "above the bundle's own version"),
        (("--allow-downgrade-from", "2"), "needs --release"),
    ],
)
def test_bad_release_arguments_are_one_line_exit_2(
    tmp_path: Path, pki: Pki, models: dict[str, Model], builder_key: tuple[Path, Path], capsys, args, message
) -> None:
    model = models["digits-mlp"]
    keys = drm.DeviceKeys.generate(pq=False)
    dirs = lay_out_inputs(tmp_path / "in", {model.listing: model}, [device_license(pki, model, keys_cert_pem(keys))],
                          chains=False, cards=False)  # fmt: skip
    assert main(build_args(dirs, tmp_path / "b.tar", builder_key[0], *args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


_METERING = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "metering.json").read_text())


@pytest.mark.parametrize("case", _METERING["release_checks"], ids=lambda c: c["name"])
def test_release_rule_vectors(tmp_path: Path, case: dict) -> None:
    """docs/FORMAT.md §18.3 on the reference device: the installed release per fleet, then the new one."""
    from drm.bundle import parse_release

    device = Device.init(tmp_path / "board", trust=_METERING["root_cert_pem"].encode(), now=NOW)
    release = parse_release(case["release"])
    if case["installed"] is not None:
        device.record_bundle_release(
            parse_release({"fleet": release.fleet, "version": case["installed"]}), now=NOW
        )
    if case["expect"] == "accept":
        device.check_bundle_release(release, now=NOW)
    else:
        with pytest.raises(drm.Refusal):
            device.check_bundle_release(release, now=NOW)
