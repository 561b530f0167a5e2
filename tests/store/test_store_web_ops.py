"""Operator and account pages: the admin's dead-letter view with a retry button, and every user's API-token
page (create shown once, revoke at once); both behind login, role checks and CSRF."""

from __future__ import annotations

from pathlib import Path

from test_store_web import _csrf, _login

from store.app import worker_loop
from tests.store.conftest import make_store


def test_admin_sees_dead_jobs_and_retries_one(tmp_path, digits_base):
    st = make_store(tmp_path, WORKER="none", JOB_MAX_ATTEMPTS=1)
    try:
        job_id = st.upload("sally", digits_base, name="broken", targets="onnx-fp32").json["jobs"][0]
        from store.models import Listing

        with st.ctx.Session() as s:
            key = s.get(Listing, "broken").latest.model_blob
        path: Path = st.data_dir / "blobs" / key.split("-", 1)[1][:2] / key
        saved = path.read_bytes()
        path.unlink()
        path.mkdir()  # storage fault: an internal error, dead-lettered at once with one attempt allowed
        worker_loop(st.ctx).drain()

        admin, _ = _login(st, "ada", "pw-ada-12345")
        page = admin.get("/admin/jobs").get_data(as_text=True)
        assert job_id in page and "IsADirectoryError" in page and "1 / 1" in page
        seller, _ = _login(st, "sally", "pw-sally-12345")
        assert seller.get("/admin/jobs").status_code == 403

        path.rmdir()
        path.write_bytes(saved)
        token = _csrf(admin, "/admin/jobs")
        assert admin.post(f"/admin/jobs/{job_id}/retry").status_code == 403  # no CSRF token
        r = admin.post(f"/admin/jobs/{job_id}/retry", data={"csrf_token": token})
        assert r.status_code == 302
        worker_loop(st.ctx).drain()
        assert f"<code>{job_id}</code>" not in admin.get("/admin/jobs").get_data(as_text=True)
        assert job_id in admin.get("/admin/jobs?state=done").get_data(as_text=True)
        r = admin.post(f"/admin/jobs/{job_id}/retry", data={"csrf_token": token})
        assert r.status_code == 409  # done jobs are not retried
    finally:
        st.ctx.close()


def test_token_page_creates_once_and_revokes(store):
    client, _ = _login(store, "bob", "pw-bob-12345")
    page = client.get("/me/tokens").get_data(as_text=True)
    assert store.tokens["bob"] not in page and store.tokens["bob"][:10] in page
    token = _csrf(client, "/me/tokens")
    r = client.post("/me/tokens", data={"csrf_token": token})
    new = r.get_data(as_text=True).split('id="new-token"')[1].split("<code>")[1].split("</code>")[0]
    assert new.startswith("emt_")
    assert store.client.get("/api/v1/me", headers={"Authorization": f"Bearer {new}"}).status_code == 200
    assert new not in client.get("/me/tokens").get_data(as_text=True)  # shown once

    listed = store.client.get("/api/v1/tokens", headers={"Authorization": f"Bearer {new}"}).json["items"]
    newest = listed[-1]["id"]
    betty, _ = _login(store, "sally", "pw-sally-12345")
    r = betty.post(f"/me/tokens/{newest}/revoke", data={"csrf_token": _csrf(betty, "/me/tokens")})
    assert r.status_code == 404  # not hers
    r = client.post(f"/me/tokens/{newest}/revoke", data={"csrf_token": token})
    assert r.status_code == 302
    assert store.client.get("/api/v1/me", headers={"Authorization": f"Bearer {new}"}).status_code == 401
    assert client.get("/me/tokens", follow_redirects=False).status_code == 200
    anon = store.app.test_client()
    assert anon.get("/me/tokens").status_code == 302  # to the login page


def test_password_guessing_locks_login_with_backoff_across_processes(tmp_path):
    """Five wrong passwords are free; the sixth locks password login for 30 s, then 60 s, ...; while locked
    even the right password is refused (429, no oracle); the counter is in the database, so a second app on
    the same database (another web process) enforces the same lock; success resets it."""
    clock = {"t": 1_900_000_000}
    st = make_store(tmp_path, WORKER="none", CLOCK=lambda: clock["t"])
    other = make_store(tmp_path, WORKER="none", CLOCK=lambda: clock["t"])  # a second web process
    try:

        def attempt(app_store, password: str) -> int:
            client = app_store.app.test_client()
            token = _csrf(client)
            return client.post(
                "/login", data={"name": "sally", "password": password, "csrf_token": token}
            ).status_code

        assert [attempt(st, "wrong") for _ in range(5)] == [401] * 5
        assert attempt(other, "wrong") == 401  # the 6th failure, in the other process: now locked for 30 s
        assert attempt(st, "pw-sally-12345") == 429
        assert attempt(other, "pw-sally-12345") == 429
        clock["t"] += 31
        assert attempt(st, "wrong") == 401  # 7th failure: locked for 60 s
        clock["t"] += 31
        assert attempt(st, "pw-sally-12345") == 429
        clock["t"] += 30
        assert attempt(other, "pw-sally-12345") == 302  # signed in; the counter resets
        assert attempt(st, "wrong") == 401 and attempt(st, "pw-sally-12345") == 302
        # API tokens are unaffected by password lockout (they are not guessable)
        assert st.client.get("/api/v1/me", headers=st.auth("sally")).status_code == 200
    finally:
        st.ctx.close()
        other.ctx.close()
