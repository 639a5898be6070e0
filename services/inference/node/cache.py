"""Content-addressed artifact cache on local disk: `<dir>/sha256/<digest>`.

A file gets its final name only after its bytes hashed to that digest (invariant 2): the name is the
"verified" marker, so a cached artifact is trusted without re-hashing it on every load or restart.
Downloads go to a temp file in the same directory (atomic rename), concurrent fetches of one digest
share one download, and least recently used artifacts are evicted beyond `max_bytes`, except those
pinned by loaded models. One process owns a cache directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pathlib
import re
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, BinaryIO

import structlog

from services.common.files import fsync_dir
from services.common.objectstore import ObjectStore
from services.common.objectstore.keys import blob_key, check_sha256

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
# Temp files of downloads in progress; any left at open() belong to a crashed process.
_TMP_PREFIX = ".tmp-"
# Download progress is logged at most this often.
_PROGRESS_SECONDS = 1.0


class CorruptArtifact(Exception):
    """Downloaded bytes do not hash to the digest they were stored under; they were discarded."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class ArtifactCache:
    def __init__(
        self,
        directory: pathlib.Path,
        max_bytes: int,
        store: ObjectStore,
        *,
        logger: Any = None,
        chunk_size: int = 1 << 20,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self._dir = pathlib.Path(directory).absolute() / "sha256"
        self._max_bytes = max_bytes
        self._store = store
        self._chunk_size = chunk_size
        self._log = logger if logger is not None else structlog.get_logger(__name__)
        # Called whenever the set of cached digests changes (the node record advertises it).
        self._on_change = on_change
        # digest -> size, least recently used first.
        self._entries: OrderedDict[str, int] = OrderedDict()
        # Pins may name digests not cached yet: a fetch pins before it downloads.
        self._pins: Counter[str] = Counter()
        self._downloads: dict[str, asyncio.Task[None]] = {}
        self._open_lock = asyncio.Lock()
        self._opened = False

    @property
    def directory(self) -> pathlib.Path:
        return self._dir

    def path(self, digest: str) -> pathlib.Path:
        return self._dir / check_sha256(digest)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Rebuild the index from the directory (LRU order from mtimes), remove partial downloads,
        then evict down to the budget. Called by the first fetch if not called before."""
        async with self._open_lock:
            if self._opened:
                return
            found, removed = await asyncio.to_thread(self._scan)
            self._entries = OrderedDict(found)
            self._opened = True
            self._log.info(
                "artifact cache opened",
                directory=str(self._dir),
                artifacts=len(found),
                bytes=self.size_bytes(),
                max_bytes=self._max_bytes,
                removed_partial=removed,
            )
            self._evict()

    def _scan(self) -> tuple[list[tuple[str, int]], int]:
        self._dir.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        removed = 0
        for entry in os.scandir(self._dir):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if _DIGEST_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                found.append((st.st_mtime, entry.name, st.st_size))
            elif entry.name.startswith(_TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                removed += 1
        found.sort()
        return [(digest, size) for _, digest, size in found], removed

    async def close(self) -> None:
        """Cancel downloads in progress (their temp files are removed)."""
        tasks = list(self._downloads.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- queries -----------------------------------------------------------------------------------

    def cached_digests(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    def size_bytes(self) -> int:
        return sum(self._entries.values())

    def pinned(self, digest: str) -> bool:
        return self._pins[digest] > 0

    # -- pins ----------------------------------------------------------------------------------------

    def pin(self, digest: str) -> None:
        """Protect `digest` from eviction (counted: every pin needs its unpin)."""
        self._pins[check_sha256(digest)] += 1

    def unpin(self, digest: str) -> None:
        """Release one pin; the artifact stays cached but becomes evictable (evicted now if over budget)."""
        self._release(digest)
        self._evict()

    def _release(self, digest: str) -> None:
        if self._pins[digest] <= 1:
            self._pins.pop(digest, None)
        else:
            self._pins[digest] -= 1

    # -- fetch ---------------------------------------------------------------------------------------

    async def fetch(self, digest: str, *, pin: bool = False) -> pathlib.Path:
        """Path of the verified artifact, downloading it first if needed.

        `pin=True` pins it atomically with the fetch (release with `unpin`). Raises ObjectNotFound,
        ObjectStoreUnavailable / ObjectStoreError, CorruptArtifact (nothing kept) or OSError (disk).
        """
        check_sha256(digest)
        # Pinned for the duration, so a concurrent eviction cannot remove it before we return.
        self._pins[digest] += 1
        try:
            path = await self._fetch(digest)
        except BaseException:
            self._release(digest)
            raise
        if not pin:
            self._release(digest)
        return path

    async def _fetch(self, digest: str) -> pathlib.Path:
        if not self._opened:
            await self.open()
        path = self._dir / digest
        while True:
            if digest in self._entries:
                if await asyncio.to_thread(self._touch, path):
                    self._entries.move_to_end(digest)
                    return path
                # Removed behind our back: forget it and download again.
                self._log.warning("cached artifact vanished from disk, downloading again", sha256=digest)
                self._entries.pop(digest, None)
                self._changed()
            task = self._downloads.get(digest)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._download(digest), name=f"download-{digest[:12]}")
                self._downloads[digest] = task
                task.add_done_callback(self._download_done)
            else:
                self._log.debug("artifact download already in progress, waiting for it", sha256=digest)
            # Shielded: one waiter giving up must not abort the download the others wait for.
            await asyncio.shield(task)

    def _download_done(self, task: asyncio.Task[None]) -> None:
        for digest, running in list(self._downloads.items()):
            if running is task:
                del self._downloads[digest]

    @staticmethod
    def _touch(path: pathlib.Path) -> bool:
        # mtime records recency, so LRU order survives a restart.
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    async def _download(self, digest: str) -> None:
        key = blob_key(digest)
        info = await self._store.stat(key)
        self._evict(reserve=info.size)
        final = self._dir / digest
        tmp = self._dir / f"{_TMP_PREFIX}{digest}-{uuid.uuid4().hex}"
        started = time.monotonic()
        self._log.info("downloading artifact", sha256=digest, size=info.size)
        handle: BinaryIO = await asyncio.to_thread(self._open_tmp, tmp)
        sha = hashlib.sha256()
        received = 0
        try:
            last_report = started
            async for chunk in self._store.get_stream(key, chunk_size=self._chunk_size):
                await asyncio.to_thread(self._write, handle, sha, chunk)
                received += len(chunk)
                now = time.monotonic()
                if now - last_report >= _PROGRESS_SECONDS:
                    last_report = now
                    self._log.debug("artifact download progress", sha256=digest, bytes=received, size=info.size)
            actual = sha.hexdigest()
            if actual != digest:
                raise CorruptArtifact(digest, actual)
            await asyncio.to_thread(self._commit, handle, tmp, final)
        except BaseException as exc:
            # Shielded so the temp file is removed even when we are being cancelled.
            cleanup = asyncio.get_running_loop().run_in_executor(None, self._discard, handle, tmp)
            with contextlib.suppress(Exception):
                await asyncio.shield(cleanup)
            if isinstance(exc, CorruptArtifact):
                self._log.error("downloaded artifact failed verification; discarded", sha256=digest, actual=exc.actual)
            raise
        self._entries[digest] = received
        self._entries.move_to_end(digest)
        seconds = time.monotonic() - started
        self._log.info(
            "artifact downloaded and verified",
            sha256=digest,
            bytes=received,
            seconds=round(seconds, 3),
            mib_per_second=round(received / 2**20 / seconds, 1) if seconds > 0 else None,
        )
        self._evict()
        self._changed()

    @staticmethod
    def _open_tmp(tmp: pathlib.Path) -> BinaryIO:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        return open(tmp, "xb")  # noqa: SIM115 - closed in _commit / _discard

    @staticmethod
    def _write(handle: BinaryIO, sha: Any, chunk: bytes) -> None:
        handle.write(chunk)
        sha.update(chunk)

    @staticmethod
    def _commit(handle: BinaryIO, tmp: pathlib.Path, final: pathlib.Path) -> None:
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(tmp, final)
        fsync_dir(final.parent)

    @staticmethod
    def _discard(handle: BinaryIO, tmp: pathlib.Path) -> None:
        with contextlib.suppress(OSError):
            handle.close()
        tmp.unlink(missing_ok=True)

    # -- eviction ------------------------------------------------------------------------------------

    def _evict(self, reserve: int = 0) -> None:
        """Remove least recently used unpinned artifacts until `reserve` more bytes fit the budget."""
        total = self.size_bytes()
        if total + reserve <= self._max_bytes:
            return
        evicted = []
        for digest in list(self._entries):
            if total + reserve <= self._max_bytes:
                break
            if self._pins[digest] > 0:
                continue
            size = self._entries.pop(digest)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._dir / digest)
            total -= size
            evicted.append(digest)
            self._log.info("evicted artifact from cache", sha256=digest, bytes=size)
        if total + reserve > self._max_bytes:
            # Pinned artifacts back loaded models; refusing a load would be worse than a soft budget.
            self._log.warning(
                "artifact cache over budget: the rest is pinned by loaded models",
                bytes=total,
                reserve=reserve,
                max_bytes=self._max_bytes,
            )
        if evicted:
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
