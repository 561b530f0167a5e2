"""A minimal JSON/bytes client for the store's HTTP API (urllib only; the device never imports the store)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from edgemart.core.errors import (
    AuthError,
    ConflictError,
    EdgemartError,
    ForbiddenError,
    NotFoundError,
    UsageError,
)

MAX_RESPONSE_BYTES = 1024**3
TIMEOUT = 60.0


class StoreUnreachable(UsageError):
    """The store could not be reached or answered with something that is not its API."""

    code = "store_unreachable"


_BY_STATUS: dict[int, type[EdgemartError]] = {
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
}


class StoreClient:
    def __init__(self, base_url: str, token: str | None = None) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UsageError(f"store URL must be http(s)://host[:port], got {base_url!r}")
        self.base = base_url.rstrip("/") + "/"
        self.token = token

    def url(self, path: str) -> str:
        return urllib.parse.urljoin(self.base, path.lstrip("/")) if not path.startswith("http") else path

    def request(
        self, method: str, path: str, *, body: bytes | None = None, content_type: str | None = None
    ) -> bytes:
        req = urllib.request.Request(self.url(path), data=body, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if content_type:
            req.add_header("Content-Type", content_type)
        req.add_header("Accept", "application/json, application/octet-stream")
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:  # noqa: S310 - scheme checked above
                data = resp.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StoreUnreachable(f"cannot reach the store at {self.base}: {reason}") from None
        if len(data) > MAX_RESPONSE_BYTES:
            raise StoreUnreachable("store response too large")
        return data

    def get_json(self, path: str) -> Any:
        return _json(self.request("GET", path), path)

    def post_json(self, path: str, obj: Any) -> Any:
        body = json.dumps(obj).encode()
        return _json(self.request("POST", path, body=body, content_type="application/json"), path)

    def post_bytes(self, path: str, body: bytes, content_type: str) -> Any:
        return _json(self.request("POST", path, body=body, content_type=content_type), path)


def _json(data: bytes, path: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise StoreUnreachable(f"store answered {path} with something that is not JSON") from None


def _api_error(exc: urllib.error.HTTPError) -> EdgemartError:
    try:
        err = json.loads(exc.read(64 * 1024)).get("error", {})
        message = str(err.get("message") or exc.reason)
        problems = err.get("problems") or []
    except (ValueError, AttributeError):
        message, problems = str(exc.reason), []
    if problems:
        message += (
            " ("
            + "; ".join(str(p.get("message", p)) if isinstance(p, dict) else str(p) for p in problems)
            + ")"
        )
    cls = _BY_STATUS.get(exc.code, UsageError if exc.code < 500 else StoreUnreachable)
    # The store's own words are the message; the status code only helps when the store failed.
    return cls(f"store: {message}" + (f" (HTTP {exc.code})" if exc.code >= 500 else ""))
