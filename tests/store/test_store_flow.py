"""The vertical slice on the real digits model: upload -> job -> sealed build -> enroll -> eval license ->
the device verifies the license with drm, unwraps the CEK and decrypts the build to the packaged bytes."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import onnxruntime as ort

import drm


def test_upload_package_enroll_license_decrypt(store, digits_base, digits_calibration, digits_test):
    r = store.upload(
        "sally",
        digits_base,
        name="Digits MLP",
        license="LicenseRef-Proprietary",
        targets="arm-cpu,onnx-fp32",
        calibration=digits_calibration,
    )
    assert r.status_code == 202, r.json
    listing_id = r.json["listing"]["id"]
    assert listing_id == "digits-mlp"
    assert r.json["listing"]["decision"]["outcome"] in ("allow", "allow_with_obligations")
    assert len(r.json["jobs"]) == 2
    store.wait()
    for job_id in r.json["jobs"]:
        job = store.client.get(f"/api/v1/jobs/{job_id}", headers=store.auth("sally")).json
        assert job["state"] == "done", job
        assert job["progress"] == 1.0

    listing = store.client.get(f"/api/v1/listings/{listing_id}").json  # public once listed
    assert listing["status"] == "listed"
    builds = {b["target"]: b for b in listing["builds"]}
    assert builds["arm-cpu"]["status"] == "done" and builds["arm-cpu"]["quality"]["passed"] is True
    assert builds["arm-cpu"]["build_hash"].startswith("sha256:")
    html = store.client.get(f"/api/v1/listings/{listing_id}/builds/arm-cpu/quality.html")
    assert html.status_code == 200 and b"<html" in html.data.lower()

    # The device makes its own keys; the store certifies them.
    keys = drm.DeviceKeys.generate()
    r = store.client.post(
        "/api/v1/devices/enroll",
        json={"csr": keys.csr().decode(), "name": "board-1"},
        headers=store.auth("bob"),
    )
    assert r.status_code == 201, r.json
    assert r.json["device_id"] == keys.device_id
    root = drm.cert_from_bytes(r.json["root"].encode())
    cert = drm.cert_from_bytes(r.json["certificate"].encode())
    now = int(time.time())
    drm.verify_cert(cert, root, now=now, purpose=drm.EKU_DEVICE)

    r = store.client.post(
        f"/api/v1/listings/{listing_id}/eval-license",
        json={"device_id": keys.device_id, "target": "arm-cpu"},
        headers=store.auth("bob"),
    )
    assert r.status_code == 201, r.json
    lic = r.json
    assert lic["build_hash"] == builds["arm-cpu"]["build_hash"]
    verified = drm.verify_license(
        lic["license"].encode(), root=root, now=now, device_id=keys.device_id, build_hash=lic["build_hash"]
    )
    claims = verified.claims
    assert claims.kind == "eval" and claims.listing == listing_id and claims.max_runs == 1000
    assert claims.not_after is not None and claims.not_after - now <= 14 * 86400 + 5

    sealed = store.client.get(lic["build_url"], headers=store.auth("bob"))
    assert sealed.status_code == 200
    cek = drm.unwrap_cek(claims, keys)
    header, plaintext = drm.open_sealed(sealed.data, key=cek, expected_build_hash=lic["build_hash"])
    assert "sha256:" + hashlib.sha256(plaintext).hexdigest() == lic["build_hash"]
    assert header.target == "arm-cpu"

    # The decrypted build is a working int8 model that agrees with the labels on the buyer's data.
    sess = ort.InferenceSession(bytes(plaintext), providers=["CPUExecutionProvider"])
    with np.load(digits_test) as data:
        x, y = data["x"].astype(np.float32), data["y"]
    outputs = sess.run(None, {sess.get_inputs()[0].name: x})
    labels = next(o for o in outputs if o.ndim == 1 or o.shape[-1] == 1).reshape(-1)
    assert (labels == y).mean() > 0.9

    # Re-requesting returns the same license: the run counter cannot be reset.
    again = store.client.post(
        f"/api/v1/listings/{listing_id}/eval-license",
        json={"device_id": keys.device_id, "target": "arm-cpu"},
        headers=store.auth("bob"),
    )
    assert again.status_code == 200
    assert again.json["license_id"] == lic["license_id"] and again.json["license"] == lic["license"]


def test_usage_sync_accepts_only_the_verified_continuation(store, digits_base, digits_calibration):
    r = store.upload("sally", digits_base, name="usage model", targets="onnx-fp32")
    assert r.status_code == 202, r.json
    store.wait()
    keys = drm.DeviceKeys.generate()
    store.client.post("/api/v1/devices/enroll", json={"csr": keys.csr().decode()}, headers=store.auth("bob"))
    lic = store.client.post(
        "/api/v1/listings/usage-model/eval-license",
        json={"device_id": keys.device_id, "target": "onnx-fp32"},
        headers=store.auth("bob"),
    ).json
    lines: list[bytes] = []
    for i in range(5):
        lines.append(
            drm.make_record(
                keys.sign,
                prev_line=lines[-1] if lines else None,
                seq=i,
                device_id=keys.device_id,
                t=1_800_000_000 + i,
                event="run",
                license_id=lic["license_id"],
                build_hash=lic["build_hash"],
                runs=i + 1,
            )
        )
    url = f"/api/v1/devices/{keys.device_id}/usage"

    def post(body: bytes):
        return store.client.post(
            url, data=body, headers={**store.auth("bob"), "Content-Type": "application/x-ndjson"}
        )

    r = post(b"\n".join(lines[:3]) + b"\n")
    body = r.json
    assert len(body.pop("budgets")) == 1  # the metered eval license's renewed offline budget
    assert body == {"ok": True, "accepted": 3, "first_bad": None, "reason": "", "held": 3}
    r = post(b"\n".join(lines) + b"\n")  # the whole log again: only the two new records count
    assert r.json["ok"] and r.json["accepted"] == 2
    r = post(b"\n".join(lines[3:]) + b"\n")  # a replayed tail adds nothing
    assert r.json["ok"] and r.json["accepted"] == 0
    tampered = lines[4].replace(b'"runs":5', b'"runs":1')
    extra = drm.make_record(
        keys.sign,
        prev_line=lines[4],
        seq=5,
        device_id=keys.device_id,
        t=1_800_000_005,
        event="run",
        license_id=lic["license_id"],
        build_hash=lic["build_hash"],
        runs=6,
    )
    r = post(tampered + b"\n" + extra + b"\n")
    assert not r.json["ok"] and r.json["first_bad"] == 0
    forged = drm.make_record(
        keys.sign,
        prev_line=lines[1],
        seq=2,
        device_id=keys.device_id,
        t=1_800_000_100,
        event="run",
        license_id=lic["license_id"],
        build_hash=lic["build_hash"],
        runs=1,
    )
    # A different record 2, signed by the device: its chain forked (test_store_metering.py has the rest).
    r = post(b"\n".join(lines[:2]) + b"\n" + forged + b"\n")
    assert r.status_code == 409 and "forked" in r.json["error"]["message"]
    usage = store.client.get("/api/v1/listings/usage-model/usage", headers=store.auth("sally")).json
    assert usage["totals"]["run"] == 5
    assert usage["devices"][0]["device_id"] == keys.device_id
    assert (
        store.client.get("/api/v1/listings/usage-model/usage", headers=store.auth("sam")).status_code == 403
    )
    # The buyer's licenses page counts the runs left after the synced 5, not the cap.
    from store.models import License
    from store.services import usage as usage_service

    with store.ctx.Session() as s:
        row = s.get(License, lic["license_id"])
        assert usage_service.runs_left(s, [row]) == {lic["license_id"]: row.max_runs - 5}
