"""File primitives: private files, atomic replace with fsync, durable appends, a process lock.

The one place edgemart writes files that must survive a crash whole: the device's state, anchor
and keys, and the store's and CLIs' key files, index and outputs all go through here."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700

# TEST-ONLY fault injection (tests/faults/): EDGEMART_FAULT_AT="<op>:<file name>:<point>[:<n>]" makes the
# n-th (default 1st) matching call SIGKILL its own process at that point, to prove every write is crash-safe.
# op:point is atomic_write:before_replace | atomic_write:after_replace (before the directory fsync) |
# append:before | append:after, or a named point of fault_point() (store:upload:before_commit). Read once at import; when unset the hook costs one `is None` test.
_FAULT_AT = os.environ.get("EDGEMART_FAULT_AT") or None
_fault_hits = 0


def _fault_point(op: str, path: Path, point: str) -> None:
    global _fault_hits
    assert _FAULT_AT is not None
    want_op, want_name, want_point, *count = _FAULT_AT.split(":")
    if (want_op, want_name, want_point) != (op, Path(path).name, point):
        return
    _fault_hits += 1
    if _fault_hits == int(count[0] if count else 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fault_point(op: str, name: str, point: str) -> None:
    """A named crash point outside this module (e.g. the store between a blob put and its row commit);
    free when EDGEMART_FAULT_AT is unset."""
    if _FAULT_AT is not None:
        _fault_point(op, Path(name), point)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write(
    path: Path,
    data: bytes | bytearray | memoryview | Callable[[BinaryIO], object],
    *,
    mode: int = PRIVATE_FILE,
) -> None:
    """Write ``path`` so a reader sees the old or the new file, never a mix, even after a crash.

    ``data`` is the bytes, or a callable that writes them to the file it is given (streaming, for
    outputs too large to hold). Temp file in the same directory + fsync + os.replace + fsync of the
    directory; the temp file is removed on any failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        if callable(data):
            with os.fdopen(fd, "wb", closefd=False) as fh:
                data(fh)
        else:
            _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    if _FAULT_AT is not None:
        _fault_point("atomic_write", path, "before_replace")
    os.replace(tmp, path)
    if _FAULT_AT is not None:
        _fault_point("atomic_write", path, "after_replace")
    fsync_dir(path.parent)


def create_private(path: Path, data: bytes) -> None:
    """Create a new 0600 file; refuses to overwrite (O_EXCL)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def append_durable(path: Path, line: bytes) -> None:
    """Append one line and fsync before returning (the usage log is evidence; it must survive a crash)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
    try:
        if _FAULT_AT is not None:
            _fault_point("append", path, "before")
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, line)
            os.fsync(fd)
        except OSError:
            # Disk full (or an I/O error) after part of the line went out: cut the torn line off so the file
            # still ends with a whole record (callers append under the device lock, so nobody else wrote).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
                os.fsync(fd)
            raise
        if _FAULT_AT is not None:
            _fault_point("append", path, "after")
    finally:
        os.close(fd)


def read_tail(path: Path, size: int) -> bytes:
    """The last ``size`` bytes of a file (all of it when shorter); b"" when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return b""
    try:
        end = os.fstat(fd).st_size
        start = max(0, end - size)
        return os.pread(fd, end - start, start)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[int]:
    """Exclusive advisory lock shared by every process using this device directory."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing the descriptor releases the lock
