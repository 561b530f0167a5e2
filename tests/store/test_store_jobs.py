"""The job queue: retries with backoff, the dead-letter state and an admin retry; lease fencing (a worker
that lost its job cannot record a result); real `edgemart store worker` processes on PostgreSQL, one of
them SIGKILLed mid-job, the job finished exactly once by another."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

import drm
from store.app import worker_loop
from store.models import Build, Job, Listing
from store.services import packaging
from store.services.maintenance import sweep_orphan_blobs
from tests.store.conftest import make_store

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def _blob_path(st, key: str) -> Path:
    return st.data_dir / "blobs" / key.split("-", 1)[1][:2] / key


def _job(st, job_id: str) -> dict:
    return st.client.get(f"/api/v1/jobs/{job_id}", headers=st.auth("ada")).json


def test_internal_failure_is_retried_with_backoff_then_dead_lettered_and_an_admin_retry_finishes(
    tmp_path, digits_base
):
    clock = Clock()
    st = make_store(tmp_path, WORKER="none", CLOCK=clock)
    try:
        job_id = st.upload("sally", digits_base, name="flaky", targets="onnx-fp32").json["jobs"][0]
        with st.ctx.Session() as s:
            model_key = s.get(Listing, "flaky").latest.model_blob
        # A storage fault (not a refusal of the model): the blob became unreadable.
        path = _blob_path(st, model_key)
        saved = path.read_bytes()
        path.unlink()
        path.mkdir()
        loop = worker_loop(st.ctx)

        loop.drain()
        first = _job(st, job_id)
        assert first["state"] == "queued" and first["attempts"] == 1
        assert first["run_after"] == T0 + 10 and "retrying in 10 s" in first["message"]
        assert "IsADirectoryError" in first["error"]
        loop.drain()  # the backoff has not passed: nothing is claimed
        assert _job(st, job_id)["attempts"] == 1

        clock.t += 10
        loop.drain()
        second = _job(st, job_id)
        assert second["attempts"] == 2 and second["run_after"] == T0 + 10 + 40

        clock.t += 40
        loop.drain()
        dead = _job(st, job_id)
        assert dead["state"] == "dead" and dead["attempts"] == 3 and dead["build_status"] == "failed"
        assert dead["error"].startswith("gave up after 3 attempts")
        listed = st.client.get("/api/v1/jobs?state=dead", headers=st.auth("ada")).json["items"]
        assert [j["id"] for j in listed] == [job_id]
        assert st.client.get("/api/v1/listings/flaky", headers=st.auth("sally")).json["status"] == "failed"

        path.rmdir()
        path.write_bytes(saved)  # the operator repaired the storage
        assert st.client.post(f"/api/v1/jobs/{job_id}/retry", headers=st.auth("sally")).status_code == 403
        r = st.client.post(f"/api/v1/jobs/{job_id}/retry", headers=st.auth("ada"))
        assert r.status_code == 200 and r.json["state"] == "queued" and r.json["attempts"] == 0
        loop.drain()
        done = _job(st, job_id)
        assert done["state"] == "done" and done["attempts"] == 1
        assert st.client.get("/api/v1/listings/flaky", headers=st.auth("sally")).json["status"] == "listed"
        r = st.client.post(f"/api/v1/jobs/{job_id}/retry", headers=st.auth("ada"))
        assert r.status_code == 409
    finally:
        st.ctx.close()


def test_a_refused_model_fails_at_once_without_retries(tmp_path, corpus):
    st = make_store(tmp_path, WORKER="none")
    try:
        # An ONNX upload for coral-edgetpu without calibration samples: a property of the upload, not a glitch.
        model = corpus / "models" / "rapidocr" / "ch_PP-OCRv4_det_infer.onnx"
        job_id = st.upload("sally", model, name="det", targets="coral-edgetpu").json["jobs"][0]
        worker_loop(st.ctx).drain()
        job = _job(st, job_id)
        assert job["state"] == "failed" and job["attempts"] == 1 and job["run_after"] is None
    finally:
        st.ctx.close()


def test_a_worker_that_lost_its_lease_cannot_record_a_result(tmp_path, digits_base):
    st = make_store(tmp_path, WORKER="none")
    try:
        job_id = st.upload("sally", digits_base, name="fenced", targets="onnx-fp32").json["jobs"][0]
        blobs_before = set(st.ctx.blobs.list())
        stale = packaging.claim_next(st.ctx)
        assert stale is not None and stale.attempt == 1
        with st.ctx.Session() as s:  # its heartbeats stopped (a paused VM, a network partition)
            s.get(Job, job_id).heartbeat_at = st.ctx.now() - 10_000
            s.commit()
        assert packaging.recover_jobs(st.ctx) == [job_id]
        fresh = packaging.claim_next(st.ctx)
        assert fresh is not None and fresh.attempt == 2

        packaging.run_job(st.ctx, stale)  # wakes up and tries to finish: refused at its first write
        with st.ctx.Session() as s:
            job = s.get(Job, job_id)
            assert (job.state, job.attempts, job.progress) == ("running", 2, 0.0)
            assert job.build.blob_key is None
        assert set(st.ctx.blobs.list()) == blobs_before

        packaging.run_job(st.ctx, fresh)
        with st.ctx.Session() as s:
            job = s.get(Job, job_id)
            assert (job.state, job.attempts, job.build.status) == ("done", 2, "done")
    finally:
        st.ctx.close()


def _worker(data_dir: Path, database_url: str, *extra: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgemart", "store", "worker", "--data-dir", str(data_dir), *extra],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "EDGEMART_DATABASE_URL": database_url,
            "EDGEMART_JOB_POLL_SECONDS": "0.2",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_a_killed_worker_process_job_is_picked_up_and_finished_once(tmp_path, postgres_server, digits_base):
    url = postgres_server.create_database()
    data = tmp_path / "store"
    st = make_store(data, WORKER="none", DATABASE_URL=url)
    try:
        job_id = st.upload("sally", digits_base, name="crashy", targets="onnx-fp32").json["jobs"][0]
        # Worker A dies by SIGKILL after sealing and storing the build, before committing the job's row.
        a = _worker(data, url, EDGEMART_FAULT_AT="store:job:before_commit")
        a.wait(timeout=120)
        assert a.returncode == -signal.SIGKILL, a.stderr.read()
        with st.ctx.Session() as s:
            job = s.get(Job, job_id)
            assert (job.state, job.attempts, job.worker.endswith(f":{a.pid}")) == ("running", 1, True)
            assert job.build.blob_key is None
        orphans = set(st.ctx.blobs.list())

        # Worker B finds A's pid gone, re-queues the job and finishes it.
        b = _worker(data, url, "--once")
        out, err = b.communicate(timeout=120)
        assert b.returncode == 0, err
        assert "re-queued 1 abandoned job" in err and "ran 1 job(s)" in err
        with st.ctx.Session() as s:
            job = s.get(Job, job_id)
            assert (job.state, job.attempts, job.build.status) == ("done", 2, "done")
            assert job.worker.endswith(f":{b.pid}")
            assert s.scalar(select(func.count()).select_from(Build).where(Build.listing_id == "crashy")) == 1
            build = job.build
            cek = st.ctx.vault.unwrap_cek(build.wrapped_cek, build.build_hash)
        drm.open_sealed(st.ctx.blobs.get(build.blob_key), key=cek, expected_build_hash=build.build_hash)
        # A's sealed build (another content key, so another blob) is an orphan the sweep removes.
        report = sweep_orphan_blobs(st.ctx, older_than=0)
        assert len(report.deleted) >= 1 and set(report.deleted) <= orphans
        assert build.blob_key in set(st.ctx.blobs.list())
    finally:
        st.ctx.close()


def test_worker_command_refuses_a_bad_database_url(tmp_path):
    w = _worker(tmp_path / "d", "mysql://nope", "--once")
    out, err = w.communicate(timeout=60)
    assert w.returncode == 2 and "Traceback" not in err, err
    assert err.strip().startswith("edgemart:")
    json.dumps(out)  # nothing half-printed on stdout
    shutil.rmtree(tmp_path / "d", ignore_errors=True)


def test_worker_command_refuses_an_unreachable_database(tmp_path):
    from store.localservers.postgres import free_port

    w = _worker(tmp_path / "d", f"postgresql://u:secret@127.0.0.1:{free_port()}/x", "--once")
    out, err = w.communicate(timeout=60)
    assert w.returncode == 2 and "Traceback" not in err, err
    assert "cannot use the database" in err and "secret" not in err
