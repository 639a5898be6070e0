"""Idle-model LRU eviction (density): pure planner rules, no etcd.

A placement short of memory on every capable node evicts idle replicas (signal shows no traffic for
`evict_idle_after_seconds`) least-recently-used first, only above their deployment's min_replicas,
never on unknown activity, and only where the evictions free enough memory.
"""

from __future__ import annotations

import itertools

import pytest

from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.scheduler.autoscaler import Autoscaler
from services.scheduler.placement import NodeCapacity, Placer, Pool
from services.scheduler.planner import READY, LOADING, Plan, PlannerConfig, Snapshot, Stored, plan

MiB = 1024**2
NOW = 1_700_000_000.0
IDLE_AFTER = 300.0
_revisions = itertools.count(100)


def cluster(*nodes: tuple[str, int]) -> Snapshot:
    return Snapshot(
        nodes={
            n: spb.Node(
                id=n, accelerator=tpb.ACCELERATOR_CPU, backends=[tpb.BACKEND_ONNXRUNTIME], memory_capacity_bytes=mem
            )
            for n, mem in nodes
        }
    )


def deploy(snapshot: Snapshot, name: str, *, size: int, min_replicas: int = 0, max_replicas: int = 2) -> None:
    """Deployment `name` of model `name` version 1 (artifact `size` bytes: estimated at 2x)."""
    snapshot.versions[(name, 1)] = rpb.ModelVersion(
        model=name, version=1, sha256=f"{abs(hash(name)):064x}"[:64], size_bytes=size, format=tpb.MODEL_FORMAT_ONNX
    )
    spec = spb.DeploymentSpec(
        name=name, model=name, traffic=[spb.TrafficTarget(version=1, weight=100)],
        min_replicas=min_replicas, max_replicas=max_replicas, generation=1,
    )  # fmt: skip
    revision = next(_revisions)
    snapshot.deployments[name] = Stored(spec, revision, revision)


def apply(snapshot: Snapshot, result: Plan) -> None:
    for key, assignment, _ in result.assignment_puts:
        snapshot.assignments[key] = Stored(assignment, next(_revisions), next(_revisions))
    for key, _ in result.assignment_deletes:
        del snapshot.assignments[key]
        snapshot.replicas.pop(key, None)
    for name, status, _ in result.status_puts:
        snapshot.statuses[name] = Stored(status, next(_revisions))


def run(snapshot: Snapshot, **kwargs) -> Plan:
    result = plan(
        snapshot, now=NOW, leader_revision=7, config=PlannerConfig(evict_idle_after_seconds=IDLE_AFTER), **kwargs
    )
    apply(snapshot, result)
    return result


def loaded(snapshot: Snapshot, name: str, memory: int, state: int = READY, replicas: int = 1) -> None:
    """Every assignment of deployment `name` reports `state` using `memory`; statuses settle."""
    for node, model, version in list(snapshot.assignments):
        if model == name:
            snapshot.replicas[(node, model, version)] = spb.ReplicaStatus(
                node_id=node, model=model, version=version, state=state, memory_bytes=memory
            )
    run(snapshot, wanted={name: replicas})


def place_idle(snapshot: Snapshot, name: str, node: str, memory: int, **fields) -> None:
    """A deployment with one READY replica on `node` using `memory` (placed by the planner, every other
    node on probation for that pass)."""
    deploy(snapshot, name, size=memory // 2, **fields)
    others = {n for n in snapshot.nodes if n != node}
    run(snapshot, wanted={name: 1}, unschedulable_nodes=others)
    assert assigned(snapshot, name) == [node]
    loaded(snapshot, name, memory)


def assigned(snapshot: Snapshot, name: str) -> list[str]:
    return sorted(n for n, m, _ in snapshot.assignments if m == name)


def cond(snapshot: Snapshot, name: str, kind: str) -> spb.Condition | None:
    return next((c for c in snapshot.statuses[name].value.conditions if c.type == kind), None)


def idle(*names: str, seconds: float = 1000.0) -> dict[str, float]:
    return {n: NOW - seconds for n in names}


@pytest.mark.parametrize("victim_first", [True, False], ids=["victim-older", "victim-newer"])
def test_idle_replica_is_evicted_for_room_in_the_same_pass(victim_first: bool) -> None:
    snapshot = cluster(("n1", 1024 * MiB))
    place_idle(snapshot, "idle", "n1", 600 * MiB)
    deploy(snapshot, "new", size=300 * MiB, min_replicas=1)
    if not victim_first:
        # "new" is the older deployment: planned before the victim, whose counts drop when its turn comes.
        stored = snapshot.deployments["new"]
        snapshot.deployments["new"] = Stored(stored.value, stored.mod_revision, 1)
        run(snapshot, wanted={"idle": 1, "new": 1})  # no idle signal: nothing evicted
        assert assigned(snapshot, "new") == [] and assigned(snapshot, "idle") == ["n1"]
        assert cond(snapshot, "new", "Unschedulable").reason == "InsufficientMemory"

    result = run(snapshot, wanted={"idle": 1, "new": 1}, idle_since=idle("idle"))

    assert [key for key, _ in result.assignment_deletes] == [("n1", "idle", 1)]
    assert [key for key, _, _ in result.assignment_puts] == [("n1", "new", 1)]
    assert result.evictions == {"idle": [("n1", "idle", 1)]}
    assert result.totals["idle"] == 0
    assert cond(snapshot, "new", "Unschedulable").status is False
    evicted = cond(snapshot, "idle", "Evicted")
    assert evicted.status and evicted.reason == "IdleEvicted"
    assert "idle since" in evicted.message and "room for model 'new'" in evicted.message
    assert cond(snapshot, "idle", "Ready").reason == "ScaledToZero"
    assert snapshot.statuses["idle"].value.versions[0].desired_replicas == 0

    # Next pass (the autoscaler now says 0): stable, the Evicted condition stays while at zero.
    again = run(snapshot, wanted={"idle": 0, "new": 1}, idle_since=idle("idle"))
    assert again.empty()
    assert cond(snapshot, "idle", "Evicted").status
    # Traffic / EnsureReplicas brings it back (scale from zero); the condition goes.
    back = run(snapshot, wanted={"idle": 1, "new": 1})
    assert cond(snapshot, "idle", "Evicted") is None
    assert cond(snapshot, "idle", "Unschedulable").reason == "InsufficientMemory"  # no room, nothing idle
    assert not back.assignment_deletes


def test_least_recently_used_is_evicted_first() -> None:
    snapshot = cluster(("n1", 1024 * MiB))
    place_idle(snapshot, "a", "n1", 400 * MiB)
    place_idle(snapshot, "c", "n1", 400 * MiB)
    deploy(snapshot, "new", size=150 * MiB, min_replicas=1)  # 300 MiB; 224 MiB free
    since = {"a": NOW - 400, "c": NOW - 1000}  # c is the least recently used
    result = run(snapshot, wanted={"a": 1, "c": 1, "new": 1}, idle_since=since)
    assert result.evictions == {"c": [("n1", "c", 1)]}
    assert assigned(snapshot, "a") == ["n1"] and assigned(snapshot, "new") == ["n1"]


def test_node_with_fewest_evictions_is_chosen() -> None:
    snapshot = cluster(("n1", 1024 * MiB), ("n2", 1024 * MiB))
    place_idle(snapshot, "s1", "n1", 300 * MiB)
    place_idle(snapshot, "s2", "n1", 300 * MiB)
    place_idle(snapshot, "s3", "n1", 300 * MiB)  # n1: 124 MiB free; two evictions needed
    place_idle(snapshot, "big", "n2", 800 * MiB)  # n2: 224 MiB free; one eviction
    deploy(snapshot, "new", size=250 * MiB, min_replicas=1)  # 500 MiB
    since = {"s1": NOW - 5000, "s2": NOW - 5000, "s3": NOW - 5000, "big": NOW - 400}
    result = run(snapshot, wanted={n: 1 for n in snapshot.deployments}, idle_since=since)
    assert result.evictions == {"big": [("n2", "big", 1)]}
    assert assigned(snapshot, "new") == ["n2"]


def test_evicts_several_on_one_node_when_needed() -> None:
    snapshot = cluster(("n1", 1024 * MiB))
    place_idle(snapshot, "a", "n1", 300 * MiB)
    place_idle(snapshot, "b", "n1", 300 * MiB)
    place_idle(snapshot, "c", "n1", 300 * MiB)  # 124 MiB free
    deploy(snapshot, "new", size=250 * MiB, min_replicas=1)  # 500 MiB: two must go
    since = {"a": NOW - 3000, "b": NOW - 1000, "c": NOW - 2000}
    result = run(snapshot, wanted={n: 1 for n in snapshot.deployments}, idle_since=since)
    assert sorted(result.evictions) == ["a", "c"]  # the two least recently used
    assert assigned(snapshot, "b") == ["n1"] and assigned(snapshot, "new") == ["n1"]


@pytest.mark.parametrize(
    "since",
    [
        {},  # unknown activity: never idle
        {"idle": NOW - 100},  # idle, but not for long enough
    ],
    ids=["unknown", "recent"],
)
def test_no_eviction_without_a_long_enough_idle_signal(since: dict[str, float]) -> None:
    snapshot = cluster(("n1", 1024 * MiB))
    place_idle(snapshot, "idle", "n1", 600 * MiB)
    deploy(snapshot, "new", size=300 * MiB, min_replicas=1)
    result = run(snapshot, wanted={"idle": 1, "new": 1}, idle_since=since)
    assert not result.assignment_deletes and not result.evictions
    assert assigned(snapshot, "idle") == ["n1"] and assigned(snapshot, "new") == []
    unschedulable = cond(snapshot, "new", "Unschedulable")
    assert unschedulable.status and unschedulable.reason == "InsufficientMemory"
    assert cond(snapshot, "idle", "Evicted") is None


def test_a_placement_short_of_memory_wakes_when_an_idle_model_becomes_evictable() -> None:
    snapshot = cluster(("n1", 1024 * MiB))
    place_idle(snapshot, "idle", "n1", 600 * MiB)
    deploy(snapshot, "new", size=300 * MiB, min_replicas=1)
    result = run(snapshot, wanted={"idle": 1, "new": 1}, idle_since={"idle": NOW - 100})
    assert not result.evictions and result.wake_at == NOW - 100 + IDLE_AFTER


def test_never_below_min_replicas() -> None:
    snapshot = cluster(("n1", 1024 * MiB))
    place_idle(snapshot, "idle", "n1", 600 * MiB, min_replicas=1)
    deploy(snapshot, "new", size=300 * MiB, min_replicas=1)
    result = run(snapshot, wanted={"idle": 1, "new": 1}, idle_since=idle("idle"))
    assert not result.evictions and assigned(snapshot, "idle") == ["n1"]
    assert cond(snapshot, "new", "Unschedulable").reason == "InsufficientMemory"


def test_only_replicas_above_min_are_evicted() -> None:
    snapshot = cluster(("n1", 1024 * MiB), ("n2", 1024 * MiB))
    deploy(snapshot, "idle", size=300 * MiB, min_replicas=1, max_replicas=2)
    run(snapshot, wanted={"idle": 2})
    loaded(snapshot, "idle", 600 * MiB, replicas=2)
    assert assigned(snapshot, "idle") == ["n1", "n2"]
    deploy(snapshot, "new", size=300 * MiB, min_replicas=2)  # needs both nodes
    result = run(snapshot, wanted={"idle": 2, "new": 2}, idle_since=idle("idle"))
    assert result.evictions == {"idle": [("n1", "idle", 1)]}  # one only: min 1 stays
    assert assigned(snapshot, "idle") == ["n2"] and assigned(snapshot, "new") == ["n1"]
    assert result.totals["idle"] == 1
    assert "1 replica(s) not placed" in cond(snapshot, "new", "Unschedulable").message


def test_no_eviction_when_it_would_not_free_enough() -> None:
    snapshot = cluster(("n1", 1024 * MiB))
    place_idle(snapshot, "idle", "n1", 200 * MiB)
    place_idle(snapshot, "busy", "n1", 700 * MiB)
    deploy(snapshot, "new", size=300 * MiB, min_replicas=1)  # 600 MiB > 124 free + 200 idle
    result = run(snapshot, wanted={"idle": 1, "busy": 1, "new": 1}, idle_since=idle("idle"))
    assert not result.evictions and not result.assignment_deletes
    assert cond(snapshot, "new", "Unschedulable").reason == "InsufficientMemory"


def test_replicas_not_ready_are_not_evicted() -> None:
    snapshot = cluster(("n1", 1024 * MiB))
    place_idle(snapshot, "idle", "n1", 600 * MiB)
    loaded(snapshot, "idle", 600 * MiB, state=LOADING)
    deploy(snapshot, "new", size=300 * MiB, min_replicas=1)
    result = run(snapshot, wanted={"idle": 1, "new": 1}, idle_since=idle("idle"))
    assert not result.evictions and assigned(snapshot, "idle") == ["n1"]


def test_placer_release_frees_memory() -> None:
    placer = Placer([NodeCapacity("n1", frozenset({tpb.BACKEND_ONNXRUNTIME}), host_capacity=100, host_used=90, replicas=1)])
    placer.release("n1", 50, 0)
    node = placer.node("n1")
    assert node.free(Pool.HOST) == 60 and node.replicas == 0


def test_autoscaler_follows_evictions() -> None:
    spec = spb.DeploymentSpec(name="d", model="m", min_replicas=0, max_replicas=3)
    scaler = Autoscaler(None)
    assert scaler.total("d", spec, None) == 1
    assert scaler.idle_since() == {}  # no signal: nothing is idle
    scaler.evicted("d", 1, spec)
    assert scaler.total("d", spec, None) == 0  # scaled to zero until traffic / EnsureReplicas
    scaler.activate("d")
    assert scaler.total("d", spec, None) == 1
    floor = spb.DeploymentSpec(name="e", model="m2", min_replicas=1, max_replicas=3)
    scaler.evicted("e", 5, floor)  # unknown state: nothing to do
    assert scaler.total("e", floor, None) == 1
