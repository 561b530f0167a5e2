"""Users, API tokens (stored as SHA-256 hashes, revocable, scoped by role), argon2 passwords and web sessions
(one row per signed-in browser, ended by sign-out, idle and absolute timeouts, password and role changes)."""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from edgemart.core.errors import AuthError, ConflictError, NotFoundError, TooManyAttempts, UsageError
from store.models import ROLES, ApiToken, User, WebSession

TOKEN_PREFIX = "emt_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_hasher = PasswordHasher()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError("user name must be 1-64 characters: letters, digits, '.', '_' or '-'")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UsageError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def hash_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < 8:
        raise UsageError("password must be at least 8 characters")
    if len(password) > 1024:
        raise UsageError("password must be at most 1024 characters")
    return _hasher.hash(password)


def create_user(session: Session, name: str, role: str, *, now: int, password: str | None = None) -> User:
    check_name(name)
    check_role(role)
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise ConflictError(f"user {name!r} already exists")
    user = User(
        name=name, role=role, created_at=now, password_hash=hash_password(password) if password else None
    )
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFoundError(f"no user {name!r}")
    return user


def issue_token(session: Session, user: User, *, now: int) -> str:
    """A new API token for ``user`` (scoped to the user's role); only its hash is stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiToken(
            user_id=user.id, token_hash=token_hash(token), prefix=token[:10], role=user.role, created_at=now
        )
    )
    session.flush()
    return token


def revoke_token(session: Session, user: User, token_id: Any, *, now: int) -> ApiToken:
    """Revoke one of ``user``'s tokens (an admin may revoke anyone's: the answer to a stolen token).
    ``token_id`` may be the id as text, as it arrives in a URL."""
    if isinstance(token_id, str) and token_id.isdigit() and len(token_id) < 19:
        token_id = int(token_id)
    if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 < token_id < 2**62:
        raise NotFoundError(f"no token {str(token_id)[:20]}")
    row = session.get(ApiToken, token_id)
    if row is None or (row.user_id != user.id and user.role != "admin"):
        raise NotFoundError(f"no token {token_id}")
    row.revoked_at = row.revoked_at or now
    return row


def list_tokens(session: Session, user: User) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)))


def token_to_dict(row: ApiToken) -> dict[str, Any]:
    """What a token list shows: never the token or its hash, only the prefix that tells tokens apart."""
    return {
        "id": row.id,
        "prefix": row.prefix,
        "role": row.role,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "revoked_at": row.revoked_at,
    }


def authenticate_token(session: Session, token: str, *, now: int) -> tuple[User, ApiToken]:
    if not token or len(token) > 256:
        raise AuthError("invalid API token")
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(token)))
    if row is None or row.revoked_at is not None:
        raise AuthError("invalid or revoked API token")
    if row.last_used_at is None or now - row.last_used_at > 60:
        row.last_used_at = now
    return row.user, row


FREE_LOGIN_FAILURES = 5  # then each further failure locks password login for longer
LOCKOUT_BASE_SECONDS = 30
LOCKOUT_MAX_SECONDS = 900


def lockout_seconds(failures: int) -> int:
    """How long password login stays locked after ``failures`` consecutive failures (0 for the first few)."""
    if failures <= FREE_LOGIN_FAILURES:
        return 0
    return int(min(LOCKOUT_BASE_SECONDS * 2 ** (failures - FREE_LOGIN_FAILURES - 1), LOCKOUT_MAX_SECONDS))


def authenticate_password(session: Session, name: str, password: str, *, now: int) -> User:
    """The user, or AuthError; after FREE_LOGIN_FAILURES wrong passwords in a row the account's password login
    is locked with exponential backoff (TooManyAttempts, checked before the password so a locked account
    gives no oracle). The counter lives in the database, so every web process enforces it."""
    user = session.scalar(select(User).where(User.name == name)) if isinstance(name, str) else None
    if user is None or not user.password_hash:
        _hasher.hash("timing-equaliser")  # do the same work for unknown users
        raise AuthError("wrong user name or password")
    if user.locked_until is not None and user.locked_until > now:
        wait = user.locked_until - now
        raise TooManyAttempts(f"too many failed logins; try again in {wait} s", details=[], retry_after=wait)
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        # One atomic UPDATE: concurrent failures from several processes all count.
        session.execute(update(User).where(User.id == user.id).values(failed_logins=User.failed_logins + 1))
        failures = session.scalar(select(User.failed_logins).where(User.id == user.id)) or 0
        wait = lockout_seconds(failures)
        if wait:
            session.execute(update(User).where(User.id == user.id).values(locked_until=now + wait))
        session.commit()
        raise AuthError("wrong user name or password") from None
    if user.failed_logins or user.locked_until:
        user.failed_logins, user.locked_until = 0, None
        session.commit()
    return user


def set_password(session: Session, user: User, password: str) -> None:
    """A new password; every web session signed in with the old one ends."""
    user.password_hash = hash_password(password)
    end_web_sessions(session, user)


def set_role(session: Session, user: User, role: str) -> None:
    """A new role; the user's web sessions end (its API tokens keep their old scope and are refused)."""
    user.role = check_role(role)
    end_web_sessions(session, user)


def revoke_everything(session: Session, user: User, *, now: int) -> list[int]:
    """The answer to a compromised account: every API token revoked, every web session ended; the token ids."""
    revoked = [row.id for row in list_tokens(session, user) if row.revoked_at is None]
    for token_id in revoked:
        revoke_token(session, user, token_id, now=now)
    end_web_sessions(session, user)
    return revoked


# ------------------------------------------------------------------------------------------ web sessions

WEB_SESSION_TOUCH_SECONDS = 60  # last_seen_at is written at most this often (idle timeouts are that coarse)


def start_web_session(
    session: Session, user: User, *, now: int, idle_seconds: float, max_seconds: float
) -> str:
    """A new web session for ``user``: the id for the signed cookie (only its hash is stored). Sessions of
    anyone that have timed out are deleted on the way, so the table holds only live ones."""
    session.execute(delete(WebSession).where(_expired(now, idle_seconds, max_seconds)))
    sid = secrets.token_urlsafe(32)
    session.add(
        WebSession(id_hash=token_hash(sid), user_id=user.id, role=user.role, created_at=now, last_seen_at=now)
    )
    session.flush()
    return sid


def _expired(now: int, idle_seconds: float, max_seconds: float) -> Any:
    return or_(WebSession.last_seen_at < now - idle_seconds, WebSession.created_at < now - max_seconds)


def web_session_user(
    session: Session, sid: object, *, now: int, idle_seconds: float, max_seconds: float
) -> tuple[User | None, bool]:
    """The user of a live web session, or None (unknown, ended, timed out, or the role changed since sign-in:
    then the row is deleted). The flag says whether the row was written (the caller commits)."""
    if not isinstance(sid, str) or not 0 < len(sid) <= 128:
        return None, False
    row = session.get(WebSession, token_hash(sid))
    if row is None:
        return None, False
    user = session.get(User, row.user_id)
    if (
        user is None
        or user.role != row.role
        or now - row.last_seen_at > idle_seconds
        or now - row.created_at > max_seconds
    ):
        session.delete(row)
        return None, True
    if now - row.last_seen_at >= min(WEB_SESSION_TOUCH_SECONDS, idle_seconds / 4):
        row.last_seen_at = now
        return user, True
    return user, False


def end_web_session(session: Session, sid: object) -> None:
    """Sign one browser out (the cookie's session id); unknown ids are ignored."""
    if isinstance(sid, str) and 0 < len(sid) <= 128:
        session.execute(delete(WebSession).where(WebSession.id_hash == token_hash(sid)))


def end_web_sessions(session: Session, user: User) -> None:
    """Sign ``user`` out everywhere: each of their cookies is refused at its next request, on every web process."""
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
