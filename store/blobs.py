"""Blob storage behind one interface (``BlobStore``) with a filesystem backend.

Keys are content hashes (``sha256-<hex>``) or generated ids, never names a user supplied; writes are
atomic (temp file in the same directory, fsync, rename) so a reader never sees half a blob."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from edgemart.core.errors import NotFoundError, UsageError

_KEY = re.compile(r"^(sha256-[0-9a-f]{64}|id-[0-9a-f]{32})\Z")
CHUNK = 1 << 20
# A temp file no write has touched for this long belongs to a put that died (a store killed mid-upload);
# a live put_stream writes every CHUNK, so the sweep never races one, even from another process.
STALE_TEMP_SECONDS = 3600


class TooLarge(UsageError):
    """An upload exceeded its size limit."""

    http_status = 413
    code = "too_large"


@dataclass(frozen=True)
class PutResult:
    key: str
    size: int
    sha256: str  # hex digest of the content
    created: bool  # False when identical content was already stored under this key


@runtime_checkable
class BlobStore(Protocol):
    """Where uploaded models, sealed builds and quality reports live."""

    def put_stream(self, stream: BinaryIO, *, max_bytes: int, key: str | None = None) -> PutResult: ...

    def put_bytes(self, data: bytes, *, key: str | None = None) -> PutResult: ...

    def get(self, key: str) -> bytes: ...

    def open(self, key: str) -> BinaryIO: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def modified(self, key: str) -> float:
        """When the blob was last written, or last put again with the same content (Unix seconds).
        The orphan sweep spares young blobs: an upload puts its blob before its row commits."""
        ...

    def list(self) -> Iterator[str]: ...

    def sweep_temp(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        """Remove what puts killed midway left (temp files, pending multipart uploads); how many."""
        ...


def copy_limited(stream: BinaryIO, out: BinaryIO, max_bytes: int) -> tuple[int, Any]:
    """Copy ``stream`` to ``out`` in CHUNKs, hashing; TooLarge past ``max_bytes``. (size, sha256 object)."""
    digest = hashlib.sha256()
    size = 0
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return size, digest
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"upload exceeds the limit of {max_bytes} bytes")
        digest.update(chunk)
        out.write(chunk)


def new_blob_id() -> str:
    """A generated key for content that is not addressed by its hash."""
    return "id-" + secrets.token_hex(16)


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise UsageError(f"invalid blob key {key!r}")
    return key


class FileBlobStore:
    """Blobs as files under ``root/<first two hex>/<key>``: directories 0700, files 0600 (mkstemp's mode)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(mode=0o700, exist_ok=True)
        self.sweep_temp()

    def sweep_temp(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        """Delete temp files left by puts that never finished (the process was killed); returns how many."""
        cutoff = time.time() - older_than
        removed = 0
        for entry in os.scandir(self._tmp):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def _path(self, key: str) -> Path:
        check_key(key)
        shard = key.split("-", 1)[1][:2]
        return self.root / shard / key

    def put_stream(self, stream: BinaryIO, *, max_bytes: int, key: str | None = None) -> PutResult:
        """Copy ``stream`` in, refusing (TooLarge) past ``max_bytes``; keyed by content hash unless ``key``."""
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as out:
                size, digest = copy_limited(stream, out, max_bytes)
                out.flush()
                os.fsync(out.fileno())
            final_key = check_key(key) if key is not None else "sha256-" + digest.hexdigest()
            path = self._path(final_key)
            if path.exists():
                os.unlink(tmp)
                os.utime(path)  # in use again: the orphan sweep judges age by modification time
                return PutResult(final_key, size, digest.hexdigest(), created=False)
            path.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(tmp, path)
            return PutResult(final_key, size, digest.hexdigest(), created=True)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put_bytes(self, data: bytes, *, key: str | None = None) -> PutResult:
        import io

        return self.put_stream(io.BytesIO(data), max_bytes=len(data), key=key)

    def get(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {key} not found") from None

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {key} not found") from None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def modified(self, key: str) -> float:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            raise NotFoundError(f"blob {key} not found") from None

    def list(self) -> Iterator[str]:
        for shard in sorted(self.root.iterdir()):
            if shard.is_dir() and shard.name != ".tmp":
                for f in sorted(shard.iterdir()):
                    if _KEY.match(f.name):
                        yield f.name
