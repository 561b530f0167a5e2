"""Request rate limits counted in the database, so every web process on every host sees the same counts: fixed
windows per (action, caller), one atomic upsert per counter; past the limit, TooManyAttempts (429 + Retry-After).

The caller is an account (all of a user's API tokens and web sessions together: minting more tokens does not
buy more requests) and the client address. Limits come from RATE_LIMIT_<ACTION>_PER_ACCOUNT / _PER_IP;
0 or an absent key means no limit. Consecutive wrong passwords per account are the lockout in
services.accounts; this module bounds the request rate."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgemart.core.errors import TooManyAttempts
from store.context import StoreContext
from store.models import RateCounter

ACTIONS = {"login": "sign-in attempts", "upload": "uploads", "license": "license requests"}


def check(ctx: StoreContext, action: str, *, ip: str | None, account: int | None) -> None:
    """Count one ``action`` request by ``account`` from ``ip``; TooManyAttempts when either is over its limit.

    Runs in its own transaction (committed even when refused), so call it before the request writes."""
    cfg = ctx.config
    counters = []
    for scope, who in (("ACCOUNT", account), ("IP", ip)):
        limit = int(cfg.get(f"RATE_LIMIT_{action.upper()}_PER_{scope}") or 0)
        if limit and who is not None and who != "":
            counters.append((f"{action}:{scope.lower()}:{str(who)[:120]}", limit, scope))
    if not counters:
        return
    window = int(cfg["RATE_LIMIT_WINDOW_SECONDS"])
    now = ctx.now()
    start = now - now % window
    over = None
    with ctx.Session() as s:
        for key, limit, scope in counters:  # always account before address: one lock order on PostgreSQL
            hits = _count(s, key, start)
            if hits == 1:
                # A new window: drop what is two windows old (older rows are written by nobody), so the
                # table holds only the callers of the last two windows.
                s.execute(delete(RateCounter).where(RateCounter.window_start < start - window))
            if hits > limit and over is None:
                over = scope
        s.commit()
    if over is not None:
        retry = start + window - now
        whom = "account" if over == "ACCOUNT" else "address"
        raise TooManyAttempts(
            f"too many {ACTIONS.get(action, action)} from this {whom}; try again in {retry} s",
            details=[],
            retry_after=retry,
        )


def _count(s: Session, key: str, start: int) -> int:
    """Add one hit to (key, window) and return the count, in one statement (INSERT … ON CONFLICT DO UPDATE)."""
    dialect: Any = sqlite if s.get_bind().dialect.name == "sqlite" else postgresql
    stmt = dialect.insert(RateCounter).values(key=key, window_start=start, hits=1)
    stmt = stmt.on_conflict_do_update(
        index_elements=[RateCounter.key, RateCounter.window_start], set_={"hits": RateCounter.hits + 1}
    ).returning(RateCounter.hits)
    return int(s.execute(stmt).scalar_one())
