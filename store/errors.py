"""The one place HTTP errors are shaped: EdgemartError subclasses and HTTP exceptions become
``{"error": {"code", "message", "problems"}}`` with the class's status; nothing internal leaks."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from edgemart.core.errors import EdgemartError, LicenseRefused, TooManyAttempts, Unavailable

log = logging.getLogger("edgemart.store")

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
}


def error_payload(exc: EdgemartError) -> dict[str, Any]:
    problems = exc.details if isinstance(exc.details, list) else []
    # A refused license tells the caller "license refused"; the precise reason stays in the server log.
    message = exc.message if not isinstance(exc, LicenseRefused) else "license refused"
    body: dict[str, Any] = {"error": {"code": exc.code, "message": message, "problems": problems}}
    extra = getattr(exc, "body", None)
    if isinstance(extra, dict):
        body.update(extra)
    return body


def error_response(exc: EdgemartError) -> Response:
    resp = jsonify(error_payload(exc))
    resp.status_code = exc.http_status
    if exc.http_status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="edgemart"'
    set_retry_after(exc, resp)
    return resp


def set_retry_after(exc: EdgemartError, resp: Response) -> None:
    """A 429 says when to come back."""
    if isinstance(exc, TooManyAttempts):
        resp.headers["Retry-After"] = str(exc.retry_after)


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in ("/openapi.json", "/healthz")


def register(app: Flask) -> None:
    @app.errorhandler(EdgemartError)
    def _edgemart(exc: EdgemartError) -> Any:
        if isinstance(exc, LicenseRefused):
            log.info("license refused: %s", exc.reason)
        if _wants_json():
            return error_response(exc)
        resp = Response(
            render_template(
                "error.html",
                status=exc.http_status,
                message=exc.message,
                problems=exc.details if isinstance(exc.details, list) else [],
            ),
            status=exc.http_status,
            mimetype="text/html",
        )
        set_retry_after(exc, resp)
        return resp

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Any:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            message = "request body too large"
        if _wants_json():
            resp = jsonify(
                {"error": {"code": HTTP_CODES.get(status, "http_error"), "message": message, "problems": []}}
            )
            resp.status_code = status
            valid = getattr(exc, "valid_methods", None)
            if status == 405 and valid:
                resp.headers["Allow"] = ", ".join(valid)
            return resp
        return render_template("error.html", status=status, message=message, problems=[]), status

    @app.errorhandler(OperationalError)
    def _database_down(exc: OperationalError) -> Any:
        # The database is restarting or unreachable: tell the client to retry instead of a bare 500.
        log.warning("database unavailable on %s %s: %s", request.method, request.path, str(exc.orig)[:200])
        exc_out = Unavailable("the database is unavailable for a moment; retry shortly")
        if _wants_json():
            resp = error_response(exc_out)
        else:  # no template: the page layout itself reads the database (the signed-in user)
            resp = Response(
                f"<!doctype html><title>503</title><h1>Service unavailable</h1><p>{exc_out.message}</p>",
                status=503,
                mimetype="text/html",
            )
        resp.headers["Retry-After"] = "2"
        return resp

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        if _wants_json():
            resp = jsonify(
                {"error": {"code": "internal", "message": "internal server error", "problems": []}}
            )
            resp.status_code = 500
            return resp
        return render_template("error.html", status=500, message="internal server error", problems=[]), 500
