"""Seats on the device (#20 item 4): a fleet-key production license runs only on a device holding a seat
activation signed under its pinned root for this device, this license and its fleet key, of a seat within the
license's signed count, and not revoked. Every failure is the one opaque refusal, the reason in DIR/audit.log;
the attacks: no activation, one copied from another device, one for another license, one re-signed by another
authority, tampered, a seat past the count, issued in the future, and a revoked seat (a fork) while another
device of the same fleet license keeps running."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

import drm
from drm.keys import private_key_to_pem
from edge_runtime import Device
from tests.edge_runtime.conftest import NOW, LicenseFactory


def _fleet_license(
    factory: LicenseFactory, build: Any, key: x25519.X25519PrivateKey, *, seats: int | None = 2
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
        days=None,
        max_runs=None,
        fleet_key_id=drm.key_id(raw),
        seats=seats,
    )


def _claims(token: bytes) -> drm.LicenseClaims:
    return drm.LicenseClaims.from_dict(drm.parse_envelope(token, "edgemart-license/1")[0])


def _activation(
    issuer: drm.Issuer, token: bytes, device_id: str, *, seat: int = 1, issued_at: int = NOW
) -> bytes:
    claims = _claims(token)
    assert claims.fleet_key_id is not None
    return drm.sign_activation(
        issuer, drm.Activation(device_id, claims.license_id, claims.fleet_key_id, seat, issued_at)
    )


def _board(
    tmp_path: Path, name: str, factory: LicenseFactory, key: x25519.X25519PrivateKey, build: Any, token: bytes
) -> Device:
    device = Device.init(tmp_path / name, trust=factory.root_pem, now=NOW)
    device.add_fleet_key(private_key_to_pem(key))
    device.install(build=build.container, license=token, now=NOW + 60)
    return device


@pytest.fixture
def fleet(tmp_path: Path, factory: LicenseFactory, digits_build: Any) -> dict[str, Any]:
    key = x25519.X25519PrivateKey.generate()
    token = _fleet_license(factory, digits_build, key)
    a = _board(tmp_path, "board-a", factory, key, digits_build, token)
    b = _board(tmp_path, "board-b", factory, key, digits_build, token)
    return {
        "key": key,
        "token": token,
        "a": a,
        "b": b,
        "lid": _claims(token).license_id,
        "build": digits_build,
    }


def _open(device: Device) -> Any:
    return device.open_model(listing="fleet-digits", now=NOW + 60)


def _runs(device: Device, digits_test: Path) -> np.ndarray:
    x = np.load(digits_test)["x"][:4]
    with _open(device) as model:
        return model.run({"x": x})["label"]


def test_a_fleet_license_without_an_activation_is_refused(fleet, factory, refused, digits_test) -> None:
    a = fleet["a"]
    refused(a, lambda: _open(a), f"no seat activation for this device on fleet license {fleet['lid']}")
    records = [json.loads(line)["rec"] for line in (a.dir / "usage.log").read_text().splitlines()]
    assert records[-1]["event"] == "refused" and records[-1]["license_id"] == fleet["lid"]
    # Once activated it runs; the activation file holds exactly the store's token.
    act = _activation(factory.issuer, fleet["token"], a.device_id)
    assert [x["seat"] for x in a.status(now=NOW + 60)["licenses"]] == [None]
    assert a.install_activation(act, now=NOW)["seat"] == 1
    assert [x["seat"] for x in a.status(now=NOW + 60)["licenses"]] == [1]
    assert (a.dir / "activations" / f"{fleet['lid']}.act").read_bytes() == act
    assert len(_runs(a, digits_test)) == 4
    # A device-bound license needs none (only fleet licenses are counted in seats).
    own = factory.license(a, factory_build(fleet), listing="own-digits")
    a.install(build=fleet["build"].container, license=own, now=NOW + 60)
    with a.open_model(listing="own-digits", now=NOW + 60) as model:
        assert len(model.run({"x": np.load(digits_test)["x"][:2]})["label"]) == 2


def factory_build(fleet: dict[str, Any]) -> Any:
    return fleet["build"]


def test_one_devices_activation_copied_into_another_device_is_refused(
    fleet, factory, refused, digits_test
) -> None:
    a, b = fleet["a"], fleet["b"]
    act_a = _activation(factory.issuer, fleet["token"], a.device_id)
    a.install_activation(act_a, now=NOW)
    assert len(_runs(a, digits_test)) == 4
    # B will not take A's token...
    with pytest.raises(drm.UsageError, match="activation is for another device"):
        b.install_activation(act_a, now=NOW)
    assert not (b.dir / "activations").exists()
    # ...and a copy of A's file into B's state is refused at run time.
    (b.dir / "activations").mkdir(mode=0o700)
    shutil.copy(a.dir / "activations" / f"{fleet['lid']}.act", b.dir / "activations" / f"{fleet['lid']}.act")
    refused(b, lambda: _open(b), "seat activation refused: activation is for another device")
    # A keeps running.
    assert len(_runs(a, digits_test)) == 4


def test_an_activation_of_another_license_is_refused(fleet, factory, refused, digits_build) -> None:
    a = fleet["a"]
    other = _fleet_license(factory, digits_build, fleet["key"])  # same fleet key, another license id
    other_act = _activation(factory.issuer, other, a.device_id)
    a.install_activation(other_act, now=NOW)  # valid for its own license: kept under that license's id
    assert not (a.dir / "activations" / f"{fleet['lid']}.act").exists()
    (a.dir / "activations" / f"{fleet['lid']}.act").write_bytes(other_act)  # renamed to pass for this one
    refused(a, lambda: _open(a), "seat activation refused: activation is for another license")
    # The same license id under another fleet key is another license too.
    claims = _claims(fleet["token"])
    wrong_fleet = drm.sign_activation(
        factory.issuer, drm.Activation(a.device_id, claims.license_id, "f" * 32, 1, NOW)
    )
    (a.dir / "activations" / f"{fleet['lid']}.act").write_bytes(wrong_fleet)
    refused(a, lambda: _open(a), "seat activation refused: activation is for another license")


@pytest.mark.parametrize("attack", ["other-authority", "tampered", "seat-past-count", "future", "garbage"])
def test_forged_or_out_of_range_activations_are_refused(fleet, factory, refused, attack: str) -> None:
    a = fleet["a"]
    token = fleet["token"]
    if attack == "other-authority":  # a well-formed token signed under a root the device does not trust
        stranger = LicenseFactory()
        act = _activation(stranger.issuer, token, a.device_id)
        reason = "seat activation refused: "
    elif attack == "tampered":  # seat 2 -> seat 1 in the signed payload
        act = _flip_payload_seat(_activation(factory.issuer, token, a.device_id, seat=2))
        reason = "seat activation refused: "
    elif attack == "seat-past-count":  # seat 3 of the license's signed 2 seats
        act = _activation(factory.issuer, token, a.device_id, seat=3)
        reason = "activation names seat 3 of a 2-seat license"
    elif attack == "future":
        act = _activation(factory.issuer, token, a.device_id, issued_at=NOW + 86400)
        reason = "activation issued in the future"
    else:
        act = b"{not an activation"
        reason = "seat activation refused: "
    (a.dir / "activations").mkdir(mode=0o700)
    (a.dir / "activations" / f"{fleet['lid']}.act").write_bytes(act)
    refused(a, lambda: _open(a), reason)
    if attack in ("other-authority", "tampered", "garbage"):
        with pytest.raises(drm.UsageError, match="seat activation refused by this device"):
            a.install_activation(act, now=NOW)


def _flip_payload_seat(token: bytes) -> bytes:
    """Change the signed payload's seat from 2 to 1 without re-signing (the payload is base64url JSON)."""
    from drm._canonical import b64d, b64e, dumps

    env = json.loads(token)
    payload = b64d(env["payload"], what="payload", max_len=1 << 16)
    assert b'"seat":2' in payload
    env["payload"] = b64e(payload.replace(b'"seat":2', b'"seat":1'))
    return dumps(env)


def test_a_revoked_seat_stops_that_device_and_no_other(fleet, factory, refused, digits_test) -> None:
    """A fork at the store revokes the device's activation (seat:<license>:<device> in the signed list): an
    open model stops at its next run, the license and the other device's seat stay good."""
    a, b = fleet["a"], fleet["b"]
    a.install_activation(_activation(factory.issuer, fleet["token"], a.device_id, seat=1), now=NOW)
    b.install_activation(_activation(factory.issuer, fleet["token"], b.device_id, seat=2), now=NOW)
    x = np.load(digits_test)["x"][:4]
    model = _open(a)
    model.run({"x": x})
    entry = drm.seat_revocation_entry(fleet["lid"], a.device_id)
    blob = factory.revocations(version=1, revoked=[entry])
    for device in (a, b):
        device.install_revocations(blob, now=NOW + 60)
    with pytest.raises(drm.LicenseRefused) as info:
        model.run({"x": x})
    assert info.value.reason == f"the seat activation of this device on {fleet['lid']} is revoked"
    model.close()
    refused(a, lambda: _open(a), f"the seat activation of this device on {fleet['lid']} is revoked")
    assert len(_runs(b, digits_test)) == 4


def test_device_activate_cli_installs_an_activation_file(fleet, factory, tmp_path, digits_test) -> None:
    a = fleet["a"]
    path = tmp_path / "seat.act"
    path.write_bytes(_activation(factory.issuer, fleet["token"], a.device_id))
    cmd = [sys.executable, "-m", "edgemart", "device", "activate", "--device-dir", str(a.dir)]
    r = subprocess.run(
        [*cmd, "--activation", str(path), "--json"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "device_id": a.device_id, "license_id": fleet["lid"], "fleet_key_id": _claims(fleet["token"]).fleet_key_id,
        "seat": 1,
    }  # fmt: skip
    assert len(_runs(a, digits_test)) == 4
    other = tmp_path / "other.act"
    other.write_bytes(_activation(factory.issuer, fleet["token"], fleet["b"].device_id))
    r = subprocess.run([*cmd, "--activation", str(other)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "activation is for another device" in r.stderr


def test_the_device_service_takes_an_activation_for_its_own_device_only(fleet, factory, digits_test) -> None:
    """Service mode: the buyer cannot write the device dir, so activations go through the service's
    `activate` operation (`device activate --service`), with the same checks."""
    import os

    from edge_runtime.service.server import DeviceService

    a, b = fleet["a"], fleet["b"]
    service = DeviceService(a.dir, os.getgid(), log=lambda line: None)
    with pytest.raises(drm.UsageError, match="activation is for another device"):
        service.op_activate({}, [_activation(factory.issuer, fleet["token"], b.device_id)])
    answer, _ = service.op_activate({}, [_activation(factory.issuer, fleet["token"], a.device_id)])
    assert (answer["result"]["device_id"], answer["result"]["seat"]) == (a.device_id, 1)
    assert len(_runs(a, digits_test)) == 4
    with pytest.raises(drm.UsageError, match="license_id"):
        service.op_activate({}, [])  # online needs the license id
