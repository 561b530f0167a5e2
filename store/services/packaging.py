# Why this is one module: the packaging job's lifecycle (claim, lease, heartbeat, run, outcome, retries, dead letters) shares the fenced-update helpers.
"""Packaging jobs: package a listing's model for one target, seal it with a fresh content key, store the
key only wrapped under the KEK, keep the quality report. Progress goes to the database as it happens."""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

import drm
from edgemart.core.errors import ConflictError, EdgemartError, NotFoundError, UsageError
from edgemart.core.fileio import fault_point
from store.blobs import new_blob_id
from store.context import StoreContext
from store.jobs import worker_id
from store.models import JOB_STATES, Build, Job, Listing, User
from store.services import confined
from store.services.job_failures import Failure, explain, gave_up, worker_stopped
from store.services.listings import settle

log = logging.getLogger("edgemart.store.packaging")
PROGRESS_STEP = 0.02  # write progress to the database at most every 2 %


class JobLost(EdgemartError):
    """This worker no longer holds the job (its lease expired and another worker took it): stop quietly."""


@dataclass(frozen=True)
class Lease:
    """A claimed job: only the holder of (worker, attempt) may write its progress or outcome."""

    job_id: str
    attempt: int
    worker: str


def pending_count(ctx: StoreContext) -> int:
    with ctx.Session() as s:
        return (
            s.scalar(select(func.count()).select_from(Job).where(Job.state.in_(("queued", "running")))) or 0
        )


def claim_next(ctx: StoreContext) -> Lease | None:
    """Move the oldest runnable queued job to running for this worker and return its lease, or None.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED`` lets any number of workers claim side by side without
    blocking on each other's candidate; the conditional UPDATE (state still queued) makes the claim
    atomic on SQLite too, where the row lock clause is ignored."""
    me = worker_id()
    now = ctx.now()
    with ctx.Session() as s:
        candidates = s.scalars(
            select(Job.id)
            .where(Job.state == "queued", or_(Job.run_after.is_(None), Job.run_after <= now))
            .order_by(Job.created_at, Job.id)
            .limit(5)
            .with_for_update(skip_locked=True)
        ).all()
        for job_id in candidates:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "queued")
                .values(
                    state="running",
                    worker=me,
                    started_at=now,
                    heartbeat_at=now,
                    attempts=Job.attempts + 1,
                    message="starting",
                )
                .returning(Job.attempts)
            )
            attempt = res.scalar()
            if attempt is not None:
                s.commit()
                return Lease(job_id, int(attempt), me)
        s.commit()
    return None


def _fenced(lease: Lease) -> Any:
    """WHERE clause: the job is still running under this lease."""
    return (
        (Job.id == lease.job_id)
        & (Job.state == "running")
        & (Job.worker == lease.worker)
        & (Job.attempts == lease.attempt)
    )


def _update_held(s: Session, lease: Lease, **values: Any) -> None:
    """Update the job while this lease still holds it; JobLost (nothing written) if another worker took it."""
    res = s.execute(update(Job).where(_fenced(lease)).values(**values))
    if res.rowcount != 1:  # type: ignore[attr-defined]
        s.rollback()
        raise JobLost(f"job {lease.job_id} attempt {lease.attempt} is no longer held by {lease.worker}")


def _held_job(s: Session, lease: Lease) -> Job | None:
    """The job row, locked, while this lease still holds it (None once another worker took it)."""
    return s.scalar(select(Job).where(_fenced(lease)).with_for_update())


def heartbeat(ctx: StoreContext, lease: Lease) -> None:
    """Renew the lease; JobLost if another worker took the job meanwhile."""
    with ctx.Session() as s:
        _update_held(s, lease, heartbeat_at=ctx.now())
        s.commit()


_RUNNING_HERE: set[str] = set()  # ids of the jobs this process is executing right now


def _worker_gone(worker: str | None) -> bool:
    """True when ``worker`` (host:pid) is a process of this host that no longer exists, or this very
    process (a job it is not running is a leftover of an earlier process that had the same pid).
    Other hosts' workers are judged by their lease alone."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_jobs(ctx: StoreContext) -> list[str]:
    """Re-queue running jobs whose worker is gone: a dead pid on this host, or a lease (heartbeat) older
    than JOB_LEASE_SECONDS anywhere. A job that used up its attempts goes to the dead-letter state."""
    lease = int(ctx.config["JOB_LEASE_SECONDS"])
    now = ctx.now()
    requeued = []
    with ctx.Session() as s:
        running = s.scalars(select(Job).where(Job.state == "running").with_for_update(skip_locked=True)).all()
        for job in running:
            if job.id in _RUNNING_HERE:
                continue
            stale = job.heartbeat_at is None or now - job.heartbeat_at > lease
            if not (stale or _worker_gone(job.worker)):
                continue
            log.warning("job %s: worker %s stopped during attempt %d", job.id, job.worker, job.attempts)
            why = worker_stopped(job.worker, job.attempts, job.build.target)
            if job.attempts >= job.max_attempts:
                _dead_letter(job, gave_up(job.attempts, why), now)
            else:
                job.state, job.worker, job.run_after = "queued", None, now
                job.message = f"re-queued: {why.reason}"[:500]
                job.build.status, job.build.message = "queued", job.message
            requeued.append(job.id)
        s.commit()
    return requeued


def _record_failure(job: Job, failure: Failure) -> None:
    """The job's and its build's error fields: the reason, its code and the next step."""
    job.error, job.error_code, job.next_step = failure.reason[:2000], failure.code, failure.next_step[:2000]
    job.message = failure.reason[:500]


def _dead_letter(job: Job, failure: Failure, now: int) -> None:
    job.state, job.finished_at, job.worker = "dead", now, None
    _record_failure(job, failure)
    build = job.build
    build.status, build.error, build.message, build.updated_at = "failed", failure.text(), job.message, now
    _settle_version(build)


def _settle_version(build: Build) -> None:
    """A pending version whose every build failed is failed; the listing's status follows its versions'."""
    version = build.version
    if version.status == "pending" and all(b.status in ("failed", "rejected") for b in version.builds):
        version.status = "failed"
    settle(version.listing)


def retry_delay(ctx: StoreContext, attempt: int) -> int:
    """Exponential backoff after a failed attempt: base * 4^(attempt-1), capped."""
    base = float(ctx.config["JOB_RETRY_BASE_SECONDS"])
    return int(min(base * 4 ** max(0, attempt - 1), float(ctx.config["JOB_RETRY_MAX_SECONDS"])))


def get_visible_job(session: Session, user: User, job_id: str) -> Job:
    """A job its listing's seller or an admin may see; NotFoundError for everyone else."""
    job = session.get(Job, job_id) if isinstance(job_id, str) and len(job_id) <= 40 else None
    if job is None or not (user.role == "admin" or job.build.listing.seller_id == user.id):
        raise NotFoundError(f"no job {str(job_id)[:40]!r}")
    return job


def search_jobs(
    session: Session, user: User, *, state: str | None, page: int, page_size: int
) -> tuple[list[Job], int]:
    if state is not None and state not in JOB_STATES:
        raise UsageError(f"state must be one of {', '.join(JOB_STATES)}")
    stmt = select(Job)
    if user.role != "admin":
        stmt = stmt.join(Build, Job.build_id == Build.id).join(Listing, Build.listing_id == Listing.id)
        stmt = stmt.where(Listing.seller_id == user.id)
    if state is not None:
        stmt = stmt.where(Job.state == state)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.scalars(
        stmt.order_by(Job.created_at.desc(), Job.id).offset((page - 1) * page_size).limit(page_size)
    ).all()
    return list(rows), -(-total // page_size)


def job_to_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state,
        "progress": round(job.progress, 4),
        "message": job.message,
        "error": job.error,
        "failure": {"code": job.error_code, "reason": job.error, "next_step": job.next_step}
        if job.state in ("failed", "dead") and job.error
        else None,
        "listing": job.build.listing_id,
        "version": job.build.version.number,
        "target": job.build.target,
        "build_status": job.build.status,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "run_after": job.run_after,
        "worker": job.worker,
    }


def requeue_dead(ctx: StoreContext, job_id: str) -> Job:
    """An admin sends a dead-lettered (or failed) job back to the queue with fresh attempts (and wakes a worker)."""
    with ctx.Session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id[:40]!r}")
        if job.state not in ("dead", "failed"):
            raise ConflictError(f"job {job.id} is {job.state}; only dead or failed jobs can be retried")
        job.state, job.attempts, job.run_after, job.error, job.message = (
            "queued",
            0,
            None,
            None,
            "queued by admin",
        )
        job.error_code, job.next_step = None, None
        job.progress, job.finished_at, job.worker = 0.0, None, None
        job.build.status, job.build.error, job.build.message, job.build.progress = (
            "queued",
            None,
            "queued",
            0.0,
        )
        if job.build.version.status == "failed":
            job.build.version.status = "pending"
            settle(job.build.listing)
        s.commit()
    ctx.queue.enqueue(job.id)
    return job


class _Progress:
    """Writes (fraction, message) to the job and its build, throttled, refreshing the job's heartbeat."""

    def __init__(self, ctx: StoreContext, lease: Lease, build_id: int, start: float, span: float) -> None:
        self.ctx, self.lease, self.build_id = ctx, lease, build_id
        self.start, self.span = start, span
        self.last = -1.0

    def __call__(self, fraction: float, message: str) -> None:
        value = self.start + self.span * max(0.0, min(1.0, float(fraction)))
        if value - self.last < PROGRESS_STEP and fraction < 1.0:
            return
        self.last = value
        set_progress(self.ctx, self.lease, self.build_id, value, message)


def set_progress(ctx: StoreContext, lease: Lease, build_id: int, value: float, message: str) -> None:
    now = ctx.now()
    with ctx.Session() as s:
        _update_held(s, lease, progress=value, message=message[:500], heartbeat_at=now)
        s.execute(
            update(Build)
            .where(Build.id == build_id)
            .values(progress=value, message=message[:500], status="running", updated_at=now)
        )
        s.commit()


def run_job(ctx: StoreContext, lease: Lease) -> None:
    """Run one claimed job and record the outcome; a failure is recorded, never lost.

    A refusal from the packagers (EdgemartError: unsupported ops, bad calibration...) is final. Anything
    else (a bug, a lost database connection, a full disk, a 5xx-class EdgemartError such as the blob store
    being unreachable) is retried with backoff up to the job's
    max_attempts, then dead-lettered for an admin. A lost lease stops the job without writing anything."""
    _RUNNING_HERE.add(lease.job_id)
    beat = _Heartbeat(ctx, lease)
    beat.start()
    attempt = _Attempt()
    try:
        _package(ctx, lease, attempt)
    except JobLost as exc:
        log.warning("%s", exc.message)
    except Exception as exc:  # noqa: BLE001 - the worker must outlive a broken job; recorded below
        failure = explain(exc, target=attempt.target, listing=attempt.listing, model=attempt.model)
        if failure.retry:
            log.exception("packaging job %s attempt %d failed", lease.job_id, lease.attempt)
            _retry_or_dead(ctx, lease, failure)
        else:
            log.info("packaging job %s refused: %s", lease.job_id, failure.reason)
            _finish(ctx, lease, ok=False, failure=failure, build_status="failed")
    finally:
        beat.stop()
        _RUNNING_HERE.discard(lease.job_id)


@dataclass
class _Attempt:
    """What the failure explanation may name: the target, the listing and the model being packaged."""

    target: str = "?"
    listing: str = "?"
    model: bytes | None = None


class _Heartbeat(threading.Thread):
    """Renews a running job's lease every JOB_HEARTBEAT_SECONDS, even through long silent steps (one
    quantization call can run for minutes without a progress callback); stops once the lease is lost."""

    def __init__(self, ctx: StoreContext, lease: Lease) -> None:
        super().__init__(name=f"heartbeat-{lease.job_id}", daemon=True)
        self.ctx, self.lease = ctx, lease
        self.every = float(ctx.config["JOB_HEARTBEAT_SECONDS"])
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            try:
                heartbeat(self.ctx, self.lease)
            except JobLost:
                log.warning("job %s: lease lost; its result will be discarded", self.lease.job_id)
                return
            except Exception:  # noqa: BLE001 - database restarting: the next beat retries
                log.warning("job %s: heartbeat failed; retrying", self.lease.job_id, exc_info=True)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5.0)


def _retry_or_dead(ctx: StoreContext, lease: Lease, failure: Failure) -> None:
    now = ctx.now()
    with ctx.Session() as s:
        job = _held_job(s, lease)
        if job is None:
            return
        if job.attempts >= job.max_attempts:
            _dead_letter(job, gave_up(job.attempts, failure), now)
        else:
            delay = retry_delay(ctx, job.attempts)
            job.state, job.worker, job.run_after = "queued", None, now + delay
            _record_failure(job, failure)
            job.message = f"attempt {job.attempts} failed; retrying in {delay} s: {failure.reason}"[:500]
            job.build.status, job.build.message = "queued", job.message
        s.commit()


def _package(ctx: StoreContext, lease: Lease, attempt: _Attempt) -> None:

    job_id = lease.job_id
    with ctx.Session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return
        build = job.build
        version = build.version
        build_id, target, listing_id = build.id, build.target, version.listing_id
        attempt.target, attempt.listing = target, listing_id
        model_key = version.model_blob
        options = (version.target_options or {}).get(target)
        samples_blob = version.calibration_blob
    set_progress(ctx, lease, build_id, 0.0, f"packaging for {target}")
    model = attempt.model = ctx.blobs.get(model_key)
    samples = ctx.blobs.get(samples_blob) if samples_blob is not None else None
    result = confined.package(
        ctx,
        model,
        samples,
        target=target,
        options=options,
        progress=_Progress(ctx, lease, build_id, 0.0, 0.9),
    )
    quality = result.quality.to_dict()
    if not result.quality.passed:
        html = ctx.blobs.put_bytes(result.quality.to_html().encode(), key=new_blob_id())
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
            lease,
            ok=False,
            failure=Failure(
                "quality_failed",
                f"quality check failed: {result.quality.verdict_reason}",
                "read the quality report on the listing page; add calibration samples or exclude the"
                f" named nodes, then re-package (edgemart seller repackage {listing_id} --targets {target}"
                " --calibration SAMPLES.npz --option ...)",
            ),
            build_status="rejected",
        )
        return

    set_progress(ctx, lease, build_id, 0.92, "sealing the build")
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
        html_put = ctx.blobs.put_bytes(result.quality.to_html().encode(), key=new_blob_id())
        if html_put.created:
            created.append(html_put.key)
        fault_point("store", "job", "before_commit")  # tests: a worker killed between its blobs and its row
        with ctx.Session() as s:
            job = _held_job(s, lease)
            if job is None:
                raise JobLost(f"job {job_id} attempt {lease.attempt} was taken over; result discarded")
            clash = s.scalar(select(Build).where(Build.build_hash == result.build_hash, Build.id != build_id))
            if clash is not None:
                raise ConflictError(
                    _duplicate_build_message(s, target, clash, listing_id), code="duplicate_build"
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
            job.state, job.progress, job.message, job.error, job.finished_at = "done", 1.0, "done", None, now
            job.error_code, job.next_step = None, None
            if build.version.status in ("pending", "failed"):
                build.version.status = "listed"
            settle(build.version.listing)
            s.commit()
    except BaseException:
        for key in created:
            ctx.blobs.delete(key)
        raise


def _duplicate_build_message(s: Session, target: str, clash: Build, listing_id: str) -> str:
    """The refusal of a build identical to one already sold: it names the other listing only when the same
    seller owns it (another seller's listing may be private; its id is not this seller's to learn)."""
    listing = s.get(Listing, listing_id)
    if listing is None or clash.listing.seller_id != listing.seller_id:
        return f"an identical {target} build is already sold by another seller; not sold twice"
    return f"an identical {target} build already exists in your listing {clash.listing_id}; not sold twice"


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def _finish(ctx: StoreContext, lease: Lease, *, ok: bool, failure: Failure | None, build_status: str) -> None:
    now = ctx.now()
    with ctx.Session() as s:
        job = _held_job(s, lease)
        if job is None:
            return  # taken over: the new holder records the outcome
        job.state = "done" if ok else "failed"
        job.message = "done"
        if failure is not None:
            _record_failure(job, failure)
        job.finished_at = now
        build = job.build
        error = failure.text() if failure is not None else None
        build.status, build.error, build.message, build.updated_at = build_status, error, job.message, now
        _settle_version(build)
        s.commit()
