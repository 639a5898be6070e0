"""Pure reconcile planning: from a snapshot of the cluster (as read from etcd) to the writes that move
it toward the declared deployments. No I/O and no clock: `now` and everything time-dependent come in
as arguments, so every rule here is unit-tested without etcd.

Per deployment (oldest first, so older deployments keep priority for scarce capacity):

1. Resolve the traffic split: aliases → versions (an alias and a version naming the same version add
   up). A target that no longer resolves holds the deployment where it is (condition Unschedulable,
   reason TargetNotFound).
2. Serving state: the version weights in the stored DeploymentStatus (`VersionStatus.weight`) are what
   routing uses. They change only when every version of the new split has its desired READY replicas
   ("switch"); until then old versions keep their replicas (zero-downtime rollout), and their
   assignments are deleted in the same pass that switches the weights.
3. A version of a rollout that reports FAILED on any node is rolled back: its assignments go, the
   weights stay on the serving versions, and the status keeps the version (weight 0, desired 0) with
   the FAILED replica statuses and a RolledBack condition. That entry is how a later leader knows not
   to retry it for the same spec generation; a new generation (any spec change) retries.
4. Replica counts: total = autoscaler's decision clamped to [min, max], split by weight with the
   largest-remainder method, and at least one replica per version that receives traffic.
5. Per version: keep assignments on live, capable nodes, and on `missing_nodes` (record vanished
   lately, may register again: kept as they are, counted, not re-placed); drop extras (FAILED,
   unreported, LOADING before READY; most loaded nodes first); place the missing ones with the
   Placer; a FAILED replica of a serving version is moved to another node after
   `failed_replica_retry_seconds`.
6. Every scheduler-written assignment (it names its deployment) or assignment of a deployed model
   that no deployment wants (dead nodes, deleted deployments, finished rollouts) is deleted; status
   records of deleted deployments are deleted. Hand-written assignments (no deployment, model not
   deployed) are left alone, though their memory counts in placement.
7. Eviction (density): when a replica cannot be placed for lack of memory on any capable node, idle
   replicas are evicted least-recently-used first to make room (`_make_room`). Evictable: a READY
   replica, on a live node, of another deployment whose load signal has shown no traffic for at least
   `evict_idle_after_seconds` (`idle_since`; unknown activity is never idle), that serves exactly one
   version and is not rolling out, and only as many of its replicas as it runs above its
   `min_replicas` (so only autoscaled deployments lose replicas: min 0 ones can go to zero, others
   keep their guarantee). The node chosen is the one needing the fewest evictions (then the oldest
   idle ones); the evictions and the new placement are planned in the same pass, the evicted
   deployment's replica total drops by as many (`Plan.evictions`: the reconciler tells the
   autoscaler) and its status carries an `Evicted` condition. Traffic or EnsureReplicas brings it
   back through the autoscaler's scale-from-zero path.
8. Canary (`DeploymentSpec.canary`, rules in canary.py): the split the rollout machinery moves to is
   the canary's current step (`_canary`), decided from the progress stored in
   `DeploymentStatus.canary`, the time and the leader's latest measurement of the candidate
   (`canary_metrics`); stable versions keep their full replica count while it runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.scheduler.canary import (
    COND_CANARY,
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    CanaryMeasurement,
    canary_split,
    evaluate,
    has_canary,
    next_step,
    same_run,
)
from services.scheduler.placement import ANY_BACKEND, NodeCapacity, Placer, Pool, ReplicaRequest

M = TypeVar("M", bound=Message)

LOADING = tpb.REPLICA_STATE_LOADING
READY = tpb.REPLICA_STATE_READY
FAILED = tpb.REPLICA_STATE_FAILED
UNLOADING = tpb.REPLICA_STATE_UNLOADING

# Condition types.
COND_READY = "Ready"
COND_PROGRESSING = "Progressing"
COND_UNSCHEDULABLE = "Unschedulable"
COND_ROLLED_BACK = "RolledBack"
COND_EVICTED = "Evicted"

ReplicaKey = tuple[str, str, int]  # (node id, model, version)


@dataclass(frozen=True, slots=True)
class Stored(Generic[M]):
    """A record as read from etcd, with the revisions that guard writes to it."""

    value: M
    mod_revision: int = 0
    create_revision: int = 0


@dataclass
class Snapshot:
    deployments: dict[str, Stored[spb.DeploymentSpec]] = field(default_factory=dict)
    statuses: dict[str, Stored[spb.DeploymentStatus]] = field(default_factory=dict)
    versions: dict[tuple[str, int], rpb.ModelVersion] = field(default_factory=dict)
    aliases: dict[tuple[str, str], int] = field(default_factory=dict)
    nodes: dict[str, spb.Node] = field(default_factory=dict)
    assignments: dict[ReplicaKey, Stored[spb.Assignment]] = field(default_factory=dict)
    replicas: dict[ReplicaKey, spb.ReplicaStatus] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannerConfig:
    memory_estimate_factor: float = 2.0
    memory_estimate_min_bytes: int = 16 * 1024 * 1024
    failed_replica_retry_seconds: float = 30.0
    # A deployment idle (no traffic in its load signal) this long may lose replicas above its min to
    # make room for a placement (LRU eviction).
    evict_idle_after_seconds: float = 300.0
    # Canary: requests a measurement needs for a verdict, and how long beyond `step_seconds` a step
    # is held for lack of one before the canary is rolled back.
    canary_min_requests: int = 20
    canary_max_hold_seconds: float = 300.0


@dataclass
class Plan:
    # (key, value, expected mod revision; 0: the key must not exist)
    assignment_puts: list[tuple[ReplicaKey, spb.Assignment, int]] = field(default_factory=list)
    assignment_deletes: list[tuple[ReplicaKey, int]] = field(default_factory=list)
    status_puts: list[tuple[str, spb.DeploymentStatus, int]] = field(default_factory=list)
    status_deletes: list[tuple[str, int]] = field(default_factory=list)
    # Replicas that failed on a node and were taken off it: avoid that node for the version a while.
    avoid: list[ReplicaKey] = field(default_factory=list)
    # Replica total used per deployment.
    totals: dict[str, int] = field(default_factory=dict)
    # Wall-clock time when a time-based rule changes the plan (None: only a change does).
    wake_at: float | None = None
    # Replicas evicted (idle, LRU) to make room, per deployment: its total dropped by as many.
    evictions: dict[str, list[ReplicaKey]] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.assignment_puts or self.assignment_deletes or self.status_puts or self.status_deletes)


def split_replicas(total: int, weights: Mapping[int, int]) -> dict[int, int]:
    """Replicas per version: `total` split by weight (largest remainder, ties to the newer version),
    at least one for every version with weight > 0 when total > 0 (so the sum may exceed total)."""
    if total <= 0 or not weights:
        return {version: 0 for version in weights}
    weight_sum = sum(weights.values()) or 1
    exact = {v: total * w / weight_sum for v, w in weights.items()}
    counts = {v: math.floor(x) for v, x in exact.items()}
    left = total - sum(counts.values())
    for v in sorted(weights, key=lambda v: (-(exact[v] - counts[v]), -v))[:left]:
        counts[v] += 1
    for v, w in weights.items():
        if w > 0 and counts[v] == 0:
            counts[v] = 1
    return counts


def default_total(spec: spb.DeploymentSpec) -> int:
    """Replicas before the autoscaler has said anything: min_replicas, and one for min 0."""
    return clamp_total(spec, max(spec.min_replicas, 1))


def clamp_total(spec: spb.DeploymentSpec, total: int) -> int:
    upper = max(spec.max_replicas, spec.min_replicas)
    return max(spec.min_replicas, min(total, upper))


def requirement(spec: spb.DeploymentSpec, version: rpb.ModelVersion | None) -> tuple[int, Pool]:
    """(backend an assignment asks for, memory pool it uses) for a version of a deployment."""
    if version is not None and version.format == tpb.MODEL_FORMAT_TENSORRT_PLAN:
        return tpb.BACKEND_TENSORRT, Pool.GPU
    if spec.accelerator == tpb.ACCELERATOR_GPU:
        return tpb.BACKEND_TENSORRT, Pool.GPU
    if spec.accelerator == tpb.ACCELERATOR_CPU:
        return tpb.BACKEND_ONNXRUNTIME, Pool.HOST
    return ANY_BACKEND, Pool.HOST


def _same_assignment(a: spb.Assignment, b: spb.Assignment) -> bool:
    """Equal apart from the fencing token (rewriting only that would make nodes re-read for nothing)."""
    left, right = spb.Assignment(), spb.Assignment()
    left.CopyFrom(a)
    right.CopyFrom(b)
    left.ClearField("leader_revision")
    right.ClearField("leader_revision")
    return left == right


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def _versions_text(weights: Mapping[int, int]) -> str:
    return ", ".join(f"{v} ({w}%)" for v, w in sorted(weights.items())) or "none"


@dataclass
class _DeploymentOutcome:
    """What one deployment's planning found, for its status."""

    unschedulable: list[tuple[str, str]] = field(default_factory=list)
    failed_replicas: list[spb.ReplicaStatus] = field(default_factory=list)


@dataclass(slots=True)
class _Victim:
    """An idle replica that may be evicted."""

    idle_since: float
    key: ReplicaKey
    deployment: str


class _Planner:
    def __init__(
        self,
        snapshot: Snapshot,
        *,
        now: float,
        wanted: Mapping[str, int],
        unschedulable_nodes: frozenset[str] | set[str],
        avoid: frozenset[ReplicaKey] | set[ReplicaKey],
        leader_revision: int,
        config: PlannerConfig,
        idle_since: Mapping[str, float] | None = None,
        canary_metrics: Mapping[str, CanaryMeasurement] | None = None,
        missing_nodes: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.s = snapshot
        self.missing_nodes = missing_nodes
        self.canary_metrics = canary_metrics or {}
        self.idle_since = idle_since or {}
        # Eviction state, built lazily on the first placement short of memory.
        self._victims: dict[str, list[_Victim]] | None = None
        self._evict_budget: dict[str, int] = {}
        self.evicted: dict[ReplicaKey, str] = {}  # key -> message
        self._pending_status: dict[str, dict[str, Any]] = {}
        self.now = now
        self.wanted = wanted
        self.avoid = avoid
        self.leader_revision = leader_revision
        self.config = config
        self.plan = Plan()
        self.desired_keys: set[ReplicaKey] = set()
        # (model, version) -> node ids with an assignment / a replica status
        self.assigned: dict[tuple[str, int], list[str]] = defaultdict(list)
        self.reported: dict[tuple[str, int], list[str]] = defaultdict(list)
        for node, model, version in snapshot.assignments:
            self.assigned[(model, version)].append(node)
        for node, model, version in snapshot.replicas:
            self.reported[(model, version)].append(node)
        self.placer = Placer(self._capacities(unschedulable_nodes))

    # -- cluster view ------------------------------------------------------------------------------

    def memory_estimate(self, model: str, version: int) -> int:
        """Measured memory of the version where a node reported it, else artifact size x factor."""
        measured = [
            self.s.replicas[(node, model, version)].memory_bytes
            for node in self.reported.get((model, version), ())
            if self.s.replicas[(node, model, version)].state == READY
        ]
        measured = [m for m in measured if m > 0]
        if measured:
            return max(measured)
        record = self.s.versions.get((model, version))
        size = record.size_bytes if record is not None else 0
        return max(self.config.memory_estimate_min_bytes, int(size * self.config.memory_estimate_factor))

    def _capacities(self, unschedulable: frozenset[str] | set[str]) -> list[NodeCapacity]:
        capacities: dict[str, NodeCapacity] = {}
        for node_id, node in self.s.nodes.items():
            capacities[node_id] = NodeCapacity(
                id=node_id,
                backends=frozenset(node.backends),
                accelerator=node.accelerator,
                host_capacity=node.memory_capacity_bytes,
                gpu_capacity=node.gpu_memory_capacity_bytes,
                cached=frozenset(node.cached_sha256),
                schedulable=node_id not in unschedulable,
            )
        for key in set(self.s.assignments) | set(self.s.replicas):
            capacity = capacities.get(key[0])
            if capacity is None:
                continue
            host, gpu = self._usage(key)
            capacity.host_used += host
            capacity.gpu_used += gpu
            if key in self.s.assignments:
                capacity.replicas += 1
        return list(capacities.values())

    def _usage(self, key: ReplicaKey) -> tuple[int, int]:
        """(host, GPU) memory a replica counts for on its node: measured, else estimated."""
        status = self.s.replicas.get(key)
        stored = self.s.assignments.get(key)
        tensorrt = (status is not None and status.backend == tpb.BACKEND_TENSORRT) or (
            stored is not None and stored.value.backend == tpb.BACKEND_TENSORRT
        )
        if status is not None and (status.memory_bytes or status.gpu_memory_bytes):
            memory, gpu_memory = status.memory_bytes, status.gpu_memory_bytes
        elif stored is not None and (status is None or status.state != FAILED):
            memory, gpu_memory = self.memory_estimate(key[1], key[2]), 0
        else:
            memory, gpu_memory = 0, 0
        if tensorrt and not gpu_memory:
            memory, gpu_memory = 0, memory
        # An instance type's reservation holds however little the replica measured.
        reserved = self._reservation(stored.value.deployment) if stored is not None else 0
        if tensorrt:
            return memory, max(gpu_memory, reserved)
        return max(memory, reserved), gpu_memory

    def _reservation(self, deployment: str) -> int:
        """Memory each replica of `deployment` reserves (its instance type); 0: none."""
        stored = self.s.deployments.get(deployment)
        return stored.value.memory_bytes if stored is not None else 0

    def ready_count(self, model: str, version: int) -> int:
        count = 0
        for node in self.assigned.get((model, version), ()):
            status = self.s.replicas.get((node, model, version))
            if node in self.s.nodes and status is not None and status.state == READY:
                count += 1
        return count

    def _live_statuses(self, model: str, version: int) -> list[spb.ReplicaStatus]:
        statuses = []
        for node in sorted(self.assigned.get((model, version), ())):
            status = self.s.replicas.get((node, model, version))
            if node in self.s.nodes and status is not None:
                statuses.append(status)
        return statuses

    def _wake(self, at: float) -> None:
        if self.plan.wake_at is None or at < self.plan.wake_at:
            self.plan.wake_at = at

    # -- the plan ---------------------------------------------------------------------------------

    def run(self) -> Plan:
        owners: dict[str, str] = {}
        ordered = sorted(self.s.deployments.items(), key=lambda item: (item[1].create_revision, item[0]))
        for name, stored in ordered:
            owner = owners.setdefault(stored.value.model, name)
            self._deployment(name, stored.value, owner)
        # Statuses last: a later deployment's placement may have evicted replicas of an earlier one.
        for name, args in self._pending_status.items():
            self._write_status(name, **args)
        for key, stored in self.s.assignments.items():
            # Ours: written for a deployment, or of a deployed model. Assignments written by hand
            # (no deployment, model not deployed) are left alone.
            if key not in self.desired_keys and (stored.value.deployment or key[1] in owners):
                self.plan.assignment_deletes.append((key, stored.mod_revision))
        for name, stored in self.s.statuses.items():
            if name not in self.s.deployments:
                self.plan.status_deletes.append((name, stored.mod_revision))
        return self.plan

    def _resolve_one(self, model: str, entry: spb.TrafficTarget) -> tuple[int | None, str]:
        if entry.WhichOneof("target") == "alias":
            version = self.s.aliases.get((model, entry.alias))
            if version is None:
                return None, f"alias {entry.alias!r} of model {model!r} not found"
        else:
            version = entry.version
        if (model, version) not in self.s.versions:
            return None, f"version {version} of model {model!r} not found"
        return version, ""

    def _resolve(self, spec: spb.DeploymentSpec) -> tuple[dict[int, int], list[str]]:
        target: dict[int, int] = {}
        problems: list[str] = []
        for entry in spec.traffic:
            version, problem = self._resolve_one(spec.model, entry)
            if version is None:
                problems.append(problem)
                continue
            target[version] = target.get(version, 0) + entry.weight
        return target, problems

    # -- canary -----------------------------------------------------------------------------------

    def _canary(
        self, name: str, spec: spb.DeploymentSpec, old: spb.DeploymentStatus, stable: Mapping[int, int],
        candidate: int, serving: Mapping[int, int],
    ) -> spb.CanaryStatus:
        """The canary's progress after this pass's decision (see canary.py)."""
        policy = spec.canary
        if not (old.HasField("canary") and same_run(old.canary, candidate, stable, policy)):
            state = spb.CanaryStatus(version=candidate, stable=stable, phase=PROGRESSING, weight=policy.steps[0])
            state.policy.CopyFrom(policy)
            return state
        state = spb.CanaryStatus()
        state.CopyFrom(old.canary)
        if state.phase != PROGRESSING or not state.HasField("step_started"):
            return state
        if dict(serving) != canary_split(stable, candidate, state.weight):
            return state  # the step's weights are not (or no longer) in effect
        weight = state.weight
        started = _seconds(state.step_started)
        measurement = self.canary_metrics.get(name)
        if measurement is not None and measurement.at < started:
            measurement = None  # taken before this step
        verdict = evaluate(policy, measurement, self.config.canary_min_requests)
        end = started + policy.step_seconds
        if verdict.outcome == "fail":
            self._canary_done(state, ROLLED_BACK, measurement, f"{verdict.reason} at step {weight}%: {verdict.message}")
        elif self.now < end:
            self._wake(end)
        elif verdict.outcome == "pass" and measurement is not None and measurement.at >= end:
            following = next_step(policy, weight)
            if following is None:
                self._canary_done(state, PROMOTED, measurement, f"every step held; last at {weight}%: {verdict.message}")
            else:
                self._record(state, measurement)
                state.weight = following
                state.ClearField("step_started")
                state.message = f"step {weight}% held: {verdict.message}"
        elif self.now >= end + self.config.canary_max_hold_seconds:
            self._canary_done(
                state, ROLLED_BACK, measurement,
                f"InsufficientTraffic at step {weight}%: no verdict {self.now - started:.0f}s after the step "
                f"started ({verdict.message})",
            )  # fmt: skip
        else:
            self._wake(end + self.config.canary_max_hold_seconds)
        return state

    @staticmethod
    def _record(state: spb.CanaryStatus, measurement: CanaryMeasurement | None) -> None:
        if measurement is not None:
            state.request_count = measurement.request_count
            state.error_rate = measurement.error_rate
            state.p99_latency_ms = measurement.p99_latency_ms

    def _canary_done(self, state: spb.CanaryStatus, phase: int, measurement: CanaryMeasurement | None, message: str) -> None:
        self._record(state, measurement)
        state.phase = phase
        state.message = message
        if phase == PROMOTED:
            state.weight = 100
        state.step_started.CopyFrom(_timestamp(self.now))  # when it finished

    @staticmethod
    def _canary_target(state: spb.CanaryStatus, stable: Mapping[int, int]) -> dict[int, int]:
        if state.phase == PROMOTED:
            return {state.version: 100}
        if state.phase == ROLLED_BACK:
            return dict(stable)
        return canary_split(stable, state.version, state.weight)

    @staticmethod
    def _canary_condition(state: spb.CanaryStatus) -> tuple[str, bool, str, str]:
        version = state.version
        if state.phase == PROMOTED:
            return COND_CANARY, False, "Promoted", f"version {version} promoted to 100%: {state.message}"
        if state.phase == ROLLED_BACK:
            back = _versions_text(dict(state.stable))
            return COND_CANARY, False, "RolledBack", f"version {version} rolled back ({state.message}); traffic on {back}"
        steps = list(state.policy.steps)
        index = steps.index(state.weight) + 1 if state.weight in steps else 0
        where = f"step {index}/{len(steps)}: version {version} at {state.weight}%"
        if not state.HasField("step_started"):
            return COND_CANARY, True, "WaitingForReplicas", f"{where} once its replicas are READY"
        since = datetime.fromtimestamp(_seconds(state.step_started), tz=UTC).isoformat(timespec="seconds")
        last = f" (last: {state.message})" if state.message else ""
        return COND_CANARY, True, "Progressing", f"{where} since {since}{last}"

    def _deployment(self, name: str, spec: spb.DeploymentSpec, owner: str) -> None:
        stored_status = self.s.statuses.get(name)
        old = stored_status.value if stored_status is not None else spb.DeploymentStatus()
        outcome = _DeploymentOutcome()
        model = spec.model

        if owner != name:
            outcome.unschedulable.append(
                ("ModelInUse", f"model {model!r} is already deployed by deployment {owner!r}; one deployment per model")
            )
            self._pending_status[name] = dict(
                spec=spec, old=old, stored=stored_status, target={}, serving={}, desired={},
                rolled_back={}, outcome=outcome, total=0,
            )  # fmt: skip
            return

        serving = {vs.version: vs.weight for vs in old.versions if vs.weight > 0}
        same_generation = old.observed_generation == spec.generation
        rolled_back: dict[int, spb.VersionStatus] = {
            vs.version: vs
            for vs in old.versions
            if same_generation
            and vs.weight == 0
            and vs.desired_replicas == 0
            and any(r.state == FAILED for r in vs.replicas)
        }
        target, problems = self._resolve(spec)
        candidate: int | None = None
        if has_canary(spec):
            candidate, problem = self._resolve_one(model, spec.canary.candidate)
            if problem:
                problems.append(f"canary candidate: {problem}")
        canary: spb.CanaryStatus | None = None
        canary_condition: tuple[str, bool, str, str] | None = None
        if problems:
            outcome.unschedulable.append(("TargetNotFound", "; ".join(problems)))
            target = dict(serving)
            if has_canary(spec) and old.HasField("canary"):
                canary = spb.CanaryStatus()
                canary.CopyFrom(old.canary)  # held where it is until its targets resolve again
        stable = dict(target)
        if candidate is not None and not problems:
            if candidate in stable:
                canary_condition = (
                    COND_CANARY, False, "CandidateServing",
                    f"candidate version {candidate} is already in the traffic split: nothing to test",
                )  # fmt: skip
            else:
                canary = self._canary(name, spec, old, stable, candidate, serving)
                target = self._canary_target(canary, stable)
        if serving and any(v in rolled_back and v not in serving for v in target):
            target = dict(serving)  # rolled back earlier in this generation: stay there
        if not serving:
            serving = dict(target)  # first rollout: nothing to keep serving meanwhile

        # A new version that fails anywhere rolls the deployment back.
        if target != serving:
            for version in sorted(target):
                if version in serving:
                    continue
                failed = [st for st in self._live_statuses(model, version) if st.state == FAILED]
                if failed:
                    rolled_back[version] = spb.VersionStatus(version=version, replicas=failed)
            if any(v in rolled_back for v in target if v not in serving):
                target = dict(serving)
                if canary is not None and canary.phase == PROGRESSING and canary.version in rolled_back:
                    replica = next(iter(rolled_back[canary.version].replicas), None)
                    where = f" on node {replica.node_id}: {replica.reason}" if replica is not None else ""
                    self._canary_done(canary, ROLLED_BACK, None, f"LoadFailed: version {canary.version} failed to load{where}")

        total = clamp_total(spec, self.wanted.get(name, default_total(spec)))
        self.plan.totals[name] = total
        target_counts = split_replicas(total, target)
        serving_counts = split_replicas(total, serving)
        if target != serving and all(self.ready_count(model, v) >= c for v, c in target_counts.items()):
            serving, serving_counts = dict(target), target_counts  # the switch: new capacity is READY
        if target == serving:
            desired = dict(target_counts)
        else:
            desired = {
                v: max(target_counts.get(v, 0), serving_counts.get(v, 0)) for v in set(target) | set(serving)
            }

        if canary is not None and canary.phase == PROGRESSING and not problems:
            # Stable versions keep their full capacity while the canary runs: a rollback is instant.
            for version, count in split_replicas(total, stable).items():
                desired[version] = max(desired.get(version, 0), count)
            if (
                not canary.HasField("step_started")
                and serving == canary_split(stable, canary.version, canary.weight)
                and self.ready_count(model, canary.version) > 0
            ):
                canary.step_started.CopyFrom(_timestamp(self.now))  # the step's weights are in effect
                self._wake(self.now + spec.canary.step_seconds)
        if canary is not None:
            canary_condition = self._canary_condition(canary)

        for node, m, version in [key for key, victim in self._evicted_of(name)]:
            # Evicted earlier in this pass (to make room for an older deployment): not replaced.
            if desired.get(version, 0) > 0:
                desired[version] -= 1
                total -= 1
        self.plan.totals[name] = total

        placed: dict[int, list[str]] = {}
        for version in sorted(desired):
            placed[version] = self._version(name, spec, version, desired[version], serving, outcome)

        self._pending_status[name] = dict(
            spec=spec, old=old, stored=stored_status, target=target, serving=serving, desired=desired,
            rolled_back=rolled_back, outcome=outcome, total=total, placed=placed,
            canary=canary, canary_condition=canary_condition,
        )  # fmt: skip

    def _evicted_of(self, name: str) -> list[tuple[ReplicaKey, str]]:
        keys = self.plan.evictions.get(name)
        return [(key, self.evicted[key]) for key in keys] if keys else []

    # -- eviction (density) -------------------------------------------------------------------------

    def _build_victims(self) -> dict[str, list[_Victim]]:
        victims: dict[str, list[_Victim]] = defaultdict(list)
        after = self.config.evict_idle_after_seconds
        for name, stored in self.s.deployments.items():
            spec = stored.value
            idle = self.idle_since.get(name)
            if idle is None:
                continue  # traffic, or unknown activity: never evicted
            if self.now - idle < after:
                self._wake(idle + after)  # a placement waits for room: look again when it may be evicted
                continue
            status = self.s.statuses.get(name)
            if status is None:
                continue
            versions = [vs for vs in status.value.versions if vs.weight > 0 or vs.desired_replicas > 0]
            if len(versions) != 1 or versions[0].weight <= 0:
                continue  # several versions, or a rollout: left alone
            version = versions[0].version
            total = clamp_total(spec, self.wanted.get(name, default_total(spec)))
            budget = total - spec.min_replicas
            if budget <= 0:
                continue  # never below min
            self._evict_budget[name] = budget
            for node in self.assigned.get((spec.model, version), ()):
                key = (node, spec.model, version)
                replica = self.s.replicas.get(key)
                if node not in self.s.nodes or replica is None or replica.state != READY:
                    continue
                if self.s.assignments[key].value.deployment != name:
                    continue
                victims[node].append(_Victim(idle, key, name))
        for node_victims in victims.values():
            node_victims.sort(key=lambda v: (v.idle_since, v.key))  # least recently used first
        return victims

    def _make_room(self, name: str, request: ReplicaRequest) -> str | None:
        """Evict idle replicas (LRU) on the node where the fewest (then the oldest) free enough
        memory for one replica of `request`; returns that node (its memory committed), or None."""
        if self._victims is None:
            self._victims = self._build_victims()
        need, pool = request.memory_bytes, request.pool
        best: tuple[tuple[int, float, str], list[_Victim]] | None = None
        for node_id, candidates in self._victims.items():
            if not candidates or not self.placer.eligible(node_id, request):
                continue
            capacity = self.placer.node(node_id)
            free = capacity.free(pool)
            taken: dict[str, int] = {}
            picks: list[_Victim] = []
            for victim in candidates:
                if victim.deployment == name or taken.get(victim.deployment, 0) >= self._evict_budget[victim.deployment]:
                    continue
                host, gpu = self._usage(victim.key)
                freed = gpu if pool is Pool.GPU else host
                if freed <= 0:
                    continue
                picks.append(victim)
                taken[victim.deployment] = taken.get(victim.deployment, 0) + 1
                free += freed
                if free >= need:
                    break
            if free < need or not picks:
                continue
            rank = (len(picks), max(v.idle_since for v in picks), node_id)
            if best is None or rank < best[0]:
                best = (rank, picks)
        if best is None:
            return None
        node_id = best[0][2]
        model, version = request.key
        for victim in best[1]:
            self._victims[node_id].remove(victim)
            self._evict_budget[victim.deployment] -= 1
            host, gpu = self._usage(victim.key)
            self.placer.release(node_id, host, gpu)
            since = datetime.fromtimestamp(victim.idle_since, tz=UTC).isoformat(timespec="seconds")
            self.evicted[victim.key] = (
                f"version {victim.key[2]} on node {node_id}: idle since {since}, "
                f"room for model {model!r} version {version}"
            )
            self.plan.evictions.setdefault(victim.deployment, []).append(victim.key)
            self.desired_keys.discard(victim.key)
            self.plan.assignment_puts = [put for put in self.plan.assignment_puts if put[0] != victim.key]
            pending = self._pending_status.get(victim.deployment)
            if pending is not None:  # planned earlier in this pass: its counts drop now
                v = victim.key[2]
                if v in pending.get("placed", {}) and node_id in pending["placed"][v]:
                    pending["placed"][v].remove(node_id)
                if pending["desired"].get(v, 0) > 0:
                    pending["desired"][v] -= 1
                    pending["total"] -= 1
                    self.plan.totals[victim.deployment] = pending["total"]
        self.placer.add_usage(node_id, need, pool)
        return node_id

    def _assignment(self, name: str, spec: spb.DeploymentSpec, record: rpb.ModelVersion, node: str) -> spb.Assignment:
        backend, _ = requirement(spec, record)
        assignment = spb.Assignment(
            node_id=node,
            model=record.model,
            version=record.version,
            sha256=record.sha256,
            format=record.format,
            backend=backend,
            precision=spec.precision,
            deployment=name,
            leader_revision=self.leader_revision,
        )
        if spec.HasField("batching"):
            assignment.batching.CopyFrom(spec.batching)
        return assignment

    def _version(
        self,
        name: str,
        spec: spb.DeploymentSpec,
        version: int,
        count: int,
        serving: Mapping[int, int],
        outcome: _DeploymentOutcome,
    ) -> list[str]:
        """Keep, trim and place the assignments of one version; returns the nodes it is assigned to."""
        model = spec.model
        record = self.s.versions.get((model, version))
        backend, pool = requirement(spec, record)
        retry = self.config.failed_replica_retry_seconds
        kept: list[str] = []
        for node in sorted(self.assigned.get((model, version), ())):
            if node not in self.s.nodes:
                if node in self.missing_nodes:
                    kept.append(node)  # may register again any moment: re-placing would reload it
                continue  # dead node (garbage-collected below)
            if (node, model, version) in self.evicted:
                continue  # evicted in this pass
            if backend != ANY_BACKEND and backend not in self.s.nodes[node].backends:
                continue  # the node cannot run it (any more): moved elsewhere
            status = self.s.replicas.get((node, model, version))
            if status is not None and status.state == FAILED:
                outcome.failed_replicas.append(status)
                failed_at = _seconds(status.updated)
                if self.now - failed_at >= retry:
                    self.plan.avoid.append((node, model, version))
                    continue
                self._wake(failed_at + retry)
            kept.append(node)

        if len(kept) > count:
            def removal_order(node: str) -> tuple[int, float]:
                status = self.s.replicas.get((node, model, version))
                rank = {FAILED: 0, LOADING: 2, UNLOADING: 1, READY: 3}.get(status.state, 1) if status else 1
                capacity = self.placer.node(node)
                return rank, -(capacity.load(pool) if capacity is not None else 0.0)

            kept = sorted(kept, key=removal_order)[len(kept) - count :]

        for node in kept:
            key = (node, model, version)
            self.desired_keys.add(key)
            if record is None:
                continue
            want = self._assignment(name, spec, record, node)
            stored = self.s.assignments[key]
            if not _same_assignment(stored.value, want):
                self.plan.assignment_puts.append((key, want, stored.mod_revision))

        missing = count - len(kept)
        if missing > 0:
            if record is None:
                outcome.unschedulable.append(("VersionNotFound", f"version {version} of model {model!r} not found"))
                return kept
            exclude = set(self.assigned.get((model, version), ())) | set(self.reported.get((model, version), ()))
            exclude.update(node for node, m, v in self.avoid if m == model and v == version)
            exclude.update(node for node, m, v in self.plan.avoid if m == model and v == version)
            request = ReplicaRequest(
                key=(model, version),
                count=missing,
                memory_bytes=max(self.memory_estimate(model, version), spec.memory_bytes),
                backend=backend,
                pool=pool,
                sha256=record.sha256,
                exclude=frozenset(exclude),
                accelerator=spec.accelerator,
            )
            placement = self.placer.place(request)
            while placement.unplaced and placement.reason == "InsufficientMemory":
                # Density: make room by evicting idle replicas, least recently used first.
                room = dataclasses.replace(request, count=1, exclude=request.exclude | set(placement.nodes))
                node = self._make_room(name, room)
                if node is None:
                    break
                placement.nodes.append(node)
                placement.unplaced -= 1
            if not placement.unplaced:
                placement.reason = placement.message = ""
            for node in placement.nodes:
                key = (node, model, version)
                self.desired_keys.add(key)
                self.plan.assignment_puts.append((key, self._assignment(name, spec, record, node), 0))
                kept.append(node)
            if placement.unplaced:
                outcome.unschedulable.append(
                    (placement.reason, f"version {version}: {placement.unplaced} replica(s) not placed: {placement.message}")
                )
        return kept

    # -- status -----------------------------------------------------------------------------------

    def _write_status(
        self,
        name: str,
        spec: spb.DeploymentSpec,
        old: spb.DeploymentStatus,
        stored: Stored[spb.DeploymentStatus] | None,
        target: Mapping[int, int],
        serving: Mapping[int, int],
        desired: Mapping[int, int],
        rolled_back: Mapping[int, spb.VersionStatus],
        outcome: _DeploymentOutcome,
        total: int,
        placed: Mapping[int, list[str]] | None = None,
        canary: spb.CanaryStatus | None = None,
        canary_condition: tuple[str, bool, str, str] | None = None,
    ) -> None:
        placed = placed or {}
        status = spb.DeploymentStatus(observed_generation=spec.generation)
        if canary is not None:
            status.canary.CopyFrom(canary)
        ready: dict[int, int] = {}
        for version in sorted(set(desired) | set(serving) | set(rolled_back)):
            if version in rolled_back and version not in desired:
                entry = spb.VersionStatus()
                entry.CopyFrom(rolled_back[version])
                entry.weight, entry.desired_replicas, entry.ready_replicas = 0, 0, 0
                status.versions.append(entry)
                continue
            replicas = [
                self.s.replicas[(node, spec.model, version)]
                for node in sorted(placed.get(version, ()))
                if (node, spec.model, version) in self.s.replicas
            ]
            ready[version] = sum(1 for r in replicas if r.state == READY)
            status.versions.append(
                spb.VersionStatus(
                    version=version,
                    weight=serving.get(version, 0),
                    desired_replicas=desired.get(version, 0),
                    ready_replicas=ready[version],
                    replicas=replicas,
                )
            )

        conditions: list[tuple[str, bool, str, str]] = []
        rolling = dict(target) != dict(serving) and bool(target)
        lagging = {v: (ready.get(v, 0), c) for v, c in desired.items() if ready.get(v, 0) < c}
        serving_failed = [r for r in outcome.failed_replicas if r.version in serving]
        if not serving and not outcome.unschedulable:
            conditions.append((COND_READY, False, "NoTarget", "nothing to serve"))
        elif total == 0 and serving:
            conditions.append(
                (COND_READY, False, "ScaledToZero", "no replicas: EnsureReplicas (or traffic, with a load signal) brings them back")
            )
        elif serving and all(ready.get(v, 0) >= max(desired.get(v, 0), 1) for v in serving):
            conditions.append((COND_READY, True, "ReplicasReady", f"serving versions {_versions_text(serving)}"))
        elif serving_failed:
            first = serving_failed[0]
            conditions.append(
                (COND_READY, False, "ReplicaFailed", f"version {first.version} failed on node {first.node_id}: {first.reason}")
            )
        else:
            detail = ", ".join(f"version {v}: {r}/{c} ready" for v, (r, c) in sorted(lagging.items())) or "waiting"
            conditions.append((COND_READY, False, "ReplicasNotReady", detail))

        if rolling:
            waiting = ", ".join(f"version {v}: {ready.get(v, 0)}/{desired.get(v, 0)} ready" for v in sorted(target))
            conditions.append(
                (
                    COND_PROGRESSING,
                    True,
                    "RollingOut",
                    f"rolling out to {_versions_text(target)} ({waiting}); traffic stays on {_versions_text(serving)}",
                )
            )
        elif lagging:
            detail = ", ".join(f"version {v}: {r}/{c} ready" for v, (r, c) in sorted(lagging.items()))
            conditions.append((COND_PROGRESSING, True, "Scaling", detail))
        else:
            conditions.append((COND_PROGRESSING, False, "Complete", f"{total} replica(s) per the spec"))

        if outcome.unschedulable:
            reason = outcome.unschedulable[0][0]
            message = "; ".join(dict.fromkeys(m for _, m in outcome.unschedulable))
            conditions.append((COND_UNSCHEDULABLE, True, reason, message))
        else:
            conditions.append((COND_UNSCHEDULABLE, False, "Scheduled", "every desired replica is placed"))

        evicted = [message for key, message in self._evicted_of(name)]
        if evicted:
            conditions.append(
                (COND_EVICTED, True, "IdleEvicted", f"{len(evicted)} idle replica(s) evicted: " + "; ".join(evicted))
            )
        else:
            before = next((c for c in old.conditions if c.type == COND_EVICTED and c.status), None)
            old_total = sum(vs.desired_replicas for vs in old.versions if vs.weight > 0)
            if before is not None and total <= old_total:
                # Kept until the deployment scales back up (traffic or EnsureReplicas).
                conditions.append((COND_EVICTED, True, before.reason, before.message))

        failed_versions = [rolled_back[v] for v in sorted(rolled_back) if v not in desired]
        if failed_versions:
            parts = []
            for entry in failed_versions:
                replica = next((r for r in entry.replicas if r.state == FAILED), None)
                where = f" on node {replica.node_id}: {replica.reason}" if replica is not None else ""
                parts.append(f"version {entry.version} failed to load{where}")
            message = "; ".join(parts) + f"; traffic stays on {_versions_text(serving)}"
            conditions.append((COND_ROLLED_BACK, True, "LoadFailed", message))
        if canary_condition is not None:
            conditions.append(canary_condition)

        previous = {c.type: c for c in old.conditions}
        for kind, state, reason, message in conditions:
            condition = spb.Condition(type=kind, status=state, reason=reason, message=message)
            before = previous.get(kind)
            if before is not None and before.status == state:
                condition.last_transition.CopyFrom(before.last_transition)
            else:
                condition.last_transition.CopyFrom(_timestamp(self.now))
            status.conditions.append(condition)

        if stored is None or stored.value != status:
            self.plan.status_puts.append((name, status, stored.mod_revision if stored is not None else 0))


def plan(
    snapshot: Snapshot,
    *,
    now: float,
    wanted: Mapping[str, int] | None = None,
    unschedulable_nodes: frozenset[str] | set[str] = frozenset(),
    avoid: frozenset[ReplicaKey] | set[ReplicaKey] = frozenset(),
    leader_revision: int = 0,
    config: PlannerConfig | None = None,
    idle_since: Mapping[str, float] | None = None,
    canary_metrics: Mapping[str, CanaryMeasurement] | None = None,
    missing_nodes: frozenset[str] | set[str] = frozenset(),
) -> Plan:
    """The writes that move `snapshot` toward its deployments (see the module docstring).

    `now`: wall-clock seconds. `wanted`: replica totals from the autoscaler (default: min, or 1).
    `unschedulable_nodes`: nodes that get no new replicas (probation). `avoid`: (node, model, version)
    where the version failed lately. `idle_since`: per deployment, since when (wall-clock, like
    `now`) its load signal shows no traffic; absent: unknown or active (never evicted).
    `canary_metrics`: per deployment, the leader's latest measurement of its canary candidate.
    `missing_nodes`: nodes without a record whose assignments stay (within their grace period)."""
    return _Planner(
        snapshot,
        now=now,
        wanted=wanted or {},
        unschedulable_nodes=unschedulable_nodes,
        avoid=avoid,
        leader_revision=leader_revision,
        config=config or PlannerConfig(),
        idle_since=idle_since,
        canary_metrics=canary_metrics,
        missing_nodes=missing_nodes,
    ).run()
