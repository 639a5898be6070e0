"""Object store: content-addressed artifacts and engines on a local directory or an S3 server.

Build one with `create_object_store(settings.object_store)`; key layout lives in `.keys`.
"""

from __future__ import annotations

from services.common.objectstore.base import (
    DigestMismatch,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
    PutResult,
    SizeLimitExceeded,
)
from services.common.objectstore.local import LocalObjectStore
from services.common.objectstore.s3 import S3ObjectStore
from services.common.settings import ObjectStoreKind, ObjectStoreSettings


def create_object_store(settings: ObjectStoreSettings) -> ObjectStore:
    """The implementation `settings.kind` names; call `ensure_ready()` before first use."""
    if settings.kind is ObjectStoreKind.S3:
        return S3ObjectStore(settings)
    if settings.kind is ObjectStoreKind.LOCAL:
        return LocalObjectStore(settings)
    raise ValueError(f"unknown object store kind {settings.kind!r}")


__all__ = [
    "DigestMismatch",
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectStoreUnavailable",
    "PutResult",
    "S3ObjectStore",
    "SizeLimitExceeded",
    "create_object_store",
]
