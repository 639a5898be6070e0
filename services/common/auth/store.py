"""API keys in etcd (`KeyBuilder.api_key(id)`, ApiKey JSON with the secret's salted hash) and the
in-memory view every gateway authenticates from.

The view is listed once and then kept current by a watch, so a verification costs a dict lookup and
one HMAC, and a revocation reaches every gateway within one watch round-trip. While etcd is
unreachable the last view keeps serving (invariant 1): known keys keep working, and a key revoked
during the outage is refused as soon as the watch resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from aimaas.auth.v1 import auth_pb2
from services.common.aio import Backoff
from services.common.errors import Conflict, InvalidArgument, NotFound
from services.common.names import validate_name
from services.common.etcd import CodecError, Compare, EtcdClient, EtcdError, KeyBuilder, Op, from_json, to_json
from services.common.auth.roles import ROLE_PERMISSIONS, Principal, role_name
from services.common.auth.tokens import KEY_ID_RE, format_token, hash_secret, new_key_id, new_secret, parse_hash

MAX_NAME_CHARS = 128
MAX_SCOPE_MODELS = 256
_PAGE = 500


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A cached API key, pre-parsed so that verifying a request does no parsing."""

    record: auth_pb2.ApiKey
    salt: bytes
    digest: bytes
    principal: Principal
    # Unix seconds; None: never expires / not revoked.
    expires_at: float | None
    revoked_at: float | None
    # etcd revision of this record: an older watch event never replaces a newer local write.
    mod_revision: int = 0


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def public(record: auth_pb2.ApiKey) -> auth_pb2.ApiKey:
    """A copy safe to return to callers: the secret hash cleared."""
    copy = auth_pb2.ApiKey()
    copy.CopyFrom(record)
    copy.ClearField("secret_hash")
    return copy


def _stored(record: auth_pb2.ApiKey, mod_revision: int) -> StoredKey:
    salt, digest = parse_hash(record.secret_hash)
    return StoredKey(
        record=record,
        salt=salt,
        digest=digest,
        principal=Principal(
            key_id=record.id, name=record.name, role=record.role, model_scope=frozenset(record.model_scope)
        ),
        expires_at=_seconds(record.expires) if record.HasField("expires") else None,
        revoked_at=_seconds(record.revoked) if record.HasField("revoked") else None,
        mod_revision=mod_revision,
    )


def validate_new_key(name: str, role: int, model_scope: Iterable[str], ttl_seconds: int, max_ttl_seconds: int) -> list[str]:
    """Validate a create request; returns the normalised (sorted, unique) scope."""
    if not name or not name.strip():
        raise InvalidArgument("name is required")
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise InvalidArgument(f"name must be at most {MAX_NAME_CHARS} printable characters")
    if role not in ROLE_PERMISSIONS:
        choices = ", ".join(role_name(r) for r in ROLE_PERMISSIONS)
        raise InvalidArgument(f"role is required: one of {choices} (got {role_name(role)})")
    scope = sorted(set(model_scope))
    if len(scope) > MAX_SCOPE_MODELS:
        raise InvalidArgument(f"model_scope may name at most {MAX_SCOPE_MODELS} models, got {len(scope)}")
    for model in scope:
        validate_name("model_scope model", model)
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds < 0:
        raise InvalidArgument(f"ttl_seconds must be a non-negative integer, got {ttl_seconds!r}")
    if max_ttl_seconds and not 0 < ttl_seconds <= max_ttl_seconds:
        raise InvalidArgument(f"ttl_seconds must be between 1 and {max_ttl_seconds} (the configured maximum)")
    return scope


class ApiKeyStore:
    """Create/list/revoke API keys in etcd, and the watched cache `lookup` reads."""

    def __init__(
        self,
        etcd: EtcdClient,
        keys: KeyBuilder | None = None,
        *,
        max_ttl_seconds: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._etcd = etcd
        self._keys = keys or etcd.keys
        self._max_ttl = max_ttl_seconds
        self._clock = clock
        self._cache: dict[str, StoredKey] = {}
        self._loaded = False
        self._revision = 0
        self._task: asyncio.Task[None] | None = None
        self._log = structlog.get_logger(__name__)

    # -- the cache -------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether the cache holds a full listing (False only before etcd was first reached)."""
        return self._loaded

    def lookup(self, key_id: str) -> StoredKey | None:
        return self._cache.get(key_id)

    def now(self) -> float:
        return self._clock()

    async def start(self) -> None:
        """List the keys (if etcd answers) and keep the cache current from a watch in the background."""
        try:
            await self._load()
        except EtcdError as exc:
            # Start anyway (a gateway must come up during an etcd outage); the watcher keeps trying.
            self._log.warning("api keys not loaded, retrying in the background", error=str(exc))
        self._task = asyncio.create_task(self._watch(), name="api-key-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _load(self) -> None:
        revision = await self._etcd.current_revision()
        prefix = self._keys.api_keys_prefix()
        fresh: dict[str, StoredKey] = {}
        last: str | None = None
        while True:
            page = await self._etcd.get_prefix(prefix, limit=_PAGE, start_after=last, revision=revision)
            for kv in page:
                self._put(kv.key, kv.value, kv.mod_revision, into=fresh)
            if len(page) < _PAGE:
                break
            last = page[-1].key
        self._cache = fresh  # one swap: readers never see a half-built view
        self._revision = revision
        self._loaded = True

    def _put(self, key: str, value: bytes, mod_revision: int, *, into: dict[str, StoredKey]) -> None:
        key_id = self._keys.parse_api_key_key(key)
        if key_id is None:
            return
        current = into.get(key_id)
        if current is not None and current.mod_revision > mod_revision:
            return  # our own newer write is already cached
        try:
            record = from_json(value, auth_pb2.ApiKey)
            stored = _stored(record, mod_revision)
        except (CodecError, ValueError) as exc:
            # A corrupt record must not take auth down; that key simply does not authenticate.
            into.pop(key_id, None)
            self._log.warning("ignoring unreadable api key record", key_id=key_id, error=str(exc))
            return
        if record.id != key_id:
            into.pop(key_id, None)
            self._log.warning("ignoring api key record whose id does not match its key", key_id=key_id)
            return
        into[key_id] = stored

    async def _watch(self) -> None:
        backoff = Backoff(0.2, 5.0)
        prefix = self._keys.api_keys_prefix()
        relist = not self._loaded
        while True:
            try:
                if relist:
                    await self._load()
                    relist = False
                    self._log.info("api keys loaded", count=len(self._cache))
                backoff.reset()
                async with contextlib.aclosing(
                    self._etcd.watch_prefix(prefix, start_revision=self._revision + 1)
                ) as events:
                    async for event in events:
                        if event.kind == "put":
                            self._put(event.key, event.value, event.mod_revision, into=self._cache)
                        elif event.kind == "delete":
                            key_id = self._keys.parse_api_key_key(event.key)
                            if key_id is not None:
                                self._cache.pop(key_id, None)
                        else:  # history compacted during a long outage: re-list (old view serves meanwhile)
                            relist = True
                            break
                        self._revision = max(self._revision, event.mod_revision)
            except EtcdError as exc:
                self._log.warning("api key watch failed, retrying", error=str(exc))
            await asyncio.sleep(backoff.next())

    # -- administration ----------------------------------------------------------------------------

    async def create(
        self, name: str, role: int, model_scope: Iterable[str] = (), ttl_seconds: int = 0
    ) -> tuple[auth_pb2.ApiKey, str]:
        """A new key and its bearer token (returned only here). The key has its secret hash cleared."""
        scope = validate_new_key(name, role, model_scope, ttl_seconds, self._max_ttl)
        now = self._clock()
        secret = new_secret()
        for _ in range(8):
            record = auth_pb2.ApiKey(
                id=new_key_id(),
                name=name.strip(),
                role=role,
                model_scope=scope,
                secret_hash=hash_secret(secret),
                created=_timestamp(now),
            )
            if ttl_seconds:
                record.expires.CopyFrom(_timestamp(now + ttl_seconds))
            key = self._keys.api_key(record.id)
            result = await self._etcd.transaction([Compare.create_revision(key, "==", 0)], [Op.put(key, to_json(record))])
            if result.succeeded:
                break
        else:  # 8 collisions of 64-bit random ids: something else is wrong
            raise Conflict("could not allocate a unique API key id")
        # Serve the new key here at once, before the watch echoes it.
        self._cache[record.id] = _stored(record, result.revision)
        self._log.info("api key created", key_id=record.id, key_name=record.name, role=role_name(role))
        return public(record), format_token(record.id, secret)

    async def list(self) -> list[auth_pb2.ApiKey]:
        """Every key (revoked ones included, with `revoked` set), hashes cleared, read from etcd."""
        prefix = self._keys.api_keys_prefix()
        result: list[auth_pb2.ApiKey] = []
        last: str | None = None
        while True:
            page = await self._etcd.get_prefix(prefix, limit=_PAGE, start_after=last)
            for kv in page:
                try:
                    result.append(public(from_json(kv.value, auth_pb2.ApiKey)))
                except CodecError as exc:
                    self._log.warning("skipping unreadable api key record", key=kv.key, error=str(exc))
            if len(page) < _PAGE:
                return result
            last = page[-1].key

    async def get(self, key_id: str) -> auth_pb2.ApiKey:
        record, _ = await self._read(key_id)
        return public(record)

    async def _read(self, key_id: str) -> tuple[auth_pb2.ApiKey, int]:
        if not key_id:
            raise InvalidArgument("API key id is required")
        if not KEY_ID_RE.fullmatch(key_id):
            raise NotFound(f"API key {key_id!r} not found")
        kv = await self._etcd.get(self._keys.api_key(key_id))
        if kv is None:
            raise NotFound(f"API key {key_id!r} not found")
        try:
            return from_json(kv.value, auth_pb2.ApiKey), kv.mod_revision
        except CodecError as exc:
            raise NotFound(f"API key {key_id!r} has an unreadable record: {exc}") from None

    async def revoke(self, key_id: str) -> auth_pb2.ApiKey:
        """Mark the key revoked (kept as a tombstone so refusals can say "revoked"); idempotent."""
        for _ in range(16):
            record, mod_revision = await self._read(key_id)
            if record.HasField("revoked"):
                return public(record)
            record.revoked.CopyFrom(_timestamp(self._clock()))
            key = self._keys.api_key(key_id)
            result = await self._etcd.transaction(
                [Compare.mod_revision(key, "==", mod_revision)], [Op.put(key, to_json(record))]
            )
            if result.succeeded:
                with contextlib.suppress(ValueError):  # an unreadable hash: the key never worked anyway
                    self._cache[key_id] = _stored(record, result.revision)
                self._log.info("api key revoked", key_id=key_id)
                return public(record)
        raise Conflict(f"API key {key_id!r} kept changing while being revoked; retry")
