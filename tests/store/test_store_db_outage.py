"""PostgreSQL restarting under a running store: requests wait out a short restart (bounded connect
retries) and succeed; a longer outage is a 503 with Retry-After and the error JSON, never a 500; the
store serves again as soon as the database is back."""

from __future__ import annotations

import threading
import time

import pytest

from store.localservers.postgres import pg_bindir, throwaway_postgres
from tests.store.conftest import make_store

pytestmark = pytest.mark.slow


@pytest.fixture
def own_postgres():
    """A cluster of this test's own: the tests stop and restart it."""
    if pg_bindir() is None:
        pytest.skip("PostgreSQL server binaries not installed (run `make apt`)")
    with throwaway_postgres("edgemart-pg-outage-") as server:
        yield server


def test_requests_ride_out_a_database_restart_and_a_long_outage_is_a_503(
    tmp_path, own_postgres, digits_base, monkeypatch
):
    st = make_store(tmp_path, WORKER="none", DATABASE_URL=own_postgres.create_database())
    try:
        assert st.upload("sally", digits_base, name="m", targets="onnx-fp32").status_code == 202

        own_postgres.stop()
        restarter = threading.Timer(2.0, own_postgres.start)
        restarter.start()
        t0 = time.monotonic()
        r = st.client.get("/api/v1/listings?mine=1", headers=st.auth("sally"))
        restarter.join()
        assert r.status_code == 200 and [x["id"] for x in r.json["items"]] == ["m"]
        assert time.monotonic() - t0 >= 1.5  # it waited for the server instead of failing

        import store.db

        monkeypatch.setattr(store.db, "CONNECT_RETRY_SECONDS", 1.0)
        own_postgres.stop()
        r = st.client.get("/api/v1/listings?mine=1", headers=st.auth("sally"))
        assert r.status_code == 503 and r.headers["Retry-After"] == "2"
        assert r.json["error"]["code"] == "unavailable"
        page = st.client.get("/", headers=st.auth("sally"))
        assert page.status_code == 503 and b"Traceback" not in page.data

        own_postgres.start()
        r = st.client.get("/api/v1/listings?mine=1", headers=st.auth("sally"))
        assert r.status_code == 200 and len(r.json["items"]) == 1
    finally:
        st.ctx.close()


def test_hosts_starting_together_migrate_once(postgres_server):
    """Four processes' worth of engines upgrade one empty database at the same moment: one migrates (under
    an advisory lock), the others find the schema current; no duplicate-table error."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import inspect, text

    from store import db

    url = postgres_server.create_database()
    engines = [db.make_engine(url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))

    def go(engine):  # type: ignore[no-untyped-def]
        barrier.wait()
        db.migrate(engine)

    try:
        with ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(go, engines))
        with engines[0].connect() as conn:
            from alembic.config import Config
            from alembic.script import ScriptDirectory

            cfg = Config()
            cfg.set_main_option("script_location", str(db.MIGRATIONS))
            head = ScriptDirectory.from_config(cfg).get_current_head()
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
            assert "jobs" in inspect(conn).get_table_names()
    finally:
        for engine in engines:
            engine.dispose()


def test_database_lost_after_authentication_is_a_503_not_a_500(tmp_path, own_postgres, monkeypatch):
    """Found by `make scale-test` (PostgreSQL restarted under load): a request that authenticated, then lost
    the database while flushing its write, was answered 503 by the handler but turned into a 500 by the
    access log reading the user object the failed flush had expired. The server stops exactly there here:
    at the request's second flush (the first is the token's last-used stamp)."""
    from sqlalchemy import event

    st = make_store(tmp_path, WORKER="none", DATABASE_URL=own_postgres.create_database())
    try:
        import store.db

        monkeypatch.setattr(store.db, "CONNECT_RETRY_SECONDS", 1.0)
        flushes = {"n": 0, "armed": False}

        def stop_at_second_flush(session, _ctx, _instances):  # type: ignore[no-untyped-def]
            if flushes["armed"]:
                flushes["n"] += 1
                if flushes["n"] == 2:
                    own_postgres.stop()

        event.listen(st.ctx.Session, "before_flush", stop_at_second_flush)
        flushes["armed"] = True
        r = st.client.post("/api/v1/tokens", headers=st.auth("bob"))
        assert flushes["n"] >= 2
        assert r.status_code == 503 and r.json["error"]["code"] == "unavailable", r.data[:300]
    finally:
        own_postgres.start()
        st.ctx.close()
