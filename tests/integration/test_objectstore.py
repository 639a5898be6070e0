"""Object store behaviour on both backends: a real local directory and a real S3-protocol server (moto)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from services.common.objectstore import (
    DigestMismatch,
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreUnavailable,
    S3ObjectStore,
    SizeLimitExceeded,
    create_object_store,
)
from services.common.objectstore.keys import (
    BLOBS_PREFIX,
    UPLOADS_PREFIX,
    blob_key,
    engine_key,
    parse_blob_key,
    upload_key,
)
from services.common.settings import ObjectStoreKind, ObjectStoreSettings
from tests.support.servers import free_port

MiB = 1 << 20


@pytest.fixture
async def store(store_settings: ObjectStoreSettings) -> AsyncIterator[ObjectStore]:
    async with create_object_store(store_settings) as object_store:
        await object_store.ensure_ready()
        yield object_store


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def chunked(data: bytes, chunk: int = MiB) -> AsyncIterator[bytes]:
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]
        await asyncio.sleep(0)


def assert_no_partial_uploads(settings: ObjectStoreSettings) -> None:
    """No temp files (local) / no unfinished multipart uploads (S3) are left behind."""
    if settings.kind is ObjectStoreKind.LOCAL:
        assert list((settings.path / ".tmp").iterdir()) == []
        return
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{settings.endpoint}",
        aws_access_key_id=settings.access_key.get_secret_value(),
        aws_secret_access_key=settings.secret_key.get_secret_value(),
        region_name=settings.region,
    )
    assert client.list_multipart_uploads(Bucket=settings.bucket).get("Uploads", []) == []


# ---- round trips ----


async def test_factory_picks_implementation(local_store_settings, s3_settings):
    assert isinstance(create_object_store(local_store_settings), LocalObjectStore)
    s3 = create_object_store(s3_settings)
    assert isinstance(s3, S3ObjectStore)
    await s3.close()


async def test_put_bytes_roundtrip(store: ObjectStore):
    data = b"hello object store"
    before = datetime.now(UTC) - timedelta(seconds=5)
    result = await store.put_bytes("a/b/hello.txt", data)
    assert result.key == "a/b/hello.txt"
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert await store.get_bytes("a/b/hello.txt") == data
    info = await store.stat("a/b/hello.txt")
    assert info.key == "a/b/hello.txt" and info.size == len(data)
    assert info.last_modified.tzinfo is not None and info.last_modified.utcoffset() == timedelta(0)
    assert before <= info.last_modified <= datetime.now(UTC) + timedelta(seconds=5)
    assert await store.ping()


async def test_empty_object(store: ObjectStore):
    result = await store.put_stream("empty", chunked(b""))
    assert result.size == 0 and result.sha256 == hashlib.sha256(b"").hexdigest()
    assert await store.get_bytes("empty") == b""
    assert (await store.stat("empty")).size == 0


async def test_multipart_stream_roundtrip(store: ObjectStore, store_settings: ObjectStoreSettings):
    # 12 MiB with 5 MiB parts: three parts on S3, the last one short.
    data = payload(12 * MiB + 123)
    result = await store.put_stream("uploads/big", chunked(data, 700_000))
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    chunks = [chunk async for chunk in store.get_stream("uploads/big", chunk_size=3 * MiB)]
    assert all(len(chunk) <= 3 * MiB for chunk in chunks)
    assert b"".join(chunks) == data
    # A single chunk larger than a part is split, not buffered whole by the store.
    result = await store.put_bytes("uploads/big2", data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert await store.get_bytes("uploads/big2", offset=len(data) - 10) == data[-10:]
    assert_no_partial_uploads(store_settings)


async def test_abandoned_read_releases_connection(store: ObjectStore):
    data = payload(3 * MiB)
    await store.put_bytes("partial", data)
    for _ in range(3):
        stream = store.get_stream("partial", chunk_size=64 * 1024)
        assert await stream.__anext__() == data[: 64 * 1024]
        await stream.aclose()  # stop early: the half-read response must not poison the pool
    assert await store.get_bytes("partial") == data


async def test_concurrent_uploads(store: ObjectStore):
    blobs = {f"c/{i}": payload(2 * MiB + i, seed=i) for i in range(6)}
    results = await asyncio.gather(*(store.put_stream(k, chunked(v, 300_000)) for k, v in blobs.items()))
    assert [r.sha256 for r in results] == [hashlib.sha256(v).hexdigest() for v in blobs.values()]
    for key, data in blobs.items():
        assert await store.get_bytes(key) == data


async def test_expected_sha256_accepted(store: ObjectStore):
    data = payload(1000)
    digest = hashlib.sha256(data).hexdigest()
    result = await store.put_stream("ok", chunked(data, 100), expected_sha256=digest.upper())
    assert result.sha256 == digest


async def test_ranged_reads(store: ObjectStore):
    data = bytes(range(256)) * 40
    await store.put_bytes("ranged", data)
    assert await store.get_bytes("ranged", offset=100, length=50) == data[100:150]
    assert await store.get_bytes("ranged", offset=1000) == data[1000:]
    assert await store.get_bytes("ranged", length=10) == data[:10]
    assert await store.get_bytes("ranged", offset=len(data) - 5, length=100) == data[-5:]
    assert await store.get_bytes("ranged", offset=len(data)) == b""
    assert await store.get_bytes("ranged", offset=len(data) + 10) == b""
    assert await store.get_bytes("ranged", offset=3, length=0) == b""
    chunks = [c async for c in store.get_stream("ranged", offset=7, length=2500, chunk_size=1000)]
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    assert b"".join(chunks) == data[7:2507]
    with pytest.raises(ValueError):
        await store.get_bytes("ranged", offset=-1)


async def test_stat_exists_delete(store: ObjectStore):
    await store.put_bytes("x/y", b"1")
    assert await store.exists("x/y")
    assert not await store.exists("x")  # a "directory" is no object
    await store.delete("x/y")
    assert not await store.exists("x/y")
    await store.delete("x/y")  # idempotent
    await store.delete("never/was")
    with pytest.raises(ObjectNotFound):
        await store.stat("x/y")


async def test_overwrite_replaces(store: ObjectStore):
    await store.put_bytes("k", b"old")
    await store.put_bytes("k", b"new!")
    assert await store.get_bytes("k") == b"new!"


async def test_list_by_prefix_sorted(store: ObjectStore):
    keys = ["a/c/d", "a/b", "a.b", "ab", "b/1", "a/a", "a-z"]
    for key in keys:
        await store.put_bytes(key, key.encode())
    listed = [info async for info in store.list("a")]
    assert [info.key for info in listed] == sorted(k for k in keys if k.startswith("a"))
    assert {info.key: info.size for info in listed}["a/c/d"] == 5
    assert [info.key async for info in store.list("a/")] == ["a/a", "a/b", "a/c/d"]
    assert [info.key async for info in store.list("")] == sorted(keys)
    assert [info.key async for info in store.list("zzz/")] == []


async def test_missing_keys_raise_not_found(store: ObjectStore):
    stream = store.get_stream("no/such/key")  # raises on first iteration, not on the call
    with pytest.raises(ObjectNotFound):
        await stream.__anext__()
    with pytest.raises(ObjectNotFound):
        await store.get_bytes("no/such/key")
    with pytest.raises(ObjectNotFound):
        await store.get_bytes("no/such/key", length=0)
    with pytest.raises(ObjectNotFound) as info:
        await store.stat("no/such/key")
    assert info.value.key == "no/such/key"
    assert not await store.exists("no/such/key")


# ---- failed uploads leave nothing behind ----


@pytest.mark.parametrize("size", [1000, 7 * MiB])  # single PUT and multipart on S3
async def test_digest_mismatch_leaves_nothing(store: ObjectStore, store_settings, size):
    data = payload(size)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DigestMismatch) as info:
        await store.put_stream("uploads/bad", chunked(data), expected_sha256=wrong)
    assert info.value.expected == wrong
    assert info.value.actual == hashlib.sha256(data).hexdigest()
    assert not await store.exists("uploads/bad")
    assert_no_partial_uploads(store_settings)


@pytest.mark.parametrize("size", [1000, 7 * MiB])
async def test_size_limit_leaves_nothing(store: ObjectStore, store_settings, size):
    data = payload(size)
    with pytest.raises(SizeLimitExceeded):
        await store.put_stream("uploads/big", chunked(data, 100_000), max_bytes=size - 1)
    assert not await store.exists("uploads/big")
    assert_no_partial_uploads(store_settings)
    # Exactly at the limit is fine.
    result = await store.put_stream("uploads/big", chunked(data, 100_000), max_bytes=size)
    assert result.size == size


async def test_source_error_leaves_nothing(store: ObjectStore, store_settings):
    async def failing() -> AsyncIterator[bytes]:
        for _ in range(6):  # past the first 5 MiB part on S3
            yield payload(MiB)
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        await store.put_stream("uploads/broken", failing())
    assert not await store.exists("uploads/broken")
    assert_no_partial_uploads(store_settings)


async def test_failed_overwrite_keeps_previous(store: ObjectStore):
    await store.put_bytes("k", b"previous")
    with pytest.raises(DigestMismatch):
        await store.put_stream("k", chunked(b"next"), expected_sha256="0" * 64)
    assert await store.get_bytes("k") == b"previous"


async def test_cancelled_upload_leaves_nothing(store: ObjectStore, store_settings):
    sent = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield payload(MiB)
        sent.set()
        await asyncio.Event().wait()  # a client that stops sending
        yield b""

    task = asyncio.create_task(store.put_stream("uploads/stalled", stalls()))
    await asyncio.wait_for(sent.wait(), 10)
    await asyncio.sleep(0.2)  # let the S3 uploader start the multipart upload
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await store.exists("uploads/stalled")
    assert_no_partial_uploads(store_settings)


async def test_s3_upload_threads_end(s3_settings):
    object_store = create_object_store(s3_settings)
    await object_store.ensure_ready()
    for _ in range(3):
        with pytest.raises(SizeLimitExceeded):
            await object_store.put_stream("uploads/x", chunked(payload(6 * MiB)), max_bytes=MiB)
    await object_store.put_bytes("uploads/y", b"ok")
    await object_store.close()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("objectstore-s3-upload") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "uploader threads still alive after close"
        await asyncio.sleep(0.05)


# ---- promote ----


async def test_promote_moves_and_dedupes(store: ObjectStore):
    data = payload(3000)
    digest = hashlib.sha256(data).hexdigest()
    await store.put_bytes(upload_key("u1"), data)
    assert await store.promote(upload_key("u1"), blob_key(digest)) is True
    assert not await store.exists(upload_key("u1"))
    assert await store.get_bytes(blob_key(digest)) == data

    await store.put_bytes(upload_key("u2"), data)
    assert await store.promote(upload_key("u2"), blob_key(digest)) is False
    assert not await store.exists(upload_key("u2"))
    assert await store.get_bytes(blob_key(digest)) == data
    assert [info.key async for info in store.list(BLOBS_PREFIX)] == [blob_key(digest)]
    assert [info.key async for info in store.list(UPLOADS_PREFIX)] == []

    with pytest.raises(ObjectNotFound):
        await store.promote(upload_key("missing"), blob_key("0" * 64))


# ---- unreachable server, invalid keys ----


async def test_unreachable_s3_fails_fast():
    settings = ObjectStoreSettings(
        kind=ObjectStoreKind.S3,
        endpoint=f"127.0.0.1:{free_port()}",  # nothing listens there
        access_key="testing",
        secret_key="testing",
        timeout_seconds=30,
    )
    async with create_object_store(settings) as object_store:
        started = time.monotonic()
        assert await object_store.ping() is False
        with pytest.raises(ObjectStoreUnavailable, match=settings.endpoint):
            await object_store.put_bytes("k", b"data")
        with pytest.raises(ObjectStoreUnavailable):
            await object_store.put_stream("k", chunked(payload(6 * MiB)))
        with pytest.raises(ObjectStoreUnavailable):
            await object_store.stat("k")
        with pytest.raises(ObjectStoreUnavailable):
            await object_store.get_bytes("k")
        with pytest.raises(ObjectStoreUnavailable):
            await object_store.ensure_ready()
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "a/../../b", "a//b", "a/./b", "a/", "a\\b", "a\x00b"])
async def test_invalid_keys_rejected(store: ObjectStore, key):
    with pytest.raises(ValueError):
        await store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        await store.stat(key)
    with pytest.raises(ValueError):
        await store.get_bytes(key)
    with pytest.raises(ValueError):
        await store.delete(key)


async def test_local_reserves_temp_dir(local_store_settings):
    async with create_object_store(local_store_settings) as object_store:
        await object_store.ensure_ready()
        with pytest.raises(ValueError):
            await object_store.put_bytes(".tmp/x", b"x")
        with pytest.raises(ValueError):
            [info async for info in object_store.list("../")]


def test_key_helpers():
    digest = hashlib.sha256(b"x").hexdigest()
    assert blob_key(digest) == f"blobs/sha256/{digest}"
    assert parse_blob_key(blob_key(digest)) == digest
    assert parse_blob_key(upload_key("abc")) is None
    assert parse_blob_key(BLOBS_PREFIX + "xyz") is None
    assert upload_key("abc-123") == "uploads/abc-123"
    assert engine_key(digest, "sm_90", "10.3.0", "fp16") == f"engines/{digest}/sm_90/10.3.0-fp16.plan"
    for bad in ["", digest.upper(), digest[:-1], digest + "0", "g" * 64]:
        with pytest.raises(ValueError):
            blob_key(bad)
    for bad in ["", "a/b", "..", ".hidden"]:
        with pytest.raises(ValueError):
            upload_key(bad)
    with pytest.raises(ValueError):
        engine_key(digest, "../sm_90", "10.3.0", "fp16")
