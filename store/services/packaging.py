"""Packaging jobs: package a listing's model for one target, seal it with a fresh content key, store the
key only wrapped under the KEK, keep the quality report. Progress goes to the database as it happens."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from sqlalchemy import func, select, update

import drm
from drm.errors import ConflictError, EdgemartError
from store.context import StoreContext
from store.jobs import worker_id
from store.models import Build, Job, Listing

log = logging.getLogger("edgemart.store.packaging")
PROGRESS_STEP = 0.02  # write progress to the database at most every 2 %


def pending_count(ctx: StoreContext) -> int:
    with ctx.Session() as s:
        return (
            s.scalar(select(func.count()).select_from(Job).where(Job.state.in_(("queued", "running")))) or 0
        )


def claim_next(ctx: StoreContext) -> str | None:
    """Atomically move the oldest queued job to running for this worker; its id, or None."""
    with ctx.Session() as s:
        candidates = s.scalars(
            select(Job.id).where(Job.state == "queued").order_by(Job.created_at, Job.id).limit(10)
        ).all()
        now = ctx.now()
        for job_id in candidates:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "queued")
                .values(
                    state="running",
                    worker=worker_id(),
                    started_at=now,
                    heartbeat_at=now,
                    attempts=Job.attempts + 1,
                    message="starting",
                )
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                s.commit()
                return job_id
        s.commit()
    return None


def _pid_alive(worker: str | None) -> bool:
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()  # our own pid at start: left over from a previous process


def recover_jobs(ctx: StoreContext) -> list[str]:
    """Re-queue jobs left running by a process that died (same host, pid gone) or whose lease expired."""
    lease = int(ctx.config["JOB_LEASE_SECONDS"])
    now = ctx.now()
    requeued = []
    with ctx.Session() as s:
        for job in s.scalars(select(Job).where(Job.state == "running")):
            stale = job.heartbeat_at is None or now - job.heartbeat_at > lease
            if stale or not _pid_alive(job.worker):
                job.state, job.worker, job.message = "queued", None, "re-queued after a worker stopped"
                job.build.status, job.build.message = "queued", "re-queued after a worker stopped"
                requeued.append(job.id)
        s.commit()
    return requeued


class _Progress:
    """Writes (fraction, message) to the job and its build, throttled, refreshing the job's heartbeat."""

    def __init__(self, ctx: StoreContext, job_id: str, build_id: int, start: float, span: float) -> None:
        self.ctx, self.job_id, self.build_id = ctx, job_id, build_id
        self.start, self.span = start, span
        self.last = -1.0

    def __call__(self, fraction: float, message: str) -> None:
        value = self.start + self.span * max(0.0, min(1.0, float(fraction)))
        if value - self.last < PROGRESS_STEP and fraction < 1.0:
            return
        self.last = value
        set_progress(self.ctx, self.job_id, self.build_id, value, message)


def set_progress(ctx: StoreContext, job_id: str, build_id: int, value: float, message: str) -> None:
    now = ctx.now()
    with ctx.Session() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(progress=value, message=message[:500], heartbeat_at=now)
        )
        s.execute(
            update(Build)
            .where(Build.id == build_id)
            .values(progress=value, message=message[:500], status="running", updated_at=now)
        )
        s.commit()


def run_job(ctx: StoreContext, job_id: str) -> None:
    """Run one claimed job to completion and record the outcome; a failure is recorded, never lost."""
    try:
        _package(ctx, job_id)
    except EdgemartError as exc:
        _finish(ctx, job_id, ok=False, error=exc.message, build_status="failed")
    except Exception as exc:  # noqa: BLE001 - the worker must outlive a broken job; recorded below
        log.exception("packaging job %s crashed", job_id)
        _finish(
            ctx,
            job_id,
            ok=False,
            error=f"internal error: {type(exc).__name__}: {exc}"[:2000],
            build_status="failed",
        )


def _load_samples(ctx: StoreContext, listing: Listing) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The seller's samples, split: the first part calibrates, the held-out rest measures quality honestly."""
    if listing.calibration_blob is None:
        return None, None
    from store.services.listings import load_samples

    samples = load_samples(ctx.blobs.get(listing.calibration_blob))
    n = min(len(v) for v in samples.values())
    held = int(n * float(ctx.config["HOLDOUT_FRACTION"]))
    if held < 10 or n - held < 10:
        return samples, None
    return {k: v[: n - held] for k, v in samples.items()}, {k: v[n - held : n] for k, v in samples.items()}


def _package(ctx: StoreContext, job_id: str) -> None:
    import packagers

    with ctx.Session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return
        build = job.build
        listing = build.listing
        build_id, target, listing_id = build.id, build.target, listing.id
        model_key = listing.model_blob
        calibration, holdout = _load_samples(ctx, listing)
    set_progress(ctx, job_id, build_id, 0.0, f"packaging for {target}")
    model = ctx.blobs.get(model_key)
    result = packagers.package_model(
        model,
        target,
        calibration=calibration,
        holdout=holdout,
        progress=_Progress(ctx, job_id, build_id, 0.0, 0.9),
    )
    quality = result.quality.to_dict()
    if not result.quality.passed:
        html = ctx.blobs.put_bytes(result.quality.to_html().encode())
        try:
            with ctx.Session() as s:
                build = s.get(Build, build_id)
                assert build is not None
                build.quality, build.quality_html_blob, build.format = quality, html.key, result.format
                s.commit()
        except BaseException:
            if html.created:
                ctx.blobs.delete(html.key)
            raise
        _finish(
            ctx,
            job_id,
            ok=False,
            error=f"quality check failed: {result.quality.verdict_reason}",
            build_status="rejected",
        )
        return

    set_progress(ctx, job_id, build_id, 0.92, "sealing the build")
    cek = drm.generate_content_key()
    sealed = drm.seal(result.payload, key=cek, target=target)
    header = drm.read_header(sealed[:65536])
    if header.build_hash != result.build_hash:
        raise ConflictError("sealed build hash differs from the packager's build hash")
    wrapped = ctx.vault.wrap_cek(cek, result.build_hash)
    del cek
    created = []
    try:
        sealed_put = ctx.blobs.put_bytes(sealed)
        if sealed_put.created:
            created.append(sealed_put.key)
        html_put = ctx.blobs.put_bytes(result.quality.to_html().encode())
        if html_put.created:
            created.append(html_put.key)
        with ctx.Session() as s:
            clash = s.scalar(select(Build).where(Build.build_hash == result.build_hash, Build.id != build_id))
            if clash is not None:
                raise ConflictError(
                    f"an identical {target} build already exists in listing {clash.listing_id}; not sold twice"
                )
            build = s.get(Build, build_id)
            assert build is not None
            now = ctx.now()
            build.build_hash = result.build_hash
            build.format = result.format
            build.blob_key = sealed_put.key
            build.sealed_size = sealed_put.size
            build.wrapped_cek = wrapped
            build.quality = quality
            build.quality_html_blob = html_put.key
            build.build_metadata = _jsonable(result.metadata)
            build.status, build.progress, build.message, build.error = "done", 1.0, "done", None
            build.updated_at = now
            job = s.get(Job, job_id)
            assert job is not None
            job.state, job.progress, job.message, job.error, job.finished_at = "done", 1.0, "done", None, now
            listing = s.get(Listing, listing_id)
            assert listing is not None
            if listing.status in ("pending", "failed"):
                listing.status = "listed"
            s.commit()
    except BaseException:
        for key in created:
            ctx.blobs.delete(key)
        raise


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def _finish(ctx: StoreContext, job_id: str, *, ok: bool, error: str | None, build_status: str) -> None:
    now = ctx.now()
    with ctx.Session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return
        job.state = "done" if ok else "failed"
        job.error = error
        job.message = error or "done"
        job.finished_at = now
        build = job.build
        build.status, build.error, build.message, build.updated_at = build_status, error, error or "done", now
        listing = build.listing
        if listing.status == "pending" and all(b.status in ("failed", "rejected") for b in listing.builds):
            listing.status = "failed"
        s.commit()
