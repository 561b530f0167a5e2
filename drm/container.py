# Why this is one module: the container format end to end (header, chunking, AEAD, streaming open): one normative format, one module.
"""The sealed container (.emdl): a model build encrypted in AES-256-GCM chunks.

Layout (normative spec: docs/FORMAT.md): MAGIC | version u8 | header_len u32be | header
(canonical JSON) | chunks. Each chunk is ciphertext||tag; nonce = prefix(8) || index u32be;
AAD = SHA-256(prefix bytes + header) || index u32be || final u8."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import os
import re
import stat
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from drm._canonical import FormatError, b64d, b64e, dumps, exact_keys, field, loads
from edgemart.core.errors import IntegrityError, UsageError

MAGIC = b"\x89EMDL\r\n\x1a"
VERSION = 1
AEAD_ID = "AES-256-GCM"
TAG_LEN = 16
KEY_LEN = 32
_PREFIX = struct.Struct(">8sBI")  # magic, version, header length
_BUILD_HASH = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_TARGET = re.compile(r"^[A-Za-z0-9._:\-]{1,64}\Z")
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9.+\-]{0,62}/[a-z0-9][a-z0-9.+\-]{0,62}\Z")


@dataclass(frozen=True)
class ContainerLimits:
    """Security-relevant bounds, checked before anything is allocated or read."""

    max_header_bytes: int = 16 * 1024
    max_chunk_size: int = 16 * 1024 * 1024
    min_chunk_size: int = 4 * 1024
    max_plaintext_bytes: int = 4 * 1024**3
    default_chunk_size: int = 1024 * 1024


DEFAULT_LIMITS = ContainerLimits()


@dataclass(frozen=True)
class ContainerHeader:
    build_hash: str
    target: str
    chunk_size: int
    plaintext_len: int
    nonce_prefix: bytes
    aead: str = AEAD_ID
    media_type: str = "application/octet-stream"

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.plaintext_len // self.chunk_size))

    def to_dict(self) -> dict[str, object]:
        return {
            "aead": self.aead,
            "build_hash": self.build_hash,
            "chunk_size": self.chunk_size,
            "media_type": self.media_type,
            "nonce_prefix": b64e(self.nonce_prefix),
            "plaintext_len": self.plaintext_len,
            "target": self.target,
            "v": VERSION,
        }

    def to_bytes(self) -> bytes:
        return self._encoded

    @functools.cached_property
    def _encoded(self) -> bytes:
        """The header's bytes, encoded once per header (a frozen value; canonical JSON costs ~0.1 ms)."""
        body = dumps(self.to_dict())
        return _PREFIX.pack(MAGIC, VERSION, len(body)) + body

    @property
    def sealed_len(self) -> int:
        return len(self._encoded) + self.plaintext_len + self.n_chunks * TAG_LEN

    @classmethod
    def parse(cls, data: bytes, limits: ContainerLimits = DEFAULT_LIMITS) -> tuple[ContainerHeader, int]:
        """Parse the header at the start of ``data``; return it and the offset of chunk 0."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise FormatError("container: expected bytes")
        if len(data) < _PREFIX.size:
            raise FormatError("container: too short for a header")
        magic, version, hlen = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise FormatError("container: not an edgemart container (bad magic)")
        if version != VERSION:
            raise FormatError(f"container: unsupported version {version}")
        if hlen > limits.max_header_bytes:
            raise FormatError(f"container: header length {hlen} exceeds {limits.max_header_bytes}")
        end = _PREFIX.size + hlen
        if len(data) < end:
            raise FormatError("container: truncated header")
        return _parse_body(bytes(data[_PREFIX.size : end]), limits), end


@functools.lru_cache(maxsize=64)
def _parse_body(body: bytes, limits: ContainerLimits) -> ContainerHeader:
    """The header JSON checked and parsed: a pure function of its bytes (and the limits), remembered so a
    device opening the same build again does not parse its header twice per open. Errors are not cached."""
    obj = loads(body, max_size=limits.max_header_bytes, what="container header")
    what = "container header"
    exact_keys(
        obj,
        {
            "aead",
            "build_hash",
            "chunk_size",
            "media_type",
            "nonce_prefix",
            "plaintext_len",
            "target",
            "v",
        },
        what=what,
    )
    if field(obj, "v", int, what=what) != VERSION:
        raise FormatError("container header: version mismatch")
    aead = field(obj, "aead", str, what=what)
    if aead != AEAD_ID:  # pinned: the header never chooses the algorithm
        raise FormatError(f"container header: algorithm {aead!r} is not allowed")
    chunk = field(obj, "chunk_size", int, what=what)
    if not limits.min_chunk_size <= chunk <= limits.max_chunk_size:
        raise FormatError(f"container header: chunk_size {chunk} out of bounds")
    plen = field(obj, "plaintext_len", int, what=what)
    if not 0 <= plen <= limits.max_plaintext_bytes:
        raise FormatError(f"container header: plaintext_len {plen} out of bounds")
    build_hash = field(obj, "build_hash", str, what=what)
    if not _BUILD_HASH.match(build_hash):
        raise FormatError("container header: build_hash must be sha256:<64 hex>")
    target = field(obj, "target", str, what=what)
    media_type = field(obj, "media_type", str, what=what)
    if not _TARGET.match(target) or not _MEDIA_TYPE.match(media_type):
        raise FormatError("container header: target or media_type malformed")
    prefix = b64d(field(obj, "nonce_prefix", str, what=what), what="nonce_prefix", max_len=8)
    if len(prefix) != 8:
        raise FormatError("container header: nonce_prefix must be 8 bytes")
    return ContainerHeader(build_hash, target, chunk, plen, prefix, aead, media_type)


def _aad(header_digest: bytes, index: int, final: bool) -> bytes:
    return header_digest + struct.pack(">IB", index, 1 if final else 0)


# One long-lived helper thread per process for the work an open does beside the caller: the build hash of a
# large build (while the backend opens) and zeroing plaintext after use. A thread per open cost 0.2-1 ms to
# start. Recreated in a forked child (the parent's thread does not exist there). (Decrypting half the chunks
# there too was measured slower: both threads then fault in fresh pages of the one buffer.)
_worker_lock = threading.Lock()
_worker_pool: ThreadPoolExecutor | None = None


def _worker() -> ThreadPoolExecutor:
    global _worker_pool
    with _worker_lock:
        if _worker_pool is None:
            _worker_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgemart-drm")
        return _worker_pool


def _beside(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run ``fn(*args)`` on the helper thread; inline (a finished Future) once the interpreter is shutting down
    and the executor takes no more work."""
    try:
        return _worker().submit(fn, *args)
    except RuntimeError:
        done: Future[Any] = Future()
        try:
            done.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the caller through the Future, as submit does
            done.set_exception(exc)
        return done


def _forget_worker_in_child() -> None:
    global _worker_pool, _worker_lock
    _worker_lock = threading.Lock()
    _worker_pool = None


os.register_at_fork(after_in_child=_forget_worker_in_child)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def generate_content_key() -> bytes:
    """A fresh random 256-bit content-encryption key (CEK), one per build."""
    return AESGCM.generate_key(bit_length=256)


def _check_key(key: bytes) -> AESGCM:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
        raise UsageError("content key must be 32 bytes")
    return AESGCM(bytes(key))


def _new_header(
    *,
    build_hash: str,
    target: str,
    media_type: str,
    plaintext_len: int,
    chunk_size: int | None,
    nonce_prefix: bytes | None,
    limits: ContainerLimits,
) -> tuple[ContainerHeader, bytes]:
    if nonce_prefix is not None and (not isinstance(nonce_prefix, bytes) or len(nonce_prefix) != 8):
        raise UsageError("nonce_prefix must be 8 bytes")
    header = ContainerHeader(
        build_hash=build_hash,
        target=target,
        chunk_size=chunk_size or limits.default_chunk_size,
        plaintext_len=plaintext_len,
        nonce_prefix=os.urandom(8) if nonce_prefix is None else nonce_prefix,
        media_type=media_type,
    )
    head = header.to_bytes()
    ContainerHeader.parse(head, limits)  # the writer applies the same validation as a reader
    return header, head


# A source is ``read(n) -> bytes`` or a binary file; a sink is ``write(bytes)`` or a binary file.
Source = Callable[[int], bytes] | BinaryIO
Sink = Callable[[bytes], object] | BinaryIO


def _read_exact(source: Source, buf: memoryview) -> int:
    """Fill ``buf`` from a file object (short reads are retried); return how many bytes arrived."""
    got = 0
    while got < len(buf):
        n = source.readinto(buf[got:])  # type: ignore[union-attr]
        if not n:
            break
        got += n
    return got


def seal_stream(
    read: Source,
    write: Sink,
    *,
    key: bytes,
    plaintext_len: int,
    build_hash: str,
    target: str,
    media_type: str = "application/octet-stream",
    chunk_size: int | None = None,
    limits: ContainerLimits = DEFAULT_LIMITS,
    nonce_prefix: bytes | None = None,
) -> ContainerHeader:
    """Seal ``plaintext_len`` bytes from ``read`` into ``write``, one chunk in memory at a time.

    ``read`` is ``read(n) -> bytes`` or a binary file (read with ``readinto`` into one reused
    buffer); ``write`` is ``write(bytes)`` or a binary file (fed from one reused buffer). The caller
    supplies ``build_hash`` since the header comes first; the bytes actually read are hashed and a
    mismatch (input changed under us) raises UsageError after writing, so write to a temp file.
    ``nonce_prefix`` is a test-only hook for known-answer vectors; production always uses random."""
    aead = _check_key(key)
    if not isinstance(plaintext_len, int) or plaintext_len < 0:
        raise UsageError("plaintext_len must be a non-negative integer")
    header, head = _new_header(
        build_hash=build_hash,
        target=target,
        media_type=media_type,
        plaintext_len=plaintext_len,
        chunk_size=chunk_size,
        nonce_prefix=nonce_prefix,
        limits=limits,
    )
    digest = hashlib.sha256(head).digest()
    hasher = hashlib.sha256()
    # File objects get one reused buffer each way; callables get fresh bytes (they may keep them).
    pull: Callable[[int], bytes] | None = read if callable(read) else None
    source: Any = None if callable(read) else read
    emit: Callable[[Any], object] = write if callable(write) else write.write
    inbuf = None if pull is not None else memoryview(bytearray(header.chunk_size))
    outbuf = None if callable(write) else memoryview(bytearray(header.chunk_size + TAG_LEN))
    emit(head)
    remaining = plaintext_len
    n_chunks = header.n_chunks
    for index in range(n_chunks):
        size = min(header.chunk_size, remaining)
        chunk: bytes | memoryview
        if inbuf is not None:
            chunk = inbuf[:size]
            got = _read_exact(source, chunk) if size else 0
        else:
            assert pull is not None
            chunk = pull(size) if size else b""
            got = len(chunk)
        if got != size:
            raise UsageError("input ended before plaintext_len bytes were read")
        hasher.update(chunk)
        remaining -= size
        nonce, aad = _nonce(header.nonce_prefix, index), _aad(digest, index, index == n_chunks - 1)
        if outbuf is not None:
            out = outbuf[: size + TAG_LEN]
            aead.encrypt_into(nonce, chunk, aad, out)
            emit(out)
        else:
            emit(aead.encrypt(nonce, chunk, aad))
    if "sha256:" + hasher.hexdigest() != build_hash:
        raise UsageError("the sealed input does not match build_hash (did the file change while sealing?)")
    return header


def seal(
    plaintext: bytes | bytearray | memoryview,
    *,
    key: bytes,
    target: str,
    media_type: str = "application/octet-stream",
    chunk_size: int | None = None,
    limits: ContainerLimits = DEFAULT_LIMITS,
    nonce_prefix: bytes | None = None,
) -> bytes:
    """Seal a build held in memory; returns the container bytes.

    ``nonce_prefix`` is a test-only hook for known-answer vectors; leave it None."""
    aead = _check_key(key)
    view = memoryview(plaintext).cast("B")
    header, head = _new_header(
        build_hash="sha256:" + hashlib.sha256(view).hexdigest(),
        target=target,
        media_type=media_type,
        plaintext_len=len(view),
        chunk_size=chunk_size,
        nonce_prefix=nonce_prefix,
        limits=limits,
    )
    digest = hashlib.sha256(head).digest()
    size, n_chunks, prefix = header.chunk_size, header.n_chunks, header.nonce_prefix
    # Slices of a memoryview are zero-copy; each chunk is encrypted straight from the caller's buffer.
    parts = [head]
    parts.extend(
        aead.encrypt(_nonce(prefix, i), view[i * size : (i + 1) * size], _aad(digest, i, i == n_chunks - 1))
        for i in range(n_chunks)
    )
    return b"".join(parts)


def read_header(prefix: bytes, limits: ContainerLimits = DEFAULT_LIMITS) -> ContainerHeader:
    """The (unauthenticated until opened) header of a container, for routing and display."""
    return ContainerHeader.parse(prefix, limits)[0]


def header_size(prefix: bytes, limits: ContainerLimits = DEFAULT_LIMITS) -> int:
    """Bytes of header (prefix + JSON) given at least the first 13 bytes; FormatError if implausible."""
    if len(prefix) < _PREFIX.size:
        raise FormatError("container: too short for a header")
    magic, version, hlen = _PREFIX.unpack_from(prefix)
    if magic != MAGIC or version != VERSION:
        raise FormatError("container: not an edgemart container (bad magic or version)")
    if hlen > limits.max_header_bytes:
        raise FormatError(f"container: header length {hlen} exceeds {limits.max_header_bytes}")
    return _PREFIX.size + hlen


PREFIX_SIZE = _PREFIX.size


def _open(
    pull: Callable[[int], bytes | memoryview],
    pull_into: Callable[[memoryview], int] | None,
    *,
    key: bytes,
    expected_build_hash: str | None,
    limits: ContainerLimits,
    verify_build_hash: bool,
    total: int | None = None,
) -> tuple[ContainerHeader, bytearray]:
    """``total``: the container's length when the source knows it (a buffer, a regular file)."""
    out = bytearray()

    def allocate(n: int) -> memoryview:
        nonlocal out
        out = bytearray(n)
        return memoryview(out)

    header, _ = _open_into(
        pull,
        pull_into,
        key=key,
        expected_build_hash=expected_build_hash,
        limits=limits,
        hasher=hashlib.sha256() if verify_build_hash else None,
        allocate=allocate,
        total=total,
    )
    return header, out


def _open_into(
    pull: Callable[[int], bytes | memoryview],
    pull_into: Callable[[memoryview], int] | None,
    *,
    key: bytes,
    expected_build_hash: str | None,
    limits: ContainerLimits,
    hasher: Any,
    allocate: Callable[[int], memoryview],
    total: int | None = None,
) -> tuple[ContainerHeader, memoryview]:
    """Decrypt every chunk into the buffer ``allocate(plaintext_len)`` returns (called once the first chunk
    has authenticated), feeding ``hasher`` chunk by chunk while each chunk is still in cache; a ``hasher``
    of None leaves the build-hash comparison to the caller. On any failure the buffer is zeroed and the one
    opaque IntegrityError raised."""
    aead = _check_key(key)
    try:
        fixed = bytes(pull(_PREFIX.size))
        end = header_size(fixed, limits)
        head = fixed + bytes(pull(end - _PREFIX.size))
        header, _ = ContainerHeader.parse(head, limits)
    except FormatError:
        raise IntegrityError() from None
    if expected_build_hash is not None and header.build_hash != expected_build_hash:
        raise IntegrityError()
    if total is not None and total != header.sealed_len:
        raise IntegrityError()  # truncated or extended: refused before any allocation or decryption
    digest = hashlib.sha256(head).digest()
    n_chunks, size, prefix = header.n_chunks, header.chunk_size, header.nonce_prefix
    scratch = memoryview(bytearray(size + TAG_LEN)) if pull_into is not None else None
    view = memoryview(b"")
    try:
        remaining = header.plaintext_len
        pos = 0
        for index in range(n_chunks):
            n = min(size, remaining)
            remaining -= n
            if scratch is not None and pull_into is not None:
                blob: bytes | memoryview = scratch[: n + TAG_LEN]
                got = pull_into(blob)  # type: ignore[arg-type]
            else:
                blob = pull(n + TAG_LEN)
                got = len(blob)
            if got != n + TAG_LEN:
                raise IntegrityError()  # truncated
            nonce, aad = _nonce(prefix, index), _aad(digest, index, index == n_chunks - 1)
            if index == 0 and total is not None:
                # The source's length matched the header's, so plaintext_len is bounded by bytes we hold:
                # allocate at once and decrypt chunk 0 in place like the others.
                view = allocate(header.plaintext_len)
                if len(view) != header.plaintext_len or view.readonly:
                    raise UsageError("allocate() must return a writable buffer of plaintext_len bytes")
                aead.decrypt_into(nonce, blob, aad, view[:n])
            elif index == 0:
                # A stream of unknown length: allocate the whole plaintext only once the first chunk
                # authenticates, so a forged header cannot make us reserve plaintext_len bytes.
                first = bytearray(n)
                try:
                    aead.decrypt_into(nonce, blob, aad, first)
                    view = allocate(header.plaintext_len)
                    if len(view) != header.plaintext_len or view.readonly:
                        raise UsageError("allocate() must return a writable buffer of plaintext_len bytes")
                    view[:n] = first
                finally:
                    wipe(first)
            else:
                aead.decrypt_into(nonce, blob, aad, view[pos : pos + n])
            if hasher is not None:
                hasher.update(view[pos : pos + n])
            pos += n
        if len(pull(1)):
            raise IntegrityError()  # trailing bytes: an extended or spliced file
        if hasher is not None and "sha256:" + hasher.hexdigest() != header.build_hash:
            raise IntegrityError()
    except (InvalidTag, IntegrityError, ValueError, MemoryError):
        _zero(view)
        raise IntegrityError() from None
    return header, view


# Below this size the build hash is computed inline: a thread costs more than it hides.
_OVERLAP_MIN_BYTES = 1024 * 1024
T = TypeVar("T")


def open_sealed_into(
    data: bytes | bytearray | memoryview | BinaryIO,
    *,
    key: bytes,
    allocate: Callable[[int], memoryview],
    use: Callable[[memoryview], T],
    discard: Callable[[T], object],
    expected_build_hash: str | None = None,
    limits: ContainerLimits = DEFAULT_LIMITS,
) -> tuple[ContainerHeader, T]:
    """Open a container (in memory, or a binary file read chunk by chunk into one reused buffer) into the
    caller's buffer, hand it to ``use`` and return its result.

    One pass over the ciphertext: every chunk is authenticated (AES-GCM) and decrypted straight into the
    buffer ``allocate(plaintext_len)`` returns (called once the first chunk authenticates; no other copy of
    the plaintext is made). The build hash (SHA-256 of the plaintext) is then computed on a second thread
    while ``use(buffer)`` runs (hashlib releases the GIL), so on two cores it costs no wall time.

    Fail closed: ``use``'s result is returned only when every chunk authenticated **and** the build hash
    matched. Otherwise ``discard(result)`` is called, the buffer is zeroed and the one opaque IntegrityError is
    raised (also when ``use`` itself raised: a build that is not the licensed one is an integrity failure).
    ``use`` therefore sees content that is authenticated under the key but whose hash is still being checked;
    it must keep whatever it derives private until this function returns (building an inference session
    qualifies; writing to disk or a socket does not). The buffer stays the caller's to wipe after success."""
    pull: Callable[[int], bytes | memoryview]
    pull_into: Callable[[memoryview], int] | None = None
    if isinstance(data, (bytes, bytearray, memoryview)):
        whole = memoryview(data).cast("B")
        total: int | None = len(whole)
        pos = 0

        def pull_view(n: int) -> memoryview:
            nonlocal pos
            piece = whole[pos : pos + n]  # zero-copy
            pos += len(piece)
            return piece

        pull = pull_view
    elif hasattr(data, "readinto"):
        fh = data
        total = _file_remaining(fh)
        pull = fh.read

        def read_into(buf: memoryview) -> int:
            return _read_exact(fh, buf)

        pull_into = read_into
    else:
        raise UsageError("open_sealed_into needs bytes or a binary file object")

    plain = memoryview(b"")

    def take(n: int) -> memoryview:
        nonlocal plain
        plain = allocate(n)
        return plain

    small = total is not None and total < _OVERLAP_MIN_BYTES
    inline = hashlib.sha256() if small else None
    header, plain = _open_into(
        pull,
        pull_into,
        key=key,
        expected_build_hash=expected_build_hash,
        limits=limits,
        hasher=inline,
        allocate=take,
        total=total,
    )
    hasher: Future[bool] | None = None
    if not small:
        started = threading.Event()

        def check() -> bool:
            started.set()
            return "sha256:" + hashlib.sha256(plain).hexdigest() == header.build_hash  # GIL released inside

        hasher = _beside(check)
        # Hand the GIL over until the helper is inside sha256 (which runs without it): otherwise it waits for
        # the interpreter's 5 ms switch interval, and takes the GIL from ``use`` at some arbitrary point later.
        started.wait(0.01)
    try:
        result = use(plain)
    except BaseException:
        matched = hasher.result() if hasher is not None else True
        _zero(plain)
        if not matched:
            raise IntegrityError() from None
        raise
    if hasher is not None:
        if not hasher.result():
            try:
                discard(result)
            finally:
                _zero(plain)
            raise IntegrityError()
    return header, result


def open_stream(
    read: Source,
    *,
    key: bytes,
    expected_build_hash: str | None = None,
    limits: ContainerLimits = DEFAULT_LIMITS,
    verify_build_hash: bool = True,
) -> tuple[ContainerHeader, bytearray]:
    """Open a container pulled from ``read`` (``read(n)`` or a binary file) into one fresh buffer.

    Memory: the plaintext plus one chunk. Any failure zeroes the buffer and raises the one
    opaque ``IntegrityError``; nothing partial is ever returned. ``verify_build_hash`` re-hashes the
    plaintext against the header's build hash, which stops a holder of the content key from
    substituting other content; it costs a SHA-256 pass (see docs/FORMAT.md, bench drm.*)."""
    if callable(read):
        return _open(
            read,
            None,
            key=key,
            expected_build_hash=expected_build_hash,
            limits=limits,
            verify_build_hash=verify_build_hash,
        )
    fh = read

    def pull_into(buf: memoryview) -> int:
        return _read_exact(fh, buf)

    return _open(
        fh.read,
        pull_into,
        key=key,
        expected_build_hash=expected_build_hash,
        limits=limits,
        verify_build_hash=verify_build_hash,
        total=_file_remaining(fh),
    )


def _file_remaining(fh: BinaryIO) -> int | None:
    """Bytes from the current position to the end of a regular file; None for pipes and sockets."""
    try:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_size - fh.tell()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def open_sealed(
    data: bytes | bytearray | memoryview | BinaryIO,
    *,
    key: bytes,
    expected_build_hash: str | None = None,
    limits: ContainerLimits = DEFAULT_LIMITS,
    verify_build_hash: bool = True,
) -> tuple[ContainerHeader, bytearray]:
    """Open a whole container (bytes, a binary file object or ``read(n)``); see ``open_stream``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        if not (callable(data) or hasattr(data, "read")):
            raise UsageError("open_sealed needs bytes, a binary file object or a read(n) callable")
        return open_stream(
            data,
            key=key,
            expected_build_hash=expected_build_hash,
            limits=limits,
            verify_build_hash=verify_build_hash,
        )
    whole = memoryview(data).cast("B")
    pos = 0

    def pull(n: int) -> memoryview:
        nonlocal pos
        piece = whole[pos : pos + n]  # zero-copy
        pos += len(piece)
        return piece

    return _open(
        pull,
        None,
        key=key,
        expected_build_hash=expected_build_hash,
        limits=limits,
        verify_build_hash=verify_build_hash,
        total=len(whole),
    )


def wipe(buffer: bytearray | memoryview) -> None:
    """Overwrite a plaintext buffer we own (best effort: Python may hold other copies)."""
    _zero(memoryview(buffer))


def wipe_soon(
    buffer: bytearray | memoryview, *owners: object, then: Callable[[], object] | None = None
) -> None:
    """``wipe`` on the helper thread, off the caller's path (a 10 MB build costs ~0.7 ms to zero); ``owners``
    (the objects whose memory ``buffer`` views) are kept alive until it is done, and ``then()`` runs once the
    buffer is zero. The helper runs its work in order, so a later build hash or wipe there finds this one done."""
    view = memoryview(buffer)
    if view.nbytes < _OVERLAP_MIN_BYTES:
        _zero(view)  # a small buffer is zeroed faster than the helper thread can be woken
        if then is not None:
            then()
    else:
        _beside(_zero_held, view, owners, then)


def _zero_held(view: memoryview, owners: tuple[object, ...], then: Callable[[], object] | None) -> None:
    _zero(view)
    del owners
    if then is not None:
        then()


def _zero(view: memoryview) -> None:
    """Zero a writable buffer in place with one memset (no zero-filled temporary of its size)."""
    if not len(view) or view.readonly:
        return
    flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    try:
        ctypes.memset(ctypes.addressof((ctypes.c_char * len(flat)).from_buffer(flat)), 0, len(flat))
    except (TypeError, ValueError, BufferError):  # not C-contiguous or not exportable: the slow, sure way
        flat[:] = bytes(len(flat))
