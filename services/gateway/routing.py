"""The routing table: which READY replicas serve which version of which deployment, at what weight.

Built from etcd (list at one revision, then one watch of the namespace from the next revision):
`deployments/<name>` (DeploymentSpec), `deployment-status/<name>` (DeploymentStatus, whose
`VersionStatus.weight` is the *effective* split the scheduler switches only once a new split is
READY), `status/<node>/<model>/<version>` (ReplicaStatus, READY ones are routable) and `nodes/<id>`
(Node, the address when a status lacks one). While etcd is unreachable the last table stays in use
unchanged (invariant 1: a control-plane outage never stops serving loaded models); a compaction
reset or a reconnect re-lists everything.

Replica statuses are lease-bound, and an etcd that was frozen or partitioned past the lease TTL
expires every lease at once when it comes back: every READY record vanishes together, moments
before the nodes register again. So a READY replica whose status vanishes (deleted, or missing from
a re-listing; a status put in another state is a real change) is *held*: still routed while its node
answers probes, until its status is written again, a probe fails, or `grace_seconds` pass.

`RoutingState`, `choose_version` and `choose_replica` are pure (unit-tested); `RoutingWatcher`
feeds the state from etcd, probes the nodes of held replicas and publishes immutable `RoutingTable`
snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import structlog

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.common.aio import Backoff
from services.common.errors import NotFound, Unavailable
from services.common.etcd import CodecError, EtcdClient, EtcdError, KeyBuilder, KeyValue, from_json


@dataclass(frozen=True, slots=True)
class Replica:
    """One READY copy of a model version on a node; `address` is the node's GRPCInferenceService."""

    node_id: str
    address: str
    model: str
    version: int


@dataclass(frozen=True, slots=True)
class VersionRoute:
    version: int
    # Effective traffic weight (percent of the deployment's traffic).
    weight: int
    replicas: tuple[Replica, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    """One deployment as routing sees it."""

    name: str
    # Registry model name: what the nodes serve (requests are rewritten to it).
    model: str
    min_replicas: int
    versions: tuple[VersionRoute, ...] = ()

    def version(self, number: int) -> VersionRoute | None:
        return next((v for v in self.versions if v.version == number), None)

    @property
    def ready(self) -> bool:
        return any(v.replicas for v in self.versions)

    def split(self) -> list[VersionRoute]:
        """Versions that can take traffic now, with their weights. Versions with weight but no READY
        replica lose their share to the others (a failing version must not fail requests); if no
        weighted version has a replica, READY versions of weight 0 share the traffic equally."""
        weighted = [v for v in self.versions if v.replicas and v.weight > 0]
        if weighted:
            return weighted
        return [VersionRoute(v.version, 1, v.replicas) for v in self.versions if v.replicas]

    def primary(self) -> VersionRoute | None:
        """The version answering unversioned metadata requests: the heaviest READY one, newest on ties."""
        split = self.split()
        return max(split, key=lambda v: (v.weight, v.version)) if split else None


@dataclass(frozen=True)
class RoutingTable:
    routes: dict[str, Route] = field(default_factory=dict)
    # Model name → deployment name, so a request naming the registry model finds its deployment.
    by_model: dict[str, str] = field(default_factory=dict)
    # Incremented on every rebuild.
    generation: int = 0

    def find(self, name: str) -> Route | None:
        route = self.routes.get(name)
        if route is None:
            deployment = self.by_model.get(name)
            route = self.routes.get(deployment) if deployment is not None else None
        return route

    def lookup(self, name: str) -> Route:
        route = self.find(name)
        if route is None:
            raise NotFound(f"unknown model '{name}': no deployment of that name")
        return route

    def addresses(self) -> set[str]:
        return {r.address for route in self.routes.values() for v in route.versions for r in v.replicas}


ReplicaKey = tuple[str, str, int]  # (node id, model, version)
# The node at an address says which of these (model, version) it serves READY now (empty: it does
# not answer, or is not ready).
ReplicaProbe = Callable[[str, Sequence[tuple[str, int]], float], Awaitable[set[tuple[str, int]]]]


@dataclass(frozen=True, slots=True, eq=False)
class HeldReplica:
    """A READY replica whose status record vanished, routed at `address` until `until` (monotonic)."""

    address: str
    until: float


class RoutingState:
    """The etcd records routing needs, updated one key at a time; `table()` builds a snapshot.

    `grace_seconds` > 0 holds READY replicas whose status vanishes (see the module docstring) for at
    most that long on `clock`; the caller drops them earlier when their node stops answering."""

    def __init__(self, keys: KeyBuilder, *, grace_seconds: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._keys = keys
        self._grace = grace_seconds
        self._clock = clock
        self.specs: dict[str, spb.DeploymentSpec] = {}
        self.statuses: dict[str, spb.DeploymentStatus] = {}
        # (node, model, version) → READY replica status (other states are not kept).
        self.replicas: dict[ReplicaKey, spb.ReplicaStatus] = {}
        self.held: dict[ReplicaKey, HeldReplica] = {}
        self.nodes: dict[str, str] = {}
        self._generation = 0

    def prefixes(self) -> tuple[str, ...]:
        k = self._keys
        return (k.deployments_prefix(), k.deployment_statuses_prefix(), k.statuses_prefix(), k.nodes_prefix())

    def reset(self, kvs: Iterable[KeyValue]) -> None:
        ready, held = dict(self.replicas), dict(self.held)
        self.specs.clear()
        self.statuses.clear()
        self.replicas.clear()
        self.held.clear()
        self.nodes.clear()
        listed: set[ReplicaKey] = set()
        for kv in kvs:
            self.apply("put", kv.key, kv.value)
            if (replica := self._keys.parse_status_key(kv.key)) is not None:
                listed.add(replica)
        # A status missing from the listing vanished meanwhile: the same as its delete event.
        for key, status in ready.items():
            if key not in listed:
                self._hold(key, status)
        for key, entry in held.items():
            if key not in listed:
                self.held[key] = entry

    def _hold(self, key: ReplicaKey, status: spb.ReplicaStatus) -> None:
        address = status.address or self.nodes.get(key[0], "")
        if self._grace > 0 and address:
            self.held[key] = HeldReplica(address, self._clock() + self._grace)

    def drop(self, key: ReplicaKey, entry: HeldReplica) -> bool:
        """Stop holding `entry` (its node failed a probe); False if it is no longer held."""
        if self.held.get(key) is entry:
            del self.held[key]
            return True
        return False

    def expire(self) -> list[ReplicaKey]:
        """Stop holding the replicas whose grace is over; their keys."""
        now = self._clock()
        over = [key for key, entry in self.held.items() if entry.until <= now]
        for key in over:
            del self.held[key]
        return over

    def next_expiry(self) -> float | None:
        return min((entry.until for entry in self.held.values()), default=None)

    def apply(self, kind: str, key: str, value: bytes) -> bool:
        """Apply one put/delete; False when the key is not one routing uses (or its value is bad)."""
        keys = self._keys
        put = kind == "put"
        try:
            if (name := keys.parse_deployment_key(key)) is not None:
                if put:
                    self.specs[name] = from_json(value, spb.DeploymentSpec)
                else:
                    self.specs.pop(name, None)
            elif (name := keys.parse_deployment_status_key(key)) is not None:
                if put:
                    self.statuses[name] = from_json(value, spb.DeploymentStatus)
                else:
                    self.statuses.pop(name, None)
            elif (replica := keys.parse_status_key(key)) is not None:
                status = from_json(value, spb.ReplicaStatus) if put else None
                if status is not None and status.state == tpb.REPLICA_STATE_READY:
                    self.replicas[replica] = status
                    self.held.pop(replica, None)
                elif (gone := self.replicas.pop(replica, None)) is not None:
                    if status is None:
                        self._hold(replica, gone)  # vanished, not changed: its lease may just have expired
                elif self.held.pop(replica, None) is None:
                    return False  # LOADING/FAILED of a replica that was not routable: no change
            elif (node := keys.parse_node_key(key)) is not None:
                if put:
                    self.nodes[node] = from_json(value, spb.Node).address
                else:
                    self.nodes.pop(node, None)
            else:
                return False
        except CodecError:
            return False  # a malformed record must not take routing down; the writer is at fault
        return True

    def table(self) -> RoutingTable:
        self._generation += 1
        now = self._clock()
        addresses = {key: status.address or self.nodes.get(key[0], "") for key, status in self.replicas.items()}
        addresses.update((key, entry.address) for key, entry in self.held.items() if entry.until > now)
        by_model_version: dict[tuple[str, int], list[Replica]] = {}
        for (node, model, version), address in sorted(addresses.items()):
            if address:
                by_model_version.setdefault((model, version), []).append(Replica(node, address, model, version))
        routes: dict[str, Route] = {}
        by_model: dict[str, str] = {}
        for name, spec in self.specs.items():
            model = spec.model or name
            weights = _effective_weights(spec, self.statuses.get(name))
            numbers = set(weights) | {v for (m, v) in by_model_version if m == model}
            versions = tuple(
                VersionRoute(n, weights.get(n, 0), tuple(by_model_version.get((model, n), ()))) for n in sorted(numbers)
            )
            routes[name] = Route(name, model, spec.min_replicas, versions)
            # One deployment per model (scheduler rule); the oldest name wins should two race in.
            if model != name and model not in by_model:
                by_model[model] = name
        return RoutingTable(routes, by_model, self._generation)


def _effective_weights(spec: spb.DeploymentSpec, status: spb.DeploymentStatus | None) -> dict[int, int]:
    if status is not None and any(v.weight for v in status.versions):
        return {v.version: v.weight for v in status.versions}
    # No effective split yet (the scheduler has not written one): the spec's numbered versions.
    weights: dict[int, int] = {}
    for target in spec.traffic:
        if target.WhichOneof("target") == "version" and target.version:
            weights[target.version] = weights.get(target.version, 0) + target.weight
    if status is not None:
        for v in status.versions:
            weights.setdefault(v.version, 0)
    return weights


# -- choosing -----------------------------------------------------------------------------------


def _unit(*parts: str) -> float:
    """A stable uniform number in [0, 1) for the given strings (the same on every gateway)."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose_version(
    route: Route, *, pinned: int | None = None, sticky_key: str | None = None, rng: random.Random | None = None
) -> VersionRoute:
    """The version a request goes to: the pinned one, or one drawn by effective weight; a sticky key
    always draws the same point of the split (same version while the split stays)."""
    if pinned is not None:
        version = route.version(pinned)
        if version is None:
            deployed = ", ".join(str(v.version) for v in route.versions) or "none"
            raise NotFound(f"model '{route.name}' has no deployed version {pinned} (deployed: {deployed})")
        if not version.replicas:
            raise Unavailable(f"model '{route.name}' version {pinned} has no READY replica")
        return version
    split = route.split()
    if not split:
        raise Unavailable(f"model '{route.name}' has no READY replica")
    if len(split) == 1:
        return split[0]
    total = sum(v.weight for v in split)
    point = (_unit("version", sticky_key) if sticky_key is not None else (rng or random).random()) * total
    for version in split:
        point -= version.weight
        if point < 0:
            return version
    return split[-1]


def choose_replica(
    replicas: Sequence[Replica],
    *,
    load: Callable[[str], int],
    exclude: set[str] = frozenset(),  # type: ignore[assignment]
    ejected: Callable[[str], bool] = lambda _address: False,
    sticky_key: str | None = None,
    rng: random.Random | None = None,
) -> Replica | None:
    """Least outstanding requests among `replicas` (random among equals), skipping `exclude`
    (already tried by this request) and preferring replicas not `ejected` (recently failed). A sticky
    key picks by rendezvous hashing: the same replica while it stays READY, and only the keys of a
    replica that leaves move."""
    candidates = [r for r in replicas if r.address not in exclude]
    if not candidates:
        return None
    healthy = [r for r in candidates if not ejected(r.address)]
    candidates = healthy or candidates
    if sticky_key is not None:
        return max(candidates, key=lambda r: _unit("replica", sticky_key, r.node_id))
    if len(candidates) == 1:
        return candidates[0]
    loads = [load(r.address) for r in candidates]
    least = min(loads)
    best = [r for r, n in zip(candidates, loads) if n == least]
    return best[0] if len(best) == 1 else (rng or random).choice(best)


# -- the etcd-fed watcher -----------------------------------------------------------------------


class RoutingWatcher:
    """Keeps a `RoutingTable` in step with etcd; the last table stays in use while etcd is away.

    With a `probe`, READY replicas whose status vanishes are held (see the module docstring) for at
    most `grace_seconds`; their nodes are probed at once and then every `probe_seconds`, and one
    failed probe drops them. Without a probe nothing is held."""

    def __init__(
        self,
        etcd: EtcdClient,
        *,
        logger: structlog.stdlib.BoundLogger,
        on_change: Callable[[RoutingTable], None] | None = None,
        probe: ReplicaProbe | None = None,
        grace_seconds: float = 0.0,
        probe_seconds: float = 1.0,
    ) -> None:
        self._etcd = etcd
        self._log = logger
        self._probe = probe
        self._probe_seconds = probe_seconds
        self._state = RoutingState(etcd.keys, grace_seconds=grace_seconds if probe is not None else 0.0)
        self._on_change = on_change
        self.table = RoutingTable()
        # Set once the first listing is in: before that the gateway knows no deployment.
        self.loaded = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._holding: asyncio.Task[None] | None = None
        self._new_hold = asyncio.Event()
        self._announced: set[HeldReplica] = set()

    @property
    def held(self) -> frozenset[ReplicaKey]:
        """Replicas routed although their status vanished (see the module docstring)."""
        return frozenset(self._state.held)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-routing-watch")

    async def stop(self) -> None:
        for task in (self._task, self._holding):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._holding = None

    async def wait_loaded(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.loaded.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_changed(self, timeout: float) -> None:
        """Return when the table next changes, or after `timeout` seconds."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _publish(self) -> None:
        self.table = self._state.table()
        # Wake the waiters of this generation; later waiters wait for the next change.
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            try:
                self._on_change(self.table)
            except Exception:  # noqa: BLE001 - a listener must not stop routing updates
                self._log.exception("routing table listener failed")
        held = self._state.held
        if held and any(entry not in self._announced for entry in held.values()):
            self._new_hold.set()  # a new hold is probed at once
            if self._holding is None or self._holding.done():
                self._holding = asyncio.get_running_loop().create_task(self._check_held(), name="gateway-routing-held")

    async def _check_held(self) -> None:
        """While replicas are held: probe their nodes now and every probe interval (at once for a
        new hold), drop the ones a node no longer serves, end the holds whose grace is over."""
        assert self._probe is not None
        state = self._state
        while state.held:
            self._new_hold.clear()
            changed = False
            for key in state.expire():
                changed = True
                self._log.warning("replica still has no status after the grace period; no longer routed",
                                  node=key[0], model=key[1], version=key[2])
            by_address: dict[str, list[tuple[ReplicaKey, HeldReplica]]] = {}
            for key, entry in state.held.items():
                by_address.setdefault(entry.address, []).append((key, entry))
                if entry not in self._announced:
                    self._announced.add(entry)
                    self._log.warning(
                        "replica status vanished (lease expired?); still routed while its node answers",
                        node=key[0], model=key[1], version=key[2], address=entry.address,
                        seconds_left=round(entry.until - time.monotonic(), 1),
                    )
            answers = await asyncio.gather(
                *(
                    self._probe(address, [(k[1], k[2]) for k, _ in entries], max(1.0, self._probe_seconds))
                    for address, entries in by_address.items()
                ),
                return_exceptions=True,
            )
            for (address, entries), answer in zip(by_address.items(), answers):
                if isinstance(answer, BaseException):
                    self._log.warning("probing a held replica's node failed", address=address, error=repr(answer))
                serving = answer if isinstance(answer, set) else set()
                for key, entry in entries:
                    if (key[1], key[2]) not in serving and state.drop(key, entry):
                        changed = True
                        self._log.warning("held replica's node does not serve it; no longer routed",
                                          node=key[0], model=key[1], version=key[2], address=address)
            self._announced.intersection_update(state.held.values())
            if changed:
                self._publish()
            until = state.next_expiry()
            if until is not None and not self._new_hold.is_set():
                pause = max(0.0, min(self._probe_seconds, until - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._new_hold.wait(), pause)

    async def _list(self) -> int:
        revision = await self._etcd.current_revision()
        kvs: list[KeyValue] = []
        for prefix in self._state.prefixes():
            kvs.extend(await self._etcd.get_prefix(prefix, revision=revision))
        self._state.reset(kvs)
        self._publish()
        if not self.loaded.is_set():
            self._log.info("routing table loaded", deployments=len(self.table.routes))
        self.loaded.set()
        return revision

    async def _run(self) -> None:
        backoff = Backoff(0.1, 2.0)
        root = self._etcd.keys.namespace + "/"
        while True:
            try:
                revision = await self._list()
                backoff.reset()
                async with contextlib.aclosing(self._etcd.watch_prefix(root, start_revision=revision + 1)) as events:
                    async for event in events:
                        if event.kind == "reset":
                            # History compacted during an outage: the cached view may be stale.
                            self._log.warning("routing watch reset, re-listing", revision=event.mod_revision)
                            break
                        if self._state.apply(event.kind, event.key, event.value):
                            self._publish()
            except asyncio.CancelledError:
                raise
            except EtcdError as exc:
                # Keep routing with the last table; re-list when etcd answers again.
                self._log.warning("routing table refresh failed; serving from the cached table", error=str(exc))
                await asyncio.sleep(backoff.next())
            except Exception:  # noqa: BLE001 - never let the watcher die
                self._log.exception("routing watcher failed; retrying")
                await asyncio.sleep(backoff.next())
