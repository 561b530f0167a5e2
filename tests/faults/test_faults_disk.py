"""Disk full, a file-size limit that tears the usage-log append, and a read-only device directory: runs are
refused with a one-line error (no traceback), the ledger stays consistent, and once the disk is writable
again the device works on without a reset and without gaining a run."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fault_helpers import Licensed, make_licensed, run_device

import drm


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a size-limited tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()!r}"
        )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def data(tmp_path: Path, digits_test: Path) -> Path:
    path = tmp_path / "five.npz"
    with np.load(digits_test) as d:
        np.savez(path, x=d["x"][:5], y=d["y"][:5])
    return path


def _eval(lic: Licensed, data: Path) -> subprocess.CompletedProcess[str]:
    """`edgemart device eval` (sideload form) on five samples: 3 warm-up + 5 licensed runs."""
    return subprocess.run(
        [sys.executable, "-m", "edgemart", "device", "eval", "--device-dir", str(lic.device_dir)]
        + [
            "--build",
            str(lic.build),
            "--license",
            str(lic.license),
            "--data",
            str(data),
            "--quiet",
            "--json",
        ],
        env=lic.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_one_line_refusal(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # an OSError: exit 2 (edgemart/cli.py)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgemart: "), proc.stderr
    assert any(w in lines[0] for w in words), lines[0]


def _ledger(lic: Licensed) -> dict:
    report = lic.open().verify_log()
    assert report["ok"] and report["matches_state"], report
    return report


def _chain(lic: Licensed) -> drm.LogReport:
    """The usage log checked on its own (no state load, so nothing is written)."""
    keys = lic.open().keys
    data = (lic.device_dir / "usage.log").read_bytes()
    return drm.verify_log(data, keys.sign.public_key(), device_id=lic.device_id)


def _fill(directory: Path) -> Path:
    """Write a filler file until the file system is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0")
    finally:
        os.close(fd)
    return filler


def _setup_on(fs: Path, tmp_path: Path, authority, model: bytes) -> Licensed:
    lic = make_licensed(tmp_path, authority, model, device_dir=fs / "device")
    # Move the rollback anchor onto the small file system too: every ledger write then hits it.
    anchors = fs / "anchors"
    anchors.mkdir(mode=0o700)
    for f in lic.anchor_dir.iterdir():
        (anchors / f.name).write_bytes(f.read_bytes())
        f.unlink()
    lic.anchor_dir = anchors
    return lic


def test_disk_full_refuses_cleanly_then_works_without_reset_or_gain(
    small_fs: Path, tmp_path: Path, authority, digits_base: Path, data: Path
):
    lic = _setup_on(small_fs, tmp_path, authority, digits_base.read_bytes())
    first = _eval(lic, data)
    assert first.returncode == 0, first.stderr
    before = _ledger(lic)
    left_before = lic.runs_left()
    filler = _fill(small_fs)

    full = _eval(lic, data)
    _assert_one_line_refusal(full, os.strerror(errno.ENOSPC))
    # Nothing half-written: the chain verifies, with at most the one record whose commit the full disk cut
    # short (its anchor/state write failed; the next load rolls it forward once there is space).
    during = _chain(lic)
    assert during.ok, during.reason
    assert len(during.records) in (before["records"], before["records"] + 1)

    filler.unlink()
    assert _ledger(lic)["records"] == len(during.records)
    assert lic.runs_left() <= left_before
    again = _eval(lic, data)
    assert again.returncode == 0, again.stderr
    after = _ledger(lic)
    assert after["records"] > len(during.records)
    assert lic.runs_left() < left_before  # used runs stay used: no reset


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_torn_usage_log_append_is_cut_back_not_left_to_brick_the_device(licensed: Licensed):
    """RLIMIT_FSIZE lets only the first 100 bytes of the next record reach usage.log (then EFBIG): the append
    must not leave a partial line (the ledger refuses a log ending in one, for good)."""
    assert run_device(licensed, 2).returncode == 0
    size = (licensed.device_dir / "usage.log").stat().st_size
    before = _ledger(licensed)
    left = licensed.runs_left()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from edgemart.cli import main; sys.exit(main())"]
        + ["device", "eval", "--device-dir", str(licensed.device_dir), "--build", str(licensed.build)]
        + ["--license", str(licensed.license), "--data", str(_tiny(licensed)), "--quiet"],
        env=licensed.env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_file_size(size + 100),
    )
    _assert_one_line_refusal(proc, os.strerror(errno.EFBIG))
    assert (licensed.device_dir / "usage.log").stat().st_size == size
    assert _ledger(licensed)["records"] == before["records"]
    assert licensed.runs_left() == left
    assert run_device(licensed, 1).returncode == 0
    assert _ledger(licensed)["records"] == before["records"] + 2


def _tiny(lic: Licensed) -> Path:
    path = lic.build.parent / "one.npz"
    np.savez(path, x=np.zeros((1, 64), np.float32))
    return path


def test_read_only_device_dir_is_a_refusal_not_a_crash(
    small_fs: Path, tmp_path: Path, authority, digits_base: Path, data: Path
):
    lic = _setup_on(small_fs, tmp_path, authority, digits_base.read_bytes())
    assert _eval(lic, data).returncode == 0
    before = _ledger(lic)
    left = lic.runs_left()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        ro = _eval(lic, data)
        _assert_one_line_refusal(ro, os.strerror(errno.EROFS))
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    assert _ledger(lic)["records"] == before["records"]
    assert lic.runs_left() == left
    assert _eval(lic, data).returncode == 0
    assert lic.runs_left() < left
