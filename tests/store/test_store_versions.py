"""Listing versions (#19 D): a new version is gated and packaged like a first upload, licenses name their
version, buyers get the newest unless they pin one, older versions keep running; re-packaging; a blocked or
failed upload does not use up its name; the 0007 migration turns every existing listing into version 1."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, text

import drm
import licenses
from store.models import Build, License
from tests.store.conftest import enroll, serve_http

ROOT = Path(__file__).resolve().parents[2]


def _digits(corpus: Path, name: str) -> Path:
    return corpus / "models" / "digits" / f"digits_mlp_{name}.onnx"


def _new_version(store, who: str | None, listing: str, model: Path | bytes | None, **fields: Any) -> Any:
    data: dict[str, Any] = {k: str(v) for k, v in fields.items()}
    if model is not None:
        raw = model.read_bytes() if isinstance(model, Path) else model
        data["model"] = (io.BytesIO(raw), "model.onnx")
    return store.client.post(
        f"/api/v1/listings/{listing}/versions",
        data=data,
        headers=store.auth(who),
        content_type="multipart/form-data",
    )


def _repackage(store, who: str | None, listing: str, calibration: Path | None = None, **fields: Any) -> Any:
    data: dict[str, Any] = {k: str(v) for k, v in fields.items()}
    if calibration is not None:
        data["calibration"] = (io.BytesIO(calibration.read_bytes()), "cal.npz")
    return store.client.post(
        f"/api/v1/listings/{listing}/repackage",
        data=data,
        headers=store.auth(who),
        content_type="multipart/form-data",
    )


def _eval_license(store, who: str, listing: str, keys: drm.DeviceKeys, **extra: Any) -> Any:
    return store.client.post(
        f"/api/v1/listings/{listing}/eval-license",
        json={"device_id": keys.device_id, "target": "onnx-fp32", **extra},
        headers=store.auth(who),
    )


def test_a_new_version_is_gated_packaged_and_licensed_by_number(store, corpus):
    assert store.upload("sally", _digits(corpus, "base"), name="vers").status_code == 202
    store.wait()
    keys = enroll(store, "bob")
    first = _eval_license(store, "bob", "vers", keys)
    assert first.status_code == 201 and first.json["version"] == 1

    r = _new_version(store, "sally", "vers", _digits(corpus, "independent"))
    assert r.status_code == 202, r.json
    assert r.json["version"]["number"] == 2 and r.json["version"]["decision"]["outcome"] != "block"
    assert r.json["version"]["license"] == "MIT" and r.json["version"]["targets"] == ["onnx-fp32"]  # defaults
    store.wait()

    listing = store.client.get("/api/v1/listings/vers").json
    assert listing["status"] == "listed" and listing["version"] == 2
    assert [v["number"] for v in listing["versions"]] == [1, 2]
    assert all(v["status"] == "listed" for v in listing["versions"])
    v1_hash = listing["versions"][0]["builds"][0]["build_hash"]
    v2_hash = listing["versions"][1]["builds"][0]["build_hash"]
    assert v1_hash != v2_hash and listing["builds"][0]["build_hash"] == v2_hash

    # Buyers get the newest version unless they pin one; the license names it, in the row and the token.
    newest = _eval_license(store, "bob", "vers", keys)
    assert newest.status_code == 201 and newest.json["version"] == 2 and newest.json["build_hash"] == v2_hash
    pinned = _eval_license(store, "bob", "vers", keys, version=1)
    assert pinned.status_code == 200 and pinned.json["license_id"] == first.json["license_id"]
    root = drm.cert_from_bytes(store.ctx.root_cert_pem())
    for lic, number in ((newest.json, 2), (pinned.json, 1)):
        claims = drm.verify_license(
            lic["license"].encode(), root=root, now=store.ctx.now(), device_id=keys.device_id
        ).claims
        assert claims.version == number and claims.listing == "vers"

    for bad, status in ((3, 404), (0, 400), ("two", 400), (True, 400)):
        r = _eval_license(store, "bob", "vers", keys, version=bad)
        assert r.status_code == status, (bad, r.json)
        assert "version" in r.json["error"]["message"]


def test_a_blocked_new_version_keeps_the_listed_one_and_awaits_review(store, corpus):
    assert store.upload("sally", _digits(corpus, "independent"), name="steady").status_code == 202
    store.wait()
    licenses.LicenseIndex(store.data_dir / "license-index").add(
        _digits(corpus, "base").read_bytes(), name="digits-mlp-base", license="CC-BY-4.0"
    )
    before = store.counts()
    r = _new_version(store, "sally", "steady", _digits(corpus, "pruned"), license="LicenseRef-Proprietary")
    assert r.status_code == 403 and r.json["error"]["code"] == "blocked"
    assert r.json["version"]["number"] == 2 and r.json["decision"]["outcome"] == "block"
    after = store.counts()
    assert after["listing_versions"] == before["listing_versions"] + 1 and after["jobs"] == before["jobs"]

    public = store.client.get("/api/v1/listings/steady").json
    assert public["status"] == "listed" and public["version"] == 1
    assert [v["number"] for v in public["versions"]] == [1]  # a blocked version is the seller's business
    mine = store.client.get("/api/v1/listings/steady", headers=store.auth("sally")).json
    assert [(v["number"], v["status"]) for v in mine["versions"]] == [(1, "listed"), (2, "blocked")]
    queue = store.client.get("/api/v1/listings?status=blocked", headers=store.auth("ada")).json["items"]
    assert "steady" in {x["id"] for x in queue}

    r = store.client.post(
        "/api/v1/listings/steady/review",
        json={"action": "reject", "note": "derivative"},
        headers=store.auth("ada"),
    )
    assert r.status_code == 200, r.json
    mine = store.client.get("/api/v1/listings/steady", headers=store.auth("sally")).json
    assert mine["status"] == "listed" and mine["versions"][1]["status"] == "rejected"
    assert mine["versions"][1]["review_note"] == "derivative"


def test_a_blocked_upload_does_not_use_up_its_name(store, corpus):
    licenses.LicenseIndex(store.data_dir / "license-index").add(
        _digits(corpus, "base").read_bytes(), name="digits-mlp-base", license="CC-BY-4.0"
    )
    r = store.upload("sally", _digits(corpus, "pruned"), name="Second Try", license="LicenseRef-Proprietary")
    assert r.status_code == 403
    # Another seller may not take it (the blocked upload is kept for appeal under its id) ...
    r = store.upload("sam", _digits(corpus, "independent"), name="second try")
    assert r.status_code == 422 and r.json["error"]["problems"][0]["code"] == "name_taken"
    # ... but its seller's next upload under the name becomes the listing's next version.
    r = store.upload("sally", _digits(corpus, "independent"), name="Second Try")
    assert r.status_code == 202, r.json
    assert r.json["listing"]["id"] == "second-try" and r.json["version"]["number"] == 2
    store.wait()
    listing = store.client.get("/api/v1/listings/second-try").json
    assert listing["status"] == "listed" and listing["version"] == 2
    # Once something is listed the name is used up again, for its seller too.
    r = store.upload("sally", _digits(corpus, "finetuned"), name="second try")
    assert r.status_code == 422 and r.json["error"]["problems"][0]["code"] == "name_taken"


def test_a_failed_upload_does_not_use_up_its_name(store, corpus):
    assert store.upload("sally", _digits(corpus, "base"), name="original").status_code == 202
    store.wait()
    # The same model again: its only build is refused as a duplicate, so the upload failed.
    assert store.upload("sally", _digits(corpus, "base"), name="flop").status_code == 202
    store.wait()
    assert store.client.get("/api/v1/listings/flop", headers=store.auth("sally")).json["status"] == "failed"
    r = store.upload("sally", _digits(corpus, "independent"), name="flop")
    assert r.status_code == 202 and r.json["version"]["number"] == 2
    store.wait()
    assert store.client.get("/api/v1/listings/flop").json["status"] == "listed"


def test_new_version_refusals_leave_nothing_behind(store, corpus):
    assert store.upload("sally", _digits(corpus, "base"), name="kept", targets="onnx-fp32").status_code == 202
    store.wait()
    before = store.counts()
    r = _new_version(store, "sally", "kept", None, targets="no-such-target", license="(MIT")
    assert r.status_code == 422
    assert {p["field"] for p in r.json["error"]["problems"]} == {"model", "targets", "license"}
    r = _new_version(store, "sally", "kept", b"not a model")
    assert r.status_code == 422 and r.json["error"]["problems"][0]["code"] == "invalid_model"
    r = _new_version(store, "sally", "kept", _digits(corpus, "independent"), eval_days="0")
    assert r.status_code == 422 and r.json["error"]["problems"][0]["field"] == "eval_days"
    assert _new_version(store, "sally", "nope", _digits(corpus, "independent")).status_code == 404
    assert store.counts() == before
    # The same model again is a new version whose build is refused as a duplicate: the listing stays as it was.
    r = _new_version(store, "sally", "kept", _digits(corpus, "base"))
    assert r.status_code == 202
    store.wait()
    mine = store.client.get("/api/v1/listings/kept", headers=store.auth("sally")).json
    assert mine["status"] == "listed" and mine["version"] == 1 and mine["versions"][1]["status"] == "failed"
    assert "identical" in mine["versions"][1]["builds"][0]["error"]
    # An unpublished listing takes no new versions.
    assert (
        store.client.post("/api/v1/listings/kept/unpublish", headers=store.auth("sally")).status_code == 200
    )
    r = _new_version(store, "sally", "kept", _digits(corpus, "independent"))
    assert r.status_code == 409 and "unpublished" in r.json["error"]["message"]


def test_repackage_adds_targets_and_never_replaces_a_licensed_build(store, corpus, digits_calibration):
    assert (
        store.upload("sally", _digits(corpus, "base"), name="repack", targets="onnx-fp32").status_code == 202
    )
    store.wait()
    before = store.counts()
    for fields, status in (
        ({"targets": "bogus"}, 422),
        ({}, 422),
        ({"targets": "arm-cpu", "options": '{"arm-cpu": {"nope": "1"}}'}, 422),
        ({"targets": "arm-cpu", "version": "9"}, 404),
        ({"targets": "arm-cpu", "version": "x"}, 400),
    ):
        r = _repackage(store, "sally", "repack", **fields)
        assert r.status_code == status, (fields, r.json)
    assert _repackage(store, "sam", "repack", targets="arm-cpu").status_code == 403
    assert _repackage(store, "bob", "repack", targets="arm-cpu").status_code == 403
    assert _repackage(store, None, "repack", targets="arm-cpu").status_code == 401
    assert store.counts() == before

    r = _repackage(store, "sally", "repack", calibration=digits_calibration, targets="arm-cpu", version="1")
    assert r.status_code == 202, r.json
    assert r.json["version"]["targets"] == ["onnx-fp32", "arm-cpu"] and len(r.json["jobs"]) == 1
    store.wait()
    v1 = store.client.get("/api/v1/listings/repack").json["versions"][0]
    assert {b["target"]: b["status"] for b in v1["builds"]} == {"arm-cpu": "done", "onnx-fp32": "done"}

    # An unlicensed build is replaced (a new job, the old blobs gone) ...
    with store.ctx.Session() as s:
        old = s.scalar(select(Build).where(Build.listing_id == "repack", Build.target == "arm-cpu"))
        old_blobs = (old.blob_key, old.quality_html_blob)
    r = _repackage(
        store, "sally", "repack", targets="arm-cpu", options='{"arm-cpu": {"min_agreement": "0.9"}}'
    )
    assert r.status_code == 202 and r.json["version"]["target_options"] == {
        "arm-cpu": {"min_agreement": "0.9"}
    }
    store.wait()
    keys = set(store.ctx.blobs.list())
    assert not set(old_blobs) & keys
    # ... a licensed one never is.
    keys = enroll(store, "bob")
    assert _eval_license(store, "bob", "repack", keys).status_code == 201
    before = store.counts()
    r = _repackage(store, "sally", "repack", targets="onnx-fp32,arm-cpu")
    assert r.status_code == 409 and "onnx-fp32 build" in r.json["error"]["message"]
    assert "new version" in r.json["error"]["message"] and store.counts() == before


def test_repackaging_a_blocked_version_is_refused(store, corpus):
    licenses.LicenseIndex(store.data_dir / "license-index").add(
        _digits(corpus, "base").read_bytes(), name="digits-mlp-base", license="CC-BY-4.0"
    )
    r = store.upload("sally", _digits(corpus, "pruned"), name="held", license="LicenseRef-Proprietary")
    assert r.status_code == 403
    r = _repackage(store, "sally", "held", targets="onnx-fp32")
    assert r.status_code == 409 and "blocked" in r.json["error"]["message"]


def test_delete_removes_every_version_and_its_blobs(store, corpus):
    assert store.upload("sally", _digits(corpus, "base"), name="gone").status_code == 202
    store.wait()
    assert _new_version(store, "sally", "gone", _digits(corpus, "independent")).status_code == 202
    store.wait()
    r = store.client.delete("/api/v1/listings/gone", headers=store.auth("sally"))
    assert r.status_code == 200, r.json
    counts = store.counts()
    assert counts["listing_versions"] == counts["builds"] == counts["blobs"] == 0


def _cli(*args: str, token: str | None = None, expect: int = 0) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if token:
        env["EDGEMART_TOKEN"] = token
    done = subprocess.run(
        [sys.executable, "-m", "edgemart", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == expect, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout) if expect == 0 else {"stderr": done.stdout + done.stderr}


def test_device_keeps_running_v1_after_fetching_v2(store, corpus, digits_test, digits_calibration, tmp_path):
    """CLI end to end: fetch v1, the seller publishes v2, fetch v2, both evaluate under their own licenses."""
    sally, bob = store.tokens["sally"], store.tokens["bob"]
    with serve_http(store.app) as url:
        out = _cli("seller", "upload", str(_digits(corpus, "base")), "--name", "dev vers", "--license", "MIT",
                   "--targets", "onnx-fp32", "--store", url, "--wait", token=sally)  # fmt: skip
        assert out["listing"] == "dev-vers" and out["version"] == 1 and not out["failures"]
        d = str(tmp_path / "board")
        _cli("device", "enroll", "--store", url, "--token", bob, "--device-dir", d)
        got = _cli("device", "fetch", "dev-vers", "--target", "onnx-fp32", "--device-dir", d)
        assert got["version"] == 1

        out = _cli("seller", "upload", str(_digits(corpus, "independent")), "--listing", "dev-vers",
                   "--store", url, "--wait", token=sally)  # fmt: skip
        assert out["listing"] == "dev-vers" and out["version"] == 2 and not out["failures"]
        got2 = _cli("device", "fetch", "dev-vers", "--target", "onnx-fp32", "--device-dir", d)
        assert got2["version"] == 2 and got2["license_id"] != got["license_id"]

        runs = {}
        for pin in ([], ["--version", "1"], ["--version", "2"]):
            report = _cli("device", "eval", "dev-vers", "--device-dir", d, "--data", str(digits_test),
                          "--quiet", "--warmup", "0", *pin)  # fmt: skip
            runs[" ".join(pin) or "default"] = report
        model = {k: r["model"] for k, r in runs.items()}
        assert model["default"]["license_id"] == model["--version 2"]["license_id"] == got2["license_id"]
        assert model["--version 1"]["license_id"] == got["license_id"]
        assert [model[k]["version"] for k in ("default", "--version 1", "--version 2")] == [2, 1, 2]
        assert all(r["classification"]["accuracy"] > 0.8 for r in runs.values())

        status = _cli("device", "status", "--device-dir", d)
        assert sorted(x["version"] for x in status["licenses"]) == [1, 2]
        _cli(
            "device",
            "eval",
            "dev-vers",
            "--version",
            "3",
            "--device-dir",
            d,
            "--data",
            str(digits_test),
            expect=2,
        )
        _cli(
            "device",
            "fetch",
            "dev-vers",
            "--target",
            "onnx-fp32",
            "--version",
            "7",
            "--device-dir",
            d,
            expect=2,
        )

        # The seller re-packages version 1 for another target from the CLI.
        out = _cli("seller", "repackage", "dev-vers", "--version", "1", "--targets", "fpga-xint8",
                   "--store", url, "--wait", expect=1, token=sally)  # fmt: skip
        assert "seller repackage dev-vers --targets fpga-xint8 --calibration" in out["stderr"]
        out = _cli("seller", "repackage", "dev-vers", "--version", "1", "--targets", "fpga-xint8",
                   "--calibration", str(digits_calibration), "--store", url, "--wait", token=sally)  # fmt: skip
        assert out["version"] == 1 and len(out["jobs"]) == 1
        _cli("seller", "upload", str(_digits(corpus, "finetuned")), "--store", url, token=sally, expect=2)


def test_migration_0007_makes_every_listing_version_1(database, tmp_path):
    """A database at 0006 with a listing, a build and a license: after the upgrade the listing is version 1,
    its build and license point at it, and nothing of the listing is lost."""
    from alembic import command
    from alembic.config import Config

    from store.db import MIGRATIONS

    url = database.get("DATABASE_URL") or f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)

    def upgrade(rev: str) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, rev)

    upgrade("0006")
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO users (id, name, role, created_at, failed_logins) VALUES (1, 's', 'seller', 0, 0)"
            )
        )
        c.execute(text(
            "INSERT INTO listings (id, name, seller_id, license, card, decision, status, visibility, targets,"
            " eval_days, eval_runs, eval_device_limit, price_per_seat, model_blob, model_sha256, model_format,"
            " model_size, created_at, target_options, reviewed_by, review_note, idempotency_key) VALUES"
            " ('old', 'Old', 1, 'MIT', 'card', '{\"outcome\": \"allow\"}', 'unpublished', 'public',"
            " '[\"onnx-fp32\"]', 14, 1000, 3, 0, 'blob1', 'sha256:aa', 'onnx', 10, 5, '{}', 1, 'ok', 'k1')"
        ))  # fmt: skip
        c.execute(text(
            "INSERT INTO builds (id, listing_id, target, status, progress, message, created_at, updated_at)"
            " VALUES (1, 'old', 'onnx-fp32', 'done', 1, 'done', 0, 0)"
        ))  # fmt: skip
        c.execute(text(
            "INSERT INTO licenses (license_id, listing_id, build_id, buyer_id, kind, seats, issued_at, token)"
            " VALUES ('lic_1', 'old', 1, 1, 'eval', 1, 0, :t)"
        ), {"t": b"token"})  # fmt: skip
    upgrade("head")
    with engine.connect() as c:
        (row,) = c.execute(text("SELECT * FROM listing_versions")).mappings().all()
        assert row["listing_id"] == "old" and row["number"] == 1 and row["status"] == "listed"
        assert row["license"] == "MIT" and row["card"] == "card" and row["model_blob"] == "blob1"
        assert row["reviewed_by"] == 1 and row["review_note"] == "ok" and row["idempotency_key"] == "k1"
        assert (
            json.loads(row["targets"]) == ["onnx-fp32"] if isinstance(row["targets"], str) else row["targets"]
        )
        assert c.execute(text("SELECT version_id FROM builds")).scalar() == row["id"]
        assert c.execute(text("SELECT version FROM licenses")).scalar() == 1
        assert c.execute(text("SELECT status FROM listings")).scalar() == "unpublished"
    engine.dispose()


def test_license_rows_name_their_version(store, corpus):
    assert store.upload("sally", _digits(corpus, "base"), name="rowver").status_code == 202
    store.wait()
    assert _new_version(store, "sally", "rowver", _digits(corpus, "independent")).status_code == 202
    store.wait()
    keys = enroll(store, "bob")
    assert _eval_license(store, "bob", "rowver", keys, version=1).status_code == 201
    assert _eval_license(store, "bob", "rowver", keys).status_code == 201
    with store.ctx.Session() as s:
        rows = s.scalars(select(License).where(License.listing_id == "rowver")).all()
        assert sorted((r.version, r.build.version.number) for r in rows) == [(1, 1), (2, 2)]
    listed = store.client.get("/api/v1/licenses", headers=store.auth("bob")).json["items"]
    assert sorted(x["version"] for x in listed if x["listing"] == "rowver") == [1, 2]
    # Production seats too: the newest version unless pinned.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    fleet = (
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    for pin, number in (({}, 2), ({"version": 1}, 1)):
        r = store.client.post(
            "/api/v1/listings/rowver/production-licenses",
            json={"target": "onnx-fp32", "fleet_key": fleet, "seats": 3, **pin},
            headers=store.auth("bill"),
        )
        assert r.status_code == 201 and r.json["licenses"][0]["version"] == number, r.json
    r = store.client.post(
        "/api/v1/listings/rowver/production-licenses",
        json={"target": "onnx-fp32", "fleet_key": fleet, "seats": 3, "version": 5},
        headers=store.auth("bill"),
    )
    assert r.status_code == 404 and "no listed version 5" in r.json["error"]["message"]


def test_openapi_names_the_version_endpoints(store):
    paths = store.client.get("/openapi.json").json["paths"]
    assert "post" in paths["/api/v1/listings/{listing_id}/versions"]
    assert "post" in paths["/api/v1/listings/{listing_id}/repackage"]


def test_web_forms_publish_and_repackage_versions(store, corpus, digits_calibration):
    """The listing page's forms (CSRF token, no inline script) call the same services as the API."""
    import re

    from tests.store.conftest import PASSWORDS

    assert store.upload("sally", _digits(corpus, "base"), name="webver").status_code == 202
    store.wait()
    client = store.app.test_client()

    def csrf(path: str) -> str:
        page = client.get(path).get_data(as_text=True)
        return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)

    r = client.post(
        "/login", data={"name": "sally", "password": PASSWORDS["sally"], "csrf_token": csrf("/login")}
    )
    assert r.status_code == 302
    page = client.get("/listings/webver").get_data(as_text=True)
    assert "Publish version 2" in page and "Re-package" in page and "<script>" not in page
    assert 'action="/listings/webver/versions"' in page and 'action="/listings/webver/repackage"' in page

    # No CSRF token: refused, nothing stored.
    before = store.counts()
    r = client.post(
        "/listings/webver/versions",
        data={"model": (io.BytesIO(_digits(corpus, "independent").read_bytes()), "m.onnx")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 403 and store.counts() == before
    # A problem re-renders the listing page with every problem listed.
    r = client.post(
        "/listings/webver/versions",
        data={"csrf_token": csrf("/listings/webver"), "targets": ["bogus"], "license": "MIT ANDD"},
        content_type="multipart/form-data",
    )
    text = r.get_data(as_text=True)
    assert r.status_code == 422 and "model file is required" in text and "unknown target" in text
    assert store.counts() == before

    r = client.post(
        "/listings/webver/versions",
        data={
            "csrf_token": csrf("/listings/webver"),
            "model": (io.BytesIO(_digits(corpus, "independent").read_bytes()), "m.onnx"),
            "targets": ["onnx-fp32"],
        },
        content_type="multipart/form-data",
    )
    assert r.status_code == 302 and "/listings/webver?jobs=job_" in r.headers["Location"]
    store.wait()
    r = client.post(
        "/listings/webver/repackage",
        data={
            "csrf_token": csrf("/listings/webver"),
            "version": "2",
            "targets": ["arm-cpu"],
            "calibration": (io.BytesIO(digits_calibration.read_bytes()), "c.npz"),
        },
        content_type="multipart/form-data",
    )
    assert r.status_code == 302, r.get_data(as_text=True)[:500]
    store.wait()
    page = client.get("/listings/webver").get_data(as_text=True)
    assert "Version 2 (current)" in page and "Version 1" in page
    assert "edgemart device fetch webver --target onnx-fp32 --version 1 --device-dir DIR" in page
    assert "edgemart device fetch webver --target arm-cpu --device-dir DIR" in page
    # A buyer's browser sees neither form, and posting to them is refused.
    client = store.app.test_client()
    r = client.post(
        "/login", data={"name": "bob", "password": PASSWORDS["bob"], "csrf_token": csrf("/login")}
    )
    assert r.status_code == 302
    assert "Publish version" not in client.get("/listings/webver").get_data(as_text=True)
    before = store.counts()
    for path in ("/listings/webver/versions", "/listings/webver/repackage"):
        r = client.post(path, data={"csrf_token": csrf("/listings/webver"), "targets": ["arm-cpu"]})
        assert r.status_code == 403, path
    assert store.counts() == before
