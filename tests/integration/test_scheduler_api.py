"""Scheduler API against a real etcd and a real registry: validation, idempotent apply, get/list/
delete/watch, ListNodes, and conditions the leader sets (with node records written directly)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.common.etcd import EtcdClient, to_json
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry, upload
from tests.support.scheduler import assignments, condition, eventually, running_scheduler, scheduler_settings

GiB = 1024**3


@pytest.fixture
async def mesh(etcd_settings, local_store_settings):
    """Registry with model `fraud` (versions 1, 2; alias prod → 1; version 3 archived) and a scheduler."""
    async with running_registry(registry_settings(etcd_settings, local_store_settings)) as (_, registry):
        for seed in range(3):
            await upload(registry, "fraud", mlp_bytes(seed=seed))
        await registry.SetAlias(rpb.SetAliasRequest(model="fraud", alias="prod", version=1))
        await registry.ArchiveVersion(rpb.ArchiveVersionRequest(model="fraud", version=3))
        async with running_scheduler(scheduler_settings(etcd_settings)) as (app, stub):
            etcd = EtcdClient(etcd_settings)
            try:
                yield registry, app, stub, etcd
            finally:
                await etcd.close()


def spec(name: str = "web", model: str = "fraud", traffic=None, min_replicas: int = 1, max_replicas: int = 3, **fields):
    traffic = traffic if traffic is not None else [spb.TrafficTarget(version=1, weight=100)]
    return spb.DeploymentSpec(
        name=name, model=model, traffic=traffic, min_replicas=min_replicas, max_replicas=max_replicas, **fields
    )


async def expect_error(call, code: grpc.StatusCode, fragment: str = ""):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert fragment.lower() in (info.value.details() or "").lower(), info.value.details()
    return info.value


async def add_node(etcd: EtcdClient, node_id: str, *, gpu: bool = False, memory: int = 8 * GiB) -> int:
    """A node record bound to its own lease, as an inference node writes it; returns the lease."""
    lease = await etcd.grant_lease(30)
    backends = [tpb.BACKEND_TENSORRT, tpb.BACKEND_ONNXRUNTIME] if gpu else [tpb.BACKEND_ONNXRUNTIME]
    node = spb.Node(
        id=node_id,
        address=f"127.0.0.1:1{len(node_id)}",
        accelerator=tpb.ACCELERATOR_GPU if gpu else tpb.ACCELERATOR_CPU,
        backends=backends,
        memory_capacity_bytes=memory,
        gpu_memory_capacity_bytes=16 * GiB if gpu else 0,
    )
    await etcd.put(etcd.keys.node(node_id), to_json(node), lease=lease)
    return lease


async def get(stub, name: str = "web") -> spb.Deployment:
    return (await stub.GetDeployment(spb.GetDeploymentRequest(name=name))).deployment


async def wait_condition(stub, name: str, kind: str, status: bool, reason: str | None = None, timeout: float = 10):
    async def check():
        found = condition(await get(stub, name), kind)
        if found is not None and found.status == status and (reason is None or found.reason == reason):
            return found
        return None

    return await eventually(check, timeout, f"{name} {kind}={status} {reason or ''}")


# ----------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("bad", "code", "fragment"),
    [
        (spec(model="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope' not found"),
        (spec(traffic=[spb.TrafficTarget(version=9, weight=100)]), grpc.StatusCode.NOT_FOUND, "version 9"),
        (spec(traffic=[spb.TrafficTarget(alias="canary", weight=100)]), grpc.StatusCode.NOT_FOUND, "alias 'canary'"),
        (spec(traffic=[spb.TrafficTarget(version=3, weight=100)]), grpc.StatusCode.FAILED_PRECONDITION, "archived"),
        (
            spec(traffic=[spb.TrafficTarget(version=1, weight=50), spb.TrafficTarget(version=2, weight=40)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sum to 100, got 90",
        ),
        (
            spec(traffic=[spb.TrafficTarget(version=1, weight=50), spb.TrafficTarget(version=1, weight=50)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "duplicate",
        ),
        (
            spec(traffic=[spb.TrafficTarget(alias="prod", weight=50), spb.TrafficTarget(alias="prod", weight=50)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "duplicate",
        ),
        (spec(traffic=[]), grpc.StatusCode.INVALID_ARGUMENT, "traffic"),
        (spec(traffic=[spb.TrafficTarget(weight=100)]), grpc.StatusCode.INVALID_ARGUMENT, "version or an alias"),
        (spec(min_replicas=4, max_replicas=2), grpc.StatusCode.INVALID_ARGUMENT, "must not exceed max_replicas"),
        (spec(min_replicas=0, max_replicas=0), grpc.StatusCode.INVALID_ARGUMENT, "max_replicas must be at least 1"),
        (spec(name="Bad_Name"), grpc.StatusCode.INVALID_ARGUMENT, "invalid deployment name"),
        (spec(model="Bad/Model"), grpc.StatusCode.INVALID_ARGUMENT, "invalid model name"),
        (
            spec(canary=spb.CanaryPolicy(candidate=spb.TrafficTarget(version=2), steps=[5, 50])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "canary.step_seconds",
        ),
        (
            spec(instance_type="m5.xlarge"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown instance type 'm5.xlarge' (known: cpu.large (CPU, 16 GiB per replica); cpu.medium",
        ),
        (
            spec(instance_type="gpu.small", accelerator=tpb.ACCELERATOR_CPU),
            grpc.StatusCode.INVALID_ARGUMENT,
            "instance type 'gpu.small' runs on a GPU, but the spec asks for accelerator CPU",
        ),
    ],
)
async def test_bad_specs_are_rejected_with_precise_errors(mesh, bad, code, fragment):
    _, _, stub, etcd = mesh
    await expect_error(stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=bad)), code, fragment)
    assert await etcd.get_prefix(etcd.keys.deployments_prefix()) == []


async def test_an_instance_type_sets_the_accelerator_and_reserves_memory_on_the_node(mesh):
    _, _, stub, etcd = mesh
    await add_node(etcd, "small", memory=2 * GiB)
    await add_node(etcd, "big", memory=8 * GiB)
    applied = (await stub.ApplyDeployment(spb.ApplyDeploymentRequest(
        spec=spec(min_replicas=1, max_replicas=1, instance_type="cpu.medium")))).deployment  # fmt: skip
    assert applied.spec.accelerator == tpb.ACCELERATOR_CPU and applied.spec.memory_bytes == 4 * GiB
    # The tiny model would fit either node; its 4 GiB reservation only fits the big one.
    found = await eventually(
        lambda: _assigned_nodes(etcd, "fraud"), 10, "an assignment of the instance-typed deployment"
    )
    assert found == ["big"]
    # Two replicas cannot both fit: the second is unschedulable for lack of memory, not placed on "small".
    await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(min_replicas=2, max_replicas=2, instance_type="cpu.medium")))
    unschedulable = await wait_condition(stub, "web", "Unschedulable", True)
    assert "memory" in unschedulable.message.lower() or unschedulable.reason == "InsufficientMemory"
    assert await _assigned_nodes(etcd, "fraud") == ["big"]


async def _assigned_nodes(etcd: EtcdClient, model: str) -> list[str] | None:
    nodes = sorted(
        etcd.keys.parse_assignment_key(kv.key)[0]
        for kv in await etcd.get_prefix(etcd.keys.assignments_prefix())
        if etcd.keys.parse_assignment_key(kv.key) and etcd.keys.parse_assignment_key(kv.key)[1] == model
    )
    return nodes or None


async def test_apply_is_idempotent_and_counts_generations(mesh):
    registry, _, stub, _ = mesh
    first = await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec()))
    assert first.changed and first.deployment.spec.generation == 1
    assert first.deployment.spec.created.seconds > 0
    again = await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec()))
    assert not again.changed and again.deployment.spec.generation == 1
    # Scheduler-managed fields in the request do not count as a change.
    noisy = spec(generation=42)
    assert not (await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=noisy))).changed
    changed = await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(max_replicas=5)))
    assert changed.changed and changed.deployment.spec.generation == 2
    assert changed.deployment.spec.created == first.deployment.spec.created

    # A deployment's model is fixed.
    await upload(registry, "another", mlp_bytes(seed=4))
    await expect_error(
        stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(model="another"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "cannot change",
    )
    # One deployment per model.
    await expect_error(
        stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(name="other"))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "already deployed by deployment 'web'",
    )
    # The registry refuses to delete a model in use (it reads the spec at keys.deployment(name)).
    await expect_error(
        registry.DeleteModel(rpb.DeleteModelRequest(name="fraud")), grpc.StatusCode.FAILED_PRECONDITION, "web"
    )
    await stub.DeleteDeployment(spb.DeleteDeploymentRequest(name="web"))
    await expect_error(stub.GetDeployment(spb.GetDeploymentRequest(name="web")), grpc.StatusCode.NOT_FOUND, "web")
    await expect_error(stub.DeleteDeployment(spb.DeleteDeploymentRequest(name="web")), grpc.StatusCode.NOT_FOUND)
    await registry.DeleteModel(rpb.DeleteModelRequest(name="fraud"))


async def test_list_paginates_and_filters_by_model(mesh):
    registry, _, stub, _ = mesh
    await upload(registry, "other", mlp_bytes(seed=7))
    names = [f"d{i:02d}" for i in range(5)]
    for i, name in enumerate(names):
        # One deployment per model: give every one but the first its own model.
        model = "fraud" if i == 0 else f"m{i}"
        if i:
            await upload(registry, model, mlp_bytes(seed=i))
        await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(name=name, model=model)))
    seen, token = [], ""
    while True:
        page = await stub.ListDeployments(spb.ListDeploymentsRequest(page=tpb.PageRequest(page_size=2, page_token=token)))
        assert len(page.deployments) <= 2
        seen += [d.spec.name for d in page.deployments]
        token = page.page.next_page_token
        if not token:
            break
    assert seen == names
    only = await stub.ListDeployments(spb.ListDeploymentsRequest(model="m3"))
    assert [d.spec.name for d in only.deployments] == ["d03"]
    await expect_error(
        stub.ListDeployments(spb.ListDeploymentsRequest(page=tpb.PageRequest(page_token="!!"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )


# ------------------------------------------------------------------------------ leader behaviour


async def test_gpu_without_gpu_nodes_is_accepted_but_unschedulable_until_one_joins(mesh):
    _, app, stub, etcd = mesh
    await add_node(etcd, "cpu-1")
    applied = await stub.ApplyDeployment(
        spb.ApplyDeploymentRequest(spec=spec(accelerator=tpb.ACCELERATOR_GPU, precision=tpb.PRECISION_FP16))
    )
    assert applied.changed
    found = await wait_condition(stub, "web", "Unschedulable", True, "NoGpuNodes")
    assert "GPU" in found.message
    assert await assignments(etcd) == {}

    # Retried when nodes change: a GPU node joins and receives the replica (TensorRT backend).
    await add_node(etcd, "gpu-1", gpu=True)
    await wait_condition(stub, "web", "Unschedulable", False)
    placed = await eventually(lambda: assignments(etcd), what="assignment")
    ((node, model, version), assignment), = placed.items()
    assert (node, model, version) == ("gpu-1", "fraud", 1)
    assert assignment.backend == tpb.BACKEND_TENSORRT and assignment.precision == tpb.PRECISION_FP16
    assert assignment.deployment == "web" and assignment.leader_revision > 0
    assert assignment.sha256 and assignment.format == tpb.MODEL_FORMAT_ONNX


async def test_watch_streams_current_state_then_changes(mesh):
    _, _, stub, etcd = mesh
    await add_node(etcd, "n1")
    await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec()))
    call = stub.WatchDeployment(spb.WatchDeploymentRequest(name="web"))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.deployment.spec.name == "web"

    # The node reports the replica READY: the leader's status change reaches the stream.
    await eventually(lambda: assignments(etcd), what="assignment")
    status = spb.ReplicaStatus(node_id="n1", model="fraud", version=1, state=tpb.REPLICA_STATE_READY, memory_bytes=1000)
    await etcd.put(etcd.keys.status("n1", "fraud", 1), to_json(status))

    async def ready_seen():
        while True:
            message = await call.read()
            if message.deployment.status.versions and message.deployment.status.versions[0].ready_replicas == 1:
                return message

    message = await asyncio.wait_for(ready_seen(), 10)
    assert condition(message.deployment, "Ready").status

    # A spec change is streamed too.
    await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(max_replicas=4)))

    async def generation_two():
        while True:
            message = await call.read()
            if message.deployment.spec.generation == 2:
                return message

    await asyncio.wait_for(generation_two(), 10)
    await stub.DeleteDeployment(spb.DeleteDeploymentRequest(name="web"))
    # Deleting ends the stream.
    async def ended():
        while (await call.read()) is not grpc.aio.EOF:
            pass

    await asyncio.wait_for(ended(), 10)
    await expect_error(
        stub.WatchDeployment(spb.WatchDeploymentRequest(name="missing")).read(), grpc.StatusCode.NOT_FOUND
    )
    # Deleting the deployment unloads its replicas.
    await eventually(lambda: _no_assignments(etcd), what="assignments removed")


async def _no_assignments(etcd):
    return not await assignments(etcd)


async def test_list_nodes_reports_replicas_and_memory(mesh):
    _, _, stub, etcd = mesh
    await add_node(etcd, "n1")
    await add_node(etcd, "g1", gpu=True)
    status = spb.ReplicaStatus(node_id="n1", model="fraud", version=1, state=tpb.REPLICA_STATE_READY, memory_bytes=5000)
    await etcd.put(etcd.keys.status("n1", "fraud", 1), to_json(status))
    nodes = {info.node.id: info for info in (await stub.ListNodes(spb.ListNodesRequest())).nodes}
    assert set(nodes) == {"n1", "g1"}
    assert nodes["n1"].memory_used_bytes == 5000 and nodes["n1"].replicas[0].state == tpb.REPLICA_STATE_READY
    assert nodes["g1"].node.accelerator == tpb.ACCELERATOR_GPU and nodes["g1"].memory_used_bytes == 0


async def test_alias_target_and_missing_version_conditions(mesh):
    registry, _, stub, etcd = mesh
    await add_node(etcd, "n1")
    await add_node(etcd, "n2")
    await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(traffic=[spb.TrafficTarget(alias="prod", weight=100)])))
    placed = await eventually(lambda: assignments(etcd), what="assignment of the alias target")
    assert {version for _, _, version in placed} == {1}
    # Moving the alias is a rollout: version 2 gets replicas; version 1 stays until 2 is READY.
    await registry.SetAlias(rpb.SetAliasRequest(model="fraud", alias="prod", version=2, expected_version=1))

    async def both():
        found = await assignments(etcd)
        return found if {v for _, _, v in found} == {1, 2} else None

    await eventually(both, what="old and new version assigned during the rollout")
    progressing = await wait_condition(stub, "web", "Progressing", True, "RollingOut")
    assert "traffic stays on 1 (100%)" in progressing.message


async def test_node_loss_moves_replicas_and_status_reports_failed_rollout(mesh):
    _, _, stub, etcd = mesh
    lease_a = await add_node(etcd, "a")
    await add_node(etcd, "b")
    await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec()))
    placed = await eventually(lambda: assignments(etcd), what="assignment")
    (first_node, _, _), = placed
    # Its node goes away (lease revoked, as when it dies): the replica moves to the other node.
    if first_node == "a":
        await etcd.revoke_lease(lease_a)
        expected = "b"
    else:
        await etcd.delete(etcd.keys.node("b"))
        expected = "a"

    async def moved():
        found = await assignments(etcd)
        return found if {n for n, _, _ in found} == {expected} else None

    await eventually(moved, what="replica moved to the surviving node")

    # READY there, then roll out version 2, which FAILS: rolled back with the node's reason.
    ready = spb.ReplicaStatus(node_id=expected, model="fraud", version=1, state=tpb.REPLICA_STATE_READY, memory_bytes=1)
    await etcd.put(etcd.keys.status(expected, "fraud", 1), to_json(ready))
    await wait_condition(stub, "web", "Ready", True)
    await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(traffic=[spb.TrafficTarget(version=2, weight=100)])))

    async def v2_assigned():
        found = await assignments(etcd)
        return [n for n, _, v in found if v == 2]

    (node_v2,) = await eventually(v2_assigned, what="version 2 assigned")
    failed = spb.ReplicaStatus(
        node_id=node_v2, model="fraud", version=2, state=tpb.REPLICA_STATE_FAILED, reason="boom: bad graph"
    )
    await etcd.put(etcd.keys.status(node_v2, "fraud", 2), to_json(failed))
    rolled = await wait_condition(stub, "web", "RolledBack", True, "LoadFailed")
    assert "version 2 failed to load" in rolled.message and "boom: bad graph" in rolled.message
    assert "traffic stays on 1 (100%)" in rolled.message
    deployment = await get(stub)
    weights = {vs.version: vs.weight for vs in deployment.status.versions}
    assert weights == {1: 100, 2: 0}
    await eventually(lambda: _only_version(etcd, 1), what="version 2 unassigned")


async def _only_version(etcd, version):
    found = await assignments(etcd)
    return found and {v for _, _, v in found} == {version}
