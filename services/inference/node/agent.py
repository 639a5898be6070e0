"""Mesh mode: the node agent that ties an inference node to the control plane.

It registers the node in etcd under a session lease, watches the node's assignments, drives the data
plane (download → verify → load → warm-up → READY; unassign → drain → unload) and publishes one
lease-bound ReplicaStatus per assigned model version.

etcd is never on the serving path (invariant 1): an outage only pauses publishing. Every key this
agent owns is kept in memory (`_published`) and written by one flusher, so anything that could not
be written during an outage, or vanished with an expired lease, is written again when etcd returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import psutil

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.common.aio import Backoff
from services.common.etcd import (
    CodecError,
    EtcdClient,
    EtcdError,
    KeyValue,
    Op,
    Session,
    WatchEvent,
    from_json,
    to_json,
)
from services.common.objectstore import ObjectNotFound, ObjectStore, ObjectStoreError
from services.common.objectstore.keys import blob_key, check_sha256
from services.inference.backends import cuda
from services.inference.backends.base import LoadOptions
from services.inference.backends.cuda import GpuInfo
from services.inference.dataplane import DataPlane, ModelLoadFailed, ModelSpec, ModelState
from services.inference.node.cache import ArtifactCache, CorruptArtifact
from services.inference.settings import BatchingDefaults, InferenceSettings

T = TypeVar("T")

# Backend names the data plane uses ↔ the enum in node records, assignments and statuses.
_BACKENDS = {"onnxruntime": tpb.BACKEND_ONNXRUNTIME, "tensorrt": tpb.BACKEND_TENSORRT}
_BACKEND_NAMES = {value: name for name, value in _BACKENDS.items()}
# Backends that need a GPU: a node that has one of them advertises a GPU accelerator.
_GPU_BACKENDS = frozenset({"tensorrt"})
_PRECISIONS = {tpb.PRECISION_FP16: "FP16", tpb.PRECISION_INT8: "INT8", tpb.PRECISION_FP32: "FP32"}
# etcd's default limit is 128 operations per transaction.
_TXN_OPS = 64


class _LoadFailure(Exception):
    """A load ended in FAILED; the message is the status reason."""


class _Superseded(Exception):
    """The assignment changed or vanished while its load was still downloading."""


@dataclass(eq=False)
class _Replica:
    model: str
    version: int
    # What the scheduler wants (None: unassigned) and the assignment's mod revision.
    desired: spb.Assignment | None = None
    desired_revision: int = 0
    # The assignment last acted on (loaded, loading or failed) and its revision.
    current: spb.Assignment | None = None
    current_revision: int = 0
    failed: bool = False
    pinned: str | None = None
    status: spb.ReplicaStatus | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.model, self.version


def _same_load(a: spb.Assignment | None, b: spb.Assignment | None) -> bool:
    """Whether two assignments load the same thing (ownership and fencing fields do not matter)."""
    if a is None or b is None:
        return a is b
    left, right = spb.Assignment(), spb.Assignment()
    left.CopyFrom(a)
    right.CopyFrom(b)
    for message in (left, right):
        message.ClearField("leader_revision")
        message.ClearField("deployment")
    return left == right


def default_node_id(address: str) -> str:
    """`<hostname>-<port>`: stable across restarts of one node, distinct for several nodes on a host."""
    host = socket.gethostname() or "node"
    _, sep, port = address.rpartition(":")
    return f"{host}-{port}" if sep and port.isdigit() else host


def _advertised(address: str) -> str:
    # A wildcard listen address is useless to other processes; the hostname at least resolves.
    host, sep, port = address.rpartition(":")
    if sep and host in ("0.0.0.0", "[::]", "::", ""):
        return f"{socket.gethostname()}:{port}"
    return address


class NodeAgent:
    """Mesh-mode lifecycle of one inference node; see the module docstring."""

    def __init__(
        self,
        settings: InferenceSettings,
        data_plane: DataPlane,
        etcd: EtcdClient,
        store: ObjectStore,
        address: str,
        logger: Any,
    ) -> None:
        self._cfg = settings.inference
        self._ttl = settings.etcd.session_ttl_seconds
        self._data_plane = data_plane
        self._etcd = etcd
        self._keys = etcd.keys
        self.node_id = self._cfg.node_id or default_node_id(address)
        self.address = self._cfg.advertise_address or _advertised(address)
        self._log = logger.bind(component="node-agent", node_id=self.node_id)
        self.cache = ArtifactCache(
            self._cfg.cache_dir,
            self._cfg.cache_max_bytes,
            store,
            logger=self._log,
            on_change=self._node_changed,
        )
        self._node_key = self._keys.node(self.node_id)
        self._replicas: dict[tuple[str, int], _Replica] = {}
        # Every key this node should have in etcd, with its value; `_dirty` keys differ from etcd
        # (a key in `_dirty` but not in `_published` is to be deleted).
        self._published: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._session: Session | None = None
        self._registered = False
        self._stopping = False
        self._started_at: datetime | None = None
        self._gpu: GpuInfo | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Future[Any]] = set()
        self._stale_leases: set[int] = set()

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the cache and start registering and watching in the background: a node starts (and
        keeps serving) while etcd is down, and registers as soon as it is up."""
        await self.cache.open()
        if self._accelerator() == tpb.ACCELERATOR_GPU:
            self._gpu = await asyncio.to_thread(self._detect_gpu)
        self._started_at = datetime.now(UTC)
        self._node_changed()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run_sessions(), name="node-agent-sessions"),
            loop.create_task(self._flush_loop(), name="node-agent-flusher"),
        ]
        self._log.info(
            "node agent started",
            address=self.address,
            backends=self._backend_names(),
            accelerator=tpb.Accelerator.Name(self._accelerator()),
            cache_dir=str(self.cache.directory),
        )

    async def stop(self) -> None:
        """Deregister at once (revoking the lease deletes the node record and every status) and stop
        watching. Loaded models stay in the data plane: the app drains and closes it afterwards."""
        if self._stopping:
            return
        self._stopping = True
        self._registered = False
        tasks = [*self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._session is not None:
            await self._session.close()
        # Leases given up on (not revoked at the time: see _retire) may still hold our records.
        stale = [self._etcd.revoke_lease(lease_id) for lease_id in self._stale_leases]
        await asyncio.gather(*stale, return_exceptions=True)
        workers = [r.task for r in self._replicas.values() if r.task is not None]
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.wait(workers)
        await self.cache.close()
        self._log.info("node agent stopped; node deregistered")

    async def healthy(self) -> bool:
        """Registered in etcd under a live session."""
        session = self._session
        return self._registered and not self._stopping and session is not None and not session.lost.is_set()

    @property
    def lease_id(self) -> int | None:
        """Lease of the current registration (None before the first one)."""
        return self._session.lease_id if self._session is not None else None

    # -- node record --------------------------------------------------------------------------------

    def _backend_names(self) -> list[str]:
        return [name for name in self._data_plane.available_backends() if name in _BACKENDS]

    def _accelerator(self) -> int:
        if _GPU_BACKENDS.intersection(self._backend_names()):
            return tpb.ACCELERATOR_GPU
        return tpb.ACCELERATOR_CPU

    def _detect_gpu(self) -> GpuInfo | None:
        # The first device: engines are built per architecture, and a node's GPUs are alike in practice.
        try:
            gpus = cuda.detect_gpus()
        except Exception as exc:  # noqa: BLE001 - a node without GPU details still serves
            self._log.warning("GPU detection failed", error=str(exc))
            return None
        return gpus[0] if gpus else None

    def _node_record(self) -> spb.Node:
        node = spb.Node(
            id=self.node_id,
            address=self.address,
            accelerator=self._accelerator(),
            backends=[_BACKENDS[name] for name in self._backend_names()],
            memory_capacity_bytes=self._cfg.memory_capacity_bytes or psutil.virtual_memory().total,
            cached_sha256=self.cache.cached_digests(),
        )
        if self._gpu is not None:
            node.gpu_arch = self._gpu.arch
            node.gpu_memory_capacity_bytes = self._gpu.total_memory_bytes
        if self._started_at is not None:
            node.started.FromDatetime(self._started_at)
        return node

    def _node_changed(self) -> None:
        if self._started_at is not None and not self._stopping:
            self._put(self._node_key, to_json(self._node_record()))

    # -- publishing ---------------------------------------------------------------------------------

    def _put(self, key: str, value: bytes) -> None:
        if self._published.get(key) != value:
            self._published[key] = value
            self._dirty.add(key)
            self._dirty_event.set()

    def _remove(self, key: str) -> None:
        if self._published.pop(key, None) is not None:
            self._dirty.add(key)
            self._dirty_event.set()

    async def _flush(self, session: Session) -> None:
        """Write every dirty key under `session`'s lease; raises EtcdError (keys stay dirty)."""
        async with self._flush_lock:
            pending = [(key, self._published.get(key)) for key in sorted(self._dirty)]
            if not pending:
                return
            # The node record first: a status never appears for a node that is not registered.
            pending.sort(key=lambda item: item[0] != self._node_key)
            for start in range(0, len(pending), _TXN_OPS):
                batch = pending[start : start + _TXN_OPS]
                ops = [
                    Op.delete(key) if value is None else Op.put(key, value, lease=session.lease_id)
                    for key, value in batch
                ]
                await self._etcd.transaction([], ops)
                for key, value in batch:
                    # Changed again while we wrote: stays dirty for the next round.
                    if self._published.get(key) == value:
                        self._dirty.discard(key)

    async def _flush_loop(self) -> None:
        backoff = Backoff(0.2, 2.0)
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            session = self._session
            if not self._registered or session is None or session.lost.is_set():
                continue  # registration writes everything
            try:
                await self._flush(session)
                backoff.reset()
            except EtcdError as exc:
                delay = backoff.next()
                self._log.info("publishing to etcd failed; retrying", error=str(exc), retry_in=round(delay, 2))
                self._dirty_event.set()
                await asyncio.sleep(delay)

    # -- sessions, registration, watch --------------------------------------------------------------

    async def _run_sessions(self) -> None:
        """Register under a session; when it is lost (etcd unreachable past the TTL), register again
        under a new one as soon as etcd answers. Loaded models are never touched by this."""
        # etcd restarts in ~1 s: a short ceiling re-registers soon after it answers.
        backoff = Backoff(0.2, 1.0)
        outage_logged = False
        while True:
            session = Session(self._etcd, self._ttl)
            try:
                await session.start()
                self._session = session
                self._dirty.update(self._published)  # the new lease holds nothing yet
                self._dirty.add(self._node_key)
                await self._flush(session)
            except EtcdError as exc:
                with contextlib.suppress(RuntimeError):  # RuntimeError: no lease was granted
                    self._stale_leases.add(session.lease_id)  # it may hold part of the registration
                self._retire(session)
                delay = backoff.next()
                if not outage_logged:
                    self._log.warning("cannot register in etcd; retrying", error=str(exc))
                    outage_logged = True
                else:
                    self._log.debug("cannot register in etcd; retrying", error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            outage_logged = False
            self._registered = True
            self._dirty_event.set()  # keys changed while the registration was being written
            self._log.info(
                "node registered", lease=f"{session.lease_id:x}", ttl=session.ttl, replicas=len(self._replicas)
            )
            self._revoke_stale_leases()
            watch = asyncio.get_running_loop().create_task(self._watch_assignments(), name="node-agent-watch")
            try:
                await session.lost.wait()
            finally:
                self._registered = False
                watch.cancel()
                await asyncio.wait([watch])
            self._log.warning(
                "etcd session lost; loaded models keep serving, re-registering when etcd answers",
                lease=f"{session.lease_id:x}",
            )
            self._stale_leases.add(session.lease_id)
            self._retire(session)

    def _retire(self, session: Session) -> None:
        # Not revoked here: a lease we gave up on may still be alive and hold the node's records, and
        # revoking it before the next registration is written would delete them all (a gap in which
        # the node looks gone). Its id is in _stale_leases, revoked once registered again.
        self._spawn(session.close(revoke=False))

    def _revoke_stale_leases(self) -> None:
        """Revoke leases lost in an outage. etcd extends leases when it restarts, so a lost lease may
        live on for a TTL and still hold keys we since dropped (a status of a model unloaded meanwhile)."""

        async def revoke(lease_id: int) -> None:
            try:
                await self._etcd.revoke_lease(lease_id)
            except EtcdError as exc:
                self._log.debug("revoking a stale lease failed; it expires by ttl", lease=f"{lease_id:x}", error=str(exc))
            self._stale_leases.discard(lease_id)

        for lease_id in list(self._stale_leases):
            self._spawn(revoke(lease_id))

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch_assignments(self) -> None:
        """Consistent list-then-watch of this node's assignments; re-lists after a compaction reset."""
        prefix = self._keys.assignments_prefix(self.node_id)
        backoff = Backoff(0.2, 2.0)
        while True:
            try:
                revision = await self._etcd.current_revision()
                self._reconcile(await self._etcd.get_prefix(prefix, revision=revision))
                backoff.reset()
                async with contextlib.aclosing(self._etcd.watch_prefix(prefix, start_revision=revision + 1)) as events:
                    async for event in events:
                        self._on_event(event)
                        if event.kind == "reset":
                            self._reconcile(await self._etcd.get_prefix(prefix, revision=event.mod_revision))
            except EtcdError as exc:
                delay = backoff.next()
                self._log.info("listing assignments failed; retrying", error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)

    def _reconcile(self, kvs: Iterable[KeyValue]) -> None:
        """Make the desired state exactly the listed assignments."""
        listed: dict[tuple[str, int], KeyValue] = {}
        for kv in kvs:
            parsed = self._keys.parse_assignment_key(kv.key)
            if parsed is not None and parsed[0] == self.node_id:
                listed[(parsed[1], parsed[2])] = kv
        for key, replica in list(self._replicas.items()):
            if key not in listed and replica.desired is not None:
                self._want(key, None, 0)
        for key, kv in listed.items():
            self._want_value(key, kv.value, kv.mod_revision)

    def _on_event(self, event: WatchEvent) -> None:
        if event.kind == "reset":
            self._log.warning("assignment watch lost history; re-listing", revision=event.mod_revision)
            return
        parsed = self._keys.parse_assignment_key(event.key)
        if parsed is None or parsed[0] != self.node_id:
            return
        key = (parsed[1], parsed[2])
        if event.kind == "delete":
            self._want(key, None, event.mod_revision)
        else:
            self._want_value(key, event.value, event.mod_revision)

    def _want_value(self, key: tuple[str, int], value: bytes, revision: int) -> None:
        try:
            assignment = from_json(value, spb.Assignment)
        except CodecError as exc:
            self._log.error("ignoring an unreadable assignment", model=key[0], version=key[1], error=str(exc))
            return
        # The key is authoritative; the value's copies of it may be stale or missing.
        assignment.node_id, assignment.model, assignment.version = self.node_id, key[0], key[1]
        self._want(key, assignment, revision)

    def _want(self, key: tuple[str, int], assignment: spb.Assignment | None, revision: int) -> None:
        replica = self._replicas.get(key)
        if replica is None:
            if assignment is None or self._stopping:
                return
            replica = _Replica(model=key[0], version=key[1])
            self._replicas[key] = replica
        if (replica.task is None or replica.task.done()) and not self._stopping:
            replica.task = asyncio.get_running_loop().create_task(
                self._run_replica(replica), name=f"replica-{key[0]}-{key[1]}"
            )
        if assignment is None:
            self._log.info("assignment removed", model=key[0], version=key[1])
        elif not _same_load(replica.desired, assignment) or replica.desired_revision != revision:
            self._log.info("assignment received", model=key[0], version=key[1], sha256=assignment.sha256)
        replica.desired, replica.desired_revision = assignment, revision
        replica.changed.set()

    # -- replica lifecycle --------------------------------------------------------------------------

    async def _run_replica(self, replica: _Replica) -> None:
        """The only task that acts on this (model, version): loads, reloads and unloads in order, always
        toward the latest desired state."""
        try:
            while True:
                replica.changed.clear()
                target, revision = replica.desired, replica.desired_revision
                if target is None:
                    if replica.current is not None:
                        await self._unload(replica)
                    if replica.desired is None:  # nothing re-assigned it while it drained
                        del self._replicas[replica.key]
                        self._remove(self._status_key(replica))
                        return
                    continue
                if _same_load(replica.current, target) and not (
                    replica.failed and revision != replica.current_revision
                ):
                    replica.current_revision = revision
                    await replica.changed.wait()
                    continue
                await self._load(replica, target, revision)
        except Exception as exc:  # noqa: BLE001 - a bug here must not go unnoticed; the next change restarts it
            self._log.exception("replica worker crashed", model=replica.model, version=replica.version)
            replica.failed = True
            self._set_status(replica, tpb.REPLICA_STATE_FAILED, reason=f"internal error: {type(exc).__name__}: {exc}")

    async def _load(self, replica: _Replica, assignment: spb.Assignment, revision: int) -> None:
        """Load `assignment`, or reload a READY replica whose assignment changed (backend, precision,
        batching): the data plane keeps the loaded instance serving until the new one is READY."""
        name, version = assignment.model, str(assignment.version)
        log = self._log.bind(model=name, version=version, sha256=assignment.sha256)
        reloading = self._data_plane.state(name, version)[0] is ModelState.READY
        previous_pin, replica.pinned = replica.pinned, None
        replica.current, replica.current_revision, replica.failed = assignment, revision, False
        started = time.monotonic()
        try:
            if reloading:
                log.info("reloading with the changed assignment; the loaded instance keeps serving")
            else:
                self._set_status(replica, tpb.REPLICA_STATE_LOADING)
            unsupported = self._unsupported(assignment)
            if unsupported is not None:
                raise _LoadFailure(unsupported)
            if not reloading:
                self._data_plane.mark_loading(name, version)
            path = await self._fetch(replica, assignment, log, quiet=reloading)
            fetched = time.monotonic()
            info = await self._data_plane.load(self._spec(assignment, path))
        except _Superseded:
            log.info("load abandoned: the assignment changed while downloading")
            self._unpin(replica)
            replica.pinned = previous_pin
            return
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is this load's FAILED reason
            if isinstance(exc, _LoadFailure):
                reason = str(exc)
            elif isinstance(exc, ModelLoadFailed):
                reason = exc.reason
            else:
                log.exception("load failed unexpectedly")
                reason = f"load failed: {type(exc).__name__}: {exc}"
            self._unpin(replica)
            replica.failed = True
            if reloading:
                # The previous load still serves: the replica stays READY, the reason tells the rest.
                replica.pinned = previous_pin
                assert replica.status is not None
                self._set_status(
                    replica,
                    tpb.REPLICA_STATE_READY,
                    reason=f"reload with the changed assignment failed, the previous load keeps serving: {reason}",
                    memory_bytes=replica.status.memory_bytes,
                    backend=replica.status.backend,
                )
                log.warning("model reload failed", reason=reason)
                return
            if isinstance(exc, _LoadFailure):
                # Nothing reached the data plane: drop its "loading" mark so it answers NOT_FOUND, not UNAVAILABLE.
                await self._clear_data_plane(replica)
            self._fail(replica, reason, log)
            return
        if previous_pin is not None:
            self.cache.unpin(previous_pin)
        done = time.monotonic()
        backend = _BACKENDS.get(info.backend, tpb.BACKEND_UNSPECIFIED)
        self._set_status(replica, tpb.REPLICA_STATE_READY, memory_bytes=info.memory_bytes, backend=backend)
        log.info(
            "model reloaded" if reloading else "model loaded",
            backend=info.backend,
            memory_bytes=info.memory_bytes,
            fetch_seconds=round(fetched - started, 3),
            load_seconds=round(done - fetched, 3),
        )

    def _unsupported(self, assignment: spb.Assignment) -> str | None:
        available = self._backend_names()
        if assignment.format == tpb.MODEL_FORMAT_TENSORRT_PLAN and "tensorrt" not in available:
            return (
                f"model {assignment.model} version {assignment.version} is a TensorRT plan and requires TensorRT, "
                f"which this node does not have: {self._missing_reason('tensorrt')}"
            )
        if assignment.backend != tpb.BACKEND_UNSPECIFIED:
            name = _BACKEND_NAMES.get(assignment.backend)
            if name is None:
                return f"unknown backend {assignment.backend} in the assignment"
            if name not in available:
                return f"backend {name} is not available on this node: {self._missing_reason(name)}"
        return None

    def _missing_reason(self, backend: str) -> str:
        """Why `backend` is missing, in its own probe's words."""
        reason = self._data_plane.unavailable_backends().get(backend)
        return reason or f"this node's backends are {self._backend_names() or 'none'}"

    async def _fetch(self, replica: _Replica, assignment: spb.Assignment, log: Any, *, quiet: bool) -> pathlib.Path:
        """The verified artifact, pinned in the cache; object-store outages retried with backoff (shown
        in the LOADING status unless `quiet`: a reload, whose replica keeps serving READY)."""
        digest = assignment.sha256
        try:
            check_sha256(digest)
        except ValueError as exc:
            raise _LoadFailure(f"invalid artifact digest in the assignment: {exc}") from exc
        attempts = self._cfg.load_max_attempts
        delay = self._cfg.load_retry_initial_seconds
        for attempt in range(1, attempts + 1):
            try:
                path = await self._interruptible(replica, assignment, self.cache.fetch(digest, pin=True))
            except ObjectNotFound as exc:
                raise _LoadFailure(f"artifact {blob_key(digest)} not found in the object store") from exc
            except CorruptArtifact as exc:
                raise _LoadFailure(str(exc)) from exc
            except ObjectStoreError as exc:
                if attempt == attempts:
                    raise _LoadFailure(f"object store unavailable: {exc}; gave up after {attempts} attempts") from exc
                reason = f"object store unavailable: {exc}, retrying in {delay:.1f}s (attempt {attempt}/{attempts})"
                log.warning("artifact download failed; retrying", reason=reason)
                if not quiet:
                    self._set_status(replica, tpb.REPLICA_STATE_LOADING, reason=reason)
                await self._interruptible(replica, assignment, asyncio.sleep(delay))
                delay = min(delay * 2, self._cfg.load_retry_max_seconds)
                continue
            except OSError as exc:
                raise _LoadFailure(f"artifact cache error: {exc}") from exc
            replica.pinned = digest
            if attempt > 1 and not quiet:
                self._set_status(replica, tpb.REPLICA_STATE_LOADING)  # clear the retry reason
            return path
        raise AssertionError("unreachable")

    async def _interruptible(self, replica: _Replica, target: spb.Assignment, work: Awaitable[T]) -> T:
        """Await `work`, cancelling it (raising _Superseded) if the assignment changes meanwhile."""
        task: asyncio.Future[T] = asyncio.ensure_future(work)
        try:
            while True:
                waiter = asyncio.ensure_future(replica.changed.wait())
                try:
                    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if task.done():
                    return task.result()
                if not _same_load(replica.desired, target):
                    raise _Superseded
                # Re-put with the same content: keep going, remember the newest revision.
                replica.current_revision = replica.desired_revision
                replica.changed.clear()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])

    def _spec(self, assignment: spb.Assignment, path: pathlib.Path) -> ModelSpec:
        batching: BatchingDefaults | None = None
        if assignment.HasField("batching"):
            requested = assignment.batching
            defaults = self._cfg.batching
            batching = defaults.model_copy(
                update={
                    "enabled": requested.enabled,
                    # 0 means "node default" for these two (types.proto).
                    "max_batch_size": requested.max_batch_size or defaults.max_batch_size,
                    "max_queue_size": requested.max_queue_size or defaults.max_queue_size,
                    "max_queue_delay_us": requested.max_queue_delay_us,
                }
            )
        options = LoadOptions(
            precision=_PRECISIONS.get(assignment.precision, "FP32"),
            max_batch_size=(batching or self._cfg.batching).max_batch_size,
            intra_op_threads=self._cfg.intra_op_threads,
            inter_op_threads=self._cfg.inter_op_threads,
        )
        return ModelSpec(
            name=assignment.model,
            version=str(assignment.version),
            artifact=path,
            format="tensorrt_plan" if assignment.format == tpb.MODEL_FORMAT_TENSORRT_PLAN else "onnx",
            backend=_BACKEND_NAMES.get(assignment.backend),
            options=options,
            batching=batching,
            labels={"deployment": assignment.deployment} if assignment.deployment else {},
            # Verified by the cache: lets a TensorRT load share its engine through the object store.
            sha256=assignment.sha256,
        )

    async def _unload(self, replica: _Replica) -> None:
        name, version = replica.model, str(replica.version)
        self._set_status(replica, tpb.REPLICA_STATE_UNLOADING)
        started = time.monotonic()
        await self._clear_data_plane(replica, drain_seconds=self._cfg.unload_drain_seconds)
        self._unpin(replica)
        replica.current, replica.failed = None, False
        self._log.info("model unloaded", model=name, version=version, seconds=round(time.monotonic() - started, 3))

    async def _clear_data_plane(self, replica: _Replica, drain_seconds: float = 0.0) -> None:
        name, version = replica.model, str(replica.version)
        try:
            state, _ = self._data_plane.state(name, version)
            if state is not ModelState.UNAVAILABLE:
                await self._data_plane.unload(name, version, drain_seconds=drain_seconds)
        except Exception:  # noqa: BLE001 - the model is gone from our side either way
            self._log.exception("data plane unload failed", model=name, version=version)

    def _fail(self, replica: _Replica, reason: str, log: Any) -> None:
        replica.failed = True
        self._set_status(replica, tpb.REPLICA_STATE_FAILED, reason=reason)
        log.warning("model load failed", reason=reason)

    def _unpin(self, replica: _Replica) -> None:
        if replica.pinned is not None:
            digest, replica.pinned = replica.pinned, None
            self.cache.unpin(digest)

    def _status_key(self, replica: _Replica) -> str:
        return self._keys.status(self.node_id, replica.model, replica.version)

    def _set_status(
        self,
        replica: _Replica,
        state: int,
        *,
        reason: str = "",
        memory_bytes: int = 0,
        backend: int = tpb.BACKEND_UNSPECIFIED,
    ) -> None:
        status = spb.ReplicaStatus(
            node_id=self.node_id,
            model=replica.model,
            version=replica.version,
            state=state,
            reason=reason,
            memory_bytes=memory_bytes,
            address=self.address,
            backend=backend,
        )
        status.updated.GetCurrentTime()
        replica.status = status
        if self._stopping:
            return  # the lease is revoked; nothing must re-appear after deregistration
        self._put(self._status_key(replica), to_json(status))
        self._log.info(
            "replica state",
            model=replica.model,
            version=replica.version,
            state=tpb.ReplicaState.Name(state),
            reason=reason or None,
        )
