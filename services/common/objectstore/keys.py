"""Object key layout: the only place object keys are formatted or parsed.

    blobs/sha256/<digest>                                      content-addressed artifacts
    uploads/<upload-id>                                        in-progress uploads, promoted to blobs
    engines/<digest>/<gpu-arch>/<trt-version>-<precision>.plan built TensorRT engines
"""

from __future__ import annotations

import re

BLOBS_PREFIX = "blobs/sha256/"
UPLOADS_PREFIX = "uploads/"
ENGINES_PREFIX = "engines/"

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
# Components interpolated into keys: one path segment, portable characters only.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_sha256(digest: str) -> str:
    """Return `digest` if it is 64 lower-case hex characters, else raise ValueError."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"invalid sha256 digest {digest!r}: want 64 lower-case hex characters")
    return digest


def _check_segment(what: str, value: str) -> str:
    if not isinstance(value, str) or not _SEGMENT_RE.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: want [A-Za-z0-9][A-Za-z0-9._+-]*")
    return value


def blob_key(sha256: str) -> str:
    return BLOBS_PREFIX + check_sha256(sha256)


def parse_blob_key(key: str) -> str | None:
    """The digest of a blob key, or None when `key` is not one."""
    if not key.startswith(BLOBS_PREFIX):
        return None
    digest = key[len(BLOBS_PREFIX):]
    return digest if _DIGEST_RE.fullmatch(digest) else None


def upload_key(upload_id: str) -> str:
    return UPLOADS_PREFIX + _check_segment("upload id", upload_id)


def engine_key(sha256: str, gpu_arch: str, trt_version: str, precision: str) -> str:
    return (
        f"{ENGINES_PREFIX}{check_sha256(sha256)}/{_check_segment('gpu arch', gpu_arch)}/"
        f"{_check_segment('TensorRT version', trt_version)}-{_check_segment('precision', precision)}.plan"
    )


def check_key(key: str) -> str:
    """Validate an object key; both backends apply the same rules so they accept the same keys.

    Relative, '/'-separated, no empty, '.' or '..' segments, no NUL or backslash: such keys could
    escape or alias paths in the local store.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    if key.startswith("/") or "\x00" in key or "\\" in key:
        raise ValueError(f"invalid object key {key!r}: absolute, or contains NUL or backslash")
    if len(key.encode()) > 1024:
        raise ValueError(f"object key too long ({len(key.encode())} bytes > 1024)")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' segment")
    return key


def check_prefix(prefix: str) -> str:
    """Validate a listing prefix: like a key, but may be empty and may end in '/' or mid-segment."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix
