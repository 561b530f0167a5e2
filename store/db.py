"""Database engine, sessions and schema migrations (Alembic, run programmatically at start).

SQLite (the embedded default) gets WAL and a busy timeout so the job worker and request threads coexist."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from edgemart.core.errors import UsageError

MIGRATIONS = Path(__file__).parent / "migrations"
CONNECT_RETRY_SECONDS = 10.0
MIGRATION_LOCK = 0x6564676D  # "edgm": the advisory lock key migrations hold on PostgreSQL


def normalize_url(url: str) -> str:
    """SQLite or PostgreSQL through psycopg 3 (``postgresql://`` means psycopg 3 here, not psycopg2)."""
    if not isinstance(url, str) or not url:
        raise UsageError("DATABASE_URL is empty")
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith(("sqlite://", "postgresql+psycopg://")):
        return url
    scheme = url.split(":", 1)[0][:40]
    raise UsageError(f"DATABASE_URL must be sqlite:///PATH or postgresql://USER:PASS@HOST/DB, not {scheme}:")


def create_private_sqlite_file(url: str) -> None:
    """Create a new SQLite database file 0600 (an empty file is a valid database): SQLite gives its -wal and
    -shm files the database file's mode, so no copy of the store's rows is readable by others."""
    url = normalize_url(url)
    if not url.startswith("sqlite:///") or url in ("sqlite://", "sqlite:///:memory:"):
        return
    path = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
    if path.name and path.parent.is_dir() and not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # Each web/worker process keeps a small pool; pre-ping drops connections a database restart cut.
    engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_recycle=1800)

    @event.listens_for(engine, "do_connect")
    def _connect_with_retry(dialect, _rec, cargs, cparams):  # type: ignore[no-untyped-def]
        # A restarting server refuses connections for a second or two: wait it out (bounded) so a
        # database restart shows as latency, not as failed requests.
        deadline = time.monotonic() + CONNECT_RETRY_SECONDS
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.25)

    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent; safe to call at every start)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Several app hosts starting at once: one migrates, the others wait and find it done.
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except OperationalError as exc:
        where = engine.url.render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0][:300] if exc.orig else str(exc)[:300]
        raise UsageError(f"cannot use the database {where}: {reason}") from None


def lock_row(session: Session, table: Any, pk: Any) -> None:
    """Hold a write lock on one row until the session's transaction ends, so check-then-insert sequences
    that count other rows (seats, limits) run one at a time per row, across processes and machines.

    PostgreSQL: ``SELECT ... FOR UPDATE`` (later statements in READ COMMITTED see what the previous holder
    committed). SQLite: pysqlite only opens a transaction at the first write, so a no-op UPDATE is that
    first write; it takes the database write lock (waiting out busy_timeout) before anything is counted."""
    column = table.__mapper__.primary_key[0]
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(table).where(column == pk).values({column.key: column}))
    else:
        session.execute(select(column).where(column == pk).with_for_update())


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"
