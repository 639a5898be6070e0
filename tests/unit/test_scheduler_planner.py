"""The pure reconcile planner: placement, scaling, rollouts, rollbacks, failover, conditions."""

from __future__ import annotations

import itertools

import pytest

from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.scheduler.planner import (
    FAILED,
    LOADING,
    READY,
    Plan,
    PlannerConfig,
    Snapshot,
    Stored,
    plan,
    split_replicas,
)

GiB = 1024**3
NOW = 1_700_000_000.0
_revisions = itertools.count(100)


def node(node_id: str, *, gpu: bool = False, memory: int = 8 * GiB, cached=()) -> spb.Node:
    return spb.Node(
        id=node_id,
        accelerator=tpb.ACCELERATOR_GPU if gpu else tpb.ACCELERATOR_CPU,
        backends=[tpb.BACKEND_TENSORRT, tpb.BACKEND_ONNXRUNTIME] if gpu else [tpb.BACKEND_ONNXRUNTIME],
        memory_capacity_bytes=memory,
        gpu_memory_capacity_bytes=16 * GiB if gpu else 0,
        cached_sha256=list(cached),
    )


def cluster(*node_ids: str, versions=(1, 2, 3), model: str = "m", **node_fields) -> Snapshot:
    snapshot = Snapshot(nodes={n: node(n, **node_fields) for n in node_ids})
    for v in versions:
        snapshot.versions[(model, v)] = rpb.ModelVersion(
            model=model, version=v, sha256=f"{v:064x}", size_bytes=10 * 1024**2, format=tpb.MODEL_FORMAT_ONNX
        )
    return snapshot


def deploy(snapshot: Snapshot, name: str = "d", model: str = "m", traffic=None, min_replicas=2, max_replicas=4,
           generation: int | None = None, **fields) -> spb.DeploymentSpec:
    traffic = traffic or {1: 100}
    targets = [
        spb.TrafficTarget(alias=t, weight=w) if isinstance(t, str) else spb.TrafficTarget(version=t, weight=w)
        for t, w in traffic.items()
    ]
    old = snapshot.deployments.get(name)
    spec = spb.DeploymentSpec(
        name=name, model=model, traffic=targets, min_replicas=min_replicas, max_replicas=max_replicas,
        generation=generation or ((old.value.generation + 1) if old else 1), **fields,
    )  # fmt: skip
    revision = next(_revisions)
    snapshot.deployments[name] = Stored(spec, revision, old.create_revision if old else revision)
    return spec


def apply(snapshot: Snapshot, result: Plan) -> None:
    """What etcd does with a plan."""
    for key, assignment, _ in result.assignment_puts:
        revision = next(_revisions)
        old = snapshot.assignments.get(key)
        snapshot.assignments[key] = Stored(assignment, revision, old.create_revision if old else revision)
    for key, _ in result.assignment_deletes:
        del snapshot.assignments[key]
        snapshot.replicas.pop(key, None)  # the node unloads and drops its status
    for name, status, _ in result.status_puts:
        snapshot.statuses[name] = Stored(status, next(_revisions))
    for name, _ in result.status_deletes:
        del snapshot.statuses[name]


def report(snapshot: Snapshot, node_id: str, version: int, state: int, model: str = "m", reason: str = "",
           memory: int = 100 * 1024**2, at: float = NOW) -> None:
    status = spb.ReplicaStatus(node_id=node_id, model=model, version=version, state=state, reason=reason,
                               memory_bytes=memory if state == READY else 0)  # fmt: skip
    status.updated.FromNanoseconds(int(at * 1e9))
    snapshot.replicas[(node_id, model, version)] = status


def run(snapshot: Snapshot, **kwargs) -> Plan:
    result = plan(snapshot, now=kwargs.pop("now", NOW), leader_revision=kwargs.pop("leader_revision", 7), **kwargs)
    apply(snapshot, result)
    return result


def assigned(snapshot: Snapshot, version: int | None = None, model: str = "m") -> list[str]:
    return sorted(n for n, m, v in snapshot.assignments if m == model and (version is None or v == version))


def ready_all(snapshot: Snapshot, version: int, model: str = "m") -> None:
    for n in assigned(snapshot, version, model):
        report(snapshot, n, version, READY, model=model)


def status(snapshot: Snapshot, name: str = "d") -> spb.DeploymentStatus:
    return snapshot.statuses[name].value


def cond(snapshot: Snapshot, kind: str, name: str = "d") -> spb.Condition:
    return next(c for c in status(snapshot, name).conditions if c.type == kind)


def weights(snapshot: Snapshot, name: str = "d") -> dict[int, int]:
    return {vs.version: vs.weight for vs in status(snapshot, name).versions}


# --------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize(
    ("total", "split", "expected"),
    [
        (4, {1: 100}, {1: 4}),
        (4, {1: 50, 2: 50}, {1: 2, 2: 2}),
        (3, {1: 50, 2: 50}, {1: 1, 2: 2}),  # the remainder goes to the newer version
        (2, {1: 90, 2: 10}, {1: 2, 2: 1}),  # every version with traffic gets a replica
        (10, {1: 33, 2: 33, 3: 34}, {1: 3, 2: 3, 3: 4}),
        (0, {1: 100}, {1: 0}),
    ],
)
def test_split_replicas(total, split, expected):
    assert split_replicas(total, split) == expected


def test_first_rollout_places_min_replicas_on_distinct_nodes():
    snapshot = cluster("a", "b", "c")
    deploy(snapshot, min_replicas=2)
    result = run(snapshot)
    assert len(result.assignment_puts) == 2 and len(set(assigned(snapshot))) == 2
    _, assignment, expected = result.assignment_puts[0]
    assert expected == 0  # create-only
    assert assignment.deployment == "d" and assignment.leader_revision == 7 and assignment.sha256 == f"{1:064x}"
    assert weights(snapshot) == {1: 100}
    assert status(snapshot).observed_generation == 1
    assert not cond(snapshot, "Ready").status and cond(snapshot, "Progressing").reason == "Scaling"

    # Nothing changes: nothing to write (idempotent).
    assert run(snapshot).empty()
    ready_all(snapshot, 1)
    result = run(snapshot)
    assert not result.assignment_puts and not result.assignment_deletes and len(result.status_puts) == 1
    assert cond(snapshot, "Ready").status and not cond(snapshot, "Progressing").status
    assert status(snapshot).versions[0].ready_replicas == 2
    assert run(snapshot).empty()


def test_scale_up_and_down_by_spec_and_by_autoscaler():
    snapshot = cluster("a", "b", "c", "d")
    deploy(snapshot, min_replicas=1, max_replicas=4)
    run(snapshot)
    assert len(assigned(snapshot)) == 1
    deploy(snapshot, min_replicas=3, max_replicas=4)
    run(snapshot)
    assert len(assigned(snapshot)) == 3
    ready_all(snapshot, 1)
    report(snapshot, assigned(snapshot)[0], 1, LOADING)  # one still loading: removed first
    loading = assigned(snapshot)[0]
    result = run(snapshot, wanted={"d": 2})  # below min: clamped to min 3
    assert result.assignment_deletes == []
    deploy(snapshot, min_replicas=1, max_replicas=4)
    result = run(snapshot, wanted={"d": 2})
    assert [key[0] for key, _ in result.assignment_deletes] == [loading]
    assert run(snapshot, wanted={"d": 9}).assignment_puts  # above max: clamped to 4
    assert len(assigned(snapshot)) == 4


def test_scale_to_zero_and_back():
    snapshot = cluster("a", "b")
    deploy(snapshot, min_replicas=0, max_replicas=2)
    run(snapshot)
    assert len(assigned(snapshot)) == 1  # min 0 starts with one replica
    ready_all(snapshot, 1)
    run(snapshot, wanted={"d": 0})
    assert assigned(snapshot) == []
    assert cond(snapshot, "Ready").reason == "ScaledToZero"
    assert weights(snapshot) == {1: 100}  # the routing state stays
    run(snapshot, wanted={"d": 1})
    assert len(assigned(snapshot)) == 1


# -------------------------------------------------------------------------------------- rollouts


def test_rollout_keeps_old_replicas_until_the_new_ones_are_ready():
    snapshot = cluster("a", "b", "c")
    deploy(snapshot, min_replicas=2)
    run(snapshot)
    ready_all(snapshot, 1)
    run(snapshot)
    old_nodes = assigned(snapshot, 1)

    deploy(snapshot, traffic={2: 100}, min_replicas=2)
    result = run(snapshot)
    assert not result.assignment_deletes
    assert len(assigned(snapshot, 2)) == 2 and assigned(snapshot, 1) == old_nodes
    assert weights(snapshot) == {1: 100, 2: 0}  # routing unchanged
    assert cond(snapshot, "Progressing").reason == "RollingOut"
    assert cond(snapshot, "Ready").status  # the old version still serves at full strength

    # One new replica READY: not enough yet.
    report(snapshot, assigned(snapshot, 2)[0], 2, READY)
    assert not run(snapshot).assignment_deletes
    # Both READY: the weights switch and the old replicas go, in one plan (status before deletes).
    ready_all(snapshot, 2)
    result = plan(snapshot, now=NOW, leader_revision=7)
    assert {key[2] for key, _ in result.assignment_deletes} == {1}
    (name, new_status, _), = result.status_puts
    assert {vs.version: vs.weight for vs in new_status.versions} == {2: 100}
    apply(snapshot, result)
    assert assigned(snapshot, 1) == [] and cond(snapshot, "Ready").status
    assert cond(snapshot, "Progressing").reason == "Complete"


def test_traffic_split_change_is_a_rollout_too():
    snapshot = cluster("a", "b", "c")
    deploy(snapshot, min_replicas=2)
    run(snapshot)
    ready_all(snapshot, 1)
    run(snapshot)
    deploy(snapshot, traffic={1: 50, 2: 50}, min_replicas=2)
    run(snapshot)
    assert weights(snapshot) == {1: 100, 2: 0}
    ready_all(snapshot, 2)
    run(snapshot)
    assert weights(snapshot) == {1: 50, 2: 50}
    assert len(assigned(snapshot, 1)) == 1 and len(assigned(snapshot, 2)) == 1


def test_failed_version_is_rolled_back_and_not_retried_until_the_spec_changes():
    snapshot = cluster("a", "b", "c")
    deploy(snapshot, min_replicas=2)
    run(snapshot)
    ready_all(snapshot, 1)
    run(snapshot)
    deploy(snapshot, traffic={3: 100}, min_replicas=2)
    run(snapshot)
    bad = assigned(snapshot, 3)
    report(snapshot, bad[0], 3, FAILED, reason="unsupported operator NoSuchOp")
    result = run(snapshot)
    assert {key for key, _ in result.assignment_deletes} == {(n, "m", 3) for n in bad}
    assert weights(snapshot) == {1: 100, 3: 0}
    rolled = cond(snapshot, "RolledBack")
    assert rolled.status and rolled.reason == "LoadFailed"
    assert "version 3 failed to load on node" in rolled.message and "NoSuchOp" in rolled.message
    assert "traffic stays on 1 (100%)" in rolled.message
    failed_entry = next(vs for vs in status(snapshot).versions if vs.version == 3)
    assert failed_entry.replicas[0].state == FAILED

    # Stays rolled back (a new leader reads the same from the status record).
    for _ in range(2):
        assert run(snapshot).empty()
    assert assigned(snapshot, 3) == []
    # A new generation retries.
    deploy(snapshot, traffic={3: 100}, min_replicas=2, labels={"retry": "1"})
    run(snapshot)
    assert len(assigned(snapshot, 3)) == 2


def test_alias_resolution_and_missing_targets():
    snapshot = cluster("a", "b")
    snapshot.aliases[("m", "prod")] = 1
    deploy(snapshot, traffic={"prod": 100}, min_replicas=1)
    run(snapshot)
    assert assigned(snapshot, 1)
    ready_all(snapshot, 1)
    run(snapshot)
    # The alias moves: a rollout to version 2.
    snapshot.aliases[("m", "prod")] = 2
    run(snapshot)
    assert assigned(snapshot, 2) and assigned(snapshot, 1)
    # The alias vanishes: the deployment holds where it is and says why.
    del snapshot.aliases[("m", "prod")]
    run(snapshot)
    unschedulable = cond(snapshot, "Unschedulable")
    assert unschedulable.status and unschedulable.reason == "TargetNotFound" and "'prod'" in unschedulable.message
    assert assigned(snapshot, 1)


# ------------------------------------------------------------------------------ nodes and failures


def test_dead_node_assignments_are_removed_and_replaced():
    snapshot = cluster("a", "b", "c")
    deploy(snapshot, min_replicas=2)
    run(snapshot)
    ready_all(snapshot, 1)
    run(snapshot)
    victim = assigned(snapshot)[0]
    del snapshot.nodes[victim]
    result = run(snapshot)
    assert [key for key, _ in result.assignment_deletes] == [(victim, "m", 1)]
    assert len(result.assignment_puts) == 1 and result.assignment_puts[0][0][0] != victim
    assert victim not in assigned(snapshot) and len(assigned(snapshot)) == 2


def test_nodes_on_probation_get_no_new_replicas():
    snapshot = cluster("a", "b")
    deploy(snapshot, min_replicas=2)
    run(snapshot, unschedulable_nodes={"b"})
    assert assigned(snapshot) == ["a"]
    assert cond(snapshot, "Unschedulable").reason == "NotEnoughNodes"
    run(snapshot)
    assert assigned(snapshot) == ["a", "b"]
    assert not cond(snapshot, "Unschedulable").status


def test_failed_replica_of_a_serving_version_moves_after_the_retry_delay():
    snapshot = cluster("a", "b", "c")
    deploy(snapshot, min_replicas=2)
    run(snapshot)
    ready_all(snapshot, 1)
    run(snapshot)
    broken = assigned(snapshot)[0]
    report(snapshot, broken, 1, FAILED, reason="out of memory", at=NOW)
    config = PlannerConfig(failed_replica_retry_seconds=30)
    early = run(snapshot, now=NOW + 5, config=config)
    assert not early.assignment_deletes and early.wake_at == pytest.approx(NOW + 30)
    assert cond(snapshot, "Ready").reason == "ReplicaFailed" and "out of memory" in cond(snapshot, "Ready").message
    late = run(snapshot, now=NOW + 31, config=config)
    assert late.avoid == [(broken, "m", 1)]
    assert [key for key, _ in late.assignment_deletes] == [(broken, "m", 1)]
    assert broken not in assigned(snapshot) and len(assigned(snapshot)) == 2
    # The planner keeps away from nodes it is told to avoid.
    run(snapshot, avoid={(broken, "m", 1)})
    assert broken not in assigned(snapshot)


def test_gpu_deployment_without_gpu_nodes_is_unschedulable_until_one_joins():
    snapshot = cluster("a", "b")
    deploy(snapshot, min_replicas=1, accelerator=tpb.ACCELERATOR_GPU)
    run(snapshot)
    assert assigned(snapshot) == []
    unschedulable = cond(snapshot, "Unschedulable")
    assert unschedulable.status and unschedulable.reason == "NoGpuNodes"
    snapshot.nodes["g"] = node("g", gpu=True)
    result = run(snapshot)
    assert assigned(snapshot) == ["g"]
    assert result.assignment_puts[0][1].backend == tpb.BACKEND_TENSORRT
    assert not cond(snapshot, "Unschedulable").status


def test_tensorrt_plans_only_on_tensorrt_nodes_and_cpu_deployments_use_onnxruntime():
    snapshot = cluster("a", "g", versions=())
    snapshot.nodes["g"] = node("g", gpu=True)
    snapshot.versions[("m", 1)] = rpb.ModelVersion(model="m", version=1, sha256="1" * 64, size_bytes=1,
                                                   format=tpb.MODEL_FORMAT_TENSORRT_PLAN)  # fmt: skip
    deploy(snapshot, min_replicas=2)
    run(snapshot)
    assert assigned(snapshot) == ["g"] and cond(snapshot, "Unschedulable").reason == "NotEnoughNodes"

    snapshot = cluster("a", "g")
    snapshot.nodes["g"] = node("g", gpu=True)
    deploy(snapshot, min_replicas=2, accelerator=tpb.ACCELERATOR_CPU)
    result = run(snapshot)
    assert {a.backend for _, a, _ in result.assignment_puts} == {tpb.BACKEND_ONNXRUNTIME}


def test_memory_measured_at_load_limits_density():
    snapshot = cluster("a", versions=(), memory=GiB)
    for i in range(3):
        snapshot.versions[(f"m{i}", 1)] = rpb.ModelVersion(model=f"m{i}", version=1, sha256=f"{i:064x}",
                                                           size_bytes=100 * 1024**2)  # fmt: skip
    deploy(snapshot, name="d0", model="m0", min_replicas=1)
    run(snapshot)
    report(snapshot, "a", 1, READY, model="m0", memory=900 * 1024**2)  # measured: much more than estimated
    deploy(snapshot, name="d1", model="m1", min_replicas=1)
    run(snapshot)
    assert assigned(snapshot, model="m1") == []
    assert cond(snapshot, "Unschedulable", "d1").reason == "InsufficientMemory"


def test_assignment_follows_spec_changes_in_place():
    snapshot = cluster("a", "b")
    deploy(snapshot, min_replicas=1)
    run(snapshot)
    (key, stored), = snapshot.assignments.items()
    deploy(snapshot, min_replicas=1, batching=tpb.BatchingConfig(enabled=True, max_batch_size=8))
    result = run(snapshot)
    ((put_key, assignment, expected),) = result.assignment_puts
    assert put_key == key and expected == stored.mod_revision and assignment.batching.max_batch_size == 8
    # A new leader (new fencing token) does not rewrite unchanged assignments.
    assert not run(snapshot, leader_revision=99).assignment_puts


def test_deleted_deployment_is_cleaned_up_and_models_have_one_owner():
    snapshot = cluster("a", "b")
    deploy(snapshot, name="first", min_replicas=1)
    deploy(snapshot, name="second", min_replicas=1)
    run(snapshot)
    assert len(assigned(snapshot)) == 1
    assert cond(snapshot, "Unschedulable", "second").reason == "ModelInUse"
    del snapshot.deployments["first"]
    result = run(snapshot)
    assert [name for name, _ in result.status_deletes] == ["first"]
    assert "first" not in snapshot.statuses
    # The model's replicas now belong to the remaining deployment.
    assert len(assigned(snapshot)) == 1 and next(iter(snapshot.assignments.values())).value.deployment == "second"
    del snapshot.deployments["second"]
    run(snapshot)
    assert snapshot.assignments == {} and snapshot.statuses == {}


def test_cache_preference():
    snapshot = cluster("a", "b", "c")
    snapshot.nodes["c"] = node("c", cached=[f"{1:064x}"])
    deploy(snapshot, min_replicas=1)
    run(snapshot)
    assert assigned(snapshot) == ["c"]


def test_hand_written_assignments_of_undeployed_models_are_left_alone():
    snapshot = cluster("a")
    snapshot.versions[("other", 1)] = rpb.ModelVersion(model="other", version=1, sha256="9" * 64, size_bytes=1)
    manual = spb.Assignment(node_id="a", model="other", version=1, sha256="9" * 64)
    snapshot.assignments[("a", "other", 1)] = Stored(manual, 5, 5)
    deploy(snapshot, min_replicas=1)
    result = run(snapshot)
    assert not result.assignment_deletes and ("a", "other", 1) in snapshot.assignments
    # ...but a deployment's own assignment outlives nothing: deleting the deployment removes it.
    del snapshot.deployments["d"]
    result = run(snapshot)
    assert [key for key, _ in result.assignment_deletes] == [("a", "m", 1)]


def test_deployment_status_keys():
    from services.common.etcd import KeyBuilder

    keys = KeyBuilder()
    assert keys.deployment_status("web") == "/aimaas/v1/deployment-status/web"
    assert keys.deployment_statuses_prefix() == "/aimaas/v1/deployment-status/"
    assert keys.parse_deployment_status_key(keys.deployment_status("web")) == "web"
    # Not under deployments/: the registry parses every value there as a DeploymentSpec.
    assert not keys.deployment_status("web").startswith(keys.deployments_prefix())
    assert keys.parse_deployment_key(keys.deployment_status("web")) is None
    assert keys.parse_deployment_status_key(keys.deployment("web")) is None
