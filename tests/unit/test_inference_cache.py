"""The node's artifact cache against a real local object store: verification, dedupe, LRU, restart."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib

import pytest

from services.common.objectstore import LocalObjectStore, ObjectNotFound, ObjectStore
from services.common.objectstore.keys import blob_key
from services.inference.node.cache import ArtifactCache, CorruptArtifact


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CountingStore(LocalObjectStore):
    """Counts downloads and can slow them, to observe deduplication."""

    def __init__(self, settings, delay: float = 0.0) -> None:
        super().__init__(settings)
        self.downloads: list[str] = []
        self.delay = delay

    async def get_stream(self, key, **kwargs):
        self.downloads.append(key)
        async for chunk in super().get_stream(key, **kwargs):
            await asyncio.sleep(self.delay)
            yield chunk


@pytest.fixture
async def store(local_store_settings) -> ObjectStore:
    store = CountingStore(local_store_settings)
    await store.ensure_ready()
    return store


async def put_blob(store: ObjectStore, data: bytes) -> str:
    digest = digest_of(data)
    await store.put_bytes(blob_key(digest), data)
    return digest


async def test_fetch_downloads_verifies_and_reuses(store, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 7)
    digest = await put_blob(store, data)
    cache = ArtifactCache(tmp_path / "cache", 1 << 30, store, chunk_size=1 << 20)

    path = await cache.fetch(digest)
    assert path == tmp_path / "cache" / "sha256" / digest
    assert path.read_bytes() == data
    assert cache.cached_digests() == [digest]
    assert cache.size_bytes() == len(data)
    # A second fetch is a cache hit.
    assert await cache.fetch(digest) == path
    assert store.downloads == [blob_key(digest)]
    # No temp files are left in the directory.
    assert sorted(os.listdir(path.parent)) == [digest]


async def test_concurrent_fetches_share_one_download(local_store_settings, tmp_path):
    store = CountingStore(local_store_settings, delay=0.05)
    await store.ensure_ready()
    data = os.urandom(256 * 1024)
    digest = await put_blob(store, data)
    cache = ArtifactCache(tmp_path / "cache", 1 << 30, store, chunk_size=16 * 1024)

    paths = await asyncio.gather(*(cache.fetch(digest) for _ in range(8)))
    assert len(set(paths)) == 1
    assert store.downloads == [blob_key(digest)]
    assert paths[0].read_bytes() == data


async def test_cancelled_waiter_does_not_abort_the_shared_download(local_store_settings, tmp_path):
    store = CountingStore(local_store_settings, delay=0.02)
    await store.ensure_ready()
    digest = await put_blob(store, os.urandom(128 * 1024))
    cache = ArtifactCache(tmp_path / "cache", 1 << 30, store, chunk_size=16 * 1024)

    first = asyncio.create_task(cache.fetch(digest))
    second = asyncio.create_task(cache.fetch(digest))
    await asyncio.sleep(0.05)
    first.cancel()
    path = await second
    assert path.is_file()
    assert store.downloads == [blob_key(digest)]
    assert not cache.pinned(digest)  # the cancelled fetch released its transient pin


async def test_corrupt_blob_is_rejected_and_not_kept(store, tmp_path):
    good = b"the bytes the digest was computed from"
    digest = digest_of(good)
    await store.put_bytes(blob_key(digest), b"different bytes under that digest")
    cache = ArtifactCache(tmp_path / "cache", 1 << 30, store)

    with pytest.raises(CorruptArtifact) as info:
        await cache.fetch(digest, pin=True)
    assert info.value.expected == digest
    assert info.value.actual == digest_of(b"different bytes under that digest")
    assert str(info.value).startswith(f"sha256 mismatch: expected {digest}, got ")
    assert digest not in cache
    assert not cache.pinned(digest)
    assert os.listdir(cache.directory) == []


async def test_missing_blob_raises_not_found(store, tmp_path):
    cache = ArtifactCache(tmp_path / "cache", 1 << 30, store)
    with pytest.raises(ObjectNotFound):
        await cache.fetch("0" * 64)
    with pytest.raises(ValueError):
        await cache.fetch("not-a-digest")


async def test_lru_eviction_skips_pinned_artifacts(store, tmp_path):
    blobs = [os.urandom(1000) for _ in range(4)]
    a, b, c, d = [await put_blob(store, data) for data in blobs]
    cache = ArtifactCache(tmp_path / "cache", 3000, store)

    await cache.fetch(a, pin=True)
    await cache.fetch(b)
    await cache.fetch(c)
    # Fourth artifact: b is the least recently used unpinned one (a is older but pinned).
    await cache.fetch(d)
    assert cache.cached_digests() == sorted([a, c, d])
    assert not (cache.directory / b).exists()

    # Using c makes d the least recently used; unpinning a then makes a the oldest again.
    await cache.fetch(c)
    await cache.fetch(b)
    assert cache.cached_digests() == sorted([a, b, c])

    cache.unpin(a)
    await cache.fetch(d)
    assert cache.cached_digests() == sorted([b, c, d])


async def test_pinned_artifacts_may_exceed_the_budget_until_unpinned(store, tmp_path):
    a = await put_blob(store, os.urandom(1000))
    b = await put_blob(store, os.urandom(1000))
    cache = ArtifactCache(tmp_path / "cache", 1500, store)
    await cache.fetch(a, pin=True)
    await cache.fetch(b, pin=True)
    # Serving beats the budget: both stay while loaded models pin them.
    assert cache.cached_digests() == sorted([a, b])
    cache.unpin(a)
    assert cache.cached_digests() == [b]


async def test_restart_rebuilds_the_index_and_removes_partial_downloads(store, tmp_path):
    blobs = [os.urandom(1000) for _ in range(3)]
    digests = [await put_blob(store, data) for data in blobs]
    cache = ArtifactCache(tmp_path / "cache", 10_000, store)
    for digest in digests:
        await cache.fetch(digest)
    # Make digests[0] the most recently used before the "crash".
    await asyncio.sleep(0.01)
    await cache.fetch(digests[0])
    partial = cache.directory / f".tmp-{digests[1]}-deadbeef"
    partial.write_bytes(b"half a download")
    (cache.directory / "stray-file").write_bytes(b"x")

    reopened = ArtifactCache(tmp_path / "cache", 2000, store)
    await reopened.open()
    # Budget 2000: the least recently used (digests[1]) is evicted on open.
    assert reopened.cached_digests() == sorted([digests[0], digests[2]])
    assert not partial.exists()
    assert reopened.size_bytes() == 2000
    downloads = len(store.downloads)
    assert (await reopened.fetch(digests[2])).read_bytes() == blobs[2]
    assert len(store.downloads) == downloads  # served from disk, no download


async def test_vanished_file_is_downloaded_again(store, tmp_path):
    data = os.urandom(500)
    digest = await put_blob(store, data)
    cache = ArtifactCache(tmp_path / "cache", 10_000, store)
    path = await cache.fetch(digest)
    path.unlink()
    assert (await cache.fetch(digest)).read_bytes() == data
    assert len(store.downloads) == 2


async def test_on_change_reports_cached_digests(store, tmp_path):
    changes: list[list[str]] = []
    cache = ArtifactCache(tmp_path / "cache", 1000, store, on_change=lambda: changes.append(cache.cached_digests()))
    a = await put_blob(store, os.urandom(800))
    b = await put_blob(store, os.urandom(800))
    await cache.fetch(a)
    await cache.fetch(b)
    # b needs a's space: a is evicted before b is downloaded.
    assert changes == [[a], [], [b]]


def test_rejects_negative_budget(tmp_path):
    with pytest.raises(ValueError):
        ArtifactCache(pathlib.Path(tmp_path), -1, None)  # type: ignore[arg-type]
