"""Hostile users of the web store (issue #16): stolen session cookies outliving sign-out, password and role
changes or an operator's revoke-all; idle and absolute session timeouts; private files on disk and a serve
that refuses a readable key directory; security headers on every page; refusals and build failures that
name other tenants' objects; request floods against login, upload and license issuance (rate limits counted
in the database, so two app instances on one database share them)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from test_store_web import _csrf, _login

from edgemart.cli import main
from store.localservers.postgres import free_port
from store.models import ApiToken, User, WebSession
from store.services import accounts
from tests.store.conftest import Store, cli_create_user, make_store

ROOT = Path(__file__).resolve().parents[2]
COOKIE = "edgemart_session"
T0 = 1_899_999_970  # 10 s into a 60 s rate-limit window (Retry-After: 50)


@pytest.fixture
def stores(database: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """make(**config) -> a Store on this test's database (SQLite or PostgreSQL + S3); several calls give
    several app instances sharing that database, as gunicorn workers or hosts behind a load balancer do."""
    for key, value in database.items():  # the CLI in this process finds the same database
        monkeypatch.setenv(f"EDGEMART_{key}", value)
    made: list[Store] = []

    def make(**config: Any) -> Store:
        st = make_store(tmp_path / "data", WORKER="none", **database, **config)
        made.append(st)
        return st

    yield make
    for st in made:
        st.ctx.close()


def _steal(client: Any) -> str:
    """A copy of ``client``'s session cookie."""
    return str(client.get_cookie(COOKIE).value)


def _replay(st: Store, cookie: str) -> Any:
    """A browser sending exactly this cookie (an attacker replays the copy; no server answer changes it)."""
    thief = st.app.test_client()
    thief.set_cookie(COOKIE, cookie)
    return thief


def _sessions(st: Store, name: str) -> int:
    with st.ctx.Session() as s:
        uid = accounts.get_user(s, name).id
        return s.scalar(select(func.count()).select_from(WebSession).where(WebSession.user_id == uid)) or 0


def _tokens(st: Store, name: str) -> int:
    with st.ctx.Session() as s:
        uid = accounts.get_user(s, name).id
        return s.scalar(select(func.count()).select_from(ApiToken).where(ApiToken.user_id == uid)) or 0


def _assert_signed_out(st: Store, cookie: str, csrf: str, name: str) -> None:
    """The copied cookie: 401 on the API, the login page on the web, and no way to mint an API token."""
    r = _replay(st, cookie).get("/api/v1/me")
    assert r.status_code == 401, r.json
    r = _replay(st, cookie).get("/me/tokens")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    before = _tokens(st, name)
    r = _replay(st, cookie).post("/me/tokens", data={"csrf_token": csrf})  # the cookie's own CSRF token
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert _replay(st, cookie).post("/api/v1/tokens").status_code == 401
    assert _tokens(st, name) == before
    assert _sessions(st, name) == 0  # nothing left behind


# ------------------------------------------------------------------------------------------ 5. sessions


def test_a_copied_cookie_dies_when_its_owner_signs_out(store: Store) -> None:
    client, _ = _login(store, "sally", "pw-sally-12345")
    csrf = _csrf(client, "/me/tokens")
    stolen = _steal(client)
    assert _replay(store, stolen).get("/api/v1/me").json["name"] == "sally"  # works while the session lives
    other, _ = _login(store, "sally", "pw-sally-12345")  # a second browser of hers
    assert _sessions(store, "sally") == 2

    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 302
    assert _sessions(store, "sally") == 1  # only that browser's session ended
    assert other.get("/api/v1/me").status_code == 200
    other.post("/logout", data={"csrf_token": _csrf(other, "/me/tokens")})
    _assert_signed_out(store, stolen, csrf, "sally")


def test_revoke_all_from_the_cli_ends_web_sessions(stores: Any, capsys: pytest.CaptureFixture[str]) -> None:
    st = stores()
    client, _ = _login(st, "sally", "pw-sally-12345")
    csrf = _csrf(client, "/me/tokens")
    stolen = _steal(client)
    assert _replay(st, stolen).get("/api/v1/me").status_code == 200
    assert main(["store", "tokens", "sally", "--revoke-all", "--data-dir", str(st.data_dir)]) == 0
    assert "ended every web session" in capsys.readouterr().out
    _assert_signed_out(st, stolen, csrf, "sally")
    assert client.get("/api/v1/me").status_code == 401
    assert st.client.get("/api/v1/me", headers=st.auth("sally")).status_code == 401  # tokens too
    assert st.client.get("/api/v1/me", headers=st.auth("sam")).status_code == 200  # nobody else


@pytest.mark.parametrize("change", ["password", "role", "role-in-the-database"])
def test_password_and_role_changes_end_web_sessions(store: Store, change: str) -> None:
    client, _ = _login(store, "bob", "pw-bob-12345")
    csrf = _csrf(client, "/me/tokens")
    assert client.get("/api/v1/me").status_code == 200
    stolen = _steal(client)
    with store.ctx.Session() as s:
        bob = accounts.get_user(s, "bob")
        if change == "password":
            accounts.set_password(s, bob, "pw-bob-changed-1")
        elif change == "role":
            accounts.set_role(s, bob, "builder")
        else:  # an operator editing the row directly: the session still notices (role kept on it)
            bob.role = "builder"
        s.commit()
    _assert_signed_out(store, stolen, csrf, "bob")


def test_sessions_end_after_idle_and_absolute_timeouts(stores: Any) -> None:
    clock = {"t": T0}
    st = stores(CLOCK=lambda: clock["t"], SESSION_IDLE_SECONDS=600, SESSION_MAX_SECONDS=1800)
    client, _ = _login(st, "sally", "pw-sally-12345")
    csrf = _csrf(client, "/me/tokens")
    clock["t"] += 599
    assert client.get("/api/v1/me").status_code == 200  # used within the idle time: renewed
    clock["t"] += 599
    assert client.get("/api/v1/me").status_code == 200
    clock["t"] += 601
    _assert_signed_out(st, _steal(client), csrf, "sally")

    client, _ = _login(st, "sally", "pw-sally-12345")
    csrf = _csrf(client, "/me/tokens")
    for _ in range(3):  # busy all along, but the absolute limit still ends it
        clock["t"] += 590
        assert client.get("/api/v1/me").status_code == 200
    clock["t"] += 100
    _assert_signed_out(st, _steal(client), csrf, "sally")


def test_bad_session_settings_are_refused(tmp_path: Path) -> None:
    for bad in ({"SESSION_IDLE_SECONDS": 0}, {"RATE_LIMIT_LOGIN_PER_IP": -1}, {"PUBLIC_URL": "ftp://x"}):
        with pytest.raises(Exception, match="must") as info:
            make_store(tmp_path, **bad)
        assert type(info.value).__name__ == "UsageError"


# ------------------------------------------------------------------------------------------ 6. files


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _serve(data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(
        [sys.executable, "-m", "edgemart", "store", "serve", "--data-dir", str(data), "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=out, start_new_session=True,
    )  # fmt: skip


def test_store_files_are_private_after_create_user_serve_and_upload(
    tmp_path: Path, digits_base: Path
) -> None:
    import signal

    from store.client import StoreClient

    data = tmp_path / "store"
    token = cli_create_user(data, "sally", "seller")
    port = free_port()
    proc = _serve(data, port, tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    break
            except OSError:
                log = (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline and proc.poll() is None, log
                time.sleep(0.2)
        client = StoreClient(f"http://127.0.0.1:{port}", token)
        result = client.upload(digits_base, name="private files", license="MIT", targets=["onnx-fp32"])
        states = client.wait_jobs(result["jobs"])
        assert all(s["state"] == "done" for s in states.values()), states
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    files = [p for p in data.rglob("*") if p.is_file()]
    dirs = [data, *(p for p in data.rglob("*") if p.is_dir())]
    names = {p.name for p in files}
    assert {"store.db", "secret.key", "root.key", "issuer.key", "kek.key"} <= names
    assert sum(1 for p in files if "blobs" in p.parts) >= 3  # model, sealed build, quality report
    loose = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files if _mode(p) & 0o077}
    loose |= {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in dirs if _mode(p) & 0o077}
    assert loose == {}


@pytest.mark.parametrize("where", ["keys", "keys/root.key"])
def test_serve_refuses_a_key_directory_others_can_read(tmp_path: Path, where: str) -> None:
    data = tmp_path / "store"
    assert main(["store", "migrate", "--data-dir", str(data)]) == 0
    (data / where).chmod(0o750 if where == "keys" else 0o640)
    port = free_port()
    proc = _serve(data, port, tmp_path / "serve.log")
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = (tmp_path / "serve.log").read_text().splitlines()
    assert code == 2
    assert len(lines) == 1 and "accessible by group or others" in lines[0] and where in lines[0], lines
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


# ------------------------------------------------------------------------------------------ 7. headers

INLINE_CODE = re.compile(r"<script(?![^>]*\bsrc=)|\son[a-z]+\s*=|\sstyle\s*=|javascript:", re.I)


def _check_page_headers(resp: Any, what: str) -> None:
    h = resp.headers
    csp = h.get("Content-Security-Policy", "")
    assert h.get("X-Content-Type-Options") == "nosniff", what
    assert h.get("Referrer-Policy"), what
    if resp.mimetype == "text/html":
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";") if d.strip())
        assert directives.get("script-src") == "'self'", (what, csp)
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, (what, csp)
        assert directives.get("frame-ancestors") == "'none'", (what, csp)
        assert directives.get("object-src") == "'none'" and directives.get("base-uri") == "'none'", what
        assert h.get("X-Frame-Options") == "DENY", what
        assert not INLINE_CODE.search(resp.get_data(as_text=True)), what
    else:
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, (what, csp)


def test_every_html_route_sends_the_security_headers(shared_store: Store, digits_base: Path) -> None:
    st = shared_store
    r = st.upload("sally", digits_base, name="headers", targets="onnx-fp32")
    assert r.status_code == 202, r.json
    st.wait()
    params = {"listing_id": "headers", "license_id": "lic-none", "token_id": "1", "job_id": "job_none"}
    admin, _ = _login(st, "ada", "pw-ada-12345")
    anonymous = st.app.test_client()
    checked = set()
    for rule in st.app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.rule.startswith("/api/"):
            continue
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", params[arg])
        for client in (admin, anonymous):
            if "GET" in rule.methods:
                _check_page_headers(client.get(path), f"GET {path}")
            if "POST" in rule.methods:  # a form re-rendered with an error, a refusal or a redirect
                _check_page_headers(client.post(path, data={}), f"POST {path}")
        checked.add(rule.endpoint)
    assert {"web.index", "web.listing", "web.login", "web.sell", "web.my_tokens", "web.admin_jobs"} <= checked
    for what, resp in {
        "a 404 page": anonymous.get("/no/such/page"),
        "a failed login": anonymous.post(
            "/login", data={"name": "sally", "password": "wrong-pw-1", "csrf_token": _csrf(anonymous)}
        ),
        "the stylesheet": anonymous.get("/static/store.css"),
        "the poller": anonymous.get("/static/listing.js"),
        "JSON": anonymous.get("/api/v1/listings"),
    }.items():
        assert resp.status_code < 500, what
        _check_page_headers(resp, what)

    page = anonymous.get("/listings/headers")
    assert "frame-src 'self'" in page.headers["Content-Security-Policy"]
    report_url = re.search(r'<iframe[^>]* sandbox src="([^"]+)"', page.get_data(as_text=True)).group(1)
    report = anonymous.get(report_url)
    assert report.status_code == 200 and report.mimetype == "text/html"
    csp = report.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'self'" in csp and "script-src" not in csp
    assert report.headers["X-Frame-Options"] == "SAMEORIGIN"  # the one page our own listing page frames
    assert "Strict-Transport-Security" not in page.headers  # http deployment: no HSTS
    _, login = _login(st, "sally", "pw-sally-12345")
    assert "Secure" not in login.headers["Set-Cookie"]


def test_https_public_url_turns_on_hsts_and_secure_cookies(tmp_path: Path) -> None:
    st = make_store(tmp_path, WORKER="none", PUBLIC_URL="https://store.example.com")
    try:
        for path in ("/", "/login", "/api/v1/listings", "/static/store.css"):
            assert st.client.get(path).headers["Strict-Transport-Security"].startswith("max-age="), path
        _, login = _login(st, "sally", "pw-sally-12345")
        cookie = login.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie
    finally:
        st.ctx.close()


# ------------------------------------------------------------------------------------------ 8. tenants


def test_refusals_and_build_failures_name_only_the_callers_own_objects(
    store: Store, digits_base: Path, digits_calibration: Path
) -> None:
    """Sally sells a model privately; Sam uploads the same bytes: his identical build is refused without
    naming her listing. His failed build's reason is for him and admins; others read "build failed"."""
    r = store.upload("sally", digits_base, name="sally secret", targets="onnx-fp32", visibility="private")
    assert r.status_code == 202, r.json
    store.wait()
    r = store.upload(
        "sam", digits_base, name="sam copy", targets="onnx-fp32,arm-cpu", calibration=digits_calibration
    )
    assert r.status_code == 202, r.json
    sam_jobs = r.json["jobs"]
    r = store.upload("sally", digits_base, name="sally again", targets="onnx-fp32")
    store.wait()

    def fp32(listing: dict[str, Any]) -> dict[str, Any]:
        return next(b for b in listing["builds"] if b["target"] == "onnx-fp32")

    mine = fp32(store.client.get("/api/v1/listings/sally-again", headers=store.auth("sally")).json)
    assert mine["status"] == "failed" and "your listing sally-secret" in mine["error"]  # her own: named

    own = store.client.get("/api/v1/listings/sam-copy", headers=store.auth("sam")).json
    assert own["status"] == "listed"  # arm-cpu is sold; only the fp32 copy was refused
    assert fp32(own)["status"] == "failed" and "another seller" in fp32(own)["error"]
    jobs = [store.client.get(f"/api/v1/jobs/{j}", headers=store.auth("sam")).json for j in sam_jobs]
    admin = fp32(store.client.get("/api/v1/listings/sam-copy", headers=store.auth("ada")).json)
    assert admin["error"] == fp32(own)["error"]
    seen = json.dumps([own, jobs]) + store.client.get(
        "/listings/sam-copy", headers=store.auth("sam")
    ).get_data(as_text=True)
    assert "another seller" in seen and "sally-secret" not in seen and "sally secret" not in seen

    for who in (None, "bob", "sally"):  # anonymous, a buyer, the other seller
        got = store.client.get("/api/v1/listings/sam-copy", headers=store.auth(who)).json
        build = fp32(got)
        assert (build["error"], build["message"], build["quality"]) == ("build failed", "build failed", None)
        page = store.client.get("/listings/sam-copy", headers=store.auth(who)).get_data(as_text=True)
        assert "build failed" in page and "identical" not in page and "another seller" not in page, who
        for job in sam_jobs:
            assert store.client.get(f"/api/v1/jobs/{job}", headers=store.auth(who)).status_code in (401, 404)
    # A build the quality check rejected keeps its report and figures: for its seller and admins only.
    from store.models import Build

    with store.ctx.Session() as s:
        arm = s.scalar(select(Build).where(Build.listing_id == "sam-copy", Build.target == "arm-cpu"))
        arm.status, arm.error = "rejected", "quality check failed: agreement 0.41 below 0.90"
        s.commit()
    report = "/api/v1/listings/sam-copy/builds/arm-cpu/quality.html"
    for who, status in ((None, 404), ("bob", 404), ("sally", 404), ("sam", 200), ("ada", 200)):
        assert store.client.get(report, headers=store.auth(who)).status_code == status, who
        got = store.client.get("/api/v1/listings/sam-copy", headers=store.auth(who)).json
        arm_seen = next(b for b in got["builds"] if b["target"] == "arm-cpu")
        assert ("0.41" in json.dumps(arm_seen)) == (status == 200), who
        page = store.client.get("/listings/sam-copy", headers=store.auth(who)).get_data(as_text=True)
        assert ("0.41" in page) == (status == 200) and ("quality.html" in page) == (status == 200), who
    # Sally's private listing stays invisible to Sam in every way.
    assert store.client.get("/api/v1/listings/sally-secret", headers=store.auth("sam")).status_code == 404


# ------------------------------------------------------------------------------------------ 9. rate limits


def _from(ip: str) -> dict[str, Any]:
    return {"environ_base": {"REMOTE_ADDR": ip}}


def _login_attempt(st: Store, ip: str) -> Any:
    client = st.app.test_client()
    token = _csrf(client)
    return client.post(
        "/login", data={"name": "sam", "password": "wrong-pw-1", "csrf_token": token}, **_from(ip)
    )


def test_login_is_rate_limited_per_address_across_app_instances(stores: Any) -> None:
    clock = {"t": T0}
    cfg = {"CLOCK": lambda: clock["t"], "RATE_LIMIT_LOGIN_PER_IP": 3}
    one, two = stores(**cfg), stores(**cfg)  # two web processes on one database
    # sam has no password: no account lockout gets in the way; only the address limit counts
    assert [_login_attempt(st, "10.0.0.1").status_code for st in (one, two, one)] == [401] * 3
    for st in (two, one):
        r = _login_attempt(st, "10.0.0.1")
        assert r.status_code == 429 and r.headers["Retry-After"] == "50", r.data
        assert b"too many sign-in attempts" in r.data
    assert _login_attempt(two, "10.0.0.2").status_code == 401  # another address is unaffected
    clock["t"] += 50
    assert _login_attempt(one, "10.0.0.1").status_code == 401  # the next window


@pytest.mark.parametrize("hops", [0, 1])
def test_forwarded_addresses_count_only_behind_a_trusted_proxy(tmp_path: Path, hops: int) -> None:
    """Behind TRUSTED_PROXY_HOPS proxies the address is the forwarded one; otherwise a forged
    X-Forwarded-For changes nothing (an attacker cannot rotate addresses with a header)."""
    st = make_store(tmp_path, WORKER="none", RATE_LIMIT_LOGIN_PER_IP=1, TRUSTED_PROXY_HOPS=hops)
    try:

        def attempt(forwarded: str) -> int:
            client = st.app.test_client()
            token = _csrf(client)
            data = {"name": "sam", "password": "wrong-pw-1", "csrf_token": token}
            return client.post("/login", data=data, headers={"X-Forwarded-For": forwarded}).status_code

        assert [attempt("203.0.113.1"), attempt("203.0.113.1")] == [401, 429]
        assert attempt("203.0.113.2") == (401 if hops else 429)
    finally:
        st.ctx.close()


def test_uploads_are_rate_limited_per_account_and_address(stores: Any) -> None:
    clock = {"t": T0}
    cfg = {"CLOCK": lambda: clock["t"], "RATE_LIMIT_UPLOAD_PER_ACCOUNT": 2, "RATE_LIMIT_UPLOAD_PER_IP": 6}
    one, two = stores(**cfg), stores(**cfg)
    before = one.counts()
    assert one.upload("sally", None).status_code == 422  # refused uploads count too
    assert two.upload("sally", None).status_code == 422
    for st in (one, two):  # the token each instance issued her: one account, one budget
        r = st.upload("sally", None)
        assert r.status_code == 429 and r.headers["Retry-After"] == "50"
        assert r.json["error"]["code"] == "too_many_requests" and "account" in r.json["error"]["message"]
    assert one.upload("sam", None).status_code == 422  # another account
    assert two.upload("sam", None).status_code == 422  # the address has seen 6 uploads now
    r = one.upload("ada", None)  # a third account, same address: the address limit
    assert r.status_code == 429 and "address" in r.json["error"]["message"]
    elsewhere = one.app.test_client()
    elsewhere.environ_base["REMOTE_ADDR"] = "10.0.0.9"
    assert one.upload("ada", None, client=elsewhere).status_code == 422
    assert one.counts() == before  # nothing stored by any of them


def test_license_requests_are_rate_limited_across_app_instances(stores: Any) -> None:
    clock = {"t": T0}
    one = stores(CLOCK=lambda: clock["t"], RATE_LIMIT_LICENSE_PER_ACCOUNT=2)
    two = stores(CLOCK=lambda: clock["t"], RATE_LIMIT_LICENSE_PER_ACCOUNT=2)
    evals = "/api/v1/listings/none/eval-license"
    seats = "/api/v1/listings/none/production-licenses"
    body = {"device_id": "0" * 32, "target": "onnx-fp32", "seats": 1}
    for path, who in ((evals, "bob"), (seats, "bill")):
        assert one.client.post(path, json=body, headers=one.auth(who)).status_code == 404
        assert two.client.post(path, json=body, headers=two.auth(who)).status_code == 404
        for st in (one, two):
            r = st.client.post(path, json=body, headers=st.auth(who))
            assert r.status_code == 429 and r.headers["Retry-After"] == "50", (path, r.json)
    assert two.client.post(evals, json=body, headers=two.auth("betty")).status_code == 404  # another account
    clock["t"] += 50
    assert one.client.post(evals, json=body, headers=one.auth("bob")).status_code == 404  # the next window
    clock["t"] += 120
    assert one.client.post(evals, json=body, headers=one.auth("betty")).status_code == 404
    from store.models import RateCounter

    with one.ctx.Session() as s:  # counters of past windows are dropped as new ones start
        starts = set(s.scalars(select(RateCounter.window_start)))
    assert starts and min(starts) >= clock["t"] - clock["t"] % 60 - 60


def test_default_limits_leave_a_normal_burst_alone(store: Store) -> None:
    """Default limits are generous: twenty sign-in attempts from one address in a minute still get answers."""
    for _ in range(20):
        assert _login_attempt(store, "127.0.0.1").status_code == 401
    with store.ctx.Session() as s:
        assert s.scalar(select(User.failed_logins).where(User.name == "sam")) == 0
