"""One conformance suite for every BlobStore backend: the filesystem, and S3 against a real SeaweedFS.

The S3 cases (marked slow) share one SeaweedFS for the session and take a fresh bucket each; a few S3-only
cases at the end cover what only S3 has: pending multipart uploads, lost races, a server that is down."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

from edgemart.core.errors import EdgemartError, NotFoundError, UsageError
from store.blobs import BlobStore, FileBlobStore, TooLarge, new_blob_id

MiB = 1024 * 1024
PART = 5 * MiB  # the S3 stores' part size and multipart threshold: S3's smallest
BIG = 12 * MiB + 12345  # three parts, the last one short

slow = pytest.mark.slow


@pytest.fixture(params=["file", pytest.param("s3", marks=slow)])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "file":
        return FileBlobStore(tmp_path / "blobs")
    # Three keys a page: every listing below goes through S3's continuation tokens.
    store: BlobStore = request.getfixturevalue("seaweed").blob_store(part_size=PART, page_size=3)
    return store


@pytest.fixture
def s3(seaweed: Any) -> Any:
    return seaweed.blob_store(part_size=PART, page_size=3)


def leftovers(store: BlobStore) -> list[Any]:
    """What a put may leave behind besides blobs: temp files, or pending multipart uploads."""
    if isinstance(store, FileBlobStore):
        return sorted(os.listdir(store.root / ".tmp"))
    return store.pending_uploads()  # type: ignore[attr-defined, no-any-return]


def sha_key(data: bytes) -> str:
    return "sha256-" + hashlib.sha256(data).hexdigest()


class _Dribble(io.RawIOBase):
    def __init__(self, data: bytes, *, step: int = 777_777, fail_after: int | None = None) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step
        self._fail_after = fail_after

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._fail_after is not None and self._pos >= self._fail_after:
            raise OSError("client went away mid-upload")
        n = min(self._step, len(self._data) - self._pos, size if size >= 0 else len(self._data))
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out


def dribble(data: bytes, *, fail_after: int | None = None) -> BinaryIO:
    """A stream handing out odd-sized reads (like a socket), optionally failing after ``fail_after`` bytes."""
    return cast(BinaryIO, _Dribble(data, fail_after=fail_after))


# -- the conformance suite -------------------------------------------------------------------------------


def test_round_trip(blobs: BlobStore) -> None:
    assert isinstance(blobs, BlobStore)
    data = b"an onnx model, more or less"
    put = blobs.put_bytes(data)
    assert put.key == sha_key(data)
    assert (put.size, put.sha256, put.created) == (len(data), hashlib.sha256(data).hexdigest(), True)
    assert blobs.get(put.key) == data
    assert blobs.size(put.key) == len(data)
    assert blobs.exists(put.key)


def test_content_addressing_and_created_flag(blobs: BlobStore) -> None:
    first = blobs.put_stream(io.BytesIO(b"same"), max_bytes=100)
    again = blobs.put_bytes(b"same")
    other = blobs.put_bytes(b"different")
    assert first.created and not again.created and other.created
    assert first.key == again.key != other.key
    assert sorted(blobs.list()) == sorted([first.key, other.key])


def test_explicit_id_key_is_never_overwritten(blobs: BlobStore) -> None:
    key = new_blob_id()
    put = blobs.put_stream(io.BytesIO(b"sealed build"), max_bytes=100, key=key)
    assert (put.key, put.created) == (key, True)
    assert put.sha256 == hashlib.sha256(b"sealed build").hexdigest()
    second = blobs.put_bytes(b"something else", key=key)
    assert (second.key, second.created) == (key, False)
    assert blobs.get(key) == b"sealed build"
    assert list(blobs.list()) == [key]


BAD_KEYS = [
    "../x",
    "sha256-zz",
    "",
    "sha256-" + "A" * 64,
    "sha256-" + "0" * 63,
    "sha256-" + "0" * 64 + "/../x",
    "id-" + "0" * 31,
    "id-" + "0" * 32 + "\n",  # `$` would match before a trailing newline; the key pattern ends in \Z
    "../../etc/passwd",
    "sha256-../" + "0" * 61,
    "md5-" + "0" * 32,
]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_invalid_keys_are_refused(blobs: BlobStore, bad: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: blobs.get(bad),
        lambda: blobs.open(bad),
        lambda: blobs.size(bad),
        lambda: blobs.delete(bad),
        lambda: blobs.exists(bad),
        lambda: blobs.modified(bad),
        lambda: blobs.put_bytes(b"x", key=bad),
        lambda: blobs.put_stream(io.BytesIO(b"x"), max_bytes=10, key=bad),
    ]
    for call in calls:
        with pytest.raises(UsageError):
            call()
    assert list(blobs.list()) == []
    assert leftovers(blobs) == []


@pytest.mark.parametrize("size", [1000, BIG], ids=["small", "past-multipart-threshold"])
def test_too_large_leaves_nothing(blobs: BlobStore, size: int) -> None:
    kept = blobs.put_bytes(b"already there")
    data = os.urandom(size)
    with pytest.raises(TooLarge) as caught:
        blobs.put_stream(dribble(data), max_bytes=size - 1)
    assert caught.value.http_status == 413
    with pytest.raises(TooLarge):
        blobs.put_stream(io.BytesIO(data), max_bytes=size - 1, key=new_blob_id())
    assert list(blobs.list()) == [kept.key]
    assert leftovers(blobs) == []
    assert not blobs.exists(sha_key(data))
    # The limit is inclusive.
    assert blobs.put_stream(io.BytesIO(data), max_bytes=size).key == sha_key(data)


def test_empty_blob(blobs: BlobStore) -> None:
    put = blobs.put_bytes(b"")
    assert (put.key, put.size, put.created) == (sha_key(b""), 0, True)
    assert blobs.get(put.key) == b""
    assert blobs.size(put.key) == 0
    with blobs.open(put.key) as fh:
        assert fh.read() == b""
    assert not blobs.put_stream(io.BytesIO(b""), max_bytes=0).created


def test_blob_past_the_multipart_threshold_round_trips(blobs: BlobStore) -> None:
    data = os.urandom(BIG)
    put = blobs.put_stream(dribble(data), max_bytes=BIG)
    assert (put.key, put.size, put.created) == (sha_key(data), BIG, True)
    assert blobs.size(put.key) == BIG
    assert blobs.get(put.key) == data
    assert leftovers(blobs) == []
    # Again under an explicit key: no content hash decides it, the bytes must still arrive whole.
    key = new_blob_id()
    assert blobs.put_stream(io.BytesIO(data), max_bytes=BIG, key=key).created
    assert hashlib.sha256(blobs.get(key)).hexdigest() == put.sha256


def test_open_streams_the_content(blobs: BlobStore) -> None:
    data = os.urandom(3 * MiB + 5)
    key = blobs.put_bytes(data).key
    with blobs.open(key) as fh:
        assert fh.readable()
        head = fh.read(1000)
        pieces = [head]
        while chunk := fh.read(65_537):
            pieces.append(chunk)
        assert fh.read() == b""
    assert fh.closed
    assert b"".join(pieces) == data
    with blobs.open(key) as fh:
        assert fh.read() == data


def test_modified_is_when_it_was_written(blobs: BlobStore) -> None:
    before = time.time()
    key = blobs.put_bytes(b"fresh").key
    after = time.time()
    # S3 reports whole seconds (HTTP dates), hence the second of slack below.
    assert before - 1.0 <= blobs.modified(key) <= after + 1.0


def test_exists_delete_and_delete_missing(blobs: BlobStore) -> None:
    key = blobs.put_bytes(b"short-lived").key
    assert blobs.exists(key)
    blobs.delete(key)
    assert not blobs.exists(key)
    with pytest.raises(NotFoundError):
        blobs.get(key)
    blobs.delete(key)  # deleting what is gone is a no-op
    blobs.delete(new_blob_id())
    assert list(blobs.list()) == []


def test_list_is_the_exact_set(blobs: BlobStore) -> None:
    keys = {blobs.put_bytes(f"blob {i}".encode()).key for i in range(7)}
    keys.add(blobs.put_bytes(b"by id", key=new_blob_id()).key)
    listed = list(blobs.list())
    assert len(listed) == len(set(listed)) == 8
    assert set(listed) == keys
    gone = sorted(keys)[3]
    blobs.delete(gone)
    assert set(blobs.list()) == keys - {gone}


def test_missing_key_is_not_found(blobs: BlobStore) -> None:
    for key in (sha_key(b"never stored"), new_blob_id()):
        assert not blobs.exists(key)
        for call in (blobs.get, blobs.open, blobs.size, blobs.modified):
            with pytest.raises(NotFoundError) as caught:
                call(key)
            assert caught.value.http_status == 404


@pytest.mark.parametrize("fail_after", [MiB, 9 * MiB], ids=["early", "past-multipart-threshold"])
def test_stream_failing_mid_read_leaves_nothing(blobs: BlobStore, fail_after: int) -> None:
    kept = blobs.put_bytes(b"already there")
    with pytest.raises(OSError, match="client went away"):
        blobs.put_stream(dribble(os.urandom(BIG), fail_after=fail_after), max_bytes=BIG)
    with pytest.raises(OSError, match="client went away"):
        blobs.put_stream(dribble(os.urandom(BIG), fail_after=fail_after), max_bytes=BIG, key=new_blob_id())
    assert list(blobs.list()) == [kept.key]
    assert leftovers(blobs) == []


def test_concurrent_puts_of_the_same_content_store_one_object(blobs: BlobStore) -> None:
    data = os.urandom(PART + MiB)  # multipart on S3
    threads = 6
    barrier = threading.Barrier(threads)
    results: list[Any] = []
    errors: list[BaseException] = []

    def put() -> None:
        try:
            barrier.wait()
            results.append(blobs.put_stream(io.BytesIO(data), max_bytes=len(data)))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=put) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    assert {r.key for r in results} == {sha_key(data)}
    assert any(r.created for r in results)
    assert list(blobs.list()) == [sha_key(data)]
    assert blobs.get(sha_key(data)) == data
    assert leftovers(blobs) == []


@slow
@pytest.mark.parametrize("backend", ["file", "s3"])
def test_measure_64mib_put_and_get(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Not a timing assertion: prints MB/s (with -s) for the report; checks only the bytes."""
    if backend == "file":
        store: BlobStore = FileBlobStore(tmp_path / "blobs")
    else:
        seaweed = request.getfixturevalue("seaweed")
        store = seaweed.blob_store()  # the default 8 MiB parts
        print(f"\nSeaweedFS started in {seaweed.start_seconds:.2f} s")
    data = os.urandom(64 * MiB)
    started = time.monotonic()
    key = store.put_stream(io.BytesIO(data), max_bytes=len(data)).key
    put_seconds = time.monotonic() - started
    started = time.monotonic()
    with store.open(key) as fh:
        digest = hashlib.sha256()
        while chunk := fh.read(MiB):
            digest.update(chunk)
    get_seconds = time.monotonic() - started
    assert "sha256-" + digest.hexdigest() == key
    print(f"\n{backend}: 64 MiB put {64 / put_seconds:.0f} MB/s, get {64 / get_seconds:.0f} MB/s")


# -- S3 only ---------------------------------------------------------------------------------------------


@slow
def test_s3_interrupted_multipart_upload_is_aborted(s3: Any) -> None:
    """Ctrl-C (or any BaseException) in the middle of the parts leaves no pending upload and no object.

    The fault is injected into the client's UploadPart; the store and the server are the real ones."""
    real_upload_part = s3._client.upload_part
    calls = 0

    def upload_part(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if kwargs["PartNumber"] == 2:
            raise KeyboardInterrupt
        return real_upload_part(**kwargs)

    s3._client.upload_part = upload_part
    data = os.urandom(BIG)
    with pytest.raises(KeyboardInterrupt):
        s3.put_stream(io.BytesIO(data), max_bytes=BIG)
    assert calls >= 2
    del s3._client.upload_part
    assert s3.pending_uploads() == []
    assert list(s3.list()) == []
    assert s3.put_bytes(data).created  # and the store still works


@slow
@pytest.mark.parametrize("size", [1000, BIG], ids=["single", "multipart"])
def test_s3_lost_race_is_not_created_and_keeps_the_first(s3: Any, size: int) -> None:
    """Another writer stores the key between our HEAD and our write: the conditional write refuses ours."""
    key = new_blob_id()
    first = os.urandom(size)
    s3.put_bytes(first, key=key)
    real_head = s3._client.head_object

    def head_before_the_other_writer(**kwargs: Any) -> Any:
        s3._client.head_object = real_head
        return real_head(Bucket=kwargs["Bucket"], Key=kwargs["Key"] + ".not-yet")

    s3._client.head_object = head_before_the_other_writer
    put = s3.put_stream(io.BytesIO(os.urandom(size)), max_bytes=size, key=key)
    assert (put.key, put.created) == (key, False)
    assert s3.get(key) == first
    assert s3.pending_uploads() == []


@slow
def test_s3_list_ignores_foreign_objects_and_other_prefixes(seaweed: Any) -> None:
    a = seaweed.blob_store(prefix="tenant-a/blobs")
    b = seaweed.blob_store(a.bucket, prefix="tenant-b")
    root = seaweed.blob_store(a.bucket)
    key_a = a.put_bytes(b"a").key
    key_b = b.put_bytes(b"b").key
    client = seaweed.client()
    client.put_object(Bucket=a.bucket, Key="tenant-a/blobs/README", Body=b"not a blob")
    client.put_object(Bucket=a.bucket, Key="tenant-a/blobs/x/" + key_b, Body=b"nested")
    assert list(a.list()) == [key_a]
    assert list(b.list()) == [key_b]
    assert list(root.list()) == []
    assert not a.exists(key_b)
    head = client.head_object(Bucket=a.bucket, Key="tenant-a/blobs/" + key_a)
    assert head["ContentLength"] == 1


@slow
def test_s3_listings_follow_continuation(s3: Any) -> None:
    """With three keys a page, seven blobs take three listing requests, fourteen uploads at least three."""
    requests: list[str] = []
    s3._client.meta.events.register("before-call.s3.*", lambda model, **_: requests.append(model.name))
    keys = {s3.put_bytes(f"page {i}".encode()).key for i in range(7)}
    for key in keys:
        s3._client.create_multipart_upload(Bucket=s3.bucket, Key=key + "-x")  # not a key: never listed
        s3._client.create_multipart_upload(Bucket=s3.bucket, Key=key)
    requests.clear()
    assert set(s3.list()) == keys
    assert requests.count("ListObjectsV2") == 3
    requests.clear()
    assert {u[0] for u in s3.pending_uploads()} == keys
    assert requests.count("ListMultipartUploads") >= 3
    assert s3.sweep_temp(older_than=-60) == 7


@slow
def test_s3_sweep_temp_aborts_only_stale_uploads(s3: Any) -> None:
    """A put killed mid-upload (kill -9) leaves a pending multipart upload; sweep_temp aborts old ones."""
    name = s3.prefix + sha_key(b"killed")
    s3._client.create_multipart_upload(Bucket=s3.bucket, Key=name)
    s3._client.create_multipart_upload(Bucket=s3.bucket, Key="not-ours")
    assert [u[0] for u in s3.pending_uploads()] == [name]
    assert s3.sweep_temp() == 0  # younger than an hour: could be a live put
    assert s3.sweep_temp(older_than=-60) == 1
    assert s3.pending_uploads() == []
    remaining = s3._client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads") or []
    assert [u["Key"] for u in remaining] == ["not-ours"]


@slow
def test_s3_from_url_and_make_blobs(seaweed: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from store.blobs_s3 import S3BlobStore
    from store.context import make_blobs

    bucket = seaweed.blob_store().bucket
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    store = make_blobs({"BLOB_URL": f"s3://{bucket}/edgemart/", "S3_ENDPOINT_URL": seaweed.endpoint_url})
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix) == (bucket, "edgemart/")
    key = store.put_bytes(b"via BLOB_URL and AWS_* env").key
    assert seaweed.client().get_object(Bucket=bucket, Key="edgemart/" + key)["Body"].read() == (
        b"via BLOB_URL and AWS_* env"
    )
    assert S3BlobStore.from_url(f"s3://{bucket}").prefix == ""
    assert S3BlobStore.from_url(f"s3://{bucket}/a//b/").prefix == "a//b/"
    for bad in ("s3://", "s3:///prefix", "http://bucket/x", f"s3://{bucket}/p?versionId=1"):
        with pytest.raises(UsageError):
            S3BlobStore.from_url(bad)


@slow
def test_s3_ensure_bucket_creates_only_once(seaweed: Any) -> None:
    from store.blobs_s3 import S3BlobStore

    store = S3BlobStore(
        "t-ensure-" + os.urandom(4).hex(),
        endpoint_url=seaweed.endpoint_url,
        access_key=seaweed.access_key,
        secret_key=seaweed.secret_key,
    )
    with pytest.raises(EdgemartError) as caught:
        store.put_bytes(b"no bucket yet")
    assert caught.value.code == "blob_bucket_missing"
    assert store.ensure_bucket() is True
    assert store.ensure_bucket() is False
    assert store.put_bytes(b"now there is").created


def assert_clean_backend_error(call: Callable[[], object]) -> EdgemartError:
    """An EdgemartError that hides botocore: no botocore class, no chained botocore traceback."""
    from botocore.exceptions import BotoCoreError, ClientError

    from store.blobs_s3 import BlobBackendError

    with pytest.raises(BlobBackendError) as caught:
        call()
    exc = caught.value
    assert not isinstance(exc, BotoCoreError | ClientError)
    assert exc.__cause__ is None and exc.__suppress_context__
    assert exc.http_status == 503 and exc.exit_code == 1
    return exc


@slow
def test_s3_errors_when_the_server_is_down_are_edgemart_errors() -> None:
    from store.blobs_s3 import S3BlobStore
    from store.localservers.seaweedfs import _free_ports

    (port,) = _free_ports(1)  # nothing listens there: what a stopped server looks like
    store = S3BlobStore(
        "edgemart",
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key="k",
        secret_key="s",
        connect_timeout=1,
        max_attempts=1,
    )
    key = sha_key(b"x")
    calls: list[Callable[[], object]] = [
        lambda: store.get(key),
        lambda: store.open(key),
        lambda: store.size(key),
        lambda: store.exists(key),
        lambda: store.modified(key),
        lambda: store.delete(key),
        lambda: store.put_bytes(b"x"),
        lambda: list(store.list()),
        lambda: store.ensure_bucket(),
        lambda: store.sweep_temp(),
    ]
    for call in calls:
        exc = assert_clean_backend_error(call)
        assert f"127.0.0.1:{port}" in exc.message


@slow
def test_s3_wrong_credentials_are_an_edgemart_error(seaweed: Any) -> None:
    from store.blobs_s3 import S3BlobStore

    bucket = seaweed.blob_store().bucket
    wrong = "wrong-secret-8d1f0c"
    store = S3BlobStore(
        bucket, endpoint_url=seaweed.endpoint_url, access_key=seaweed.access_key, secret_key=wrong
    )
    for call in (lambda: store.put_bytes(b"x"), lambda: list(store.list()), lambda: store.get(sha_key(b"x"))):
        exc = assert_clean_backend_error(call)
        assert exc.code == "blob_backend_denied"
        assert wrong not in exc.message
    assert "SignatureDoesNotMatch" in assert_clean_backend_error(lambda: list(store.list())).message
