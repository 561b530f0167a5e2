"""Seats of a fleet license are signed and counted at the store (#20 item 4): the activation endpoint locks the
license row, hands out seat numbers 1..seats once each, is idempotent per device and refuses past `seats`; a
device runs the fleet license only with its activation (one seat runs on one device), and a fork at the store
revokes the forked device's activation, not the license."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

import drm
from drm.keys import private_key_to_pem
from edge_runtime import Device
from tests.store.conftest import serve_http

A, B = "a" * 32, "b" * 32


@pytest.fixture
def fleet_license(store, digits_base, digits_calibration) -> dict:
    r = store.upload("sally", digits_base, name="seated", targets="onnx-fp32", calibration=digits_calibration)
    assert r.status_code == 202, r.json
    store.wait()
    pem = (
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    r = store.client.post(
        "/api/v1/listings/seated/production-licenses",
        json={"target": "onnx-fp32", "fleet_key": pem.decode(), "seats": 1},
        headers=store.auth("bill"),
    )
    assert r.status_code == 201, r.json
    return r.json["licenses"][0]


def _activate(store, license_id: str, device_id: str, who: str = "bill"):
    return store.client.post(
        f"/api/v1/licenses/{license_id}/activations", json={"device_id": device_id}, headers=store.auth(who)
    )


def test_one_seat_goes_to_one_device_and_a_second_device_is_refused(store, fleet_license) -> None:
    lid = fleet_license["license_id"]
    first = _activate(store, lid, A)
    assert first.status_code == 201, first.json
    act = drm.parse_activation(first.json["activation"].encode())
    assert (act.device_id, act.license_id, act.seat) == (A, lid, 1)
    assert act.fleet_key_id == fleet_license["fleet_key_id"]
    again = _activate(store, lid, A)
    assert again.status_code == 200 and again.json["activation"] == first.json["activation"]  # idempotent
    second = _activate(store, lid, B)
    assert second.status_code == 409 and "seats" in second.json["error"]["message"], second.json


def test_only_the_holder_activates_and_only_fleet_licenses(store, fleet_license) -> None:
    lid = fleet_license["license_id"]
    assert _activate(store, lid, A, who="bob").status_code == 404  # not the holder: no oracle
    assert _activate(store, lid, "dev a/..", who="bill").status_code == 400
    assert _activate(store, "no-such-license", A).status_code == 404


# --------------------------------------------------------------------------- the device side, over HTTP


@pytest.fixture
def fleet_order(store, digits_base, digits_calibration):
    """buy(seats) -> (license dict with its token, the fleet's private key, the sealed build bytes)."""
    r = store.upload("sally", digits_base, name="seated", targets="onnx-fp32", calibration=digits_calibration)
    assert r.status_code == 202, r.json
    store.wait()

    def buy(seats: int) -> tuple[dict, x25519.X25519PrivateKey, bytes]:
        key = x25519.X25519PrivateKey.generate()
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        r = store.client.post(
            "/api/v1/listings/seated/production-licenses",
            json={"target": "onnx-fp32", "fleet_key": pem.decode(), "seats": seats},
            headers=store.auth("bill"),
        )
        assert r.status_code == 201, r.json
        (lic,) = r.json["licenses"]
        build = store.client.get(lic["build_url"], headers=store.auth("bill"))
        assert build.status_code == 200
        return lic, key, build.data

    return buy


def _board(tmp_path: Path, name: str, url: str, store, lic: dict, key, build: bytes) -> Device:
    """A fleet device as the factory sets it up: enrolled on the builder's account, the fleet key installed,
    the fleet license and its build sideloaded (no seat yet)."""
    device = Device.init(tmp_path / name)
    device.enroll(url, store.tokens["bill"])
    device.add_fleet_key(private_key_to_pem(key))
    device.install(build=build, license=lic["license"].encode(), listing="seated")
    return device


def _run(device: Device, x: np.ndarray, now: int | None = None) -> int:
    with device.open_model(listing="seated", now=now) as model:
        return len(model.run({"x": x})["label"])


def test_one_seat_runs_on_one_device(store, fleet_order, tmp_path, monkeypatch, digits_test) -> None:
    monkeypatch.setenv("EDGEMART_ANCHOR_DIR", str(tmp_path / "anchors"))
    lic, key, build = fleet_order(1)
    x = np.load(digits_test)["x"][:3]
    with serve_http(store.app) as url:
        a = _board(tmp_path, "a", url, store, lic, key, build)
        b = _board(tmp_path, "b", url, store, lic, key, build)
        for device in (a, b):  # installed, not activated: refused
            with pytest.raises(drm.LicenseRefused, match="no seat activated"):
                _run(device, x)
        assert a.activate(lic["license_id"])["seat"] == 1
        assert _run(a, x) == 3
        assert a.activate(lic["license_id"])["seat"] == 1  # idempotent: the same seat again
        with pytest.raises(drm.ConflictError, match="all 1 seats"):
            b.activate(lic["license_id"])
        r = subprocess.run(
            [sys.executable, "-m", "edgemart", "device", "activate", lic["license_id"], "--device-dir", str(b.dir)],
            capture_output=True, text=True, timeout=120, env={**os.environ},
        )  # fmt: skip
        assert r.returncode == 1 and "all 1 seats" in r.stderr, r.stderr
        assert not (b.dir / "activations").exists()
        with pytest.raises(drm.LicenseRefused) as info:
            _run(b, x)
        assert info.value.reason == f"no seat activation for this device on fleet license {lic['license_id']}"
        assert _run(a, x) == 3


def test_a_fork_revokes_that_devices_seat_only(
    store, fleet_order, tmp_path, monkeypatch, digits_test
) -> None:
    """A restored (cloned) board forks its usage log; the store revokes its seat activation, not the fleet
    license: the board refuses, the other board keeps running, and the seat stays used."""
    anchors = tmp_path / "anchors"
    monkeypatch.setenv("EDGEMART_ANCHOR_DIR", str(anchors))
    lic, key, build = fleet_order(2)
    lid = lic["license_id"]
    x = np.load(digits_test)["x"][:2]
    t0 = int(time.time())
    with serve_http(store.app) as url:
        a = _board(tmp_path, "a", url, store, lic, key, build)
        b = _board(tmp_path, "b", url, store, lic, key, build)
        assert (a.activate(lid)["seat"], b.activate(lid)["seat"]) == (1, 2)
        assert _run(a, x, t0) == 2 and _run(b, x, t0) == 2
        snap = tmp_path / "snap"
        shutil.copytree(a.dir, snap / "a")
        shutil.copytree(anchors, snap / "anchors")
        assert _run(a, x, t0 + 100) == 2
        assert a.sync(now=t0 + 100)["store"]["ok"]
        shutil.rmtree(a.dir)
        shutil.rmtree(anchors)
        shutil.copytree(snap / "a", a.dir)
        shutil.copytree(snap / "anchors", anchors)
        clone = Device.open(a.dir)
        assert _run(clone, x, t0 + 200) == 2  # another history from the same state
        with pytest.raises(drm.ConflictError, match="forked"):
            clone.sync(now=t0 + 200)
        with pytest.raises(drm.LicenseRefused) as info:
            _run(clone, x, t0 + 201)
        assert info.value.reason == f"the seat activation of this device on {lid} is revoked"

        rl = drm.verify_revocation_list(
            store.client.get("/api/v1/revocations").data,
            root=store.ctx.vault.authority().cert,
            now=store.ctx.now(),
        )
        assert drm.seat_revocation_entry(lid, a.device_id) in rl.revoked
        assert lid not in rl.revoked and drm.seat_revocation_entry(lid, b.device_id) not in rl.revoked
        held = store.client.get(f"/api/v1/licenses/{lid}", headers=store.auth("bill")).json
        assert held["revoked"] is False
        (fork,) = store.client.get("/api/v1/forks", headers=store.auth("bill")).json["items"]
        assert fork["revoked"] == [drm.seat_revocation_entry(lid, a.device_id)]

        # The other board checks in, takes the new list and keeps running.
        assert b.sync(now=t0 + 300)["store"]["ok"]
        assert _run(b, x, t0 + 300) == 2
        # The forked board cannot take its seat back, and the seat is not handed to anyone else.
        assert _activate(store, lid, a.device_id).status_code == 403
        c = _board(tmp_path, "c", url, store, lic, key, build)
        with pytest.raises(drm.ConflictError, match="all 2 seats"):
            c.activate(lid)


def test_bundle_build_draws_seats_from_the_pool_and_never_past_it(
    store, fleet_order, tmp_path, monkeypatch, capsys, digits_test
) -> None:
    """`bundle build --activate-devices` draws one activation per listed device from the store; more devices
    than seats, or seats already taken by other devices (409), stop the build with no bundle written."""
    from drm.bundle import generate_builder_key
    from edge_runtime.bundle import install_bundle
    from edgemart.cli import main

    monkeypatch.setenv("EDGEMART_ANCHOR_DIR", str(tmp_path / "anchors"))
    lic, key, build = fleet_order(2)
    lid = lic["license_id"]
    for sub in ("licenses", "builds"):
        (tmp_path / sub).mkdir()
    (tmp_path / "licenses" / "fleet.lic").write_text(lic["license"])
    (tmp_path / "builds" / "digits.emdl").write_bytes(build)
    (tmp_path / "builder.pem").write_bytes(generate_builder_key()[0])
    root = tmp_path / "root.crt"
    root.write_bytes(store.client.get("/api/v1/root.crt").data)
    boards = []
    for name in ("a", "b", "c"):
        device = Device.init(tmp_path / name, trust=root.read_bytes())
        device.add_fleet_key(private_key_to_pem(key))
        boards.append(device)
    ids = tmp_path / "devices.txt"

    def build_with(devices: list[Device], url: str, out: Path) -> int:
        ids.write_text("# the fleet\n" + "".join(f"{d.device_id}\n" for d in devices))
        return main([
            "bundle", "build", "--licenses", str(tmp_path / "licenses"), "--builds", str(tmp_path / "builds"),
            "--signing-key", str(tmp_path / "builder.pem"), "--root", str(root), "--out", str(out),
            "--activate-devices", str(ids), "--store", url, "--token", store.tokens["bill"],
        ])  # fmt: skip

    with serve_http(store.app) as url:
        # Three devices from two seats: refused before the store is asked; nothing drawn, nothing written.
        assert build_with(boards, url, tmp_path / "three.tar") == 2
        assert "lists 3 devices but fleet license" in capsys.readouterr().err
        assert not (tmp_path / "three.tar").exists()
        seats = store.client.get(f"/api/v1/licenses/{lid}", headers=store.auth("bill")).json
        assert _activate(store, lid, boards[2].device_id).status_code == 201  # c takes seat 1 online
        # a and b now find only one seat left: the store's 409 stops the build, no bundle.
        assert build_with(boards[:2], url, tmp_path / "two.tar") == 1
        assert "all 2 seats" in capsys.readouterr().err
        assert not (tmp_path / "two.tar").exists()
        assert seats["seats"] == 2

    # A fresh 2-seat license for a and b: a bundle carrying both activations, running on a and b only.
    lic, key2, build = fleet_order(2)
    (tmp_path / "licenses" / "fleet.lic").write_text(lic["license"])
    for device in boards:
        device.add_fleet_key(private_key_to_pem(key2))
    with serve_http(store.app) as url:
        assert build_with(boards[:2], url, tmp_path / "fleet.tar") == 0
    x = np.load(digits_test)["x"][:2]
    for seat, device in enumerate(boards[:2], 1):
        (entry,) = install_bundle((tmp_path / "fleet.tar").read_bytes(), device.dir)["installed"]
        assert entry["seat"] == seat
        with device.open_model(listing="seated") as model:
            assert len(model.run({"x": x})["label"]) == 2
    with pytest.raises(drm.Refusal, match="not in this bundle's license set"):
        install_bundle((tmp_path / "fleet.tar").read_bytes(), boards[2].dir)


def test_twenty_concurrent_activations_of_three_seats_give_out_exactly_three(store, fleet_order) -> None:
    from tests.store.test_store_concurrency import _together

    lic, _, _ = fleet_order(3)
    devices = [f"{i:032x}" for i in range(1, 21)]

    def ask(i: int) -> tuple[int, int | None]:
        r = store.app.test_client().post(
            f"/api/v1/licenses/{lic['license_id']}/activations",
            json={"device_id": devices[i]},
            headers=store.auth("bill"),
        )
        assert r.status_code < 500, r.data[:300]
        return r.status_code, (r.json or {}).get("seat")

    results = _together(len(devices), ask)
    assert sorted(code for code, _ in results) == [201] * 3 + [409] * 17, results
    assert sorted(seat for code, seat in results if code == 201) == [1, 2, 3]
