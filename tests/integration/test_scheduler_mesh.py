"""The scheduler with real processes: etcd, a registry, a scheduler and three inference nodes
(`python -m services.<name>` subprocesses with AIMAAS_* settings, session TTL 3 s).

Covers: min replicas READY on distinct nodes, scaling up and down by changing the spec, a rollout
that keeps at least min READY replicas at every sampled moment, an automatic rollback of a version
that fails to load, and `kill -9` of a node (replicas READY elsewhere; the time is printed).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper

from aimaas.cli.health import grpc_serving
from aimaas.registry.v1 import registry_pb2_grpc
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from aimaas.types.v1 import types_pb2 as tpb
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.etcd import EtcdClient, from_json
from services.common.settings import EtcdSettings, ObjectStoreKind, ObjectStoreSettings
from services.scheduler.autoscaler import NodeStatsSignalSource
from tests.support.models import mlp_bytes
from tests.support.registry import upload
from tests.support.scheduler import (
    Process,
    assignments,
    base_env,
    condition,
    eventually,
    inference_node,
    replica_states,
    scheduler_process,
)
from tests.support.servers import free_port

READY, FAILED = tpb.REPLICA_STATE_READY, tpb.REPLICA_STATE_FAILED
TTL = 3
NODES = ("node-a", "node-b", "node-c")


class Mesh:
    def __init__(self, etcd: EtcdSettings, store: ObjectStoreSettings, registry: Process, scheduler: Process, nodes):
        self.etcd_settings = etcd
        self.store = store
        self.registry = registry
        self.scheduler = scheduler
        self.nodes: dict[str, Process] = nodes

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.log_tail()}" for p in (self.registry, self.scheduler, *self.nodes.values())
        )


def _wait_serving(process: Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process is not None and process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.process.returncode}:\n{process.log_tail()}")
        if grpc_serving(process.address, timeout=1.0):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{process.name} did not become SERVING:\n{process.log_tail()}")


@pytest.fixture(scope="module")
def mesh(etcd_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scheduler-mesh")
    etcd = EtcdSettings(
        endpoints=etcd_server.endpoint, namespace=f"/test-{uuid.uuid4().hex[:12]}/aimaas/v1", session_ttl_seconds=TTL
    )
    store = ObjectStoreSettings(kind=ObjectStoreKind.LOCAL, path=tmp / "objects")
    registry_env = base_env(etcd, store)
    registry_port = free_port()
    registry_env.update({"AIMAAS_REGISTRY__GRPC_PORT": str(registry_port), "AIMAAS_REGISTRY__METRICS_PORT": "-1"})
    registry = Process("registry", "services.registry", registry_env, tmp, registry_port)
    scheduler = scheduler_process(
        "scheduler", etcd, store, tmp,
        AIMAAS_SCHEDULER__NODE_PROBATION_SECONDS="2",
        AIMAAS_SCHEDULER__FAILED_REPLICA_RETRY_SECONDS="30",
    )  # fmt: skip
    nodes = {node_id: inference_node(node_id, etcd, store, tmp) for node_id in NODES}
    processes = [registry, scheduler, *nodes.values()]
    try:
        for process in processes:
            process.start()
        for process in processes:
            _wait_serving(process)
        yield Mesh(etcd, store, registry, scheduler, nodes)
    finally:
        for process in processes:
            process.stop()


@pytest.fixture
async def clients(mesh):
    etcd = EtcdClient(mesh.etcd_settings)
    registry_channel = grpc.aio.insecure_channel(mesh.registry.address)
    scheduler_channel = grpc.aio.insecure_channel(mesh.scheduler.address)
    try:
        await eventually(lambda: _node_count(etcd, len(mesh.nodes)), 30, "all nodes registered")
        yield (
            etcd,
            registry_pb2_grpc.RegistryServiceStub(registry_channel),
            scheduler_pb2_grpc.SchedulerServiceStub(scheduler_channel),
        )
    finally:
        await registry_channel.close()
        await scheduler_channel.close()
        await etcd.close()


async def _node_count(etcd: EtcdClient, count: int) -> bool:
    return len(await etcd.get_prefix(etcd.keys.nodes_prefix())) == count


def deployment(name: str, model: str, version: int, min_replicas: int, max_replicas: int | None = None):
    return spb.DeploymentSpec(
        name=name,
        model=model,
        traffic=[spb.TrafficTarget(version=version, weight=100)],
        min_replicas=min_replicas,
        max_replicas=max_replicas or max(min_replicas, 1),
        accelerator=tpb.ACCELERATOR_CPU,
    )


async def ready_nodes(etcd: EtcdClient, model: str, version: int) -> set[str]:
    return {node for (node, v), state in (await replica_states(etcd, model)).items() if v == version and state == READY}


async def wait_ready(etcd, model, version, count, timeout=30.0, exactly=True) -> set[str]:
    async def check():
        nodes = await ready_nodes(etcd, model, version)
        return nodes if (len(nodes) == count if exactly else len(nodes) >= count) else None

    return await eventually(check, timeout, f"{count} READY replicas of {model} v{version}")


def failing_onnx() -> bytes:
    """A well-formed ONNX file whose operator does not exist: accepted by the registry, FAILED at load."""
    graph = helper.make_graph(
        [helper.make_node("NoSuchOperator", ["x"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def test_min_replicas_on_distinct_nodes_then_scale_up_and_down(mesh, clients):
    etcd, registry, scheduler = clients
    await upload(registry, "scale", mlp_bytes(seed=1))
    await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=deployment("scale", "scale", 1, 2)))
    nodes = await wait_ready(etcd, "scale", 1, 2)
    assert len(nodes) == 2  # distinct nodes

    async def ready_condition():
        found = condition((await scheduler.GetDeployment(spb.GetDeploymentRequest(name="scale"))).deployment, "Ready")
        return found if found is not None and found.status else None

    await eventually(ready_condition, 10, "Ready condition")
    listed = (await scheduler.ListNodes(spb.ListNodesRequest())).nodes
    assert sum(1 for info in listed for r in info.replicas if r.model == "scale" and r.state == READY) == 2
    assert all(info.memory_used_bytes > 0 for info in listed if any(r.model == "scale" for r in info.replicas))

    await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=deployment("scale", "scale", 1, 3)))
    assert len(await wait_ready(etcd, "scale", 1, 3)) == 3

    await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=deployment("scale", "scale", 1, 1)))
    await wait_ready(etcd, "scale", 1, 1)
    await eventually(lambda: _assignment_count(etcd, "scale", 1), 10, "one assignment left")

    await scheduler.DeleteDeployment(spb.DeleteDeploymentRequest(name="scale"))
    await eventually(lambda: _no_status(etcd, "scale"), 15, "replicas unloaded after delete")


async def _assignment_count(etcd, model, count):
    return len(await assignments(etcd, model)) == count


async def _no_status(etcd, model):
    return not await replica_states(etcd, model) and not await assignments(etcd, model)


async def test_rollout_keeps_min_ready_and_a_failing_version_rolls_back(mesh, clients):
    etcd, registry, scheduler = clients
    await upload(registry, "roll", mlp_bytes(seed=2))
    await upload(registry, "roll", mlp_bytes(seed=3))
    await upload(registry, "roll", failing_onnx())
    minimum = 2
    await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=deployment("roll", "roll", 1, minimum)))
    await wait_ready(etcd, "roll", 1, minimum)

    samples: list[int] = []
    # Every change of the statuses, from a watch: the READY count after each event (stronger than sampling).
    after_each_change: list[int] = []
    stop = asyncio.Event()
    revision = await etcd.current_revision()
    states = {
        key: from_json(kv.value, spb.ReplicaStatus).state
        for kv in await etcd.get_prefix(etcd.keys.statuses_prefix(), revision=revision)
        if (key := etcd.keys.parse_status_key(kv.key)) is not None and key[1] == "roll"
    }

    async def sample() -> None:
        while not stop.is_set():
            current = await replica_states(etcd, "roll")
            samples.append(sum(1 for state in current.values() if state == READY))
            await asyncio.sleep(0.05)

    async def follow() -> None:
        async for event in etcd.watch_prefix(etcd.keys.statuses_prefix(), start_revision=revision + 1):
            key = etcd.keys.parse_status_key(event.key)
            if key is None or key[1] != "roll":
                continue
            if event.kind == "put":
                states[key] = from_json(event.value, spb.ReplicaStatus).state
            else:
                states.pop(key, None)
            after_each_change.append(sum(1 for state in states.values() if state == READY))

    sampler = asyncio.create_task(sample())
    follower = asyncio.create_task(follow())
    try:
        await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=deployment("roll", "roll", 2, minimum)))
        await wait_ready(etcd, "roll", 2, minimum)

        async def old_gone():
            return not any(v == 1 for (_, v) in await replica_states(etcd, "roll"))

        await eventually(old_gone, 15, "version 1 unloaded after the switch")
        status = (await scheduler.GetDeployment(spb.GetDeploymentRequest(name="roll"))).deployment.status
        assert {vs.version: vs.weight for vs in status.versions} == {2: 100}

        # Version 3 fails to load on the node(s): rolled back, version 2 keeps serving.
        await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=deployment("roll", "roll", 3, minimum)))

        async def rolled_back():
            found = condition((await scheduler.GetDeployment(spb.GetDeploymentRequest(name="roll"))).deployment, "RolledBack")
            return found if found is not None and found.status else None

        rolled = await eventually(rolled_back, 20, "RolledBack condition")
        assert "version 3 failed to load" in rolled.message and "NoSuchOperator" in rolled.message, rolled.message
        await eventually(lambda: _only_version_assigned(etcd, "roll", 2), 10, "version 3 unassigned")
        assert len(await ready_nodes(etcd, "roll", 2)) == minimum
    finally:
        stop.set()
        await sampler
        follower.cancel()
    assert samples and min(samples) >= minimum, f"READY replicas dropped below {minimum}: {samples}"
    assert after_each_change and min(after_each_change) >= minimum, (
        f"READY replicas dropped below {minimum}: {after_each_change}"
    )
    print(
        f"\nrollout: {len(samples)} samples every 50 ms and {len(after_each_change)} status changes watched, "
        f"READY replicas min={min(after_each_change)} max={max(after_each_change)}"
    )
    await scheduler.DeleteDeployment(spb.DeleteDeploymentRequest(name="roll"))


async def _only_version_assigned(etcd, model, version):
    found = await assignments(etcd, model)
    return bool(found) and {v for _, _, v in found} == {version}


async def test_node_reported_load_signal(mesh, clients):
    """The autoscaler's fallback signal: a READY replica's own statistics, differenced over time."""
    etcd, registry, scheduler = clients
    await upload(registry, "stats", mlp_bytes(seed=6))
    await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=deployment("stats", "stats", 1, 1)))
    (node,) = await wait_ready(etcd, "stats", 1, 1)
    replicas = [
        from_json(kv.value, spb.ReplicaStatus) for kv in await etcd.get_prefix(etcd.keys.statuses_prefix(node))
    ]
    source = NodeStatsSignalSource()
    try:
        assert await source.sample("stats", 1, replicas) is None  # the first look only records counters
        async with grpc.aio.insecure_channel(mesh.nodes[node].address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(20):
                request = pb.ModelInferRequest(model_name="stats", model_version="1")
                request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
                request.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
                await stub.ModelInfer(request)
        sample = await source.sample("stats", 1, replicas)
        assert sample is not None and sample.replicas == 1
        assert sample.qps > 0 and sample.in_flight > 0
    finally:
        await source.close()
    await scheduler.DeleteDeployment(spb.DeleteDeploymentRequest(name="stats"))


async def test_kill_9_of_a_node_moves_its_replicas(mesh, clients):
    etcd, registry, scheduler = clients
    await upload(registry, "failover", mlp_bytes(seed=4))
    await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=deployment("failover", "failover", 1, 2)))
    before = await wait_ready(etcd, "failover", 1, 2)
    victim = sorted(before)[0]
    mesh.nodes[victim].kill()
    killed_at = time.monotonic()

    async def moved():
        nodes = await ready_nodes(etcd, "failover", 1)
        return nodes if len(nodes) == 2 and victim not in nodes else None

    after = await eventually(moved, TTL + 20, "2 READY replicas without the killed node", interval=0.02)
    elapsed = time.monotonic() - killed_at
    print(f"\nfailover: kill -9 {victim} -> 2 READY replicas on {sorted(after)} in {elapsed:.2f}s (lease TTL {TTL}s)")
    assert elapsed < TTL + 10, mesh.logs()
    # The node comes back (re-registers under a new lease).
    mesh.nodes[victim].start()
    await eventually(lambda: _node_count(etcd, len(NODES)), 30, "node back")
    await scheduler.DeleteDeployment(spb.DeleteDeploymentRequest(name="failover"))
