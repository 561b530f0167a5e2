"""The store killed (SIGKILL) or its client gone mid-upload: after a restart no orphan blob, no temp file and
no database row is left behind, and the store still takes uploads. Real server processes (`edgemart store
serve`), a raw socket that sends half of a real corpus model's multipart body."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fault_helpers import ROOT

pytestmark = pytest.mark.timeout(300)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "edgemart", *args], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server(data_dir: Path, **env: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """`edgemart store serve` in its own process group (gunicorn forks workers); killed with SIGKILL on exit."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgemart",
            "store",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
        ],
        env={**_env(), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "store exited at startup"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/listings", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "store did not come up"
            time.sleep(0.2)
        yield port, proc
    finally:
        _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: server and its workers
        proc.wait(timeout=30)


def _multipart(model: bytes, name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in (("name", name), ("license", "MIT"), ("targets", "onnx-fp32")):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        )
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="model.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + model
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _send_half(port: int, token: str, model: bytes) -> socket.socket:
    """Open an upload whose headers announce the whole body, and send only half of it."""
    body, ctype = _multipart(model, "half-upload")
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /api/v1/listings HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def _upload(port: int, token: str, model: bytes, name: str) -> int:
    body, ctype = _multipart(model, name)
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/listings",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": ctype},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return int(resp.status)


def _snapshot(data_dir: Path) -> dict[str, object]:
    """Row counts of every table, the blob keys and the blob temp dir's contents. The rate-limit counters are
    left out: counting a request is what the request did, not something its failure left behind."""
    con = sqlite3.connect(data_dir / "store.db")
    try:
        tables = [
            r[0]
            for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if r[0] != "rate_counters"
        ]
        rows = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        con.close()
    blobs = data_dir / "blobs"
    keys = sorted(p.name for p in blobs.rglob("*") if p.is_file() and ".tmp" not in p.parts)
    temp = sorted(p.name for p in (blobs / ".tmp").iterdir()) if (blobs / ".tmp").is_dir() else []
    return {"rows": rows, "blobs": keys, "temp": temp}


@pytest.fixture
def store_dir(tmp_path: Path) -> tuple[Path, str]:
    data = tmp_path / "store"
    out = json.loads(
        _cli("store", "create-user", "sally", "--role", "seller", "--data-dir", str(data), "--json")
    )
    return data, out["token"]


@pytest.fixture(scope="module")
def big_model(corpus: Path) -> bytes:
    return (corpus / "models" / "rapidocr" / "ch_PP-OCRv4_det_infer.onnx").read_bytes()


@pytest.mark.slow
def test_store_killed_mid_upload_leaves_nothing_and_still_serves(store_dir, big_model, digits_base):
    data, token = store_dir
    with _server(data) as (port, proc):
        before = _snapshot(data)
        sock = _send_half(port, token, big_model)
        time.sleep(1.0)  # let the server read what was sent
        _kill(proc)
        sock.close()
    after_kill = _snapshot(data)
    assert after_kill == before
    with _server(data) as (port, _):
        assert _snapshot(data) == before
        assert _upload(port, token, digits_base.read_bytes(), "after-restart") == 202
        assert _snapshot(data)["rows"]["listings"] == before["rows"]["listings"] + 1  # type: ignore[index]


@pytest.mark.slow
def test_client_gone_mid_upload_leaves_nothing_and_the_store_keeps_serving(store_dir, big_model, digits_base):
    data, token = store_dir
    with _server(data) as (port, _):
        before = _snapshot(data)
        sock = _send_half(port, token, big_model)
        time.sleep(0.5)
        sock.close()
        # The server answers other clients, and the abandoned request left nothing behind.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/listings", timeout=30) as r:
            assert r.status == 200
        time.sleep(1.0)
        assert _snapshot(data) == before
        assert _upload(port, token, digits_base.read_bytes(), "after-disconnect") == 202


PUT = """
import sys
from store.blobs import FileBlobStore
FileBlobStore(sys.argv[1]).put_stream(sys.stdin.buffer, max_bytes=1 << 30)
"""


def test_store_killed_inside_a_blob_put_leaves_a_temp_file_that_startup_sweeps(
    tmp_path: Path, big_model: bytes
):
    """Kill the real FileBlobStore.put_stream after its first chunk hit the disk (it is blocked reading the
    rest): the temp file it leaves is removed when the blob store next opens, once no write has touched it for
    STALE_TEMP_SECONDS (we age it with os.utime instead of waiting an hour); a fresh one, possibly a live put
    of another process, is left alone."""
    from store.blobs import STALE_TEMP_SECONDS, FileBlobStore

    root = tmp_path / "blobs"
    proc = subprocess.Popen([sys.executable, "-c", PUT, str(root)], env=_env(), stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        proc.stdin.write(big_model[: 3 * len(big_model) // 4])  # > 1 MiB: one whole CHUNK, then it blocks
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size >= 1 << 20 for p in (root / ".tmp").glob("put-*")):
            assert time.monotonic() < deadline, "put_stream wrote nothing"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    orphans = list((root / ".tmp").iterdir())
    assert len(orphans) == 1  # the orphan this fix is about
    assert list(FileBlobStore(root).list()) == []

    FileBlobStore(root)  # a restart right away: it may be a live put elsewhere, so it stays
    assert [p.name for p in (root / ".tmp").iterdir()] == [orphans[0].name]
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(orphans[0], (old, old))
    FileBlobStore(root)
    assert list((root / ".tmp").iterdir()) == []


def _job_states(data_dir: Path) -> set[str]:
    con = sqlite3.connect(data_dir / "store.db")
    try:
        return {r[0] for r in con.execute("SELECT state FROM jobs")}
    finally:
        con.close()


@pytest.mark.slow
def test_blob_committed_before_its_row_is_swept_by_gc(store_dir, digits_base):
    """The store killed between writing an upload's blob and committing its row (a named fault point in
    the upload service) leaves a blob no row references; `edgemart store gc` spares it while it is young
    (it could be an upload in flight) and deletes it once past the grace period. Nothing else is touched."""
    data, token = store_dir
    with _server(data) as (port, _):
        assert _upload(port, token, digits_base.read_bytes(), "kept") == 202
        deadline = time.monotonic() + 120
        while _snapshot(data)["rows"]["jobs"] == 0 or _job_states(data) != {"done"}:  # type: ignore[index]
            assert time.monotonic() < deadline, "packaging did not finish"
            time.sleep(0.2)
    before = _snapshot(data)
    with _server(data, EDGEMART_FAULT_AT="store:upload:before_commit") as (port, _):
        with pytest.raises((ConnectionError, urllib.error.URLError, http.client.HTTPException)):
            _upload(port, token, (digits_base.parent / "digits_mlp_finetuned.onnx").read_bytes(), "orphan")
    after = _snapshot(data)
    assert after["rows"] == before["rows"]
    orphans = sorted(set(after["blobs"]) - set(before["blobs"]))  # type: ignore[arg-type]
    assert len(orphans) == 1

    young = json.loads(_cli("store", "gc", "--data-dir", str(data), "--json"))
    assert young["deleted"] == 0 and young["young"] == 1
    dry = json.loads(_cli("store", "gc", "--data-dir", str(data), "--older-than", "0", "--dry-run", "--json"))
    assert dry["deleted_keys"] == orphans and _snapshot(data) == after
    swept = json.loads(_cli("store", "gc", "--data-dir", str(data), "--older-than", "0", "--json"))
    assert swept["deleted_keys"] == orphans
    assert _snapshot(data) == before  # the listing that was kept still has its model and builds
