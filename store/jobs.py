"""Background jobs: the queue is the ``jobs`` table itself (PostgreSQL ``FOR UPDATE SKIP LOCKED`` claims,
an atomic conditional UPDATE on SQLite), run by a ``WorkerLoop`` in a thread of the web process (embedded
default) or in separate ``edgemart store worker`` processes on any number of machines (scale-out).

Why the database and not Redis/RabbitMQ: a job is created in the same transaction as the listing and
build it packages, so no upload can be committed without its job or vice versa; claims, leases, retries
and the dead-letter state are rows anyone can query; and there is one less server to run and back up.
Packaging jobs take seconds to minutes, so polling a few times a second is far below what PostgreSQL
handles (see docs/DEPLOY.md for the measured figures)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("edgemart.store.jobs")


def worker_id() -> str:
    """host:pid of this process (recomputed: gunicorn forks after import)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@runtime_checkable
class JobQueue(Protocol):
    def start(self) -> None: ...

    def enqueue(self, job_id: str) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def wait_idle(self, timeout: float) -> bool: ...


class WorkerLoop:
    """Claims runnable jobs and runs them one at a time until stopped; also re-queues jobs whose worker
    died, every ``recover_seconds``. The same loop runs in a thread of the web process (embedded
    default) or in the foreground of an ``edgemart store worker`` process (scale-out).

    ``claim`` returns a lease (or None); ``run`` executes it and records the outcome; ``recover``
    re-queues abandoned jobs; ``pending`` counts queued + running jobs (for ``wait_idle``)."""

    def __init__(
        self,
        *,
        claim: Callable[[], Any],
        run: Callable[[Any], None],
        pending: Callable[[], int],
        recover: Callable[[], list[str]] | None = None,
        poll_seconds: float = 2.0,
        recover_seconds: float = 30.0,
    ) -> None:
        self._claim = claim
        self._run = run
        self.pending = pending
        self._recover = recover
        self._poll = poll_seconds
        self._recover_every = recover_seconds
        self._next_recover = 0.0
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.jobs_run = 0

    def _maybe_recover(self) -> None:
        if self._recover is None or time.monotonic() < self._next_recover:
            return
        self._next_recover = time.monotonic() + self._recover_every
        try:
            requeued = self._recover()
        except Exception:  # noqa: BLE001 - a database blip must not kill the worker; retried next round
            log.exception("recovering abandoned jobs failed")
            return
        if requeued:
            log.warning("re-queued %d abandoned job(s): %s", len(requeued), ", ".join(requeued))

    def run_forever(self) -> None:
        while not self.stopping.is_set():
            self._maybe_recover()
            try:
                lease = self._claim()
            except Exception:  # noqa: BLE001 - database restarting: wait and claim again
                log.exception("claiming a job failed; retrying")
                lease = None
            if lease is None:
                self.wake.wait(self._poll)
                self.wake.clear()
                continue
            self._run(lease)
            self.jobs_run += 1

    def drain(self) -> None:
        """Run jobs until none is runnable right now (or stopped)."""
        self._next_recover = 0.0
        self._maybe_recover()
        while not self.stopping.is_set():
            lease = self._claim()
            if lease is None:
                return
            self._run(lease)
            self.jobs_run += 1


class ThreadJobQueue:
    """The embedded default: one daemon thread of the web process runs the ``WorkerLoop``."""

    def __init__(self, loop: WorkerLoop) -> None:
        self._loop = loop
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._loop.stopping.clear()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name="edgemart-job-worker", daemon=True
            )
            self._thread.start()

    def enqueue(self, job_id: str) -> None:
        self._loop.wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._loop.stopping.set()
        self._loop.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is queued or running (True) or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._loop.pending() == 0:
                return True
            self._loop.wake.set()
            time.sleep(0.05)
        return self._loop.pending() == 0


class NoWorker:
    """For processes that must not run jobs (CLI tools, a web tier with separate workers)."""

    def start(self) -> None:
        return None

    def enqueue(self, job_id: str) -> None:
        return None

    def stop(self, timeout: float = 10.0) -> None:
        return None

    def wait_idle(self, timeout: float) -> bool:
        return False
