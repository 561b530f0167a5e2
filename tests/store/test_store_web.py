"""The web UI through the Flask test client: login with CSRF, secure cookies, seller upload form,
listing page with decision and quality report, buyer/seller/admin pages; cookies never authorize API writes."""

from __future__ import annotations

import io
import re

import drm


def _csrf(client, path: str = "/login") -> str:
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def _login(store, name: str, password: str):
    client = store.app.test_client()
    token = _csrf(client)
    r = client.post("/login", data={"name": name, "password": password, "csrf_token": token})
    assert r.status_code == 302, r.data
    return client, r


def test_login_sets_secure_cookie_and_needs_csrf(store):
    client = store.app.test_client()
    r = client.post("/login", data={"name": "sally", "password": "pw-sally-12345"})
    assert r.status_code == 403  # no CSRF token
    token = _csrf(client)
    r = client.post("/login", data={"name": "sally", "password": "wrong-password", "csrf_token": token})
    assert r.status_code == 401 and b"wrong user name or password" in r.data
    _, r = _login(store, "sally", "pw-sally-12345")
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_seller_uploads_through_the_form_and_sees_progress(store, digits_base, digits_calibration):
    client, _ = _login(store, "sally", "pw-sally-12345")
    token = _csrf(client, "/sell")
    r = client.post(
        "/sell",
        data={
            "csrf_token": token,
            "name": "Web Digits",
            "license": "MIT",
            "targets": ["arm-cpu", "onnx-fp32"],
            "price_per_seat": "250",
            "model": (io.BytesIO(digits_base.read_bytes()), "m.onnx"),
            "calibration": (io.BytesIO(digits_calibration.read_bytes()), "c.npz"),
        },
        content_type="multipart/form-data",
    )
    assert r.status_code == 302
    assert "/listings/web-digits?jobs=job_" in r.headers["Location"]
    page = client.get(r.headers["Location"]).get_data(as_text=True)
    job_id = r.headers["Location"].split("jobs=")[1].split(",")[0]
    assert "static/listing.js" in page and job_id in page  # the polling script and the jobs it follows
    assert "<script>" not in page  # no inline script (CSP)
    assert "/api/v1/jobs/" in client.get("/static/listing.js").get_data(as_text=True)
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 200  # cookie works for reads
    store.wait()
    page = client.get("/listings/web-digits").get_data(as_text=True)
    assert "Compliance decision" in page and "quality.html" in page and "arm-cpu" in page
    assert "production seat: <span data-price-per-seat>2.50</span>" in page
    assert client.get("/me/usage").status_code == 200
    # The same form with a problem re-renders with every problem listed.
    token = _csrf(client, "/sell")
    r = client.post(
        "/sell",
        data={"csrf_token": token, "name": "", "license": "MIT ANDD", "targets": ["x"]},
        content_type="multipart/form-data",
    )
    assert r.status_code == 422
    text = r.get_data(as_text=True)
    assert "name is required" in text and "unknown target" in text and "model file is required" in text


def test_cookie_cannot_write_through_the_api(store):
    client, _ = _login(store, "bob", "pw-bob-12345")
    keys = drm.DeviceKeys.generate()
    r = client.post("/api/v1/devices/enroll", json={"csr": keys.csr().decode()})
    assert r.status_code == 401
    assert client.get("/api/v1/me").json["name"] == "bob"


def test_pages_by_role(store):
    bob, _ = _login(store, "bob", "pw-bob-12345")
    assert bob.get("/me/licenses").status_code == 200
    assert bob.get("/sell").status_code == 403
    assert bob.get("/admin/review").status_code == 403
    ada, _ = _login(store, "ada", "pw-ada-12345")
    assert ada.get("/admin/review").status_code == 200
    anon = store.app.test_client()
    assert anon.get("/").status_code == 200
    r = anon.get("/sell")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert anon.get("/listings/nope").status_code == 404


def test_sell_form_takes_models_larger_than_a_json_body(store):
    """The CSRF check parses the form, so the upload limit must apply before it, not the 256 KiB JSON one."""
    client, _ = _login(store, "sally", "pw-sally-12345")
    token = _csrf(client, "/sell")
    assert 'name="price_per_seat"' in client.get("/sell").get_data(as_text=True)
    big = b"\0" * (int(store.ctx.config["MAX_JSON_BYTES"]) + 200_000)
    before = store.counts()
    r = client.post(
        "/sell",
        data={
            "csrf_token": token,
            "name": "Big",
            "license": "MIT",
            "targets": ["onnx-fp32"],
            "price_per_seat": "-5",
            "model": (io.BytesIO(big), "m.onnx"),
        },
        content_type="multipart/form-data",
    )
    assert r.status_code == 422, r.status_code  # read and judged, not refused as too large
    assert "price_per_seat" in r.get_data(as_text=True)
    assert store.counts() == before


def test_listing_page_follows_the_jobs_an_admin_approval_started(tmp_path, corpus):
    import licenses
    from tests.store.conftest import make_store

    st = make_store(tmp_path, WORKER="none")  # jobs stay queued: the page must keep following them
    try:
        digits = corpus / "models" / "digits"
        licenses.LicenseIndex(st.data_dir / "license-index").add(
            (digits / "digits_mlp_base.onnx").read_bytes(), name="digits-mlp-base", license="CC-BY-4.0"
        )
        r = st.upload("sally", digits / "digits_mlp_pruned.onnx", name="appeal", license="MIT")
        assert r.status_code == 403  # blocked, kept for appeal
        r = st.client.post(
            "/api/v1/listings/appeal/review", json={"action": "approve"}, headers=st.auth("ada")
        )
        [job] = r.json["jobs"]
        sally, _ = _login(st, "sally", "pw-sally-12345")
        page = sally.get("/listings/appeal").get_data(as_text=True)  # no ?jobs= in the URL
        assert "static/listing.js" in page and f"{job}" in page
        bob, _ = _login(st, "bob", "pw-bob-12345")
        assert bob.get("/listings/appeal").status_code == 404  # pending: not public yet
    finally:
        st.ctx.close()
