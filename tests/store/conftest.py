"""Fixtures for the store tests: a real app on a temp data dir (SQLite + files + thread worker) and users."""

from __future__ import annotations

import contextlib
import io
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from store import create_app
from store.context import StoreContext
from store.models import User
from store.services import accounts

PASSWORDS = {"sally": "pw-sally-12345", "bob": "pw-bob-12345", "ada": "pw-ada-12345"}
ROLES = {
    "sally": "seller",
    "sam": "seller",
    "bob": "buyer",
    "betty": "buyer",
    "bill": "builder",
    "ada": "admin",
}


@dataclass
class Store:
    app: Flask
    client: FlaskClient
    ctx: StoreContext
    tokens: dict[str, str]
    data_dir: Path

    def auth(self, who: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}

    def wait(self, timeout: float = 120.0) -> None:
        assert self.ctx.queue.wait_idle(timeout), "packaging jobs did not finish"

    def upload(
        self,
        who: str,
        model: Path | bytes | None,
        *,
        name: str | None = "m",
        license: str | None = "MIT",
        targets: str | None = "onnx-fp32",
        calibration: Path | bytes | None = None,
        card: str | None = None,
        filename: str = "model.onnx",
        headers: dict[str, str] | None = None,
        client: FlaskClient | None = None,  # a client of its own, for uploads from several threads
        **fields: Any,
    ) -> Any:
        data: dict[str, Any] = {k: str(v) for k, v in fields.items()}
        for key, value in (("name", name), ("license", license), ("targets", targets)):
            if value is not None:
                data[key] = value
        if model is not None:
            raw = model.read_bytes() if isinstance(model, Path) else model
            data["model"] = (io.BytesIO(raw), filename)
        if calibration is not None:
            raw = calibration.read_bytes() if isinstance(calibration, Path) else calibration
            data["calibration"] = (io.BytesIO(raw), "cal.npz")
        if card is not None:
            data["card"] = (io.BytesIO(card.encode()), "README.md")
        return (client or self.client).post(
            "/api/v1/listings",
            data=data,
            headers={**self.auth(who), **(headers or {})},
            content_type="multipart/form-data",
        )

    def counts(self) -> dict[str, int]:
        """Rows per table and blobs on disk: a failed request must leave both unchanged."""
        from sqlalchemy import func, select

        from store import models

        out = {"blobs": len(list(self.ctx.blobs.list()))}
        with self.ctx.Session() as s:
            for model in (
                models.Listing,
                models.ListingVersion,
                models.Build,
                models.Job,
                models.License,
                models.Device,
                models.UsageRecord,
            ):
                out[model.__tablename__] = s.scalar(select(func.count()).select_from(model)) or 0
        pending = getattr(self.ctx.blobs, "pending_uploads", None)
        tmp = self.data_dir / "blobs" / ".tmp"
        out["tmp_files"] = len(pending()) if pending else len(list(tmp.iterdir()))
        return out


def enroll(store: Store, who: str) -> Any:
    """A fresh device (drm.DeviceKeys) enrolled on ``who``'s account through the API."""
    import drm

    keys = drm.DeviceKeys.generate()
    r = store.client.post(
        "/api/v1/devices/enroll", json={"csr": keys.csr().decode()}, headers=store.auth(who)
    )
    assert r.status_code == 201, r.json
    return keys


@contextlib.contextmanager
def serve_http(app: Flask) -> Iterator[str]:
    """The app served over real HTTP by werkzeug in a thread (threaded: pages poll jobs); yields its URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


def cli_create_user(data_dir: Path, name: str, role: str) -> str:
    """`edgemart store create-user` in a process of its own (as an operator runs it); returns the API token."""
    import json
    import os
    import subprocess
    import sys

    made = subprocess.run(
        [sys.executable, "-m", "edgemart", "store", "create-user", name, "--role", role,
         "--data-dir", str(data_dir), "--json"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return str(json.loads(made.stdout)["token"])


def make_store(data_dir: Path, **config: Any) -> Store:
    app = create_app({"DATA_DIR": str(data_dir), "JOB_POLL_SECONDS": 0.2, **config})
    app.testing = True
    ctx: StoreContext = app.extensions["edgemart"]
    tokens = {}
    with ctx.Session() as s:
        for name, role in ROLES.items():
            existing = s.scalar(select(User).where(User.name == name))
            user = existing or accounts.create_user(
                s, name, role, now=ctx.now(), password=PASSWORDS.get(name)
            )
            tokens[name] = accounts.issue_token(s, user, now=ctx.now())
        s.commit()
    return Store(app, app.test_client(), ctx, tokens, data_dir)


# These suites run twice: on the embedded default (SQLite + files) and scaled out (a real PostgreSQL server
# + a real SeaweedFS S3 bucket), the same code configured differently.
BOTH_DATABASES = {
    "test_store_flow",
    "test_store_lifecycle",
    "test_store_bad_input",
    "test_store_authz",
    "test_store_concurrency",
    "test_store_hostile_models",
    "test_store_hostile_users",
    "test_store_versions",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database" in metafunc.fixturenames and metafunc.module.__name__ in BOTH_DATABASES:
        metafunc.parametrize(
            "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)], indirect=True
        )


@pytest.fixture
def database(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Store config for the backends: {} (SQLite + files in the data dir) or PostgreSQL + S3."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return {}
    server = request.getfixturevalue("postgres_server")
    seaweed = request.getfixturevalue("seaweed")
    bucket = seaweed.blob_store().bucket  # a fresh bucket per test
    for key, value in seaweed.env().items():
        request.getfixturevalue("monkeypatch").setenv(key, value)
    return {
        "DATABASE_URL": str(server.create_database()),
        "BLOB_URL": f"s3://{bucket}/blobs",
        "S3_ENDPOINT_URL": seaweed.endpoint_url,
    }


@pytest.fixture
def store(database: dict[str, Any]) -> Iterator[Store]:
    with tempfile.TemporaryDirectory(prefix="edgemart-store-") as tmp:
        st = make_store(Path(tmp), **database)
        try:
            yield st
        finally:
            st.ctx.close()


@pytest.fixture(scope="module")
def shared_store() -> Iterator[Store]:
    """One store per test module, for read-only checks on already packaged listings."""
    with tempfile.TemporaryDirectory(prefix="edgemart-store-") as tmp:
        st = make_store(Path(tmp))
        try:
            yield st
        finally:
            st.ctx.close()
