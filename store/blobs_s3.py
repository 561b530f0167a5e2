# Why this is one module: the S3 backend of one interface (BlobStore) with its multipart and checksum handling.
"""The S3-compatible ``BlobStore`` backend (AWS S3, SeaweedFS, MinIO, ...), chosen by ``BLOB_URL=s3://...``.

Owns the object layout (``<prefix><key>``), content hashing while streaming, multipart uploads and the
mapping of botocore failures onto the edgemart error tree. boto3 is imported only when a store is built.

How a put works, and why: the content-addressed key is only known once the whole stream has been read,
so ``put_stream`` first spools the stream (in memory below the multipart threshold, in an anonymous temp
file above it) while hashing and counting, then uploads to the *final* key.

* A refused upload (``TooLarge``, a stream that fails mid-read) is refused before the first S3 request,
  so it cannot leave an object, a temp object or a pending multipart upload behind.
* A blob that is already stored costs one HEAD, not an upload (models are re-uploaded often).
* There is no temp key and no server-side copy, which on S3 would be a second full write of every blob
  and a temp object to clean up after a crash; the anonymous spool file vanishes with the process.
* Every request carries the SHA-256 of its bytes (``ChecksumSHA256`` per object or per part), so the
  server refuses a body damaged in transit with ``BadDigest``.
* Writes are conditional (``If-None-Match: *``), so a stored blob is not overwritten and of racing puts
  one reports ``created``. Where the server checks that condition non-atomically (SeaweedFS 4.48 on
  multipart completion) or ignores it, two may report ``created`` and the later identical bytes win;
  an ``id-`` key is random, so only content-addressed keys race, and their bytes are the same.
* Any failure of a multipart upload, ``KeyboardInterrupt`` included, aborts it. Only a process killed
  mid-upload can leave a pending upload; ``sweep_temp`` aborts those (S3 bills for their parts).

The price is local disk for the spool (one blob, at most ``MAX_UPLOAD_BYTES``) and reading it twice."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any, BinaryIO
from urllib.parse import urlsplit

from edgemart.core.errors import EdgemartError, NotFoundError, UsageError
from store.blobs import _KEY, CHUNK, STALE_TEMP_SECONDS, PutResult, check_key, copy_limited

log = logging.getLogger("edgemart.store.blobs")

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
MAX_PARTS = 10_000  # S3's ceiling on parts per upload

_MISSING = ("NoSuchKey", "NotFound", "404")
_DENIED = (
    "403",
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
)


class BlobBackendError(EdgemartError):
    """The blob storage backend failed or could not be reached."""

    exit_code = 1
    http_status = 503
    code = "blob_backend_unavailable"


class S3BlobStore:
    """Blobs as objects ``<prefix><key>`` in one S3 bucket; see the module docstring for the put protocol."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        multipart_threshold: int | None = None,
        max_concurrency: int = 4,
        spool_dir: str | None = None,
        conditional_writes: bool = True,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        page_size: int = 1000,
        client: Any = None,
    ) -> None:
        """Credentials and region come from boto3's usual chain (AWS_* env vars, config files, instance
        roles) unless given. ``multipart_threshold`` (default ``part_size``) is the size from which a blob
        goes up in ``part_size`` parts, ``max_concurrency`` of them at once. ``conditional_writes=False``
        is for servers that reject ``If-None-Match``. ``page_size`` caps the keys of one listing request.
        Building a store sends no request."""
        if not bucket:
            raise UsageError("an S3 blob store needs a bucket name")
        if part_size < MIN_PART_SIZE:
            raise UsageError(f"S3 part size must be at least {MIN_PART_SIZE} bytes, got {part_size}")
        threshold = part_size if multipart_threshold is None else multipart_threshold
        if threshold < 1:
            raise UsageError(f"multipart threshold must be positive, got {threshold}")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.part_size = part_size
        self.multipart_threshold = threshold
        self.max_concurrency = max(1, max_concurrency)
        self.spool_dir = spool_dir
        self.conditional_writes = conditional_writes
        self._pages = {"PageSize": max(1, page_size)}
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": "standard", "max_attempts": max_attempts},
                # A custom endpoint (SeaweedFS, MinIO) serves buckets as paths, not as DNS names.
                s3={"addressing_style": "path" if endpoint_url else "auto"},
            )
            with self._s3("client setup"):  # a bad AWS_PROFILE or config file fails here
                session = boto3.session.Session(
                    aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region_name
                )
                # S3-compatible servers accept any region; us-east-1 is the one every signer agrees on.
                region = session.region_name or ("us-east-1" if endpoint_url else None)
                client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self._client = client

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None, **options: Any) -> S3BlobStore:
        """``s3://BUCKET[/PREFIX]`` -> a store; ``options`` are the constructor's keyword arguments."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise UsageError(f"an S3 blob URL looks like s3://BUCKET[/PREFIX], got {url!r}")
        return cls(parts.netloc, parts.path, endpoint_url=endpoint_url, **options)

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix}{where})"

    # -- errors ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _s3(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn botocore failures into edgemart errors: a missing ``key`` is NotFoundError, the rest is
        BlobBackendError with the S3 error code but neither credentials nor a botocore traceback."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
            if key is not None and code in _MISSING:
                raise NotFoundError(f"blob {key} not found") from None
            if code == "NoSuchBucket":
                raise BlobBackendError(
                    f"S3 bucket {self.bucket!r} does not exist{self._where()}", code="blob_bucket_missing"
                ) from None
            message = error.get("Message") or ""
            if code in _DENIED:
                raise BlobBackendError(
                    f"S3 {action} was refused{self._where()}: {code} {message}".rstrip()
                    + " (check the AWS_* credentials and the bucket's policy)",
                    code="blob_backend_denied",
                ) from None
            raise BlobBackendError(f"S3 {action} failed{self._where()}: {code} {message}".rstrip()) from None
        except BotoCoreError as exc:
            raise BlobBackendError(f"S3 {action} failed{self._where()}: {exc}") from None

    def _where(self) -> str:
        return f" (endpoint {self.endpoint_url})" if self.endpoint_url else ""

    @staticmethod
    def _code(exc: BaseException) -> str:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    # -- bucket and housekeeping -------------------------------------------------------------------------

    def ensure_bucket(self) -> bool:
        """Create the bucket if it does not exist; True when it was created. Only on request: a store
        pointed at a mistyped bucket must fail loudly, not start filling a new one."""
        from botocore.exceptions import ClientError

        with self._s3("HeadBucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return False
            except ClientError as exc:
                if self._code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if not self.endpoint_url and region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        with self._s3("CreateBucket"):
            try:
                self._client.create_bucket(**kwargs)
            except ClientError as exc:
                if self._code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return False
                raise
        return True

    def pending_uploads(self) -> list[tuple[str, str, float]]:
        """Multipart uploads begun under this store's prefix and neither completed nor aborted:
        ``(object key, upload id, initiated Unix seconds)``."""
        found: list[tuple[str, str, float]] = []
        with self._s3("ListMultipartUploads"):
            pages = self._client.get_paginator("list_multipart_uploads")
            for page in pages.paginate(Bucket=self.bucket, Prefix=self.prefix, PaginationConfig=self._pages):
                for upload in page.get("Uploads") or []:
                    if _KEY.fullmatch(upload["Key"][len(self.prefix) :]):
                        initiated = upload["Initiated"].timestamp()
                        found.append((upload["Key"], upload["UploadId"], initiated))
        return found

    def sweep_temp(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        """Abort multipart uploads left by puts that never finished (the process was killed); returns how
        many. A live put completes within the hour, so the sweep does not race one, even elsewhere."""
        cutoff = time.time() - older_than
        aborted = 0
        for object_key, upload_id, initiated in self.pending_uploads():
            if initiated < cutoff:
                with self._s3("AbortMultipartUpload"):
                    with contextlib.suppress(self._client.exceptions.NoSuchUpload):
                        self._client.abort_multipart_upload(
                            Bucket=self.bucket, Key=object_key, UploadId=upload_id
                        )
                        aborted += 1
        return aborted

    # -- BlobStore ---------------------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put_stream(self, stream: BinaryIO, *, max_bytes: int, key: str | None = None) -> PutResult:
        """Copy ``stream`` in, refusing (TooLarge) past ``max_bytes``; keyed by content hash unless ``key``."""
        if key is not None:
            check_key(key)
        with tempfile.SpooledTemporaryFile(max_size=self.multipart_threshold, dir=self.spool_dir) as spool:
            size, digest = copy_limited(stream, spool, max_bytes)  # type: ignore[arg-type]
            final_key = key if key is not None else "sha256-" + digest.hexdigest()
            if self.exists(final_key):
                return PutResult(final_key, size, digest.hexdigest(), created=False)
            spool.seek(0)
            if size < self.multipart_threshold:
                created = self._put_single(final_key, spool.read(), digest.digest())
            else:
                created = self._put_multipart(final_key, spool, size)
        return PutResult(final_key, size, digest.hexdigest(), created=created)

    def _condition(self) -> dict[str, str]:
        return {"IfNoneMatch": "*"} if self.conditional_writes else {}

    def _put_single(self, key: str, data: bytes, sha256: bytes) -> bool:
        from botocore.exceptions import ClientError

        with self._s3("PutObject"):
            try:
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=self._name(key),
                    Body=data,
                    ContentLength=len(data),
                    ChecksumSHA256=base64.b64encode(sha256).decode(),
                    **self._condition(),
                )
            except ClientError as exc:
                if self._code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False  # another put stored this key between our HEAD and our PUT
                raise
        return True

    def _put_multipart(self, key: str, spool: IO[bytes], size: int) -> bool:
        from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

        from botocore.exceptions import ClientError

        part_size = max(self.part_size, -(-size // MAX_PARTS))
        name = self._name(key)
        with self._s3("CreateMultipartUpload"):
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=name, ChecksumAlgorithm="SHA256"
            )["UploadId"]
        pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="s3-part")
        try:
            futures: list[Future[dict[str, Any]]] = []
            while part := spool.read(part_size):
                # At most max_concurrency parts in memory; a failed part stops the upload at once.
                while len(running := [f for f in futures if not f.done()]) >= self.max_concurrency:
                    wait(running, return_when=FIRST_COMPLETED)
                for done in futures:
                    if done.done():
                        done.result()
                futures.append(pool.submit(self._upload_part, name, upload_id, len(futures) + 1, part))
            parts = [f.result() for f in futures]
            with self._s3("CompleteMultipartUpload"):
                try:
                    self._client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=name,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                        **self._condition(),
                    )
                except ClientError as exc:
                    if self._code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                        raise
                    # Another put stored this key first; the refused upload stays pending until aborted.
                    self._abort(name, upload_id)
                    return False
            return True
        except BaseException:
            # Parts still in flight would outlive an abort and be billed: let them end first.
            pool.shutdown(wait=True, cancel_futures=True)
            self._abort(name, upload_id)
            raise
        finally:
            pool.shutdown(wait=True)

    def _upload_part(self, name: str, upload_id: str, number: int, part: bytes) -> dict[str, Any]:
        checksum = base64.b64encode(hashlib.sha256(part).digest()).decode()
        with self._s3("UploadPart"):
            etag = self._client.upload_part(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                PartNumber=number,
                Body=part,
                ContentLength=len(part),
                ChecksumSHA256=checksum,
            )["ETag"]
        return {"PartNumber": number, "ETag": etag, "ChecksumSHA256": checksum}

    def _abort(self, name: str, upload_id: str) -> None:
        """Best effort: the caller is already failing, and sweep_temp catches what this misses."""
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except Exception as exc:  # must not mask the error that brought us here
            log.warning("could not abort multipart upload %s of %s: %s", upload_id, name, exc)

    def put_bytes(self, data: bytes, *, key: str | None = None) -> PutResult:
        return self.put_stream(io.BytesIO(data), max_bytes=len(data), key=key)

    def _get_object(self, key: str) -> Any:
        name = self._name(key)
        with self._s3("GetObject", key):
            return self._client.get_object(Bucket=self.bucket, Key=name)

    def get(self, key: str) -> bytes:
        response = self._get_object(key)
        with self._s3("GetObject", key), contextlib.closing(response["Body"]) as body:
            data: bytes = body.read()
        return data

    def open(self, key: str) -> BinaryIO:
        """A buffered reader over the object's body; read errors surface as BlobBackendError."""
        response = self._get_object(key)
        return io.BufferedReader(_BodyReader(response["Body"], self, key), buffer_size=CHUNK)

    def _head(self, key: str) -> dict[str, Any]:
        name = self._name(key)
        with self._s3("HeadObject", key):
            head: dict[str, Any] = self._client.head_object(Bucket=self.bucket, Key=name)
        return head

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def delete(self, key: str) -> None:
        name = self._name(key)
        with contextlib.suppress(NotFoundError), self._s3("DeleteObject", key):
            self._client.delete_object(Bucket=self.bucket, Key=name)

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except NotFoundError:
            return False
        return True

    def modified(self, key: str) -> float:
        return float(self._head(key)["LastModified"].timestamp())

    def list(self) -> Iterator[str]:
        """Valid keys directly under the prefix, in key order; other objects in the bucket are skipped."""
        with self._s3("ListObjectsV2"):
            pages = self._client.get_paginator("list_objects_v2")
            listing = pages.paginate(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/", PaginationConfig=self._pages
            )
            for page in listing:
                for item in page.get("Contents") or []:
                    name = item["Key"][len(self.prefix) :]
                    if _KEY.fullmatch(name):
                        yield name


class _BodyReader(io.RawIOBase):
    """A botocore streaming body as a raw binary stream whose failures are edgemart errors."""

    def __init__(self, body: Any, store: S3BlobStore, key: str) -> None:
        super().__init__()
        self._body = body
        self._store = store
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._store._s3("GetObject", self._key):
            data = self._body.read(len(buffer))
        view = memoryview(buffer).cast("B")
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
