"""Object store on a local directory: the single-machine default."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import pathlib
import stat as statmod
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from datetime import UTC, datetime
from typing import BinaryIO

from services.common.files import fsync_dir
from services.common.objectstore.base import (
    DigestMismatch,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    PutResult,
    SizeLimitExceeded,
    check_range,
    normalize_sha256,
)
from services.common.objectstore.keys import check_key, check_prefix
from services.common.settings import ObjectStoreSettings

# Temp files live under the root (same filesystem, so os.replace is atomic) but outside every
# key's directory, so listings never see half-written objects.
_TMP_DIR = ".tmp"
# Temp files older than this are leftovers of a crashed process.
_STALE_TMP_SECONDS = 24 * 3600


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(key=key, size=st.st_size, last_modified=datetime.fromtimestamp(st.st_mtime, tz=UTC))


class _TempObject:
    """A temp file being written from worker threads.

    All file operations hold one lock, so `discard` (run when the writer fails or is cancelled)
    waits for a write still running in a thread instead of racing it.
    """

    def __init__(self, tmp_dir: pathlib.Path) -> None:
        self.path = tmp_dir / f"{uuid.uuid4().hex}.part"
        self._lock = threading.Lock()
        self._file: BinaryIO | None = open(self.path, "xb")  # noqa: SIM115 - closed in commit/discard
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        with self._lock:
            if self._file is None:
                raise ObjectStoreError("upload already discarded")
            self._file.write(data)
            self._sha.update(data)
            self.size += len(data)

    def hexdigest(self) -> str:
        with self._lock:
            return self._sha.hexdigest()

    def commit(self, dst: pathlib.Path) -> None:
        with self._lock:
            if self._file is None:
                raise ObjectStoreError("upload already discarded")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, dst)
            fsync_dir(dst.parent)

    def discard(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self.path.unlink(missing_ok=True)


class LocalObjectStore(ObjectStore):
    def __init__(self, settings: ObjectStoreSettings) -> None:
        self._root = pathlib.Path(settings.path).absolute()
        self._tmp = self._root / _TMP_DIR

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self._root)!r})"

    def _path(self, key: str) -> pathlib.Path:
        check_key(key)
        if key.split("/", 1)[0] == _TMP_DIR:
            raise ValueError(f"invalid object key {key!r}: {_TMP_DIR!r} is reserved by the local store")
        return self._root / key

    def _error(self, action: str, key: str, exc: OSError) -> ObjectStoreError:
        return ObjectStoreError(f"local object store {str(self._root)!r}: {action} {key!r} failed: {exc}")

    # ---- lifecycle ----

    async def ensure_ready(self) -> None:
        def prepare() -> None:
            self._tmp.mkdir(parents=True, exist_ok=True)
            cutoff = time.time() - _STALE_TMP_SECONDS
            for entry in os.scandir(self._tmp):
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                except OSError:
                    pass  # another process may be cleaning up too

        try:
            await asyncio.to_thread(prepare)
        except OSError as exc:
            raise self._error("preparing", str(self._root), exc) from exc

    async def ping(self) -> bool:
        def check() -> bool:
            return self._tmp.is_dir() and os.access(self._tmp, os.W_OK) and os.access(self._root, os.W_OK)

        try:
            return await asyncio.to_thread(check)
        except Exception:
            return False

    async def close(self) -> None:
        return None

    # ---- writes ----

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> PutResult:
        dst = self._path(key)
        expected = normalize_sha256(expected_sha256)
        try:
            tmp = await asyncio.to_thread(self._open_temp)
        except OSError as exc:
            raise self._error("writing", key, exc) from exc
        try:
            total = 0
            async for chunk in chunks:
                if not chunk:
                    continue
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise SizeLimitExceeded(max_bytes)
                await self._io("writing", key, tmp.write, chunk)
            actual = tmp.hexdigest()
            if expected is not None and actual != expected:
                raise DigestMismatch(expected, actual)
            await self._io("writing", key, tmp.commit, dst)
            return PutResult(key=key, size=tmp.size, sha256=actual)
        except BaseException:
            # Runs in a thread even if we are cancelled again: discard waits for an in-flight write.
            discard = asyncio.get_running_loop().run_in_executor(None, tmp.discard)
            try:
                await asyncio.shield(discard)
            except Exception:
                pass
            raise

    async def _io(self, action: str, key: str, fn: Callable[..., object], *args: object) -> None:
        # Only our own file I/O errors become ObjectStoreError; errors of the caller's chunk
        # iterator propagate unchanged.
        try:
            await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise self._error(action, key, exc) from exc

    def _open_temp(self) -> _TempObject:
        try:
            return _TempObject(self._tmp)
        except FileNotFoundError:
            # Root removed or never prepared; recreate rather than fail every upload.
            self._tmp.mkdir(parents=True, exist_ok=True)
            return _TempObject(self._tmp)

    async def delete(self, key: str) -> None:
        path = self._path(key)

        def remove() -> None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except (IsADirectoryError, PermissionError, NotADirectoryError):
                # A directory or a path through a file is no object: nothing to delete.
                if path.is_file():
                    raise

        try:
            await asyncio.to_thread(remove)
        except OSError as exc:
            raise self._error("deleting", key, exc) from exc

    async def promote(self, src_key: str, dst_key: str) -> bool:
        src, dst = self._path(src_key), self._path(dst_key)

        def move() -> bool:
            if not src.is_file():
                raise ObjectNotFound(src_key)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                # link fails if dst exists, making "exists? else move" atomic across writers.
                os.link(src, dst)
            except FileExistsError:
                src.unlink(missing_ok=True)
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
                    raise
                # Filesystem without hard links: same content either way, so a race only costs a rewrite.
                if dst.is_file():
                    src.unlink(missing_ok=True)
                    return False
                os.replace(src, dst)
                fsync_dir(dst.parent)
                return True
            src.unlink()
            fsync_dir(dst.parent)
            return True

        try:
            return await asyncio.to_thread(move)
        except OSError as exc:
            raise self._error("promoting", f"{src_key} -> {dst_key}", exc) from exc

    # ---- reads ----

    async def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = await asyncio.to_thread(os.stat, path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise self._error("reading", key, exc) from exc
        if not statmod.S_ISREG(st.st_mode):
            raise ObjectNotFound(key)
        return _info(key, st)

    async def get_stream(
        self, key: str, *, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        path = self._path(key)
        check_range(offset, length, chunk_size)

        def open_at() -> BinaryIO:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
            try:
                handle.seek(offset)
            except BaseException:
                handle.close()
                raise
            return handle

        try:
            handle = await asyncio.to_thread(open_at)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise self._error("reading", key, exc) from exc
        try:
            remaining = length
            while remaining is None or remaining > 0:
                want = chunk_size if remaining is None else min(chunk_size, remaining)
                try:
                    data = await asyncio.to_thread(handle.read, want)
                except OSError as exc:
                    raise self._error("reading", key, exc) from exc
                if not data:
                    break
                if remaining is not None:
                    remaining -= len(data)
                yield data
        finally:
            handle.close()

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        check_prefix(prefix)
        base = prefix.rpartition("/")[0]

        def scan() -> list[ObjectInfo]:
            start = self._root / base if base else self._root
            found: list[ObjectInfo] = []
            for dirpath, dirnames, filenames in os.walk(start):
                rel_dir = pathlib.Path(dirpath).relative_to(self._root).as_posix()
                if rel_dir == ".":
                    rel_dir = ""
                    dirnames[:] = [d for d in dirnames if d != _TMP_DIR]
                for name in filenames:
                    key = f"{rel_dir}/{name}" if rel_dir else name
                    if not key.startswith(prefix):
                        continue
                    try:
                        st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted while listing
                    if statmod.S_ISREG(st.st_mode):
                        found.append(_info(key, st))
            # Directory walk order is not key order ('a.b' < 'a/b'): sort the full keys.
            found.sort(key=lambda info: info.key)
            return found

        try:
            infos = await asyncio.to_thread(scan)
        except OSError as exc:
            raise self._error("listing", prefix, exc) from exc
        for info in infos:
            yield info
