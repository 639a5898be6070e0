"""The object store interface shared by the local-directory and S3 implementations."""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

_HEX64_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    # Timezone-aware UTC.
    last_modified: datetime


@dataclass(frozen=True)
class PutResult:
    key: str
    size: int
    # Lower-case hex sha256 of the bytes stored.
    sha256: str


class ObjectStoreError(Exception):
    """Base of every error the object store raises."""


class ObjectNotFound(ObjectStoreError):
    def __init__(self, key: str) -> None:
        super().__init__(f"object {key!r} not found")
        self.key = key


class ObjectStoreUnavailable(ObjectStoreError):
    """The store cannot be reached (connection refused, timeouts, server errors)."""


class DigestMismatch(ObjectStoreError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class SizeLimitExceeded(ObjectStoreError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"object exceeds the size limit of {limit} bytes")
        self.limit = limit


def normalize_sha256(digest: str | None) -> str | None:
    """Lower-case an expected digest, rejecting anything that is not 64 hex characters."""
    if digest is None:
        return None
    lowered = digest.lower()
    if not _HEX64_RE.fullmatch(lowered):
        raise ValueError(f"invalid expected sha256 {digest!r}")
    return lowered


def check_range(offset: int, length: int | None, chunk_size: int) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if length is not None and length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data


class ObjectStore(abc.ABC):
    """Asyncio object store.

    Writes are atomic per key: an object becomes visible only once complete, and a failed or
    cancelled `put_stream` never changes what is stored at its key. Reads past the end of an
    object yield no bytes.
    """

    @abc.abstractmethod
    async def ensure_ready(self) -> None:
        """Create the bucket / root directory if missing."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Cheap health check; never raises."""

    @abc.abstractmethod
    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> PutResult:
        """Store the concatenation of `chunks` at `key`, hashing on the way, in bounded memory.

        Raises DigestMismatch / SizeLimitExceeded (and propagates any error of `chunks` or a
        cancellation) leaving nothing new at `key`.
        """

    async def put_bytes(self, key: str, data: bytes) -> PutResult:
        return await self.put_stream(key, _single(data))

    @abc.abstractmethod
    def get_stream(
        self, key: str, *, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """Bytes [offset, offset+length) of `key`; raises ObjectNotFound on the first iteration."""

    async def get_bytes(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        parts = [chunk async for chunk in self.get_stream(key, offset=offset, length=length)]
        return b"".join(parts)

    @abc.abstractmethod
    async def stat(self, key: str) -> ObjectInfo:
        """Size and modification time of `key`; raises ObjectNotFound."""

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except ObjectNotFound:
            return False
        return True

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with `prefix` (recursively), sorted by key."""

    @abc.abstractmethod
    async def promote(self, src_key: str, dst_key: str) -> bool:
        """Move `src_key` to `dst_key` for content-addressed storage.

        If `dst_key` already exists, `src_key` is deleted and False returned (dedupe); otherwise
        the object is moved and True returned. Raises ObjectNotFound if `src_key` is missing.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads."""

    async def __aenter__(self) -> ObjectStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
