"""``create_app(config)``: wires the store context (DB, blobs, key vault, job worker) into a Flask app
with the ``api`` and ``web`` blueprints and the one error mapping."""

from __future__ import annotations

import atexit
import datetime as _dt
import logging
import time
from typing import Any

from flask import Flask, g, jsonify, request

from store import errors
from store.auth import close_db
from store.context import StoreContext, is_https, open_context, secret_key
from store.jobs import NoWorker, ThreadJobQueue, WorkerLoop
from store.logs import request_id

log = logging.getLogger("edgemart.store")

# Pages load scripts and styles from /static only (no inline code), are never framed, and frame only our own
# quality reports (which carry their own sandboxing policy). Everything else is not a document at all.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
OTHER_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"
access = logging.getLogger("edgemart.store.access")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Config keys (all optional): DATA_DIR, DATABASE_URL, MAX_UPLOAD_BYTES, WORKER ("thread" | "none"),
    SECRET_KEY, SESSION_COOKIE_SECURE, CLOCK, EVAL_DEVICE_LIMIT and the rest of store.context.DEFAULTS."""
    ctx = open_context(config)
    cfg = ctx.config
    app = Flask(__name__, template_folder="templates", static_folder="static")
    app.config.update(
        SECRET_KEY=secret_key(cfg),
        MAX_CONTENT_LENGTH=int(cfg["MAX_JSON_BYTES"]),  # raised per view for uploads
        MAX_FORM_MEMORY_SIZE=int(cfg["MAX_CARD_BYTES"]) + 64 * 1024,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=bool(cfg["SESSION_COOKIE_SECURE"]) or is_https(cfg),
        SESSION_COOKIE_NAME="edgemart_session",
        # The cookie's own expiry; the server-side web session (store.auth) is what actually ends it.
        PERMANENT_SESSION_LIFETIME=_dt.timedelta(seconds=float(cfg["SESSION_MAX_SECONDS"])),
        PREFERRED_URL_SCHEME="https" if is_https(cfg) else "http",
        JSON_SORT_KEYS=False,
    )
    app.extensions["edgemart"] = ctx
    hops = int(cfg["TRUSTED_PROXY_HOPS"])
    if hops:  # the client address for rate limits and logs, as the load balancer saw it
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    app.teardown_appcontext(close_db)
    errors.register(app)

    from store.api import bp as api_bp
    from store.web import bp as web_bp

    app.register_blueprint(api_bp)
    app.register_blueprint(web_bp)

    @app.get("/healthz")
    def healthz() -> Any:
        from sqlalchemy import text

        with ctx.Session() as s:
            s.execute(text("SELECT 1"))
        return {"ok": True}

    @app.get("/openapi.json")
    def openapi() -> Any:
        from store.openapi import build_spec

        return jsonify(build_spec(app))

    @app.before_request
    def _start_request() -> None:
        g.request_id = request_id(request.headers.get("X-Request-Id"))
        g.t0 = time.perf_counter()

    @app.after_request
    def _access_log(resp: Any) -> Any:
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        # Only plain values here: after a database error the session's objects are expired, and loading
        # one again (with the database down) would turn an answered request into a 500.
        access.info(
            "%s %s %s",
            request.method,
            request.path,
            resp.status_code,
            extra={
                "fields": {
                    "method": request.method,
                    "path": request.path[:300],
                    "status": resp.status_code,
                    "ms": round((time.perf_counter() - g.get("t0", time.perf_counter())) * 1000, 2),
                    "user_id": g.get("user_id"),
                    "remote": request.remote_addr,
                    "bytes": resp.calculate_content_length(),
                }
            },
        )
        return resp

    hsts = is_https(cfg)

    @app.after_request
    def _security_headers(resp: Any) -> Any:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        if "Content-Security-Policy" in resp.headers:
            # A view with a policy of its own: the quality report, framed by our listing page only.
            resp.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
        else:
            html = resp.mimetype == "text/html"
            resp.headers["Content-Security-Policy"] = PAGE_CSP if html else OTHER_CSP
            resp.headers.setdefault("X-Frame-Options", "DENY")
        if hsts:
            resp.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return resp

    _start_worker(ctx)
    return app


def _start_worker(ctx: StoreContext) -> None:
    if ctx.config["WORKER"] != "thread":
        ctx.queue = NoWorker()
        return
    ctx.queue = ThreadJobQueue(worker_loop(ctx))
    ctx.queue.start()
    atexit.register(ctx.queue.stop, 5.0)


def worker_loop(ctx: StoreContext) -> WorkerLoop:
    """The job loop over the packaging service, for a thread here or an `edgemart store worker` process."""
    from store.services import packaging

    cfg = ctx.config
    return WorkerLoop(
        claim=lambda: packaging.claim_next(ctx),
        run=lambda lease: packaging.run_job(ctx, lease),
        pending=lambda: packaging.pending_count(ctx),
        recover=lambda: packaging.recover_jobs(ctx),
        poll_seconds=float(cfg["JOB_POLL_SECONDS"]),
        recover_seconds=max(1.0, float(cfg["JOB_LEASE_SECONDS"]) / 4),
    )
