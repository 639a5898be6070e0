"""The scheduler rides out an etcd restart: it keeps (or regains) leadership, its watch resumes,
and changes made after the outage are reconciled."""

from __future__ import annotations

import asyncio

import grpc

from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.common.etcd import EtcdClient, to_json
from services.common.settings import EtcdSettings
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry, upload
from tests.support.scheduler import assignments, eventually, running_scheduler, scheduler_settings

GiB = 1024**3


async def _count(etcd, count):
    return len(await assignments(etcd)) == count


async def test_reconciling_resumes_after_an_etcd_restart(restartable_etcd, local_store_settings):
    etcd_settings = EtcdSettings(endpoints=restartable_etcd.endpoint, session_ttl_seconds=5, timeout_seconds=1)
    etcd = EtcdClient(etcd_settings)
    lease = await etcd.grant_lease(60)
    for i in range(3):
        node = spb.Node(id=f"n{i}", address=f"127.0.0.1:{7200 + i}", accelerator=tpb.ACCELERATOR_CPU,
                        backends=[tpb.BACKEND_ONNXRUNTIME], memory_capacity_bytes=8 * GiB)  # fmt: skip
        await etcd.put(etcd.keys.node(node.id), to_json(node), lease=lease)
    try:
        async with running_registry(registry_settings(etcd_settings, local_store_settings)) as (_, registry):
            await upload(registry, "res", mlp_bytes(seed=11))
            await registry.SetAlias(rpb.SetAliasRequest(model="res", alias="prod", version=1))
            async with running_scheduler(scheduler_settings(etcd_settings)) as (app, stub):
                spec = spb.DeploymentSpec(name="res", model="res", traffic=[spb.TrafficTarget(alias="prod", weight=100)],
                                          min_replicas=1, max_replicas=3)  # fmt: skip
                await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec))
                await eventually(lambda: _count(etcd, 1), 10, "one replica")

                restartable_etcd.stop()
                await asyncio.sleep(1.0)
                restartable_etcd.start()

                spec.min_replicas = 3
                await eventually(lambda: _apply(stub, spec), 15, "apply accepted after the restart")
                await eventually(lambda: _count(etcd, 3), 15, "three replicas after the restart")
                assert app.is_leader
    finally:
        await etcd.close()


async def _apply(stub, spec) -> bool:
    try:
        await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec), timeout=2)
    except grpc.aio.AioRpcError:
        return False
    return True
