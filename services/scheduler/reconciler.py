"""The leader's reconcile loop: a watched view of etcd, the planner, and fenced writes.

- `ClusterCache` lists the whole namespace at one revision, then watches it from the next revision
  (a "reset" after compaction re-lists at the reset revision), keeping a `Snapshot` for the planner.
  Driven by the watch, never by polling.
- `Reconciler.lead(election)` runs while this process leads: on every change (debounced) it plans
  and writes the plan in transactions guarded by `election.fence()`, so a deposed leader cannot
  write (no split brain), and by per-key compares (create-only for new assignments, mod revision
  for updates and deletes), so one replica slot (node, model, version) never gets two writers. After
  a write it waits until the watch has delivered that revision, so the next plan sees its own
  writes.
- `_canary_loop` measures every running canary's candidate (its step's weights in effect) every
  `canary_check_interval_seconds` through a `CanaryMetricsSource`; the planner decides from the
  latest measurement (canary.py), and a pass runs at once when a measurement can change a decision.
- `NodeGrace` keeps the assignments of a node whose record vanished for `node_grace_seconds`
  (nothing re-placed): an etcd frozen past the lease TTL expires every node's lease at once when it
  resumes, and the nodes register again moments later. A node whose readiness probe fails
  (`NodeProbe`, at its last known address) is lost at once; so is one whose grace ends.
- `FlapTracker` damps flapping nodes: a node whose record re-appears within `flap_window` of being
  lost is on probation (no new placements) for `probation` seconds, doubled per further flap. A node
  back within its grace period lost nothing and is not on probation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from services.common.etcd import (
    CodecError,
    Compare,
    Election,
    EtcdClient,
    EtcdError,
    KeyValue,
    NotLeader,
    Op,
    WatchEvent,
    from_json,
    to_json,
)
from services.scheduler.autoscaler import Autoscaler
from services.scheduler.canary import PROGRESSING, CanaryMeasurement, CanaryMetricsSource, evaluate, has_canary
from services.scheduler.planner import Plan, PlannerConfig, Snapshot, Stored, plan
from services.scheduler.settings import SchedulerServerSettings
from services.scheduler.tasks import cancel_and_wait

# Writes per transaction (etcd allows 128 operations per transaction by default; compares count too).
_TXN_WRITES = 60


class FlapTracker:
    def __init__(self, window_seconds: float, probation_seconds: float, max_probation_seconds: float) -> None:
        self._window = window_seconds
        self._probation = probation_seconds
        self._max = max_probation_seconds
        self._lost_at: dict[str, float] = {}
        self._flaps: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def lost(self, node_id: str, now: float) -> None:
        self._lost_at[node_id] = now

    def joined(self, node_id: str, now: float) -> float | None:
        """Record a (re-)registration; returns the end of its probation, if any."""
        lost_at = self._lost_at.pop(node_id, None)
        if lost_at is None or now - lost_at > self._window:
            self._flaps.pop(node_id, None)
            return None
        flaps = self._flaps[node_id] = self._flaps.get(node_id, 0) + 1
        until = now + min(self._probation * 2 ** (flaps - 1), self._max)
        self._until[node_id] = until
        return until

    def on_probation(self, now: float) -> tuple[set[str], float | None]:
        """Nodes on probation now, and when the next probation ends."""
        for node_id, until in list(self._until.items()):
            if until <= now:
                del self._until[node_id]
        return set(self._until), min(self._until.values(), default=None)


class NodeGrace:
    """Nodes whose record vanished and that may register again: their assignments stay for
    `grace_seconds` (pure; `now` is monotonic seconds)."""

    def __init__(self, grace_seconds: float) -> None:
        self._grace = grace_seconds
        self._since: dict[str, float] = {}
        # Last known address of every node seen (a vanished record no longer tells it).
        self._addresses: dict[str, str] = {}

    def seen(self, node_id: str, address: str) -> bool:
        """A (re-)registration; True when the node was missing (back within its grace)."""
        if address:
            self._addresses[node_id] = address
        return self._since.pop(node_id, None) is not None

    def vanished(self, node_id: str, now: float) -> bool:
        """The node's record is gone: True while it is in its grace (kept), False when it is lost."""
        if self._grace <= 0:
            return False
        self._since.setdefault(node_id, now)
        return True

    def lost(self, node_id: str) -> bool:
        """End a missing node's grace early (its probe failed); False if it was not missing."""
        return self._since.pop(node_id, None) is not None

    def expire(self, now: float) -> list[str]:
        """End the graces that are over; those nodes are lost."""
        over = [node_id for node_id, since in self._since.items() if now - since >= self._grace]
        for node_id in over:
            del self._since[node_id]
        return over

    def missing(self) -> frozenset[str]:
        return frozenset(self._since)

    def addresses(self) -> dict[str, str]:
        """Missing nodes with a known address (the ones a probe can ask)."""
        return {node_id: self._addresses[node_id] for node_id in self._since if node_id in self._addresses}

    def next_expiry(self) -> float | None:
        return min((since + self._grace for since in self._since.values()), default=None)


class ClusterCache:
    def __init__(
        self, etcd: EtcdClient, logger: Any, on_node: Callable[[str, bool, str], None] | None = None
    ) -> None:
        """`on_node(node_id, present, address)`: a node record appeared or vanished."""
        self._etcd = etcd
        self._keys = etcd.keys
        self._root = etcd.keys.namespace + "/"
        self._log = logger
        self._on_node = on_node or (lambda node_id, present, address: None)
        self.snapshot = Snapshot()
        self.revision = 0
        self.loaded = asyncio.Event()
        self.changed = asyncio.Event()
        self._progress = asyncio.Condition()

    # -- decoding ---------------------------------------------------------------------------------

    def _put(self, key: str, value: bytes, mod_revision: int, create_revision: int | None) -> None:
        s, k = self.snapshot, self._keys
        try:
            if (parsed := k.parse_assignment_key(key)) is not None:
                old = s.assignments.get(parsed)
                s.assignments[parsed] = Stored(
                    from_json(value, spb.Assignment), mod_revision, create_revision or (old.create_revision if old else mod_revision)
                )
            elif (parsed := k.parse_status_key(key)) is not None:
                s.replicas[parsed] = from_json(value, spb.ReplicaStatus)
            elif (node_id := k.parse_node_key(key)) is not None:
                node = from_json(value, spb.Node)
                if node_id not in s.nodes:
                    self._on_node(node_id, True, node.address)
                s.nodes[node_id] = node
            elif (name := k.parse_deployment_key(key)) is not None:
                old = s.deployments.get(name)
                s.deployments[name] = Stored(
                    from_json(value, spb.DeploymentSpec),
                    mod_revision,
                    create_revision or (old.create_revision if old else mod_revision),
                )
            elif (name := k.parse_deployment_status_key(key)) is not None:
                s.statuses[name] = Stored(from_json(value, spb.DeploymentStatus), mod_revision)
            elif (parsed := k.parse_version_key(key)) is not None:
                s.versions[parsed] = from_json(value, rpb.ModelVersion)
            elif (parsed := k.parse_alias_key(key)) is not None:
                s.aliases[parsed] = from_json(value, rpb.Alias).version
        except CodecError as exc:
            self._log.error("ignoring an unreadable record", key=key, error=str(exc))

    def _delete(self, key: str) -> None:
        s, k = self.snapshot, self._keys
        if (parsed := k.parse_assignment_key(key)) is not None:
            s.assignments.pop(parsed, None)
        elif (parsed := k.parse_status_key(key)) is not None:
            s.replicas.pop(parsed, None)
        elif (node_id := k.parse_node_key(key)) is not None:
            if (node := s.nodes.pop(node_id, None)) is not None:
                self._on_node(node_id, False, node.address)
        elif (name := k.parse_deployment_key(key)) is not None:
            s.deployments.pop(name, None)
        elif (name := k.parse_deployment_status_key(key)) is not None:
            s.statuses.pop(name, None)
        elif (parsed := k.parse_version_key(key)) is not None:
            s.versions.pop(parsed, None)
        elif (parsed := k.parse_alias_key(key)) is not None:
            s.aliases.pop(parsed, None)

    def _load(self, kvs: list[KeyValue], revision: int) -> None:
        before = self.snapshot.nodes
        self.snapshot = Snapshot()
        for kv in kvs:
            self._put(kv.key, kv.value, kv.mod_revision, kv.create_revision)
        if self.loaded.is_set():
            # After a reset: nodes that vanished meanwhile.
            for node_id in set(before) - set(self.snapshot.nodes):
                self._on_node(node_id, False, before[node_id].address)
        self.revision = revision
        self.loaded.set()
        self.changed.set()

    async def _advance(self, revision: int) -> None:
        async with self._progress:
            self.revision = max(self.revision, revision)
            self._progress.notify_all()

    async def wait_revision(self, revision: int, timeout: float) -> bool:
        """Until the view includes `revision` (e.g. our own write); False on timeout."""
        async with self._progress:
            try:
                await asyncio.wait_for(self._progress.wait_for(lambda: self.revision >= revision), timeout)
            except TimeoutError:
                return False
        return True

    # -- list then watch ------------------------------------------------------------------------

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                revision = await self._etcd.current_revision()
                self._load(await self._etcd.get_prefix(self._root, revision=revision), revision)
                await self._advance(revision)
                delay = 0.1
                watch = self._etcd.watch_prefix(self._root, start_revision=revision + 1)
                async with contextlib.aclosing(watch) as events:
                    async for event in events:
                        await self._on_event(event)
            except EtcdError as exc:
                self._log.info("cluster view: etcd unavailable, re-listing", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _on_event(self, event: WatchEvent) -> None:
        if event.kind == "reset":
            self._log.warning("cluster view lost watch history; re-listing", revision=event.mod_revision)
            self._load(await self._etcd.get_prefix(self._root, revision=event.mod_revision), event.mod_revision)
        elif event.kind == "put":
            self._put(event.key, event.value, event.mod_revision, None)
        else:
            self._delete(event.key)
        self.changed.set()
        await self._advance(event.mod_revision)


class Reconciler:
    def __init__(
        self,
        etcd: EtcdClient,
        settings: SchedulerServerSettings,
        autoscaler: Autoscaler,
        *,
        logger: Any = None,
        metrics: Any = None,
        canary_metrics: CanaryMetricsSource | None = None,
        node_probe: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        """`node_probe(address)`: whether the node there answers as ready (a vanished node that
        does not is lost at once; without a probe only its grace period ends it)."""
        self._etcd = etcd
        self._node_probe = node_probe
        self._canary_source = canary_metrics
        # Latest measurement of each running canary's candidate (this term only).
        self._canary_measurements: dict[str, CanaryMeasurement] = {}
        self._keys = etcd.keys
        self._settings = settings
        self._autoscaler = autoscaler
        self._log = (logger or structlog.get_logger("scheduler")).bind(component="reconciler")
        self._metrics = metrics
        self._config = PlannerConfig(
            memory_estimate_factor=settings.memory_estimate_factor,
            memory_estimate_min_bytes=settings.memory_estimate_min_bytes,
            failed_replica_retry_seconds=settings.failed_replica_retry_seconds,
            evict_idle_after_seconds=settings.evict_idle_after_seconds,
            canary_min_requests=settings.canary_min_requests,
            canary_max_hold_seconds=settings.canary_max_hold_seconds,
        )
        self._flaps = FlapTracker(
            settings.node_flap_window_seconds, settings.node_probation_seconds, settings.node_probation_max_seconds
        )
        self._grace = NodeGrace(settings.node_grace_seconds)
        self._probe_now = asyncio.Event()
        self._avoid: dict[tuple[str, str, int], float] = {}
        self._poke = asyncio.Event()
        self.cache: ClusterCache | None = None
        self.passes = 0

    def poke(self) -> None:
        """Run a pass soon (e.g. after EnsureReplicas)."""
        self._poke.set()

    def _on_node(self, node_id: str, present: bool, address: str) -> None:
        now = time.monotonic()
        if present:
            if self._grace.seen(node_id, address):
                self._log.info("node registered again within its grace period; its replicas stayed", node_id=node_id)
                return  # nothing was moved: not a flap
            until = self._flaps.joined(node_id, now)
            if until is not None:
                self._log.warning(
                    "node re-registered soon after being lost: on probation, no new placements",
                    node_id=node_id, seconds=round(until - now, 1),
                )
        elif self._grace.vanished(node_id, now):
            self._log.warning(
                "node record vanished: its replicas stay assigned while it may register again",
                node_id=node_id, grace_seconds=self._settings.node_grace_seconds,
            )
            self._probe_now.set()
        else:
            self._lost(node_id, now, "its record vanished")

    def _lost(self, node_id: str, now: float, why: str) -> None:
        self._flaps.lost(node_id, now)
        self._log.warning("node lost: its replicas are placed elsewhere", node_id=node_id, why=why)

    def _nodes_absent_at_start(self, snapshot: Snapshot) -> None:
        """A new term sees no deletion of the records that vanished before it: nodes still assigned
        but without a record get their grace from now (unless the last term started it)."""
        for node_id in sorted({key[0] for key in snapshot.assignments} - set(snapshot.nodes)):
            if node_id not in self._grace.missing():
                self._on_node(node_id, False, "")

    async def _probe_missing(self) -> None:
        """While nodes are missing: ask each, at its last known address, whether it still serves
        (at once when one vanishes, then every `node_grace_probe_seconds`); one that does not is lost."""
        probe = self._node_probe
        assert probe is not None
        while True:
            self._probe_now.clear()
            targets = self._grace.addresses()
            if not targets:
                await self._probe_now.wait()
                continue
            answers = await asyncio.gather(*(probe(address) for address in targets.values()), return_exceptions=True)
            now, lost = time.monotonic(), False
            for (node_id, address), answer in zip(targets.items(), answers):
                if answer is not True and self._grace.lost(node_id):
                    self._lost(node_id, now, f"its record vanished and it does not answer as ready at {address}")
                    lost = True
            if lost:
                self.poke()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._probe_now.wait(), self._settings.node_grace_probe_seconds)

    async def lead(self, election: Election) -> None:
        """Reconcile until cancelled (the caller cancels as soon as leadership is lost)."""
        self._autoscaler.reset()
        self._avoid.clear()
        self._canary_measurements.clear()
        cache = self.cache = ClusterCache(self._etcd, self._log, self._on_node)
        tasks = [
            asyncio.create_task(cache.run(), name="scheduler-cluster-view"),
            asyncio.create_task(self._autoscale_loop(cache), name="scheduler-autoscaler"),
        ]
        if self._canary_source is not None:
            tasks.append(asyncio.create_task(self._canary_loop(cache), name="scheduler-canary"))
        if self._node_probe is not None:
            tasks.append(asyncio.create_task(self._probe_missing(), name="scheduler-node-probe"))
        try:
            await cache.loaded.wait()
            self._nodes_absent_at_start(cache.snapshot)
            wake_in: float | None = 0.0
            while True:
                waiters = [asyncio.ensure_future(cache.changed.wait()), asyncio.ensure_future(self._poke.wait())]
                try:
                    await asyncio.wait(
                        [*waiters, *tasks],
                        timeout=self._settings.reconcile_resync_seconds if wake_in is None else wake_in,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    for waiter in waiters:
                        waiter.cancel()
                for task in tasks:
                    if task.done():
                        task.result()  # a crashed helper ends this term (re-raised)
                if self._settings.reconcile_debounce_seconds:
                    await asyncio.sleep(self._settings.reconcile_debounce_seconds)
                cache.changed.clear()
                self._poke.clear()
                try:
                    wake_in = await self._pass(cache, election)
                except NotLeader:
                    raise
                except EtcdError as exc:
                    self._log.info("reconcile pass failed: etcd unavailable; retrying", error=str(exc))
                    wake_in = 0.5
        finally:
            await cancel_and_wait(tasks)
            self.cache = None

    async def _autoscale_loop(self, cache: ClusterCache) -> None:
        await cache.loaded.wait()
        while True:
            await asyncio.sleep(self._settings.autoscale_interval_seconds)
            snapshot = cache.snapshot
            specs = {name: stored.value for name, stored in snapshot.deployments.items()}
            statuses = {name: stored.value for name, stored in snapshot.statuses.items()}
            replicas: dict[tuple[str, int], list[spb.ReplicaStatus]] = defaultdict(list)
            for (node, model, version), status in snapshot.replicas.items():
                if node in snapshot.nodes and (node, model, version) in snapshot.assignments:
                    replicas[(model, version)].append(status)
            if await self._autoscaler.tick(specs, statuses, replicas):
                self.poke()

    async def _canary_loop(self, cache: ClusterCache) -> None:
        await cache.loaded.wait()
        source = self._canary_source
        assert source is not None
        while True:
            await asyncio.sleep(self._settings.canary_check_interval_seconds)
            snapshot = cache.snapshot
            running: set[str] = set()
            for name, stored in list(snapshot.deployments.items()):
                spec, status = stored.value, snapshot.statuses.get(name)
                if not has_canary(spec) or status is None or not status.value.HasField("canary"):
                    continue
                canary = status.value.canary
                if canary.phase != PROGRESSING or not canary.HasField("step_started"):
                    continue
                running.add(name)
                try:
                    measurement = await source.measure(spec.model, canary.version, float(spec.canary.step_seconds))
                except Exception:  # noqa: BLE001 - a broken source means "no verdict", never a crash
                    self._log.exception("canary metrics failed", deployment=name)
                    measurement = None
                if measurement is None:
                    self._canary_measurements.pop(name, None)
                    continue
                self._canary_measurements[name] = measurement
                started = canary.step_started.seconds + canary.step_started.nanos / 1e9
                verdict = evaluate(spec.canary, measurement, self._settings.canary_min_requests)
                if verdict.outcome == "fail" or measurement.at >= started + spec.canary.step_seconds:
                    self.poke()  # this measurement can decide the step
            for name in set(self._canary_measurements) - running:
                del self._canary_measurements[name]

    async def _pass(self, cache: ClusterCache, election: Election) -> float | None:
        """One reconcile pass; returns seconds until a time-based rule needs another one."""
        started = time.perf_counter()
        monotonic, wall = time.monotonic(), time.time()
        snapshot = cache.snapshot
        for node_id in self._grace.expire(monotonic):
            self._lost(node_id, monotonic, f"it did not register again within {self._settings.node_grace_seconds:g}s")
        probation, probation_ends = self._flaps.on_probation(monotonic)
        self._avoid = {key: until for key, until in self._avoid.items() if until > monotonic}
        wanted = self._autoscaler.totals(
            {name: stored.value for name, stored in snapshot.deployments.items()},
            {name: stored.value for name, stored in snapshot.statuses.items()},
        )
        result = plan(
            snapshot,
            now=wall,
            wanted=wanted,
            unschedulable_nodes=probation,
            avoid=set(self._avoid),
            leader_revision=election.leader_revision,
            config=self._config,
            # The autoscaler's clock is monotonic; the planner's is the wall clock.
            idle_since={name: wall - (monotonic - t) for name, t in self._autoscaler.idle_since().items()},
            canary_metrics=dict(self._canary_measurements),
            missing_nodes=self._grace.missing(),
        )
        for key in result.avoid:
            self._avoid[key] = monotonic + max(self._settings.failed_replica_retry_seconds, 1.0)
        self.passes += 1
        wrote = await self._write(result, cache, election)
        if wrote:
            for name, keys in result.evictions.items():
                self._log.info("idle replicas evicted for room", deployment=name, replicas=[list(k) for k in keys])
                stored = snapshot.deployments.get(name)
                if stored is not None:
                    self._autoscaler.evicted(name, len(keys), stored.value)
        if self._metrics is not None:
            self._metrics.observe_pass(time.perf_counter() - started, result)
        deadlines = [d for d in (probation_ends, self._grace.next_expiry(), *(self._avoid.values())) if d is not None]
        wake = [d - monotonic for d in deadlines]
        if result.wake_at is not None:
            wake.append(result.wake_at - wall)
        if not wrote:
            wake.append(0.5)  # a conflicting write: look again shortly
        return max(0.0, min(wake)) + 0.01 if wake else None

    def _operations(self, result: Plan) -> list[tuple[Compare, Op]]:
        k = self._keys
        writes: list[tuple[Compare, Op]] = []
        # New capacity first, then the routing state (statuses), then removals.
        for (node, model, version), assignment, expected in result.assignment_puts:
            key = k.assignment(node, model, version)
            guard = Compare.create_revision(key, "==", 0) if expected == 0 else Compare.mod_revision(key, "==", expected)
            writes.append((guard, Op.put(key, to_json(assignment))))
        for name, status, expected in result.status_puts:
            key = k.deployment_status(name)
            guard = Compare.create_revision(key, "==", 0) if expected == 0 else Compare.mod_revision(key, "==", expected)
            writes.append((guard, Op.put(key, to_json(status))))
        for (node, model, version), expected in result.assignment_deletes:
            key = k.assignment(node, model, version)
            writes.append((Compare.mod_revision(key, "==", expected), Op.delete(key)))
        for name, expected in result.status_deletes:
            key = k.deployment_status(name)
            writes.append((Compare.mod_revision(key, "==", expected), Op.delete(key)))
        return writes

    async def _write(self, result: Plan, cache: ClusterCache, election: Election) -> bool:
        writes = self._operations(result)
        if not writes:
            return True
        for start in range(0, len(writes), _TXN_WRITES):
            batch = writes[start : start + _TXN_WRITES]
            fence = election.fence()  # raises NotLeader once leadership is gone
            outcome = await self._etcd.transaction([fence, *(c for c, _ in batch)], [op for _, op in batch])
            if not outcome.succeeded:
                if not election.is_leader:
                    raise NotLeader("leadership lost during a reconcile write")
                self._log.info("reconcile write conflicted with a newer change; planning again")
                return False
            if not await cache.wait_revision(outcome.revision, timeout=5.0):
                self._log.warning("cluster view lags behind our own write; planning again")
                return False
        self._log.info(
            "reconciled",
            assigned=len(result.assignment_puts),
            unassigned=len(result.assignment_deletes),
            statuses=len(result.status_puts),
        )
        return True
