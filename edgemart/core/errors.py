"""The one error tree of edgemart: every package raises subclasses of EdgemartError.

Each class carries the CLI exit code and the HTTP status it maps to; the CLI and the web
layer translate errors in one place each (edgemart.cli and store.api)."""

from __future__ import annotations


class EdgemartError(Exception):
    """Root of every error edgemart raises on purpose."""

    exit_code = 2
    http_status = 400
    code = "error"

    def __init__(self, message: str = "", *, code: str | None = None, details: object = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.__class__.__name__)
        if code is not None:
            self.code = code
        self.details = details

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def diagnostics(self) -> str:
        """One human line; never contains key material."""
        return self.message


def with_prefix(prefix: str, message: str) -> str:
    """``prefix: message``, unless the message already starts with that prefix (no "card: card: ...")."""
    return message if message.lower().startswith(prefix.lower() + ":") else f"{prefix}: {message}"


class UsageError(EdgemartError):
    """Bad usage or malformed input (exit 2, HTTP 400)."""

    exit_code = 2
    http_status = 400
    code = "bad_input"


class Unavailable(EdgemartError):
    """A service this needs is down for the moment (database restarting...): retry later (exit 75, HTTP 503)."""

    exit_code = 75  # EX_TEMPFAIL
    http_status = 503
    code = "unavailable"


class TooManyAttempts(EdgemartError):
    """Too many attempts or requests: wait ``retry_after`` seconds and try again (exit 1, HTTP 429)."""

    exit_code = 1
    http_status = 429
    code = "too_many_requests"

    def __init__(self, message: str = "", *, retry_after: int = 1, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = max(1, int(retry_after))


class NotFoundError(EdgemartError):
    """A named thing does not exist."""

    exit_code = 2
    http_status = 404
    code = "not_found"


class ConflictError(EdgemartError):
    """The request conflicts with the current state."""

    exit_code = 1
    http_status = 409
    code = "conflict"


class AuthError(EdgemartError):
    """Missing or invalid credentials."""

    exit_code = 2
    http_status = 401
    code = "unauthorized"


class ForbiddenError(EdgemartError):
    """Authenticated but not allowed."""

    exit_code = 2
    http_status = 403
    code = "forbidden"


class Refusal(EdgemartError):
    """An expected negative outcome (exit 1): a block decision, a refused license."""

    exit_code = 1
    http_status = 403
    code = "refused"


class IntegrityError(Refusal):
    """The sealed data failed authentication."""

    code = "integrity"

    def __init__(self, message: str = "integrity check failed", **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]


class LicenseRefused(Refusal):
    """The license does not allow this run."""

    code = "license_refused"

    def __init__(self, message: str = "license refused", *, reason: str = "", **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        # The precise reason is for the local audit log only; never printed to the caller.
        self.reason = reason or message
