"""Structured logs: one JSON object per line on stderr, for the web processes and the job workers.

Every request gets one ``edgemart.store.access`` record (method, path, status, duration, user, request id)
and an ``X-Request-Id`` response header (the caller's own id is kept when it is a short token), so a log
line, an error report and a client's retry can be tied together. Application records carry the same
request id. Secrets never reach a record: only ids, counts, paths and messages the code writes."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import sys
from typing import Any

# Fields a record may carry besides the message (passed as ``extra={"fields": {...}}``).
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": os.getpid(),
        }
        request_id = getattr(record, "request_id", None) or _current_request_id()
        if request_id:
            out["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)[-4000:]
        return json.dumps(out, default=str, ensure_ascii=False)


def _current_request_id() -> str | None:
    try:
        from flask import g, has_request_context

        return g.get("request_id") if has_request_context() else None
    except Exception:  # noqa: BLE001 - logging must never fail because of the web framework
        return None


def configure(level: int = logging.INFO) -> logging.Handler:
    """Send every record (ours, gunicorn's, the libraries') as JSON lines to stderr; idempotent."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_edgemart_json", False):
            return h
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._edgemart_json = True  # type: ignore[attr-defined]
    root.handlers = [handler]
    root.setLevel(level)
    return handler


def gunicorn_logconfig() -> dict[str, Any]:
    """gunicorn's own loggers (master, workers) through the same JSON formatter."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "store.logs.JsonFormatter"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
        },
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {"gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True}},
    }


def request_id(header: str | None) -> str:
    """The caller's X-Request-Id when it is a plain short token, else a fresh one."""
    if header and _REQUEST_ID.match(header):
        return header
    return os.urandom(8).hex()
