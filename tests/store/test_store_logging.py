"""Structured logs: one JSON access record per request with the request id the response carries; a
caller's well-formed X-Request-Id is kept, anything else replaced; `edgemart store serve` writes nothing
but JSON lines (gunicorn's own records included) and never a token."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from store.localservers.postgres import free_port
from store.logs import JsonFormatter
from tests.store.conftest import cli_create_user

ROOT = Path(__file__).resolve().parents[2]


def test_each_request_has_one_access_record_with_its_request_id(store, caplog):
    caplog.set_level(logging.INFO, logger="edgemart.store.access")
    r = store.client.get("/api/v1/me", headers={**store.auth("bob"), "X-Request-Id": "trace-12345678"})
    assert r.headers["X-Request-Id"] == "trace-12345678"
    bad = store.client.get("/api/v1/me", headers={"X-Request-Id": "<script> not an id"})
    assert bad.status_code == 401 and len(bad.headers["X-Request-Id"]) == 16
    records = [rec for rec in caplog.records if rec.name == "edgemart.store.access"]
    assert len(records) == 2
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["status"] == 200 and line["path"] == "/api/v1/me" and line["method"] == "GET"
    assert line["user_id"] is not None and line["ms"] >= 0 and line["level"] == "info"
    second = json.loads(JsonFormatter().format(records[1]))
    assert second["status"] == 401 and second["user_id"] is None


def test_serve_writes_only_json_lines(tmp_path):
    data = tmp_path / "store"
    token = cli_create_user(data, "sally", "seller")
    port = free_port()
    err = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgemart", "store", "serve", "--data-dir", str(data), "--port", str(port),
         "--workers", "2"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=err, stderr=err, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/v1/me", headers={"Authorization": f"Bearer {token}"}
                )
                with urllib.request.urlopen(req, timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        err.close()
    lines = (tmp_path / "serve.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]  # every line is JSON
    assert any(r["logger"].startswith("gunicorn") for r in records)
    access = [r for r in records if r["logger"] == "edgemart.store.access" and r["path"] == "/api/v1/me"]
    assert access and access[-1]["status"] == 200 and access[-1]["request_id"]
    assert token not in "\n".join(lines)
