"""Two scheduler processes (`python -m services.scheduler`): one leads, the other serves reads and
spec writes; `kill -9` of the leader → the other leads within the lease TTL; assignment keys are
watched throughout and never exceed one per replica slot."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from aimaas.cli.health import grpc_serving
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from aimaas.types.v1 import types_pb2 as tpb
from services.common.etcd import EtcdClient, Session, from_json, to_json
from services.common.settings import EtcdSettings
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry, upload
from tests.support.scheduler import Process, eventually, scheduler_process

TTL = 3
GiB = 1024**3


def _wait_serving(process: Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process is not None and process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        if grpc_serving(process.address, timeout=1.0):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{process.name} did not become SERVING:\n{process.log_tail()}")


async def leader_address(etcd: EtcdClient) -> str | None:
    candidates = await etcd.get_prefix(etcd.keys.leader("scheduler") + "/")
    return min(candidates, key=lambda kv: kv.create_revision).value.decode() if candidates else None


def spec(min_replicas: int) -> spb.DeploymentSpec:
    return spb.DeploymentSpec(
        name="ha", model="ha", traffic=[spb.TrafficTarget(version=1, weight=100)],
        min_replicas=min_replicas, max_replicas=5,
    )  # fmt: skip


async def test_leader_kill_9_follower_takes_over_without_double_assignments(
    etcd_server, local_store_settings, tmp_path
):
    etcd_settings = EtcdSettings(
        endpoints=etcd_server.endpoint, namespace=f"/test-{uuid.uuid4().hex[:12]}/aimaas/v1", session_ttl_seconds=TTL
    )
    etcd = EtcdClient(etcd_settings)
    # Five nodes, as inference nodes register them (lease-bound records), kept alive by this test.
    session = await Session(etcd, 30).start()
    for i in range(5):
        node = spb.Node(
            id=f"n{i}", address=f"127.0.0.1:{7000 + i}", accelerator=tpb.ACCELERATOR_CPU,
            backends=[tpb.BACKEND_ONNXRUNTIME], memory_capacity_bytes=8 * GiB,
        )  # fmt: skip
        await etcd.put(etcd.keys.node(node.id), to_json(node), lease=session.lease_id)

    first = scheduler_process("scheduler-1", etcd_settings, local_store_settings, tmp_path)
    second = scheduler_process("scheduler-2", etcd_settings, local_store_settings, tmp_path)
    channels: list[grpc.aio.Channel] = []
    watcher: asyncio.Task | None = None
    try:
        first.start()
        await asyncio.to_thread(_wait_serving, first)
        await eventually(lambda: _is(etcd, first.address), 10, "scheduler-1 leads")
        second.start()
        await asyncio.to_thread(_wait_serving, second)
        channels = [grpc.aio.insecure_channel(first.address), grpc.aio.insecure_channel(second.address)]
        leader_stub, follower_stub = (scheduler_pb2_grpc.SchedulerServiceStub(ch) for ch in channels)

        # Watch every assignment change; after each one, count assignments per replica slot owner.
        revision = await etcd.current_revision()
        live: dict[str, spb.Assignment] = {}
        max_per_version: dict[tuple[str, int], int] = {}
        writers: set[int] = set()

        async def watch() -> None:
            async for event in etcd.watch_prefix(etcd.keys.assignments_prefix(), start_revision=revision + 1):
                if event.kind == "put":
                    assignment = from_json(event.value, spb.Assignment)
                    live[event.key] = assignment
                    writers.add(assignment.leader_revision)
                else:
                    live.pop(event.key, None)
                counts: dict[tuple[str, int], int] = {}
                for a in live.values():
                    counts[(a.model, a.version)] = counts.get((a.model, a.version), 0) + 1
                for slot, count in counts.items():
                    max_per_version[slot] = max(max_per_version.get(slot, 0), count)

        watcher = asyncio.create_task(watch())

        async with running_registry(registry_settings(etcd_settings, local_store_settings)) as (_, registry):
            await upload(registry, "ha", mlp_bytes(seed=5))

        # Writes go through the follower; the leader reconciles them.
        applied = await follower_stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(2)))
        assert applied.changed
        await eventually(lambda: _count(etcd, 2), 10, "2 assignments")
        # Followers answer reads.
        got = await follower_stub.GetDeployment(spb.GetDeploymentRequest(name="ha"))
        assert got.deployment.spec.min_replicas == 2
        assert len((await follower_stub.ListNodes(spb.ListNodesRequest())).nodes) == 5
        assert len((await follower_stub.ListDeployments(spb.ListDeploymentsRequest())).deployments) == 1
        assert (await leader_stub.GetDeployment(spb.GetDeploymentRequest(name="ha"))).deployment.spec.generation == 1
        # EnsureReplicas on the follower is forwarded to the leader.
        ensured = await follower_stub.EnsureReplicas(spb.EnsureReplicasRequest(deployment="ha"))
        assert ensured.deployment.spec.name == "ha"
        first_term = {a.leader_revision for a in (await _assignments(etcd)).values()}
        assert len(first_term) == 1

        # kill -9 the leader.
        first.kill()
        killed_at = time.monotonic()
        # A spec change right after the kill: only a leader can act on it.
        await follower_stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(4)))
        await eventually(lambda: _is(etcd, second.address), TTL + 5, "scheduler-2 leads", interval=0.02)
        elected = time.monotonic() - killed_at
        await eventually(lambda: _count(etcd, 4), TTL + 10, "4 assignments by the new leader", interval=0.02)
        acted = time.monotonic() - killed_at
        print(
            f"\nleader takeover: kill -9 -> scheduler-2 holds the election in {elected:.2f}s, "
            f"-> its first reconcile is visible in {acted:.2f}s (lease TTL {TTL}s)"
        )
        assert elected < TTL + 1.5, second.log_tail()
        assert acted < TTL + 3, second.log_tail()
        second_term = {a.leader_revision for a in (await _assignments(etcd)).values()} - first_term
        assert second_term and min(second_term) > max(first_term)  # fencing tokens only grow

        # Scale down on the new leader, then check the slots.
        await follower_stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(1)))
        await eventually(lambda: _count(etcd, 1), 10, "1 assignment")
        await asyncio.sleep(0.3)
        assert max_per_version[("ha", 1)] == 4, max_per_version  # never more than desired at any moment
        keys = list(await _assignments(etcd))
        assert len(keys) == len(set(keys)) == 1
    finally:
        if watcher is not None:
            watcher.cancel()
        for process in (first, second):
            process.stop()
        for channel in channels:
            await channel.close()
        await session.close()
        await etcd.close()


async def _is(etcd: EtcdClient, address: str) -> bool:
    return await leader_address(etcd) == address


async def _assignments(etcd: EtcdClient) -> dict[str, spb.Assignment]:
    return {kv.key: from_json(kv.value, spb.Assignment) for kv in await etcd.get_prefix(etcd.keys.assignments_prefix())}


async def _count(etcd: EtcdClient, count: int) -> bool:
    return len(await _assignments(etcd)) == count
