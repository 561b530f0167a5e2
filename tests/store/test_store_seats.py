"""Seats of a fleet license are signed and counted at the store (#20 item 4): the activation endpoint locks the
license row, hands out seat numbers 1..seats once each, is idempotent per device and refuses past `seats`."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

import drm

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
