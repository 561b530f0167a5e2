"""The bench's own helpers: a measurement that leaves a child process behind hangs `edgemart bench` at exit
(multiprocessing joins live children forever), so each floor is checked to return and leave nothing running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = """
import multiprocessing as mp
import numpy as np
from bench.chain import floor_memcpy_ms, floor_socket_rtt_ms
rtt = floor_socket_rtt_ms(2)
copy = floor_memcpy_ms(np.ones(1024, dtype=np.float32), 2)
assert rtt > 0 and copy > 0, (rtt, copy)
assert not mp.active_children(), mp.active_children()
print("done")
"""


def test_the_floor_measurements_return_and_leave_no_child() -> None:
    # Before the fix the forked echo child kept the parent's end of the socket pair open, never saw EOF, and
    # the interpreter hung at exit: a timeout here is the failure.
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]
