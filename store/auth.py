"""Who is asking: bearer API tokens for the API, a signed session cookie naming a server-side web session for
the web UI, CSRF tokens, request rate limits.

Cookie sessions authenticate API reads only (the web UI polls jobs); API writes need a bearer token,
so a forged cross-site form can never act through the API. A cookie is only as good as its web_sessions row:
sign-out, timeouts, password and role changes and `store tokens --revoke-all` delete it on every process."""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import current_app, g, request, session
from sqlalchemy.orm import Session

from edgemart.core.errors import AuthError, ForbiddenError
from store.context import StoreContext
from store.models import User
from store.services import accounts, throttle

F = TypeVar("F", bound=Callable[..., Any])
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

log = logging.getLogger("edgemart.store.auth")


def ctx() -> StoreContext:
    return current_app.extensions["edgemart"]  # type: ignore[no-any-return]


def db() -> Session:
    if "db" not in g:
        g.db = ctx().Session()
    return g.db  # type: ignore[no-any-return]


def close_db(_exc: BaseException | None = None) -> None:
    s = g.pop("db", None)
    if s is not None:
        try:
            s.close()
        except Exception:  # noqa: BLE001 - the answer is already made; a dead connection is dropped by the pool
            log.warning("closing the database session failed", exc_info=True)


def current_user(*, required: bool = True, cookie_ok: bool | None = None) -> User | None:
    """The authenticated user (bearer token, else session cookie where allowed); AuthError if required."""
    if "user" in g:
        user = g.user
    else:
        user = None
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError("Authorization header must be 'Bearer <token>'")
            user, token_row = accounts.authenticate_token(db(), token.strip(), now=ctx().now())
            db().commit()
            g.token_role = token_row.role
        else:
            allow_cookie = request.method in SAFE_METHODS if cookie_ok is None else cookie_ok
            if allow_cookie and "sid" in session:
                user = _session_user()
            g.token_role = user.role if user is not None else None
        g.user = user
        g.user_id = user.id if user is not None else None  # plain int: the access log must not touch the ORM
    if user is None and required:
        raise AuthError(
            "authentication required (Authorization: Bearer <token> from `edgemart store create-user`)"
        )
    if user is not None and g.get("token_role") != user.role:
        # A token is scoped to the role it was issued for; a role change needs a new token.
        raise ForbiddenError("this token was issued for another role")
    return user  # type: ignore[no-any-return]


def _session_user() -> User | None:
    """The user of the cookie's web session; a cookie whose session ended is emptied."""
    cfg = ctx().config
    user, wrote = accounts.web_session_user(
        db(),
        session.get("sid"),
        now=ctx().now(),
        idle_seconds=float(cfg["SESSION_IDLE_SECONDS"]),
        max_seconds=float(cfg["SESSION_MAX_SECONDS"]),
    )
    if wrote:
        db().commit()  # web views authenticate before they write (web.before_request), so this is all it commits
    if user is None:
        session.clear()
    return user


def require_user() -> User:
    user = current_user(required=True)
    assert user is not None
    return user


def roles(*allowed: str) -> Callable[[F], F]:
    """Decorator: the view needs an authenticated user with one of ``allowed`` roles."""

    def deco(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            user = require_user()
            if user.role not in allowed:
                raise ForbiddenError(f"this needs a {' or '.join(allowed)} account; you are a {user.role}")
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco


# ------------------------------------------------------------------------------------------ CSRF


def csrf_token() -> str:
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def check_csrf() -> None:
    """Synchronizer token: the form's hidden field must equal the one in the signed session cookie."""
    expected = session.get("csrf")
    given = request.form.get("csrf_token", "") or request.headers.get("X-CSRF-Token", "")
    if not isinstance(expected, str) or not hmac.compare_digest(expected.encode(), given.encode()):
        raise ForbiddenError("the form expired or did not come from this site; reload the page and try again")


def login(user: User) -> None:
    """Start a web session for ``user`` (a fresh cookie: a session id planted before sign-in is dropped)."""
    cfg = ctx().config
    sid = accounts.start_web_session(
        db(),
        user,
        now=ctx().now(),
        idle_seconds=float(cfg["SESSION_IDLE_SECONDS"]),
        max_seconds=float(cfg["SESSION_MAX_SECONDS"]),
    )
    db().commit()
    session.clear()
    session["sid"] = sid
    session.permanent = True
    csrf_token()


def logout() -> None:
    """End this browser's web session on the server (a copy of the cookie is refused too) and clear it."""
    accounts.end_web_session(db(), session.get("sid"))
    db().commit()
    session.clear()


# ------------------------------------------------------------------------------------------ rate limits


def rate_limit(action: str, user: User | None = None) -> None:
    """Count this request against the ``action`` limits of ``user``'s account and the client address
    (TooManyAttempts past either). Call it before the view writes anything."""
    throttle.check(ctx(), action, ip=request.remote_addr, account=user.id if user is not None else None)
