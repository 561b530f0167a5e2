"""Device killed (SIGKILL) at every write point of a licensed run: the usage-log append, the anchor and the
state replace. Write points are reached deterministically through the test-only EDGEMART_FAULT_AT hook in
edge_runtime/fileio.py. Afterwards the device rolls forward exactly or refuses: it never resets, never grants
a run, and no usage record is lost or duplicated."""

from __future__ import annotations

import signal

import pytest
from fault_helpers import Licensed, run_device

MAX_RUNS = 100
RESERVE_BLOCK = 64  # edge_runtime.Policy default: the first run reserves this many, close() releases the rest
RUNS = 3

# A run of RUNS then close() makes two commits (reserve, release), each: log append, anchor, state.
POINTS = [
    ("append", "usage.log", "before"),
    ("append", "usage.log", "after"),
    ("atomic_write", "{anchor}", "before_replace"),
    ("atomic_write", "{anchor}", "after_replace"),
    ("atomic_write", "state.bin", "before_replace"),
    ("atomic_write", "state.bin", "after_replace"),
]


def _spec(licensed: Licensed, op: str, name: str, point: str, nth: int) -> str:
    return f"{op}:{name.format(anchor=licensed.device_id)}:{point}:{nth}"


def _check_ledger(licensed: Licensed, *, records: int) -> dict:
    """The log verifies, its seq runs 0..records-1 without gaps or repeats, and the state matches it."""
    report = licensed.open().verify_log()
    assert report["ok"], report
    assert report["records"] == records, report
    assert report["matches_state"], report
    assert report["state_records"] == records
    return report


def _used_after(records: int) -> int:
    """Runs the license has used after the first ``records`` commits of the reserve/release pair."""
    return {0: 0, 1: RESERVE_BLOCK, 2: RUNS}[records]


@pytest.mark.parametrize("nth", [1, 2], ids=["reserve", "release"])
@pytest.mark.parametrize(("op", "name", "point"), POINTS, ids=["-".join(p[::2]) for p in POINTS])
def test_kill_at_each_write_point_rolls_forward_exactly(licensed: Licensed, op, name, point, nth):
    assert licensed.runs_left() == MAX_RUNS
    proc = run_device(licensed, RUNS, EDGEMART_FAULT_AT=_spec(licensed, op, name, point, nth))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ran = proc.stdout.count("ran")
    assert ran == (0 if nth == 1 else RUNS)  # the reservation is durable before any run is computed
    # Commit nth reached the log unless the kill came before its append.
    records = nth - 1 if (op, point) == ("append", "before") else nth
    report = _check_ledger(licensed, records=records)
    assert sum(report["runs_by_license"].values()) == _used_after(records)
    left = licensed.runs_left()
    assert left == MAX_RUNS - _used_after(records)
    assert left <= MAX_RUNS - ran  # never a run granted back that was computed
    # The device keeps working from there: one more licensed session adds exactly its two records.
    again = run_device(licensed, 2)
    assert again.returncode == 0, again.stderr
    _check_ledger(licensed, records=records + 2)
    assert licensed.runs_left() == left - 2


SECOND = [p for p in POINTS if p[0] == "atomic_write"]


@pytest.mark.parametrize(("op", "name", "point"), SECOND, ids=["-".join(p[::2]) for p in SECOND])
def test_kill_during_the_roll_forward_itself(licensed: Licensed, op, name, point):
    """Crash right after the reserve record is logged, then crash again while the next open rolls it forward."""
    first = run_device(licensed, RUNS, EDGEMART_FAULT_AT=_spec(licensed, "append", "usage.log", "after", 1))
    assert first.returncode == -signal.SIGKILL and first.stdout == ""
    second = run_device(licensed, RUNS, EDGEMART_FAULT_AT=_spec(licensed, op, name, point, 1))
    assert second.returncode == -signal.SIGKILL and second.stdout == "", second.stderr
    report = _check_ledger(licensed, records=1)
    assert report["runs_by_license"] == {licensed.claims().license_id: RESERVE_BLOCK}
    assert licensed.runs_left() == MAX_RUNS - RESERVE_BLOCK


def test_a_torn_state_replacement_leaves_only_a_stray_temp_file(licensed: Licensed):
    """Killed between writing the new state's temp file and renaming it: the temp file stays beside the state,
    is never read as state, and the next commit is unaffected."""
    proc = run_device(licensed, RUNS, EDGEMART_FAULT_AT="atomic_write:state.bin:before_replace:1")
    assert proc.returncode == -signal.SIGKILL
    strays = sorted(p.name for p in licensed.device_dir.glob(".state.bin.*.tmp"))
    assert len(strays) == 1
    _check_ledger(licensed, records=1)
    assert run_device(licensed, 1).returncode == 0
    _check_ledger(licensed, records=3)
