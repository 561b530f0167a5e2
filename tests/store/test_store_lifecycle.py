"""Compliance block and appeal, job failures and restarts, revocation, production licenses, device limits,
the OpenAPI document."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from sqlalchemy import select

import drm
import licenses
from store.models import Build, Job
from tests.store.conftest import enroll, make_store

_enroll = enroll


def test_blocked_upload_is_kept_for_appeal_never_packaged(store, corpus):
    digits = corpus / "models" / "digits"
    licenses.LicenseIndex(store.data_dir / "license-index").add(
        (digits / "digits_mlp_base.onnx").read_bytes(), name="digits-mlp-base", license="CC-BY-4.0"
    )
    before = store.counts()
    r = store.upload(
        "sally",
        digits / "digits_mlp_pruned.onnx",
        name="pruned copy",
        license="LicenseRef-Proprietary",
        targets="onnx-fp32",
    )
    assert r.status_code == 403
    assert r.json["error"]["code"] == "blocked"
    assert r.json["decision"]["outcome"] == "block"
    assert any(f["code"] == "undeclared_derivative" for f in r.json["error"]["problems"])
    after = store.counts()
    assert (
        after["listings"] == before["listings"] + 1
        and after["jobs"] == before["jobs"]
        and after["builds"] == 0
    )
    assert store.client.get("/api/v1/listings/pruned-copy").status_code == 404
    assert store.client.get("/api/v1/listings/pruned-copy", headers=store.auth("sam")).status_code == 404
    assert (
        store.client.get("/api/v1/listings/pruned-copy", headers=store.auth("sally")).json["status"]
        == "blocked"
    )
    queue = store.client.get("/api/v1/listings?status=blocked", headers=store.auth("ada")).json["items"]
    assert [x["id"] for x in queue] == ["pruned-copy"]
    # The admin approves on appeal: only then is it packaged.
    r = store.client.post(
        "/api/v1/listings/pruned-copy/review",
        json={"action": "approve", "note": "licensed"},
        headers=store.auth("ada"),
    )
    assert r.status_code == 200 and len(r.json["jobs"]) == 1
    store.wait()
    assert store.client.get("/api/v1/listings/pruned-copy").json["status"] == "listed"


def test_declared_derivative_is_allowed_with_obligations(store, corpus):
    digits = corpus / "models" / "digits"
    licenses.LicenseIndex(store.data_dir / "license-index").add(
        (digits / "digits_mlp_base.onnx").read_bytes(), name="digits-mlp-base", license="CC-BY-4.0"
    )
    card = "---\nlicense: cc-by-4.0\nbase_model: digits-mlp-base\n---\n# Fine-tuned digits\n"
    r = store.upload("sally", digits / "digits_mlp_finetuned.onnx", name="ft", license="CC-BY-4.0", card=card)
    assert r.status_code == 202, r.json
    assert r.json["listing"]["decision"]["outcome"] == "allow_with_obligations"
    store.wait()


def test_failed_job_is_recorded_with_its_message(store, digits_base):
    r = store.upload("sally", digits_base, name="no calibration", targets="arm-cpu")  # int8 needs samples
    assert r.status_code == 202
    store.wait()
    job = store.client.get(f"/api/v1/jobs/{r.json['jobs'][0]}", headers=store.auth("sally")).json
    assert job["state"] == "failed" and "calibration" in job["error"]
    listing = store.client.get("/api/v1/listings/no-calibration", headers=store.auth("sally")).json
    assert listing["status"] == "failed" and listing["builds"][0]["status"] == "failed"
    assert store.client.get("/api/v1/listings/no-calibration").status_code == 404


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_interrupted_jobs_are_requeued_at_start(tmp_path, digits_base):
    st = make_store(tmp_path, WORKER="none")
    r = st.upload("sally", digits_base, name="restart", targets="onnx-fp32")
    job_id = r.json["jobs"][0]
    with st.ctx.Session() as s:  # a worker of this host died mid-job: state running, pid gone
        job = s.get(Job, job_id)
        job.state, job.worker, job.heartbeat_at = (
            "running",
            f"{socket.gethostname()}:{_dead_pid()}",
            int(time.time()),
        )
        job.attempts = 1
        s.commit()
    st.ctx.close()
    st2 = make_store(tmp_path)
    try:
        st2.wait()
        body = st2.client.get(f"/api/v1/jobs/{job_id}", headers=st2.auth("sally")).json
        assert body["state"] == "done"
        with st2.ctx.Session() as s:
            assert s.get(Job, job_id).attempts == 2
    finally:
        st2.ctx.close()


def test_other_hosts_jobs_are_requeued_only_when_their_lease_expires(tmp_path, digits_base):
    st = make_store(tmp_path, WORKER="none")
    fresh = st.upload("sally", digits_base, name="fresh", targets="onnx-fp32").json["jobs"][0]
    stale = st.upload("sally", digits_base, name="stale", targets="onnx-fp32", eval_days=2).json["jobs"][0]
    now = int(time.time())
    with st.ctx.Session() as s:
        for job_id, beat in ((fresh, now), (stale, now - 10_000)):
            job = s.get(Job, job_id)
            job.state, job.worker, job.heartbeat_at, job.attempts = "running", "elsewhere:42", beat, 1
        s.commit()
    from store.services import packaging

    assert packaging.recover_jobs(st.ctx) == [stale]
    with st.ctx.Session() as s:
        assert s.get(Job, fresh).state == "running" and s.get(Job, stale).state == "queued"
    st.ctx.close()


@pytest.fixture
def listed(store, digits_base):
    r = store.upload("sally", digits_base, name="lic", targets="onnx-fp32", eval_days=3, eval_runs=50)
    assert r.status_code == 202
    store.wait()
    return "lic"


def test_revocation_list_is_signed_and_versioned(store, listed):
    keys = _enroll(store, "bob")
    lic = store.client.post(
        f"/api/v1/listings/{listed}/eval-license",
        json={"device_id": keys.device_id, "target": "onnx-fp32"},
        headers=store.auth("bob"),
    ).json
    assert lic["max_runs"] == 50
    root = drm.cert_from_bytes(store.client.get("/api/v1/root.crt").data)
    now = int(time.time())
    v1 = drm.verify_revocation_list(store.client.get("/api/v1/revocations").data, root=root, now=now)
    r = store.client.post(f"/api/v1/licenses/{lic['license_id']}/revoke", headers=store.auth("ada"))
    assert r.status_code == 200 and r.json["revocation_version"] == v1.version + 1
    v2 = drm.verify_revocation_list(
        store.client.get("/api/v1/revocations").data, root=root, now=now, current_version=v1.version
    )
    assert lic["license_id"] in v2.revoked
    with pytest.raises(drm.LicenseRefused):
        drm.verify_license(
            lic["license"].encode(), root=root, now=now, device_id=keys.device_id, revoked=v2.revoked
        )
    # A revoked license is not re-issued (that would reset its counters) and no longer opens the build.
    again = store.client.post(
        f"/api/v1/listings/{listed}/eval-license",
        json={"device_id": keys.device_id, "target": "onnx-fp32"},
        headers=store.auth("bob"),
    )
    assert again.status_code == 403
    assert store.client.get(lic["build_url"], headers=store.auth("bob")).status_code == 403


def test_eval_device_limit(store, listed):
    for _ in range(3):
        keys = _enroll(store, "bob")
        r = store.client.post(
            f"/api/v1/listings/{listed}/eval-license",
            json={"device_id": keys.device_id, "target": "onnx-fp32"},
            headers=store.auth("bob"),
        )
        assert r.status_code == 201
    keys = _enroll(store, "bob")
    r = store.client.post(
        f"/api/v1/listings/{listed}/eval-license",
        json={"device_id": keys.device_id, "target": "onnx-fp32"},
        headers=store.auth("bob"),
    )
    assert r.status_code == 403 and "limit" in r.json["error"]["message"]


def test_production_licenses_per_device_and_fleet(store, listed):
    root = drm.cert_from_bytes(store.client.get("/api/v1/root.crt").data)
    now = int(time.time())
    fleet_devices = [drm.DeviceKeys.generate() for _ in range(2)]
    certs = [drm.cert_to_pem(k.self_signed_cert(now=now)).decode() for k in fleet_devices]
    r = store.client.post(
        f"/api/v1/listings/{listed}/production-licenses",
        json={"target": "onnx-fp32", "device_certs": certs},
        headers=store.auth("bill"),
    )
    assert r.status_code == 201, r.json
    for keys, item in zip(fleet_devices, r.json["licenses"], strict=True):
        claims = drm.verify_license(
            item["license"].encode(), root=root, now=now, device_id=keys.device_id
        ).claims
        assert claims.kind == "production" and claims.not_after is None
        assert len(drm.unwrap_cek(claims, keys)) == 32
    fleet = x25519.X25519PrivateKey.generate()
    pem = fleet.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    r = store.client.post(
        f"/api/v1/listings/{listed}/production-licenses",
        json={"target": "onnx-fp32", "fleet_key": pem.decode(), "seats": 100},
        headers=store.auth("bill"),
    )
    assert r.status_code == 201
    item = r.json["licenses"][0]
    claims = drm.verify_license(
        item["license"].encode(), root=root, now=now, fleet_key_ids=frozenset({item["fleet_key_id"]})
    ).claims
    cek = drm.unwrap_cek(claims, fleet)
    sealed = store.client.get(item["build_url"], headers=store.auth("bill")).data
    drm.open_sealed(sealed, key=cek, expected_build_hash=claims.build_hash)
    r = store.client.post(
        f"/api/v1/listings/{listed}/production-licenses",
        json={"target": "onnx-fp32", "device_certs": ["not a cert"]},
        headers=store.auth("bill"),
    )
    assert r.status_code == 400 and "device_certs" in r.json["error"]["message"]


def test_cek_is_stored_only_wrapped(store, listed):
    with store.ctx.Session() as s:
        build = s.scalar(select(Build).where(Build.listing_id == listed))
        cek = store.ctx.vault.unwrap_cek(build.wrapped_cek, build.build_hash)
    url = store.ctx.engine.url
    if url.get_backend_name() == "sqlite":
        raw = b"".join(path.read_bytes() for path in store.data_dir.glob("store.db*"))
    else:  # the whole database as pg_dump writes it (what a backup would hold)
        from store.localservers.postgres import pg_bindir

        raw = subprocess.run(
            [
                str(pg_bindir() / "pg_dump"),
                "-h",
                url.host,
                "-p",
                str(url.port),
                "-U",
                url.username,
                url.database,
            ],
            env={**os.environ, "PGPASSWORD": url.password},
            check=True,
            capture_output=True,
        ).stdout
        assert b"COPY public.builds" in raw and build.build_hash.encode() in raw  # the dump is real
    assert cek not in raw and cek.hex().encode() not in raw
    import base64

    assert base64.b64encode(cek) not in raw


def test_openapi_lists_every_api_route(store):
    spec = store.client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    for rule in store.app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1"):
            path = rule.rule.replace("<", "{").replace(">", "}")
            assert path in spec["paths"], path
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                op = spec["paths"][path][method.lower()]
                assert op["summary"] and op["responses"]


def test_unpublish_stops_new_licenses_but_issued_ones_keep_their_build(store, digits_base):
    assert store.upload("sally", digits_base, name="retiring", targets="onnx-fp32").status_code == 202
    store.wait()
    keys = _enroll(store, "bob")
    body = {"device_id": keys.device_id, "target": "onnx-fp32"}
    lic = store.client.post(
        "/api/v1/listings/retiring/eval-license", json=body, headers=store.auth("bob")
    ).json
    assert (
        store.client.post("/api/v1/listings/retiring/unpublish", headers=store.auth("sam")).status_code == 403
    )
    r = store.client.post("/api/v1/listings/retiring/unpublish", headers=store.auth("sally"))
    assert r.status_code == 200 and r.json["status"] == "unpublished"
    assert (
        store.client.post("/api/v1/listings/retiring/unpublish", headers=store.auth("sally")).status_code
        == 409
    )
    assert "retiring" not in {x["id"] for x in store.client.get("/api/v1/listings").json["items"]}
    betty = _enroll(store, "betty")
    r = store.client.post(
        "/api/v1/listings/retiring/eval-license",
        json={"device_id": betty.device_id, "target": "onnx-fp32"},
        headers=store.auth("betty"),
    )
    assert r.status_code == 404  # off the store for new buyers
    hexdigest = lic["build_hash"].split(":")[1]
    assert store.client.get(f"/api/v1/builds/{hexdigest}", headers=store.auth("bob")).status_code == 200
    # A licensed listing cannot be deleted, only unpublished.
    r = store.client.delete("/api/v1/listings/retiring", headers=store.auth("sally"))
    assert r.status_code == 409 and "unpublish" in r.json["error"]["message"]


def test_delete_a_never_licensed_listing_removes_rows_and_blobs(store, digits_base):
    before = store.counts()
    assert store.upload("sally", digits_base, name="scrap", targets="onnx-fp32").status_code == 202
    store.wait()
    assert store.client.delete("/api/v1/listings/scrap", headers=store.auth("sam")).status_code == 403
    assert store.client.delete("/api/v1/listings/scrap", headers=store.auth("bob")).status_code == 403
    r = store.client.delete("/api/v1/listings/scrap", headers=store.auth("sally"))
    assert r.status_code == 200 and r.json == {"deleted": "scrap"}
    assert store.counts() == before
    assert store.client.get("/api/v1/listings/scrap", headers=store.auth("sally")).status_code == 404
    # The name is free again.
    assert store.upload("sally", digits_base, name="scrap", targets="onnx-fp32").status_code == 202
