"""The sealed container (.emdl): a model build encrypted in AES-256-GCM chunks.

Layout (normative spec: docs/FORMAT.md): MAGIC | version u8 | header_len u32be | header
(canonical JSON) | chunks. Each chunk is ciphertext||tag; nonce = prefix(8) || index u32be;
AAD = SHA-256(prefix bytes + header) || index u32be || final u8."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from drm._canonical import FormatError, b64d, b64e, dumps, exact_keys, field, loads
from drm.errors import IntegrityError, UsageError

MAGIC = b"\x89EMDL\r\n\x1a"
VERSION = 1
AEAD_ID = "AES-256-GCM"
TAG_LEN = 16
KEY_LEN = 32
_PREFIX = struct.Struct(">8sBI")  # magic, version, header length


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
        body = dumps(self.to_dict())
        return _PREFIX.pack(MAGIC, VERSION, len(body)) + body

    @property
    def sealed_len(self) -> int:
        return len(self.to_bytes()) + self.plaintext_len + self.n_chunks * TAG_LEN

    @classmethod
    def parse(cls, data: bytes, limits: ContainerLimits = DEFAULT_LIMITS) -> tuple[ContainerHeader, int]:
        """Parse the header at the start of ``data``; return it and the offset of chunk 0."""
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
        obj = loads(data[_PREFIX.size : end], max_size=limits.max_header_bytes, what="container header")
        what = "container header"
        exact_keys(
            obj,
            {"aead", "build_hash", "chunk_size", "media_type", "nonce_prefix", "plaintext_len", "target", "v"},
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
        if not (build_hash.startswith("sha256:") and len(build_hash) == 71):
            raise FormatError("container header: build_hash must be sha256:<64 hex>")
        target = field(obj, "target", str, what=what)
        media_type = field(obj, "media_type", str, what=what)
        if len(target) > 64 or len(media_type) > 128:
            raise FormatError("container header: target or media_type too long")
        prefix = b64d(field(obj, "nonce_prefix", str, what=what), what="nonce_prefix", max_len=8)
        if len(prefix) != 8:
            raise FormatError("container header: nonce_prefix must be 8 bytes")
        header = cls(build_hash, target, chunk, plen, prefix, aead, media_type)
        return header, end


def _aad(header_digest: bytes, index: int, final: bool) -> bytes:
    return header_digest + struct.pack(">IB", index, 1 if final else 0)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def generate_content_key() -> bytes:
    """A fresh random 256-bit content-encryption key (CEK), one per build."""
    return AESGCM.generate_key(bit_length=256)


def _check_key(key: bytes) -> AESGCM:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
        raise UsageError("content key must be 32 bytes")
    return AESGCM(bytes(key))


def seal_stream(
    read: Callable[[int], bytes],
    write: Callable[[bytes], object],
    *,
    key: bytes,
    plaintext_len: int,
    build_hash: str,
    target: str,
    media_type: str = "application/octet-stream",
    chunk_size: int | None = None,
    limits: ContainerLimits = DEFAULT_LIMITS,
) -> ContainerHeader:
    """Seal ``plaintext_len`` bytes pulled from ``read`` into ``write``, one chunk in memory at a time.

    The caller supplies ``build_hash`` (``sha256:`` of the plaintext) since the header comes first;
    opening recomputes and checks it."""
    aead = _check_key(key)
    header = ContainerHeader(
        build_hash=build_hash,
        target=target,
        chunk_size=chunk_size or limits.default_chunk_size,
        plaintext_len=plaintext_len,
        nonce_prefix=os.urandom(8),
        media_type=media_type,
    )
    head = header.to_bytes()
    ContainerHeader.parse(head, limits)  # the same validation a reader applies
    digest = hashlib.sha256(head).digest()
    write(head)
    remaining = plaintext_len
    for index in range(header.n_chunks):
        size = min(header.chunk_size, remaining)
        chunk = read(size) if size else b""
        if len(chunk) != size:
            raise UsageError("input ended before plaintext_len bytes were read")
        remaining -= size
        final = index == header.n_chunks - 1
        write(aead.encrypt(_nonce(header.nonce_prefix, index), chunk, _aad(digest, index, final)))
    return header


def seal(
    plaintext: bytes,
    *,
    key: bytes,
    target: str,
    media_type: str = "application/octet-stream",
    chunk_size: int | None = None,
    limits: ContainerLimits = DEFAULT_LIMITS,
) -> bytes:
    """Seal a build held in memory; returns the container bytes."""
    view = memoryview(plaintext)
    pos = 0
    out: list[bytes] = []

    def read(n: int) -> bytes:
        nonlocal pos
        piece = view[pos : pos + n]
        pos += n
        return bytes(piece)

    seal_stream(
        read,
        out.append,
        key=key,
        plaintext_len=len(plaintext),
        build_hash="sha256:" + hashlib.sha256(plaintext).hexdigest(),
        target=target,
        media_type=media_type,
        chunk_size=chunk_size,
        limits=limits,
    )
    return b"".join(out)


def read_header(prefix: bytes, limits: ContainerLimits = DEFAULT_LIMITS) -> ContainerHeader:
    """The (unauthenticated until opened) header of a container, for routing and display."""
    return ContainerHeader.parse(prefix, limits)[0]


def _chunks(read: Callable[[int], bytes], header: ContainerHeader) -> Iterator[tuple[int, bytes, bool]]:
    remaining = header.plaintext_len
    for index in range(header.n_chunks):
        size = min(header.chunk_size, remaining)
        remaining -= size
        blob = read(size + TAG_LEN)
        if len(blob) != size + TAG_LEN:
            raise IntegrityError()
        yield index, blob, index == header.n_chunks - 1


def open_stream(
    read: Callable[[int], bytes],
    *,
    key: bytes,
    expected_build_hash: str | None = None,
    limits: ContainerLimits = DEFAULT_LIMITS,
) -> tuple[ContainerHeader, bytearray]:
    """Open a container pulled from ``read`` into one preallocated buffer.

    Memory: the plaintext plus one chunk. Any failure zeroes the buffer and raises the one
    opaque ``IntegrityError``; nothing partial is ever returned."""
    aead = _check_key(key)
    fixed = read(_PREFIX.size)
    if len(fixed) != _PREFIX.size:
        raise IntegrityError()
    try:
        _, _, hlen = _PREFIX.unpack(fixed)
        if hlen > limits.max_header_bytes:
            raise IntegrityError()
        head = fixed + read(hlen)
        header, _ = ContainerHeader.parse(head, limits)
    except FormatError:
        raise IntegrityError() from None
    if expected_build_hash is not None and header.build_hash != expected_build_hash:
        raise IntegrityError()
    digest = hashlib.sha256(head).digest()
    out = bytearray(header.plaintext_len)
    view = memoryview(out)
    pos = 0
    hasher = hashlib.sha256()
    try:
        for index, blob, final in _chunks(read, header):
            n = len(blob) - TAG_LEN
            aead.decrypt_into(_nonce(header.nonce_prefix, index), blob, _aad(digest, index, final), view[pos : pos + n])
            hasher.update(view[pos : pos + n])
            pos += n
        if read(1):
            raise IntegrityError()  # trailing bytes: an extended or spliced file
        if "sha256:" + hasher.hexdigest() != header.build_hash:
            raise IntegrityError()
    except (InvalidTag, IntegrityError, ValueError):
        view[:] = bytes(len(out))
        view.release()
        raise IntegrityError() from None
    view.release()
    return header, out


def open_sealed(
    data: bytes | bytearray | memoryview | BinaryIO,
    *,
    key: bytes,
    expected_build_hash: str | None = None,
    limits: ContainerLimits = DEFAULT_LIMITS,
) -> tuple[ContainerHeader, bytearray]:
    """Open a whole container (bytes or a binary file object); see ``open_stream``."""
    if hasattr(data, "read"):
        return open_stream(data.read, key=key, expected_build_hash=expected_build_hash, limits=limits)  # type: ignore[union-attr]
    view = memoryview(data)  # type: ignore[arg-type]
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        piece = view[pos : pos + n]
        pos += len(piece)
        return bytes(piece)

    return open_stream(read, key=key, expected_build_hash=expected_build_hash, limits=limits)


def wipe(buffer: bytearray) -> None:
    """Overwrite a plaintext buffer we own (best effort: Python may hold other copies)."""
    buffer[:] = bytes(len(buffer))
