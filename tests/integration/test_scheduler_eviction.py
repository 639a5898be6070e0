"""Idle-model LRU eviction wired end to end (real etcd, registry and scheduler; the load signal is a
test double standing in for the monitor): a full node makes room for a new deployment by evicting an
idle min-0 deployment's replica, which is marked Evicted and scaled to zero."""

from __future__ import annotations

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.common.etcd import EtcdClient, to_json
from services.scheduler.autoscaler import LoadSample
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry, upload
from tests.support.scheduler import assignments, condition, eventually, running_scheduler, scheduler_settings

MiB = 1024**2


class IdleSource:
    """No traffic for model `idle`; nothing known about anything else."""

    async def sample(self, model, version, replicas):
        return LoadSample(in_flight=0.0, qps=0.0, replicas=1) if model == "idle" else None

    async def close(self) -> None:
        pass


async def test_full_node_evicts_an_idle_model_for_a_new_one(etcd_settings, local_store_settings):
    settings = scheduler_settings(etcd_settings, autoscale_interval_seconds=0.1, evict_idle_after_seconds=0.5)
    etcd = EtcdClient(etcd_settings)
    lease = await etcd.grant_lease(60)
    node = spb.Node(id="n0", address="127.0.0.1:7190", accelerator=tpb.ACCELERATOR_CPU,
                    backends=[tpb.BACKEND_ONNXRUNTIME], memory_capacity_bytes=128 * MiB)  # fmt: skip
    await etcd.put(etcd.keys.node(node.id), to_json(node), lease=lease)
    try:
        async with running_registry(registry_settings(etcd_settings, local_store_settings)) as (_, registry):
            await upload(registry, "idle", mlp_bytes(seed=3))
            await upload(registry, "busy", mlp_bytes(seed=4))
            async with running_scheduler(settings, load_signal=IdleSource()) as (_, stub):

                def spec(name: str, min_replicas: int) -> spb.DeploymentSpec:
                    return spb.DeploymentSpec(
                        name=name, model=name, traffic=[spb.TrafficTarget(version=1, weight=100)],
                        min_replicas=min_replicas, max_replicas=1,
                    )  # fmt: skip

                async def deployment(name: str) -> spb.Deployment:
                    return (await stub.GetDeployment(spb.GetDeploymentRequest(name=name))).deployment

                await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec("idle", 0)))
                placed = await eventually(lambda: assignments(etcd, "idle"), 10, "the idle model placed")
                assert list(placed) == [("n0", "idle", 1)]
                # The node reports it READY, using nearly all of its memory.
                status = spb.ReplicaStatus(node_id="n0", model="idle", version=1, state=tpb.REPLICA_STATE_READY,
                                           memory_bytes=120 * MiB)  # fmt: skip
                await etcd.put(etcd.keys.status("n0", "idle", 1), to_json(status))

                async def ready():
                    found = condition(await deployment("idle"), "Ready")
                    return found is not None and found.status

                await eventually(ready, 10, "idle model READY")

                await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec("busy", 1)))

                async def evicted():
                    found = condition(await deployment("idle"), "Evicted")
                    return found if found is not None and found.status else None

                mark = await eventually(evicted, 15, "Evicted condition on the idle deployment")
                assert mark.reason == "IdleEvicted" and "room for model 'busy'" in mark.message
                final = await eventually(
                    lambda: _only(etcd, {("n0", "busy", 1)}), 10, "busy placed where idle was"
                )
                assert final
                assert condition(await deployment("idle"), "Ready").reason == "ScaledToZero"
                assert condition(await deployment("busy"), "Unschedulable").status is False
    finally:
        await etcd.revoke_lease(lease)
        await etcd.close()


async def _only(etcd, keys) -> bool:
    return set(await assignments(etcd)) == keys
