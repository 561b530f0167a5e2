"""Background jobs behind one interface (``JobQueue``) with an in-process thread worker.

Jobs live in the database; the queue only wakes a worker. A worker claims a job with one atomic
UPDATE (queued -> running), so several processes can share a database without running a job twice."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

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


class ThreadJobQueue:
    """One daemon thread that claims queued jobs from the database and runs them one at a time.

    ``claim`` returns the id of a job it atomically moved to running (or None); ``run`` executes it and
    records the outcome; ``pending`` counts queued + running jobs (for ``wait_idle``)."""

    def __init__(
        self,
        *,
        claim: Callable[[], str | None],
        run: Callable[[str], None],
        pending: Callable[[], int],
        poll_seconds: float = 2.0,
    ) -> None:
        self._claim = claim
        self._run = run
        self._pending = pending
        self._poll = poll_seconds
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="edgemart-job-worker", daemon=True)
            self._thread.start()

    def enqueue(self, job_id: str) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is queued or running (True) or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._pending() == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
        return self._pending() == 0

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._poll)
            self._wake.clear()
            while not self._stopping.is_set():
                job_id = self._claim()
                if job_id is None:
                    break
                self._run(job_id)


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
