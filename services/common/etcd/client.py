"""asyncio etcd v3 client for every service: deadlines on every call, one outage exception, and watches
that survive etcd restarts.

aetcd provides the connection (channel, authentication, generated stubs); requests are built here on
the raw stubs because aetcd lacks range limits, range-at-revision, create-revision filters and a watch
that can resume. No aetcd or grpc exception type escapes this module.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import aetcd
import aetcd.rpc as rpc
import grpc
import structlog

from services.common.aio import Backoff
from services.common.etcd.keys import KeyBuilder
from services.common.settings import EtcdSettings

T = TypeVar("T")


class EtcdError(Exception):
    """An etcd call failed for a reason other than an outage (bad request, auth, corrupt state)."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached or did not answer within the deadline; retrying later may work."""


class SessionLost(EtcdError):
    """The session's lease expired or could not be kept alive; everything bound to it is gone."""


class NotLeader(EtcdError):
    """The election candidate does not hold leadership."""


# Codes that mean "the cluster or the connection is in trouble", not "your request is wrong".
_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        # grpc reports some connection resets ("Stream removed") as UNKNOWN.
        grpc.StatusCode.UNKNOWN,
    }
)


def _b(key: str) -> bytes:
    # surrogateescape round-trips any byte key that was read back as str.
    return key.encode("utf-8", "surrogateescape")


def _s(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that covers exactly the keys starting with `prefix`."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"  # all 0xff: the range runs to the end of the keyspace


def _really_cancelled() -> bool:
    """Whether the current task was asked to stop, as opposed to grpc raising CancelledError for a
    call that it cancelled itself because the channel closed."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _check_prefix(prefix: str) -> bytes:
    # An empty prefix would address the whole keyspace, including other deployments' namespaces.
    if not prefix:
        raise ValueError("prefix must not be empty")
    return _b(prefix)


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def _from_pb(cls, kv: rpc.KeyValue) -> KeyValue:
        return cls(_s(kv.key), kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change under a watched prefix.

    kind "put": `key` now holds `value` (written at `mod_revision`).
    kind "delete": `key` was deleted at `mod_revision`; `value` is empty.
    kind "reset": events were lost because etcd compacted the history the watch needed (a long
    outage). `key` is the watched prefix (or key) and `mod_revision` a revision R: the consumer must
    drop its cached view and re-list, ideally `get_prefix(prefix, revision=R)`; the events that follow
    are exactly the changes after R.
    """

    kind: Literal["put", "delete", "reset"]
    key: str
    value: bytes
    mod_revision: int


_COMPARE_OPS = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """One transaction guard. A missing key compares as version/create/mod revision 0."""

    key: str
    target: Literal["value", "version", "create_revision", "mod_revision", "lease"]
    op: CompareOp
    operand: bytes | int

    def __post_init__(self) -> None:
        if self.op not in _COMPARE_OPS:
            raise ValueError(f"compare operator must be one of {sorted(_COMPARE_OPS)}, got {self.op!r}")

    @classmethod
    def value(cls, key: str, op: CompareOp, value: bytes) -> Compare:
        return cls(key, "value", op, value)

    @classmethod
    def version(cls, key: str, op: CompareOp, version: int) -> Compare:
        return cls(key, "version", op, version)

    @classmethod
    def create_revision(cls, key: str, op: CompareOp, revision: int) -> Compare:
        return cls(key, "create_revision", op, revision)

    @classmethod
    def mod_revision(cls, key: str, op: CompareOp, revision: int) -> Compare:
        return cls(key, "mod_revision", op, revision)

    @classmethod
    def lease(cls, key: str, op: CompareOp, lease_id: int) -> Compare:
        return cls(key, "lease", op, lease_id)

    def _to_pb(self) -> rpc.Compare:
        message = rpc.Compare(key=_b(self.key), result=_COMPARE_OPS[self.op])
        if self.target == "value":
            message.target = rpc.Compare.VALUE
            message.value = bytes(self.operand)  # type: ignore[arg-type]
        elif self.target == "version":
            message.target = rpc.Compare.VERSION
            message.version = int(self.operand)
        elif self.target == "create_revision":
            message.target = rpc.Compare.CREATE
            message.create_revision = int(self.operand)
        elif self.target == "mod_revision":
            message.target = rpc.Compare.MOD
            message.mod_revision = int(self.operand)
        elif self.target == "lease":
            message.target = rpc.Compare.LEASE
            message.lease = int(self.operand)
        else:
            raise ValueError(f"unknown compare target {self.target!r}")
        return message


@dataclass(frozen=True, slots=True)
class Op:
    """One transaction operation; `prefix=True` makes get/delete cover every key under `key`."""

    kind: Literal["put", "delete", "get"]
    key: str
    value: bytes = b""
    lease: int | None = None
    prefix: bool = False

    @classmethod
    def put(cls, key: str, value: bytes, lease: int | None = None) -> Op:
        return cls("put", key, value, lease)

    @classmethod
    def delete(cls, key: str) -> Op:
        return cls("delete", key)

    @classmethod
    def delete_prefix(cls, prefix: str) -> Op:
        _check_prefix(prefix)
        return cls("delete", prefix, prefix=True)

    @classmethod
    def get(cls, key: str) -> Op:
        return cls("get", key)

    @classmethod
    def get_prefix(cls, prefix: str) -> Op:
        _check_prefix(prefix)
        return cls("get", prefix, prefix=True)

    def _to_pb(self) -> rpc.RequestOp:
        key = _b(self.key)
        range_end = _prefix_end(key) if self.prefix else b""
        if self.kind == "put":
            return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=self.value, lease=self.lease or 0))
        if self.kind == "delete":
            return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=range_end))
        if self.kind == "get":
            return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=range_end))
        raise ValueError(f"unknown op kind {self.kind!r}")


@dataclass(frozen=True, slots=True)
class OpResponse:
    """Result of one executed op: `kvs` for get, `deleted` (count) for delete, nothing for put."""

    kind: Literal["put", "delete", "get"]
    kvs: tuple[KeyValue, ...] = ()
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class TxnResult:
    """`succeeded`: whether the compares held (so `success` ops ran, else `failure` ops).
    `revision`: the store revision after the transaction. `responses`: one per executed op."""

    succeeded: bool
    revision: int
    responses: tuple[OpResponse, ...] = field(default=())


def _op_response(response: rpc.ResponseOp) -> OpResponse:
    which = response.WhichOneof("response")
    if which == "response_range":
        return OpResponse("get", kvs=tuple(KeyValue._from_pb(kv) for kv in response.response_range.kvs))
    if which == "response_delete_range":
        return OpResponse("delete", deleted=response.response_delete_range.deleted)
    return OpResponse("put")


class EtcdClient:
    """One per process; cheap to share between tasks. `keys` builds keys under settings.namespace.

    `connect()` opens the channel without waiting for etcd (so services start during an outage);
    calls connect lazily too. Use `ping()` for a health check.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        if (settings.username is None) != (settings.password is None):
            raise ValueError("etcd username and password must be set together")
        self.settings = settings
        self.keys = KeyBuilder(settings.namespace)
        self._timeout = settings.timeout_seconds
        self._endpoints = settings.endpoint_list()
        self._endpoint_index = 0
        self._conn: aetcd.Client | None = None
        # Bumped on every new connection so a stale failure cannot rotate away from a fresh one.
        self._generation = 0
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()
        self._log = structlog.get_logger(__name__)

    # -- connection ----------------------------------------------------------------------------

    def _channel_options(self) -> dict[str, int]:
        return {
            # Detect dead connections under long-lived watch streams (etcd allows pings every >= 5 s).
            "grpc.keepalive_time_ms": 10_000,
            "grpc.keepalive_timeout_ms": 5_000,
            "grpc.http2.max_pings_without_data": 0,
            # grpc's default reconnect backoff grows to 120 s; an etcd restart must be noticed in ~1 s.
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.min_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": 1_000,
            "grpc.max_receive_message_length": 256 * 1024 * 1024,
        }

    async def connect(self) -> None:
        self._closed = False
        await self._connection()

    async def close(self) -> None:
        self._closed = True
        pending = list(self._background)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        async with self._connect_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def __aenter__(self) -> EtcdClient:
        await self.connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _connection(self) -> tuple[aetcd.Client, int]:
        if self._closed:
            raise EtcdError("etcd client is closed")
        async with self._connect_lock:
            if self._conn is None:
                host, port = self._endpoints[self._endpoint_index]
                password = self.settings.password.get_secret_value() if self.settings.password else None
                conn = aetcd.Client(
                    host=host,
                    port=port,
                    username=self.settings.username,
                    password=password,
                    timeout=self._timeout,
                    options=self._channel_options(),
                )
                try:
                    await conn.connect()  # network I/O only when authenticating
                except BaseException as exc:
                    with contextlib.suppress(Exception):
                        await conn.close()
                    if isinstance(exc, Exception):
                        self._rotate_endpoint()
                        raise self._map(exc) from exc
                    raise
                self._conn = conn
                self._generation += 1
            return self._conn, self._generation

    def _rotate_endpoint(self) -> None:
        self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)

    def _drop_connection(self, generation: int) -> None:
        """Forget a failed connection so the next call builds a new one (next endpoint, fresh token)."""
        if self._conn is None or generation != self._generation:
            return
        old, self._conn = self._conn, None
        self._rotate_endpoint()
        # Let calls still running on the old channel finish within their deadline.
        task = asyncio.get_running_loop().create_task(self._close_later(old))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_later(self, conn: aetcd.Client) -> None:
        with contextlib.suppress(Exception):
            if conn.channel is not None:
                await conn.channel.close(grace=self._timeout)

    def _map(self, exc: BaseException) -> EtcdError:
        if isinstance(exc, grpc.aio.AioRpcError):
            if exc.code() in _TRANSIENT_CODES:
                return EtcdUnavailable(f"etcd {exc.code().name.lower()}: {exc.details()}")
            return EtcdError(f"etcd {exc.code().name.lower()}: {exc.details()}")
        # UsageError: the call raced with closing a channel we just replaced.
        transient = (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, grpc.aio.UsageError)
        if isinstance(exc, (*transient, TimeoutError, OSError)):
            return EtcdUnavailable(f"etcd unreachable: {exc}")
        if isinstance(exc, EtcdError):
            return exc
        return EtcdError(f"etcd call failed: {exc!r}")

    async def _call(self, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run one request on the current connection and translate its failures."""
        for attempt in range(2):
            conn, generation = await self._connection()
            try:
                return await op(conn)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                # Auth tokens expire server-side: authenticate again once, then give up.
                if code == grpc.StatusCode.UNAUTHENTICATED and attempt == 0 and self.settings.username:
                    self._drop_connection(generation)
                    continue
                if code in _TRANSIENT_CODES and len(self._endpoints) > 1:
                    self._drop_connection(generation)
                raise self._map(exc) from exc
            except (TimeoutError, grpc.aio.UsageError, aetcd.ClientError) as exc:
                raise self._map(exc) from exc
            except asyncio.CancelledError:
                if _really_cancelled():
                    raise
                # grpc cancels calls locally when their channel closes (client closed or replaced).
                raise (EtcdError("etcd client is closed") if self._closed else EtcdUnavailable("etcd call cancelled"))
        raise EtcdError("etcd authentication failed")

    # -- key-value -------------------------------------------------------------------------------

    async def _range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        limit: int = 0,
        revision: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        sort_target: int = rpc.RangeRequest.KEY,
        sort_order: int = rpc.RangeRequest.NONE,
        max_create_revision: int = 0,
    ) -> rpc.RangeResponse:
        request = rpc.RangeRequest(
            key=key,
            range_end=range_end,
            limit=limit,
            revision=revision,
            keys_only=keys_only,
            count_only=count_only,
            sort_target=sort_target,
            sort_order=sort_order,
            max_create_revision=max_create_revision,
        )
        return await self._call(lambda c: c.kvstub.Range(request, timeout=self._timeout, metadata=c.metadata))

    async def get(self, key: str) -> KeyValue | None:
        response = await self._range(_b(key))
        return KeyValue._from_pb(response.kvs[0]) if response.kvs else None

    async def get_prefix(
        self,
        prefix: str,
        *,
        limit: int | None = None,
        start_after: str | None = None,
        keys_only: bool = False,
        revision: int | None = None,
    ) -> list[KeyValue]:
        """Keys under `prefix` sorted by key. Paginate with `start_after` = the last key of the previous
        page (strictly greater keys only). `revision` reads the store as of that revision, e.g. the one
        from `current_revision()`, so pages and a following watch see one consistent snapshot."""
        start = _check_prefix(prefix)
        end = _prefix_end(start)
        if start_after is not None:
            start = max(start, _b(start_after) + b"\x00")  # smallest key strictly after start_after
            if start >= end:
                return []
        if limit is not None and limit <= 0:
            raise ValueError("limit must be positive")
        response = await self._range(start, end, limit=limit or 0, revision=revision or 0, keys_only=keys_only)
        return [KeyValue._from_pb(kv) for kv in response.kvs]

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        request = rpc.PutRequest(key=_b(key), value=value, lease=lease or 0)
        response = await self._call(lambda c: c.kvstub.Put(request, timeout=self._timeout, metadata=c.metadata))
        return response.header.revision

    async def delete(self, key: str) -> bool:
        request = rpc.DeleteRangeRequest(key=_b(key))
        response = await self._call(
            lambda c: c.kvstub.DeleteRange(request, timeout=self._timeout, metadata=c.metadata)
        )
        return response.deleted > 0

    async def delete_prefix(self, prefix: str) -> int:
        start = _check_prefix(prefix)
        request = rpc.DeleteRangeRequest(key=start, range_end=_prefix_end(start))
        response = await self._call(
            lambda c: c.kvstub.DeleteRange(request, timeout=self._timeout, metadata=c.metadata)
        )
        return response.deleted

    async def transaction(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """Atomically: if every compare holds, run `success`, else `failure`."""
        request = rpc.TxnRequest(
            compare=[c._to_pb() for c in compare],
            success=[o._to_pb() for o in success],
            failure=[o._to_pb() for o in failure],
        )
        response = await self._call(lambda c: c.kvstub.Txn(request, timeout=self._timeout, metadata=c.metadata))
        return TxnResult(
            succeeded=response.succeeded,
            revision=response.header.revision,
            responses=tuple(_op_response(r) for r in response.responses),
        )

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> bool:
        """Put only if the key does not exist; False if it does."""
        result = await self.transaction(
            [Compare.create_revision(key, "==", 0)], [Op.put(key, value, lease=lease)]
        )
        return result.succeeded

    async def compare_and_swap(
        self, key: str, value: bytes, *, expected_mod_revision: int, lease: int | None = None
    ) -> bool:
        """Put only if the key's mod_revision is still `expected_mod_revision` (0: key must be absent)."""
        result = await self.transaction(
            [Compare.mod_revision(key, "==", expected_mod_revision)], [Op.put(key, value, lease=lease)]
        )
        return result.succeeded

    async def compare_and_delete(self, key: str, *, expected_mod_revision: int) -> bool:
        """Delete only if the key's mod_revision is still `expected_mod_revision`."""
        if expected_mod_revision <= 0:
            raise ValueError("expected_mod_revision must be the positive mod_revision of an existing key")
        result = await self.transaction(
            [Compare.mod_revision(key, "==", expected_mod_revision)], [Op.delete(key)]
        )
        return result.succeeded

    async def current_revision(self) -> int:
        response = await self._range(_b(self.settings.namespace), count_only=True)
        return response.header.revision

    async def compact(self, revision: int) -> None:
        """Drop history before `revision` (admin and tests; watches older than it get a reset)."""
        request = rpc.CompactionRequest(revision=revision, physical=True)
        await self._call(lambda c: c.kvstub.Compact(request, timeout=self._timeout, metadata=c.metadata))

    async def ping(self) -> bool:
        """Cheap health check: True when the connected etcd member answers within the deadline."""
        try:
            await self._call(
                lambda c: c.maintenancestub.Status(rpc.StatusRequest(), timeout=self._timeout, metadata=c.metadata)
            )
        except Exception:
            return False
        return True

    # -- leases ----------------------------------------------------------------------------------

    async def _grant_lease(self, ttl: int) -> tuple[int, int]:
        """(lease id, TTL granted); etcd may raise a too-small TTL to its minimum."""
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        request = rpc.LeaseGrantRequest(TTL=ttl)
        response = await self._call(
            lambda c: c.leasestub.LeaseGrant(request, timeout=self._timeout, metadata=c.metadata)
        )
        if response.error:
            raise EtcdError(f"lease grant failed: {response.error}")
        return response.ID, response.TTL

    async def grant_lease(self, ttl: int) -> int:
        lease_id, _ = await self._grant_lease(ttl)
        return lease_id

    async def refresh_lease(self, lease_id: int) -> int:
        """Renew the lease once; returns its TTL from now. <= 0 means the lease no longer exists."""

        async def keep_alive(conn: aetcd.Client) -> int:
            call = conn.leasestub.LeaseKeepAlive(timeout=self._timeout, metadata=conn.metadata)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                response = await call.read()
            finally:
                call.cancel()
            if response is grpc.aio.EOF:
                raise EtcdUnavailable("lease keep-alive stream closed")
            return response.TTL

        return await self._call(keep_alive)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease, deleting every key bound to it; a lease already gone is not an error."""
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(
                lambda c: c.leasestub.LeaseRevoke(request, timeout=self._timeout, metadata=c.metadata)
            )
        except EtcdUnavailable:
            raise
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    async def lease_time_to_live(self, lease_id: int) -> int:
        """Remaining TTL in seconds; -1 when the lease does not exist."""
        request = rpc.LeaseTimeToLiveRequest(ID=lease_id)
        response = await self._call(
            lambda c: c.leasestub.LeaseTimeToLive(request, timeout=self._timeout, metadata=c.metadata)
        )
        return response.TTL

    # -- watches ---------------------------------------------------------------------------------

    def watch_prefix(self, prefix: str, *, start_revision: int | None = None) -> AsyncIterator[WatchEvent]:
        """Every change under `prefix`, in revision order, from `start_revision` (default: changes
        after the watch is established). Survives etcd restarts and connection loss by re-watching from
        the revision after the last delivered event; if that history was compacted it yields one
        `WatchEvent(kind="reset")` (see WatchEvent) and continues. Ends only when the consumer stops
        iterating (use `contextlib.aclosing`), its task is cancelled, or the client is closed.

        Consistent list-then-watch: `rev = await current_revision()`, `get_prefix(prefix, revision=rev)`,
        then `watch_prefix(prefix, start_revision=rev + 1)`.
        """
        start = _check_prefix(prefix)
        return self._watch(start, _prefix_end(start), start_revision)

    def watch_key(self, key: str, *, start_revision: int | None = None) -> AsyncIterator[WatchEvent]:
        """Like `watch_prefix`, for exactly one key."""
        return self._watch(_b(key), b"", start_revision)

    async def _watch(self, key: bytes, range_end: bytes, start_revision: int | None) -> AsyncIterator[WatchEvent]:
        next_revision = start_revision
        backoff = Backoff(0.1, 2.0)
        while not self._closed:
            call = None
            generation = -1
            reset = False
            try:
                conn, generation = await self._connection()
                call = rpc.WatchStub(conn.channel).Watch(metadata=conn.metadata)
                create = rpc.WatchCreateRequest(key=key, range_end=range_end, start_revision=next_revision or 0)
                await asyncio.wait_for(call.write(rpc.WatchRequest(create_request=create)), self._timeout)
                created = await asyncio.wait_for(call.read(), self._timeout)
                if _really_cancelled():
                    # Python 3.11's wait_for returns the result, swallowing a cancellation that arrived
                    # as the call completed; without this the watch would then wait forever.
                    raise asyncio.CancelledError
                if created is grpc.aio.EOF:
                    raise EtcdUnavailable("watch stream closed")
                if not created.compact_revision and not created.canceled:
                    if next_revision is None:
                        # Revision 0 means "from now": pin it so a reconnect loses nothing.
                        next_revision = created.header.revision + 1
                    backoff.reset()
                response = created
                while True:
                    if response.compact_revision:
                        reset = True
                        break
                    if response.canceled:
                        self._log.warning("etcd watch cancelled", reason=response.cancel_reason)
                        break
                    for event in response.events:
                        next_revision = event.kv.mod_revision + 1
                        kind: Literal["put", "delete"] = "put" if event.type == rpc.Event.PUT else "delete"
                        yield WatchEvent(kind, _s(event.kv.key), event.kv.value, event.kv.mod_revision)
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        break
                if reset:
                    revision = await self.current_revision()
                    next_revision = revision + 1
                    self._log.warning("etcd watch history compacted, consumer must re-list", prefix=_s(key))
                    yield WatchEvent("reset", _s(key), b"", revision)
                    continue
            except asyncio.CancelledError:
                if _really_cancelled():
                    raise
                if self._closed:
                    return  # our channel was closed under the stream
            except (grpc.aio.AioRpcError, TimeoutError, EtcdError) as exc:
                if self._closed:
                    return
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in _TRANSIENT_CODES:
                    self._log.warning("etcd watch failed, retrying", error=str(self._map(exc)))
                # A rejected auth token needs a fresh connection (re-authentication), like a dead endpoint.
                expired_token = (
                    isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED
                )
                if generation >= 0 and (len(self._endpoints) > 1 or expired_token):
                    self._drop_connection(generation)
            finally:
                if call is not None:
                    call.cancel()
            await asyncio.sleep(backoff.next())
