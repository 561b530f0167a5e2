"""Start real servers (PostgreSQL, SeaweedFS) on 127.0.0.1 for tests and `make scale-test`."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable


def wait_for_signal(alive: Callable[[], bool] = lambda: True) -> bool:
    """Block until SIGTERM/SIGINT (True) or until ``alive()`` turns false (False): the foreground loop of
    ``python -m store.localservers.<server>``."""
    stop = False

    def _term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    while not stop and alive():
        time.sleep(0.2)
    return stop
