"""API key tokens `aimaas_<key-id>_<secret>` and the salted hash stored instead of the secret.

Hashing: HMAC-SHA256 keyed with a random per-key salt. A slow password KDF (bcrypt, scrypt, argon2)
exists to make guessing *low-entropy* passwords expensive; our secrets are 256 random bits, so an
offline search over a leaked hash is infeasible however fast the hash is, and a fast hash keeps
per-request verification at about a microsecond instead of tens of milliseconds of CPU per call.
The salt makes equal secrets hash differently and rules out precomputed tables.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

TOKEN_PREFIX = "aimaas_"
SECRET_BYTES = 32  # 256 bits
KEY_ID_BYTES = 8
_SALT_BYTES = 16
_HASH_SCHEME = "hmac-sha256"
# Key ids are hex, so the first '_' after the prefix separates id and secret (the secret is base64url,
# which may contain '_').
KEY_ID_RE = re.compile(r"[0-9a-f]{%d}" % (2 * KEY_ID_BYTES))
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of 32 bytes, unpadded


class MalformedToken(ValueError):
    """The text is not an `aimaas_<key-id>_<secret>` token."""


def new_key_id() -> str:
    return secrets.token_hex(KEY_ID_BYTES)


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def format_token(key_id: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}{key_id}_{secret}"


def parse_token(token: str) -> tuple[str, str]:
    """(key id, secret) of a token; MalformedToken (whose message never contains the secret)."""
    if not token.startswith(TOKEN_PREFIX):
        raise MalformedToken(f"API key must start with {TOKEN_PREFIX!r}")
    key_id, sep, secret = token[len(TOKEN_PREFIX):].partition("_")
    if not sep or not KEY_ID_RE.fullmatch(key_id):
        raise MalformedToken(f"API key must look like '{TOKEN_PREFIX}<16 hex digit key id>_<secret>'")
    if not _SECRET_RE.fullmatch(secret):
        raise MalformedToken(f"API key {key_id}: secret must be 43 base64url characters")
    return key_id, secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _digest(salt: bytes, secret: str) -> bytes:
    return hmac.new(salt, secret.encode(), hashlib.sha256).digest()


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """`hmac-sha256$<salt>$<digest>` (base64url): the only form in which a secret is stored."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    return f"{_HASH_SCHEME}${_b64(salt)}${_b64(_digest(salt, secret))}"


def parse_hash(stored: str) -> tuple[bytes, bytes]:
    """(salt, digest) of a stored hash; ValueError when it is not one `hash_secret` wrote."""
    parts = stored.split("$")
    if len(parts) != 3 or parts[0] != _HASH_SCHEME:
        raise ValueError(f"unsupported secret hash scheme {parts[0]!r}")
    salt, digest = parts[1], parts[2]
    try:
        salt_bytes, digest_bytes = _unb64(salt), _unb64(digest)
    except ValueError as exc:
        raise ValueError(f"corrupt secret hash: {exc}") from None
    if len(salt_bytes) < 8 or len(digest_bytes) != hashlib.sha256().digest_size:
        raise ValueError("corrupt secret hash: wrong salt or digest length")
    return salt_bytes, digest_bytes


def verify_secret(secret: str, salt: bytes, digest: bytes) -> bool:
    # Constant-time: the comparison leaks nothing about how many bytes matched.
    return hmac.compare_digest(_digest(salt, secret), digest)
