"""Attacks on the sealed container: bit flips, truncation, extension, reordering, splicing, header
edits, algorithm substitution, wrong keys, forged sizes. Every one must end in IntegrityError."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import tracemalloc
from typing import Any

import pytest
from drm_testkit import PROPERTY
from hypothesis import given
from hypothesis import strategies as st

import drm
from drm.container import MAGIC, TAG_LEN

KEY = bytes(range(32))
CHUNK = 4096


def _layout(sealed: bytes) -> tuple[int, drm.ContainerHeader]:
    head_len = drm.header_size(sealed[:13])
    return head_len, drm.read_header(sealed[:head_len])


def _chunks(sealed: bytes) -> tuple[bytes, list[bytes]]:
    head_len, header = _layout(sealed)
    body = sealed[head_len:]
    size = header.chunk_size + TAG_LEN
    return sealed[:head_len], [body[i : i + size] for i in range(0, len(body), size)]


def _refused(data: bytes | bytearray, key: bytes = KEY, **kw: object) -> None:
    with pytest.raises(drm.IntegrityError):
        drm.open_sealed(data, key=key, **kw)  # type: ignore[arg-type]


def _reheader(sealed: bytes, **changes: object) -> bytes:
    """Re-serialize the header JSON with ``changes`` (a well-formed but edited header)."""
    head_len, header = _layout(sealed)
    obj = header.to_dict()
    obj.update(changes)
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">BI", 1, len(body)) + body + sealed[head_len:]


# ----------------------------------------------------------------------------- round trips


@PROPERTY
@given(
    data=st.one_of(
        st.binary(max_size=3 * CHUNK + 5),
        st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK - 1]).map(
            lambda n: os.urandom(n)
        ),
    ),
    chunk_size=st.sampled_from([4096, 4097, 8192, 12345]),
    via=st.sampled_from(["bytes", "file", "callable"]),
)
def test_round_trip_any_size_and_chunking(data: bytes, chunk_size: int, via: str) -> None:
    sealed = drm.seal(data, key=KEY, target="arm-cpu", chunk_size=chunk_size)
    _, header = _layout(sealed)
    assert header.plaintext_len == len(data)
    assert header.build_hash == "sha256:" + hashlib.sha256(data).hexdigest()
    assert header.n_chunks == max(1, -(-len(data) // chunk_size))
    assert len(sealed) == header.sealed_len
    source: object = {"bytes": sealed, "file": io.BytesIO(sealed), "callable": io.BytesIO(sealed).read}[via]
    if via == "callable":
        got_header, plain = drm.open_stream(source, key=KEY)  # type: ignore[arg-type]
    else:
        got_header, plain = drm.open_sealed(source, key=KEY, expected_build_hash=header.build_hash)  # type: ignore[arg-type]
    assert bytes(plain) == data
    assert got_header == header


@PROPERTY
@given(data=st.binary(max_size=3 * CHUNK), chunk_size=st.sampled_from([4096, 5000]))
def test_seal_stream_matches_seal_and_reads_files_in_bounded_chunks(data: bytes, chunk_size: int) -> None:
    out = io.BytesIO()
    reads: list[int] = []

    class Recording(io.BytesIO):
        def readinto(self, buf):  # type: ignore[no-untyped-def,override]
            reads.append(len(buf))
            return super().readinto(buf)

    header = drm.seal_stream(
        Recording(data),
        out,
        key=KEY,
        plaintext_len=len(data),
        build_hash=drm.sha256_tag(data),
        target="t",
        chunk_size=chunk_size,
    )
    assert max(reads, default=0) <= chunk_size
    assert bytes(drm.open_sealed(out.getvalue(), key=KEY)[1]) == data
    assert header.sealed_len == len(out.getvalue())


def test_seal_stream_refuses_input_that_changed_under_it() -> None:
    data = os.urandom(10_000)
    with pytest.raises(drm.UsageError):
        drm.seal_stream(
            io.BytesIO(data),
            io.BytesIO(),
            key=KEY,
            plaintext_len=len(data),
            build_hash=drm.sha256_tag(b"other"),
            target="t",
            chunk_size=CHUNK,
        )
    with pytest.raises(drm.UsageError):
        drm.seal_stream(
            io.BytesIO(data[:-1]),
            io.BytesIO(),
            key=KEY,
            plaintext_len=len(data),
            build_hash=drm.sha256_tag(data),
            target="t",
            chunk_size=CHUNK,
        )


def test_nonce_prefix_is_random_unless_pinned_for_vectors() -> None:
    a = drm.seal(b"x", key=KEY, target="t")
    b = drm.seal(b"x", key=KEY, target="t")
    assert _layout(a)[1].nonce_prefix != _layout(b)[1].nonce_prefix
    pinned = drm.seal(b"x", key=KEY, target="t", nonce_prefix=b"\x00" * 8)
    assert pinned == drm.seal(b"x", key=KEY, target="t", nonce_prefix=b"\x00" * 8)
    with pytest.raises(drm.UsageError):
        drm.seal(b"x", key=KEY, target="t", nonce_prefix=b"short")


# ----------------------------------------------------------------------------- bit flips


def test_every_single_bit_flip_in_a_small_container_is_rejected() -> None:
    sealed = drm.seal(b"small model bytes" * 5, key=KEY, target="arm-cpu")
    for i in range(len(sealed)):
        for bit in range(8):
            flipped = bytearray(sealed)
            flipped[i] ^= 1 << bit
            _refused(flipped)


def test_sampled_bit_flips_in_a_multi_chunk_container_are_rejected() -> None:
    sealed = drm.seal(os.urandom(5 * CHUNK + 77), key=KEY, target="arm-cpu", chunk_size=CHUNK)
    rng = random.Random(4)
    positions = list(range(64)) + [rng.randrange(len(sealed)) for _ in range(400)] + [len(sealed) - 1]
    for i in positions:
        flipped = bytearray(sealed)
        flipped[i] ^= 1 << rng.randrange(8)
        _refused(flipped)
        _refused(io.BytesIO(bytes(flipped)))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- structure attacks


def test_truncation_at_every_chunk_boundary_and_every_byte_of_the_tail() -> None:
    sealed = drm.seal(os.urandom(3 * CHUNK + 10), key=KEY, target="t", chunk_size=CHUNK)
    head, chunks = _chunks(sealed)
    boundaries = [len(head) + sum(len(c) for c in chunks[:k]) for k in range(len(chunks))]
    for cut in boundaries + list(range(len(sealed) - 40, len(sealed))) + list(range(0, len(head) + 1, 7)):
        _refused(sealed[:cut])
        _refused(io.BytesIO(sealed[:cut]))  # type: ignore[arg-type]
        _refused(io.BytesIO(sealed[:cut]).read)  # type: ignore[arg-type]  # a pipe: no length known


def test_an_empty_plaintext_still_has_an_authenticated_final_chunk() -> None:
    sealed = drm.seal(b"", key=KEY, target="t")
    head, chunks = _chunks(sealed)
    assert [len(c) for c in chunks] == [TAG_LEN]
    _refused(head)  # header alone is not a valid empty container


def test_extension_is_rejected() -> None:
    sealed = drm.seal(os.urandom(2 * CHUNK), key=KEY, target="t", chunk_size=CHUNK)
    _, chunks = _chunks(sealed)
    for tail in (b"\x00", os.urandom(TAG_LEN), chunks[-1]):
        _refused(sealed + tail)
        _refused(io.BytesIO(sealed + tail).read)  # type: ignore[arg-type]


def test_reordering_duplicating_and_dropping_chunks_is_rejected() -> None:
    sealed = drm.seal(os.urandom(4 * CHUNK), key=KEY, target="t", chunk_size=CHUNK)
    head, c = _chunks(sealed)
    for order in ([1, 0, 2, 3], [0, 1, 3, 2], [0, 0, 2, 3], [0, 2, 3], [3, 1, 2, 0], [0, 1, 2, 2]):
        _refused(head + b"".join(c[i] for i in order))


def test_splicing_chunks_between_two_containers_under_the_same_key_is_rejected() -> None:
    a = drm.seal(os.urandom(3 * CHUNK), key=KEY, target="t", chunk_size=CHUNK)
    b = drm.seal(os.urandom(3 * CHUNK), key=KEY, target="t", chunk_size=CHUNK)
    head_a, ca = _chunks(a)
    head_b, cb = _chunks(b)
    for i in range(3):
        spliced = list(ca)
        spliced[i] = cb[i]
        _refused(head_a + b"".join(spliced))
    _refused(head_b + b"".join(ca))  # whole body under the other header
    # Even with the same nonce prefix (the test hook), the header digest in the AAD differs.
    x = drm.seal(os.urandom(2 * CHUNK), key=KEY, target="t", chunk_size=CHUNK, nonce_prefix=b"\x01" * 8)
    y = drm.seal(os.urandom(2 * CHUNK), key=KEY, target="t", chunk_size=CHUNK, nonce_prefix=b"\x01" * 8)
    hx, cx = _chunks(x)
    _, cy = _chunks(y)
    _refused(hx + cx[0] + cy[1])


@pytest.mark.parametrize(
    "changes",
    [
        {"target": "coral-edgetpu"},
        {"media_type": "application/vnd.tflite"},
        {"plaintext_len": 3 * CHUNK - 1},
        {"plaintext_len": 2 * CHUNK},
        {"chunk_size": 8192},
        {"nonce_prefix": "AAAAAAAAAAA"},
        {"build_hash": "sha256:" + "00" * 32},
    ],
)
def test_well_formed_header_edits_are_rejected(changes: dict[str, object]) -> None:
    sealed = drm.seal(os.urandom(3 * CHUNK), key=KEY, target="arm-cpu", chunk_size=CHUNK)
    _refused(_reheader(sealed, **changes))


@pytest.mark.parametrize("aead", ["AES-128-GCM", "ChaCha20-Poly1305", "none", "aes-256-gcm", ""])
def test_a_header_naming_another_aead_is_refused_before_decryption(aead: str) -> None:
    sealed = drm.seal(b"model", key=KEY, target="t")
    edited = _reheader(sealed, aead=aead)
    with pytest.raises(drm.FormatError, match="algorithm|aead"):
        drm.read_header(edited[: drm.header_size(edited[:13])])
    _refused(edited)


def test_version_and_magic_edits_are_refused() -> None:
    sealed = drm.seal(b"model", key=KEY, target="t")
    _refused(sealed[:8] + b"\x02" + sealed[9:])
    _refused(b"\x89EMDM" + sealed[5:])
    _refused(_reheader(sealed, v=2))


def test_wrong_key_and_wrong_expected_build_hash_are_rejected() -> None:
    sealed = drm.seal(b"model bytes", key=KEY, target="t")
    _refused(sealed, key=bytes(32))
    _refused(sealed, key=drm.generate_content_key())
    _refused(sealed, expected_build_hash="sha256:" + "11" * 32)
    with pytest.raises(drm.UsageError):
        drm.open_sealed(sealed, key=b"short")


def test_a_key_holder_cannot_substitute_content_under_a_build_hash() -> None:
    """Someone who extracted the CEK seals other bytes but claims the original build hash."""
    original = b"the real model"
    sealed = drm.seal(original, key=KEY, target="t")
    real_hash = _layout(sealed)[1].build_hash
    evil = b"a backdoored model"
    out = io.BytesIO()
    with pytest.raises(drm.UsageError):  # our own sealer refuses to lie...
        drm.seal_stream(
            io.BytesIO(evil), out, key=KEY, plaintext_len=len(evil), build_hash=real_hash, target="t"
        )
    forged = out.getvalue()  # ...but a forger writes the same bytes anyway
    _refused(forged, expected_build_hash=real_hash)
    header, plain = drm.open_sealed(forged, key=KEY, verify_build_hash=False)
    assert bytes(plain) == evil  # documented: skipping the re-hash trusts every CEK holder


def test_a_forged_header_claiming_a_huge_plaintext_allocates_nothing_large() -> None:
    sealed = drm.seal(os.urandom(CHUNK), key=KEY, target="t", chunk_size=CHUNK)
    forged = _reheader(sealed, plaintext_len=4 * 1024**3)
    body = forged + os.urandom(CHUNK)
    tracemalloc.start()
    try:
        for source in (body, io.BytesIO(body).read):
            _refused(source)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * CHUNK + len(body) * 2


def test_header_limits_are_checked_before_reading() -> None:
    sealed = drm.seal(b"m", key=KEY, target="t")
    huge = MAGIC + struct.pack(">BI", 1, 2**31) + b"{}"
    with pytest.raises(drm.FormatError, match="exceeds"):
        drm.header_size(huge)
    pulled: list[int] = []
    src = io.BytesIO(huge + b"x" * 100)

    def read(n: int) -> bytes:
        pulled.append(n)
        return src.read(n)

    _refused(read)  # type: ignore[arg-type]
    assert sum(pulled) <= 13
    tight = drm.ContainerLimits(max_plaintext_bytes=10)
    with pytest.raises(drm.IntegrityError):
        drm.open_sealed(drm.seal(b"x" * 11, key=KEY, target="t"), key=KEY, limits=tight)
    with pytest.raises(drm.FormatError):
        drm.seal(b"x" * 11, key=KEY, target="t", limits=tight)
    assert drm.read_header(sealed).plaintext_len == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"chunk_size": 1},
        {"chunk_size": 2**40},
        {"plaintext_len": -1},
        {"target": "a" * 65},
        {"target": "bad target\n"},
        {"media_type": "x"},
        {"build_hash": "sha256:" + "AB" * 32},
        {"nonce_prefix": "AAAA"},
        {"nonce_prefix": 5},
        {"extra": 1},
        {"chunk_size": True},
    ],
)
def test_malformed_headers_give_format_errors(changes: dict[str, object]) -> None:
    edited = _reheader(drm.seal(b"m", key=KEY, target="t"), **changes)
    with pytest.raises(drm.FormatError):
        drm.read_header(edited)
    _refused(edited)


def test_non_canonical_header_json_is_refused() -> None:
    sealed = drm.seal(b"m", key=KEY, target="t")
    head_len, header = _layout(sealed)
    for body in (
        json.dumps(header.to_dict(), sort_keys=True).encode(),  # spaces
        json.dumps(header.to_dict()).encode(),  # key order
        json.dumps(header.to_dict(), sort_keys=True, separators=(",", ":")).encode() + b" ",
    ):
        edited = MAGIC + struct.pack(">BI", 1, len(body)) + body + sealed[head_len:]
        with pytest.raises(drm.FormatError):
            drm.read_header(edited)
        _refused(edited)


def test_wipe_zeroes_a_plaintext_buffer() -> None:
    _, plain = drm.open_sealed(drm.seal(b"secret weights", key=KEY, target="t"), key=KEY)
    drm.wipe(plain)
    assert plain == bytearray(len(b"secret weights"))


def _forged_under(real: bytes, evil: bytes, chunk_size: int | None = None) -> bytes:
    """A container holding ``evil`` under ``real``'s build hash, sealed with the right key (a CEK holder)."""
    real_hash = "sha256:" + hashlib.sha256(real).hexdigest()
    out = io.BytesIO()
    with pytest.raises(drm.UsageError):
        drm.seal_stream(
            io.BytesIO(evil),
            out,
            key=KEY,
            plaintext_len=len(evil),
            build_hash=real_hash,
            target="t",
            chunk_size=chunk_size,
        )
    return out.getvalue()


class _Into:
    """allocate/use/discard for open_sealed_into that records what it was handed."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.buffer = bytearray()
        self.seen = b""
        self.discarded: list[object] = []
        self.fail = fail

    def allocate(self, n: int) -> memoryview:
        self.buffer = bytearray(n)
        return memoryview(self.buffer)

    def use(self, view: memoryview) -> object:
        self.seen = hashlib.sha256(view).digest()
        if self.fail is not None:
            raise self.fail
        return ("opened", len(view))

    def discard(self, result: object) -> None:
        self.discarded.append(result)


def _open_sealed_into(plain: bytes, chunk_size: int | None = None) -> tuple[Any, object, _Into]:
    sealed = drm.seal(plain, key=KEY, target="t", chunk_size=chunk_size)
    into = _Into()
    header, result = drm.open_sealed_into(
        sealed,
        key=KEY,
        allocate=into.allocate,
        use=into.use,
        discard=into.discard,
        expected_build_hash="sha256:" + hashlib.sha256(plain).hexdigest(),
    )
    return header, result, into


@pytest.mark.parametrize("size", [CHUNK - 7, 3 * 1024 * 1024 + 5])  # inline hash / hash beside use()
def test_open_sealed_into_decrypts_into_the_callers_buffer(size: int) -> None:
    plain = os.urandom(size)
    header, result, into = _open_sealed_into(plain, CHUNK if size < CHUNK else None)
    assert result == ("opened", size) and bytes(into.buffer) == plain and not into.discarded
    assert header.plaintext_len == size and into.seen == hashlib.sha256(plain).digest()


@pytest.mark.parametrize("size", [CHUNK - 7, 3 * 1024 * 1024 + 5])
def test_open_sealed_into_fails_closed_on_a_substituted_build(size: int) -> None:
    real, evil = os.urandom(size), os.urandom(size)
    forged = _forged_under(real, evil)
    real_hash = "sha256:" + hashlib.sha256(real).hexdigest()
    into = _Into()
    with pytest.raises(drm.IntegrityError):
        drm.open_sealed_into(
            forged,
            key=KEY,
            allocate=into.allocate,
            use=into.use,
            discard=into.discard,
            expected_build_hash=real_hash,
        )
    # Whatever use() built from the unverified bytes was discarded, and the buffer zeroed.
    assert not any(into.buffer)
    if size >= 1024 * 1024:
        assert into.discarded == [("opened", size)]
    else:
        assert into.seen == b"" and not into.discarded  # small builds are hashed before use()


def test_open_sealed_into_reports_integrity_over_a_use_error_and_passes_use_errors_through() -> None:
    size = 2 * 1024 * 1024
    real, evil = os.urandom(size), os.urandom(size)
    forged = _forged_under(real, evil)
    into = _Into(fail=drm.UsageError("backend could not load"))
    with pytest.raises(drm.IntegrityError):
        drm.open_sealed_into(forged, key=KEY, allocate=into.allocate, use=into.use, discard=into.discard)
    assert not any(into.buffer)
    sealed = drm.seal(real, key=KEY, target="t")
    into = _Into(fail=drm.UsageError("backend could not load"))
    with pytest.raises(drm.UsageError, match="could not load"):
        drm.open_sealed_into(sealed, key=KEY, allocate=into.allocate, use=into.use, discard=into.discard)
    assert not any(into.buffer)


def test_open_sealed_into_refuses_tampering_before_use() -> None:
    sealed = bytearray(drm.seal(os.urandom(3 * CHUNK), key=KEY, target="t", chunk_size=CHUNK))
    sealed[-5] ^= 1
    into = _Into()
    with pytest.raises(drm.IntegrityError):
        drm.open_sealed_into(
            bytes(sealed), key=KEY, allocate=into.allocate, use=into.use, discard=into.discard
        )
    assert into.seen == b"" and not any(into.buffer)


def test_wipe_soon_zeroes_on_the_helper_thread_and_keeps_the_owner_alive() -> None:
    from drm.container import _worker, wipe_soon

    owner = bytearray(os.urandom(3 * 1024 * 1024))
    view = memoryview(owner)
    wipe_soon(view, owner)
    del owner  # only the pending wipe holds it now
    _worker().submit(lambda: None).result()  # the helper runs its work in order: the wipe is done
    assert not any(view)


def _open_large_in_child(conn: Any) -> None:
    size = 2 * 1024 * 1024
    plain = os.urandom(size)
    _, result, into = _open_sealed_into(plain)
    conn.send(result == ("opened", size) and bytes(into.buffer) == plain)


def test_a_forked_child_gets_its_own_helper_thread() -> None:
    """The helper thread of the parent does not exist in a forked child: work submitted there to the
    parent's executor would wait forever. The child makes its own."""
    import multiprocessing as mp

    from drm.container import _worker

    _worker().submit(lambda: None).result()  # the parent's helper exists before the fork
    ctx = mp.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_open_large_in_child, args=(theirs,), daemon=True)
    child.start()
    try:
        assert ours.poll(60), "the child hung: it waited on the parent's helper thread"
        assert ours.recv() is True
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
