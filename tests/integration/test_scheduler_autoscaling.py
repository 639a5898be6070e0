"""Autoscaling wired end to end (real etcd, registry and scheduler; the load signal is a test
double standing in for the monitor): scale up on load, down when it drops, to zero when idle with
min 0, and back with EnsureReplicas (which waits for a READY replica)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.common.etcd import EtcdClient, to_json
from services.scheduler.autoscaler import LoadSample
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry, upload
from tests.support.scheduler import assignments, condition, eventually, running_scheduler, scheduler_settings

GiB = 1024**3


class Source:
    """The pluggable SignalSource interface, driven by the test."""

    def __init__(self) -> None:
        self.current: LoadSample | None = None

    async def sample(self, model, version, replicas):
        return self.current

    async def close(self) -> None:
        pass


async def _count(etcd, count):
    return len(await assignments(etcd)) == count


async def test_scale_on_load_to_zero_when_idle_and_back_with_ensure_replicas(etcd_settings, local_store_settings):
    source = Source()
    settings = scheduler_settings(
        etcd_settings, autoscale_interval_seconds=0.1, scale_down_stabilization_seconds=0.5
    )
    etcd = EtcdClient(etcd_settings)
    lease = await etcd.grant_lease(60)
    for i in range(4):
        node = spb.Node(id=f"n{i}", address=f"127.0.0.1:{7100 + i}", accelerator=tpb.ACCELERATOR_CPU,
                        backends=[tpb.BACKEND_ONNXRUNTIME], memory_capacity_bytes=8 * GiB)  # fmt: skip
        await etcd.put(etcd.keys.node(node.id), to_json(node), lease=lease)
    try:
        async with running_registry(registry_settings(etcd_settings, local_store_settings)) as (_, registry):
            await upload(registry, "auto", mlp_bytes(seed=9))
            async with running_scheduler(settings, load_signal=source) as (_, stub):
                spec = spb.DeploymentSpec(
                    name="auto", model="auto", traffic=[spb.TrafficTarget(version=1, weight=100)],
                    min_replicas=0, max_replicas=3,
                    autoscaling=spb.AutoscalingPolicy(target_in_flight_per_replica=2, scale_to_zero_after_seconds=1),
                )  # fmt: skip
                await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec))
                await eventually(lambda: _count(etcd, 1), 10, "one replica to start with")

                source.current = LoadSample(in_flight=5.5, qps=100, replicas=1)  # ceil(5.5 / 2) = 3
                await eventually(lambda: _count(etcd, 3), 10, "scaled up to 3")
                source.current = LoadSample(in_flight=1.0, qps=10, replicas=3)
                await eventually(lambda: _count(etcd, 1), 10, "scaled down to 1 after the window")
                source.current = LoadSample(in_flight=0.0, qps=0.0, replicas=1)
                await eventually(lambda: _count(etcd, 0), 10, "scaled to zero when idle")

                async def scaled_to_zero():
                    found = condition((await stub.GetDeployment(spb.GetDeploymentRequest(name="auto"))).deployment, "Ready")
                    return found is not None and found.reason == "ScaledToZero"

                await eventually(scaled_to_zero, 10, "ScaledToZero condition")

                # EnsureReplicas brings it back and waits for READY (the node's status is simulated).
                async def report_ready():
                    placed = await eventually(lambda: assignments(etcd), 10, "a replica after EnsureReplicas")
                    (node, model, version), = placed
                    status = spb.ReplicaStatus(node_id=node, model=model, version=version,
                                               state=tpb.REPLICA_STATE_READY, memory_bytes=1)  # fmt: skip
                    await etcd.put(etcd.keys.status(node, model, version), to_json(status))

                reporter = asyncio.create_task(report_ready())
                ensured = await stub.EnsureReplicas(spb.EnsureReplicasRequest(deployment="auto", wait_seconds=10))
                await reporter
                ready = [vs.ready_replicas for vs in ensured.deployment.status.versions]
                assert ready == [1]

                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.EnsureReplicas(spb.EnsureReplicasRequest(deployment="missing"))
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await etcd.revoke_lease(lease)
        await etcd.close()
