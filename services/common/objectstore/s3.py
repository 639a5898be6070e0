"""Object store on an S3-protocol server (MinIO in production) through the synchronous `minio` SDK.

Every SDK call runs in a worker thread. Uploads bridge the caller's async chunk iterator to
minio's streaming `put_object(length=-1)` through `_ChunkPipe`, a bounded buffer read by the
uploader thread, so memory stays bounded and a slow store slows the producer down.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import hashlib
import sys
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.datatypes import Object as MinioObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from services.common.objectstore.base import (
    DigestMismatch,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
    PutResult,
    SizeLimitExceeded,
    check_range,
    normalize_sha256,
)
from services.common.objectstore.keys import check_key, check_prefix
from services.common.settings import ObjectStoreSettings

T = TypeVar("T")

# Bytes the producer may queue ahead of the uploader thread, on top of the part being assembled
# and the part being sent.
_PIPE_BUFFER_BYTES = 4 << 20
# Uploads hold a thread while waiting on their producer, so they get their own bounded pool and
# cannot starve the short SDK calls that use the default executor.
_MAX_CONCURRENT_UPLOADS = 16
_LIST_BATCH = 1000
# A connect attempt to a dead or black-holed endpoint should fail in seconds, whatever the
# (read) timeout is.
_MAX_CONNECT_TIMEOUT_SECONDS = 5.0


class _WriterGone(Exception):
    """Raised inside the uploader thread when the producer failed or was cancelled."""


class _ReaderGone(Exception):
    """Raised to the producer when the uploader thread has ended (its error is on its future)."""


class _ChunkPipe:
    """A bounded, file-like bridge from an asyncio producer to minio's blocking `read()`.

    It hashes what the uploader reads and, at end of stream, checks the expected digest *before*
    reporting EOF: a mismatch raises inside `put_object`, which then aborts the multipart upload
    (or never sends the single PUT), so a bad object is never completed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, expected_sha256: str | None) -> None:
        self._loop = loop
        self._expected = expected_sha256
        self._cond = threading.Condition()
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._failed = False
        self._reader_done = False
        self._space = asyncio.Event()
        self._sha = hashlib.sha256()
        self.size = 0

    # -- producer side (event loop thread) --

    async def write(self, chunk: memoryview) -> None:
        while True:
            with self._cond:
                if self._reader_done:
                    raise _ReaderGone()
                if self._buffered < _PIPE_BUFFER_BYTES:
                    self._chunks.append(chunk)
                    self._buffered += len(chunk)
                    self._cond.notify()
                    return
                # Cleared under the lock, so a reader's later set() cannot be lost.
                self._space.clear()
            await self._space.wait()

    def finish(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify()

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._chunks.clear()
            self._buffered = 0
            self._cond.notify()

    def hexdigest(self) -> str:
        # Called once the uploader thread has ended.
        return self._sha.hexdigest()

    # -- uploader side (worker thread) --

    def read(self, size: int = -1) -> bytes:
        need = size if size >= 0 else sys.maxsize
        pieces: list[memoryview] = []
        got = 0
        at_eof = False
        while got < need:
            with self._cond:
                while not self._chunks and not self._eof and not self._failed:
                    self._cond.wait()
                if self._failed:
                    raise _WriterGone()
                if not self._chunks:
                    at_eof = True
                    break
                chunk = self._chunks.popleft()
                if len(chunk) > need - got:
                    # memoryview slices: splitting a large chunk copies nothing.
                    self._chunks.appendleft(chunk[need - got:])
                    chunk = chunk[: need - got]
                self._buffered -= len(chunk)
            self._wake_writer()
            pieces.append(chunk)
            got += len(chunk)
        data = b"".join(pieces)
        del pieces
        # Hash outside the lock: the producer takes it on the event loop thread. Only this thread
        # touches the hash until the upload has ended.
        self._sha.update(data)
        self.size += len(data)
        if at_eof and self._expected is not None:
            actual = self._sha.hexdigest()
            if actual != self._expected:
                raise DigestMismatch(self._expected, actual)
        return data

    def reader_done(self) -> None:
        with self._cond:
            self._reader_done = True
            self._chunks.clear()
            self._buffered = 0
        self._wake_writer()

    def _wake_writer(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._space.set)
        except RuntimeError:
            pass  # loop closed: no producer left to wake


def _as_view(chunk: bytes) -> memoryview:
    # A caller may reuse a bytearray after yielding it; bytes are immutable and can be shared.
    return memoryview(chunk if isinstance(chunk, bytes) else bytes(chunk))


def _take(iterator: Iterator[MinioObject], count: int) -> list[MinioObject]:
    batch = []
    for item in iterator:
        batch.append(item)
        if len(batch) >= count:
            break
    return batch


def _utc(value: datetime | None) -> datetime:
    if value is None:
        return datetime.fromtimestamp(0, tz=UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class S3ObjectStore(ObjectStore):
    def __init__(self, settings: ObjectStoreSettings) -> None:
        self._settings = settings
        self._endpoint = settings.endpoint
        self._bucket = settings.bucket
        self._part_size = settings.part_size_bytes
        scheme = "https" if settings.secure else "http"
        self._where = f"{scheme}://{settings.endpoint}/{settings.bucket}"
        timeout = settings.timeout_seconds
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout, _MAX_CONNECT_TIMEOUT_SECONDS), read=timeout),
            maxsize=_MAX_CONCURRENT_UPLOADS,
            cert_reqs="CERT_REQUIRED" if settings.secure else "CERT_NONE",
            ca_certs=certifi.where() if settings.secure else None,
            # Few, quick retries: an unreachable server must fail in seconds, not minutes.
            retries=urllib3.Retry(
                total=2, connect=1, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)
            ),
        )
        access_key = settings.access_key.get_secret_value()
        self._client = Minio(
            settings.endpoint,
            access_key=access_key or None,
            secret_key=settings.secret_key.get_secret_value() if access_key else None,
            secure=settings.secure,
            # A fixed region avoids a GetBucketLocation round trip per bucket.
            region=settings.region,
            http_client=self._http,
        )
        self._uploads = concurrent.futures.ThreadPoolExecutor(
            max_workers=_MAX_CONCURRENT_UPLOADS, thread_name_prefix="objectstore-s3-upload"
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"S3ObjectStore({self._where!r})"

    # ---- error mapping ----

    def _translate(self, exc: BaseException, key: str | None) -> BaseException:
        if isinstance(exc, (ObjectStoreError, _WriterGone, ValueError)):
            return exc
        if isinstance(exc, S3Error):
            status = exc.response.status if exc.response is not None else 0
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound") and key is not None:
                return ObjectNotFound(key)
            if exc.code == "NoSuchBucket":
                return ObjectStoreError(
                    f"bucket {self._bucket!r} does not exist at {self._endpoint} (call ensure_ready)"
                )
            if status >= 500 or exc.code in ("SlowDown", "ServiceUnavailable", "RequestTimeout"):
                return ObjectStoreUnavailable(f"object store at {self._endpoint} failed: {exc.code}: {exc.message}")
            return ObjectStoreError(f"object store at {self._endpoint}: {exc.code}: {exc.message} (key {key!r})")
        if isinstance(exc, ServerError):
            return ObjectStoreUnavailable(f"object store at {self._endpoint} failed: HTTP {exc.status_code}")
        if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
            return ObjectStoreUnavailable(f"object store at {self._endpoint} unreachable: {exc}")
        if isinstance(exc, InvalidResponseError):
            return ObjectStoreError(f"object store at {self._endpoint} sent a non-S3 response: {exc}")
        if isinstance(exc, MinioException):
            return ObjectStoreError(f"object store at {self._endpoint}: {exc}")
        return exc

    async def _call(self, key: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise ObjectStoreError(f"object store {self._where} is closed")
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:
            translated = self._translate(exc, key)
            if translated is exc:
                raise
            raise translated from exc

    # ---- lifecycle ----

    async def ensure_ready(self) -> None:
        if await self._call(None, self._client.bucket_exists, self._bucket):
            return
        try:
            await self._call(None, self._client.make_bucket, self._bucket, location=self._settings.region)
        except ObjectStoreError as exc:
            # Another process may have created it between our check and our create.
            cause = exc.__cause__
            if not (isinstance(cause, S3Error) and cause.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")):
                raise

    async def ping(self) -> bool:
        try:
            return bool(
                await asyncio.wait_for(
                    self._call(None, self._client.bucket_exists, self._bucket),
                    timeout=self._settings.timeout_seconds,
                )
            )
        except Exception:
            return False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Running uploads end on their own once their producers finish or fail.
        self._uploads.shutdown(wait=False, cancel_futures=True)
        self._http.clear()

    # ---- writes ----

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> PutResult:
        check_key(key)
        expected = normalize_sha256(expected_sha256)
        if self._closed:
            raise ObjectStoreError(f"object store {self._where} is closed")
        pipe = _ChunkPipe(asyncio.get_running_loop(), expected)
        thread_future = self._uploads.submit(self._upload_sync, key, pipe)
        # Also runs when the upload is cancelled before starting (close()), so the producer never
        # waits on a reader that will not come.
        thread_future.add_done_callback(lambda _: pipe.reader_done())
        upload = asyncio.wrap_future(thread_future)
        try:
            try:
                total = 0
                async for chunk in chunks:
                    if not chunk:
                        continue
                    total += len(chunk)
                    if max_bytes is not None and total > max_bytes:
                        raise SizeLimitExceeded(max_bytes)
                    await pipe.write(_as_view(chunk))
            except _ReaderGone:
                pass  # the uploader thread failed: its error is raised by awaiting it below
            else:
                pipe.finish()
            if thread_future.cancelled():
                raise ObjectStoreError(f"object store {self._where} was closed during the upload of {key!r}")
            await asyncio.shield(upload)
            return PutResult(key=key, size=pipe.size, sha256=pipe.hexdigest())
        except BaseException:
            # Unblock the uploader (it aborts the multipart upload) or drop it if not started yet,
            # then wait for it so no thread or partial upload outlives this call.
            pipe.fail()
            if not thread_future.cancel():
                try:
                    await asyncio.shield(upload)
                except Exception:
                    pass
                else:
                    # Completed just before we failed (e.g. cancelled during the final request).
                    try:
                        await asyncio.shield(self._call(key, self._client.remove_object, self._bucket, key))
                    except Exception:
                        pass
            raise

    def _upload_sync(self, key: str, pipe: _ChunkPipe) -> None:
        try:
            # Sequential parts (num_parallel_uploads=1): minio's parallel pool buffers extra parts
            # and leaks its worker threads when the reader raises.
            self._client.put_object(
                self._bucket,
                key,
                pipe,  # type: ignore[arg-type]  # duck-typed: minio only calls read()
                length=-1,
                part_size=self._part_size,
                num_parallel_uploads=1,
            )
        except Exception as exc:
            translated = self._translate(exc, key)
            if translated is exc:
                raise
            raise translated from exc

    async def delete(self, key: str) -> None:
        check_key(key)
        # S3 DELETE of a missing key succeeds: idempotent already.
        await self._call(key, self._client.remove_object, self._bucket, key)

    async def promote(self, src_key: str, dst_key: str) -> bool:
        check_key(src_key)
        check_key(dst_key)
        await self.stat(src_key)  # ObjectNotFound for a missing source, in both branches
        if await self.exists(dst_key):
            await self.delete(src_key)
            return False
        # minio's copy_object switches to a multipart compose above 5 GiB (the CopyObject limit).
        await self._call(src_key, self._client.copy_object, self._bucket, dst_key, CopySource(self._bucket, src_key))
        await self.delete(src_key)
        return True

    # ---- reads ----

    async def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        obj = await self._call(key, self._client.stat_object, self._bucket, key)
        return ObjectInfo(key=key, size=int(obj.size or 0), last_modified=_utc(obj.last_modified))

    async def get_stream(
        self, key: str, *, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        check_key(key)
        check_range(offset, length, chunk_size)
        if length == 0:
            # minio reads length=0 as "to the end"; still report a missing key.
            await self.stat(key)
            return
        try:
            response = await self._call(
                key, self._client.get_object, self._bucket, key, offset=offset, length=length or 0
            )
        except ObjectStoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, S3Error) and cause.code == "InvalidRange":
                return  # offset at or past the end: no bytes, like a file
            raise
        try:
            while True:
                data = await self._call(key, functools.partial(response.read, chunk_size))
                if not data:
                    break
                yield data
        finally:
            # Closing before release keeps a half-read connection out of the pool.
            response.close()
            response.release_conn()

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        check_prefix(prefix)
        # S3 lists keys in UTF-8 byte order, which is Python's str order: already sorted.
        iterator = iter(self._client.list_objects(self._bucket, prefix=prefix or None, recursive=True))
        while True:
            batch = await self._call(prefix, _take, iterator, _LIST_BATCH)
            for obj in batch:
                if obj.is_dir or obj.object_name is None:
                    continue
                yield ObjectInfo(key=obj.object_name, size=int(obj.size or 0), last_modified=_utc(obj.last_modified))
            if len(batch) < _LIST_BATCH:
                return
