"""etcd frozen (SIGSTOP) past the session TTL under load, then resumed (SIGCONT): every lease expires
at once on resume, so every node record and replica status vanishes together and the nodes
re-register a moment later (issue 21). Real processes: etcd, registry, scheduler, two inference
nodes; the gateway in-process; gRPC clients through it.

- zero failed requests: the gateway keeps the replicas whose records vanished while they answer;
- no replica re-placed: the assignments keep their revisions and no node reloads (each replica
  status comes back with the timestamp of its original READY);
- a deployment with some replicas serving and others unschedulable reads DEGRADED, with the
  reason, in the SDK, the REST API and the CLI's status view; FAILED only when nothing serves;
- the hold itself against a real node: kept while the node serves the replica, ended by a failed
  probe, a stopped node, or the end of the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import httpx
import numpy as np
import pytest
import structlog

from aimaas.cli.cluster import deployment_entry, deployments_table
from aimaas.sdk import AsyncModelService
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.etcd import EtcdClient, KeyValue, from_json, to_json
from services.common.settings import EtcdSettings
from services.gateway.routing import RoutingWatcher
from services.gateway.upstream import Upstream
from services.scheduler.probe import NodeProbe
from tests.support.etcd_freeze import EtcdLink, frozen
from tests.support.gateway import Mesh, deploy, running_gateway, start_mesh, wait_serving
from tests.support.inference import inference_settings, running_inference, write_model
from tests.support.models import mlp_bytes, mlp_model
from tests.support.scheduler import eventually, inference_node
from tests.support.servers import EtcdProcess

TTL = 2
FREEZE_SECONDS = 2.5 * TTL
CLIENTS = 12
NODES = ("node-a", "node-b")


def _request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(np.ones((2, 4), np.float32).tobytes())
    return request


async def _records(etcd: EtcdClient, prefix: str) -> dict[str, KeyValue]:
    return {kv.key: kv for kv in await etcd.get_prefix(prefix)}


async def _watch_deletes(etcd: EtcdClient, prefix: str, deleted: list[str]) -> None:
    async for event in etcd.watch_prefix(prefix):
        if event.kind == "delete":
            deleted.append(event.key)


def _etcd_settings(endpoint: str) -> EtcdSettings:
    return EtcdSettings(
        endpoints=endpoint, namespace=f"/test-{uuid.uuid4().hex[:12]}/aimaas/v1", session_ttl_seconds=TTL, timeout_seconds=2
    )


@pytest.fixture
def mesh(etcd_server, tmp_path):
    mesh = start_mesh(_etcd_settings(etcd_server.endpoint), tmp_path)
    yield mesh
    mesh.stop()


@contextlib.asynccontextmanager
async def _mesh_for_freezing(server: EtcdProcess, tmp: pathlib.Path, *, late: bool) -> AsyncIterator[tuple[Mesh, EtcdLink | None]]:
    """Registry, scheduler and two nodes; with `late`, the nodes reach etcd through an EtcdLink."""
    etcd = _etcd_settings(server.endpoint)
    link = await EtcdLink(etcd.endpoints).start() if late else None
    mesh = await asyncio.to_thread(start_mesh, etcd, tmp, ())
    try:
        node_etcd = etcd.model_copy(update={"endpoints": link.address}) if link is not None else etcd
        for node_id in NODES:
            mesh.nodes[node_id] = inference_node(node_id, node_etcd, mesh.store, tmp).start()
        for process in mesh.nodes.values():
            await asyncio.to_thread(wait_serving, process)  # the loop keeps forwarding the link meanwhile
        yield mesh, link
    finally:
        await asyncio.to_thread(mesh.stop)
        if link is not None:
            await link.close()


async def _leader_lease(etcd: EtcdClient) -> int | None:
    leaders = await etcd.get_prefix(etcd.keys.leader("scheduler") + "/")
    return leaders[0].lease if leaders else None


@pytest.mark.parametrize(
    "late",
    [False, True],
    ids=["nodes-back-with-etcd", "nodes-back-after-a-new-scheduler-term"],
)
async def test_etcd_frozen_past_the_ttl_under_load_fails_no_request_and_moves_no_replica(restartable_etcd, tmp_path, late):
    """`late`: the nodes' links to etcd stay frozen after etcd resumes, until a new scheduler term
    has run without them: their re-registration loses every race (the gateway sees their records
    gone, the scheduler sees their assignments without nodes) instead of only sometimes."""
    async with _mesh_for_freezing(restartable_etcd, tmp_path, late=late) as (mesh, link):
        etcd = EtcdClient(mesh.etcd)
        keys = etcd.keys
        watch: asyncio.Task[None] | None = None
        try:
            async with running_gateway(mesh.gateway_settings()) as gateway:
                await deploy(gateway, "mlp", [mlp_bytes(seed=21)], min_replicas=2)
                assignments_before = await _records(etcd, keys.assignments_prefix())
                statuses_before = await _records(etcd, keys.statuses_prefix())
                nodes_before = await _records(etcd, keys.nodes_prefix())
                leader_before = await _leader_lease(etcd)
                assert len(assignments_before) == 2 and len(statuses_before) == 2 and len(nodes_before) == 2
                deleted: list[str] = []
                watch = asyncio.create_task(_watch_deletes(etcd, keys.statuses_prefix(), deleted))

                served = 0
                failures: list[str] = []
                stop = asyncio.Event()
                async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)

                    async def client() -> None:
                        nonlocal served
                        while not stop.is_set():
                            try:
                                await stub.ModelInfer(_request("mlp"), timeout=20)
                            except grpc.aio.AioRpcError as exc:
                                failures.append(f"{exc.code().name}: {exc.details()}")
                                await asyncio.sleep(0.01)
                                continue
                            served += 1

                    async def new_leader() -> bool:
                        lease = await _leader_lease(etcd)
                        return lease is not None and lease != leader_before

                    async def reregistered() -> bool:
                        nodes = await _records(etcd, keys.nodes_prefix())
                        statuses = await _records(etcd, keys.statuses_prefix())
                        return (
                            set(nodes) == set(nodes_before)
                            and all(nodes[k].lease != nodes_before[k].lease for k in nodes)
                            and set(statuses) == set(statuses_before)
                            and all(statuses[k].lease != statuses_before[k].lease for k in statuses)
                        )

                    clients = [asyncio.create_task(client()) for _ in range(CLIENTS)]
                    try:
                        await asyncio.sleep(1.0)
                        if link is not None:
                            link.hold()
                        with frozen(restartable_etcd):
                            await asyncio.sleep(FREEZE_SECONDS)
                        resumed = time.monotonic()
                        if link is not None:
                            await eventually(lambda: _gone(etcd, keys.nodes_prefix()), 10, "the node records expired")
                            await eventually(new_leader, 30, "a new scheduler term", interval=0.1)
                            await asyncio.sleep(1.0)  # its passes run without the nodes
                            # Both replicas are still routed (held while their nodes answer) and assigned.
                            assert len(gateway.routing.table.lookup("mlp").versions[0].replicas) == 2
                            assert set(await _records(etcd, keys.assignments_prefix())) == set(assignments_before)
                            assert gateway.routing.held == {(n, "mlp", 1) for n in NODES}
                            link.release()
                        await eventually(reregistered, 30, "both nodes registered again under new leases")
                        back = time.monotonic() - resumed
                        # Time for the scheduler to lead again and run its passes: a re-placement
                        # would show up here.
                        await eventually(new_leader, 30, "a scheduler leading again", interval=0.1)
                        await asyncio.sleep(3 * TTL)
                    finally:
                        stop.set()
                        await asyncio.gather(*clients)

                print(
                    f"\netcd frozen {FREEZE_SECONDS:g}s (lease TTL {TTL}s), {CLIENTS} clients: {served} requests, "
                    f"{len(failures)} failed; nodes re-registered {back:.2f}s after the resume; "
                    f"{len(deleted)} status records expired"
                )
                # The scenario happened: the leases did expire and the records vanished.
                assert deleted, "no status record expired: the freeze did not outlast the leases"
                assert not failures, failures[:5]
                assert served > 0
                assignments_after = await _records(etcd, keys.assignments_prefix())
                assert {k: (kv.create_revision, kv.mod_revision) for k, kv in assignments_after.items()} == {
                    k: (kv.create_revision, kv.mod_revision) for k, kv in assignments_before.items()
                }, "assignments were rewritten: replicas re-placed"
                statuses_after = await _records(etcd, keys.statuses_prefix())
                for key, kv in statuses_after.items():
                    status = from_json(kv.value, spb.ReplicaStatus)
                    before = from_json(statuses_before[key].value, spb.ReplicaStatus)
                    assert status.state == tpb.REPLICA_STATE_READY
                    # A reload would publish LOADING, then READY with a new timestamp.
                    assert status.updated == before.updated, f"{key} was reloaded"
                assert len(gateway.routing.table.lookup("mlp").versions[0].replicas) == 2
                assert not gateway.routing.held  # the records are back: nothing held any more
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
            await etcd.close()


async def _gone(etcd: EtcdClient, prefix: str) -> bool:
    return not await etcd.get_prefix(prefix)


async def test_a_partly_schedulable_deployment_reads_degraded_while_it_serves(mesh):
    async with running_gateway(mesh.gateway_settings()) as gateway:
        # Three replicas of one version on two nodes: two serve, one cannot be placed.
        await deploy(gateway, "wide", [mlp_bytes(seed=22)], min_replicas=3, ready_replicas=2)
        service = AsyncModelService(gateway.grpc_address, http_url=gateway.http_url)
        try:
            async def unschedulable():
                deployment = await service.get_deployment("wide")
                reasons = {c.reason for c in deployment.raw.status.conditions if c.type == "Unschedulable" and c.status}
                ready = sum(v.ready_replicas for v in deployment.raw.status.versions)
                return deployment if reasons and ready == 2 else None

            deployment = await eventually(unschedulable, 30, "2 READY replicas and Unschedulable")
            assert deployment.status == "DEGRADED"
            assert "status='DEGRADED'" in repr(deployment)
            entry = deployment_entry(deployment, via_gateway=True)
            assert entry["status"] == "DEGRADED"
            assert "Unschedulable: NotEnoughNodes" in entry["status_reason"]
            table = deployments_table([entry])
            assert "DEGRADED" in str(table.columns[2]._cells[0])

            async with httpx.AsyncClient(base_url=gateway.http_url) as rest:
                document = (await rest.get("/v1/deployments/wide", timeout=10)).json()
            assert document["status"]["state"] == "DEGRADED"
            assert "NotEnoughNodes" in document["status"]["state_reason"]

            # It serves traffic all the same.
            async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
                response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request("wide"), timeout=20)
            assert response.model_name == "wide"
        finally:
            await service.close()


async def test_a_held_replica_is_routed_while_its_node_serves_it_and_no_longer(etcd_settings, tmp_path):
    """The gateway's hold and the scheduler's probe against a real node (standalone, port 0)."""
    write_model(tmp_path / "repo", "mlp", mlp_model(seed=23))
    etcd = EtcdClient(etcd_settings)
    keys = etcd.keys
    upstream = Upstream(eject_seconds=5, max_message_bytes=1 << 20)
    grace = 1.5
    watcher = RoutingWatcher(
        etcd, logger=structlog.get_logger("test"), probe=upstream.probe, grace_seconds=grace, probe_seconds=0.1
    )
    try:
        async with running_inference(inference_settings(tmp_path / "repo")) as node:
            address = node.grpc.address
            assert await NodeProbe()(address)  # the scheduler's probe: serving
            for model in ("mlp", "ghost"):  # the node serves mlp, not ghost
                spec = spb.DeploymentSpec(
                    name=model, model=model, min_replicas=1, max_replicas=1, traffic=[spb.TrafficTarget(version=1, weight=100)]
                )
                await etcd.put(keys.deployment(model), to_json(spec))
            ready = {
                model: to_json(spb.ReplicaStatus(node_id="n1", model=model, version=1, state=tpb.REPLICA_STATE_READY, address=address))
                for model in ("mlp", "ghost")
            }
            for model, value in ready.items():
                await etcd.put(keys.status("n1", model, 1), value)
            watcher.start()

            def routed(model: str) -> int:
                route = watcher.table.find(model)
                return sum(len(v.replicas) for v in route.versions) if route is not None else 0

            await eventually(lambda: routed("mlp") and routed("ghost"), 10, "both replicas routed")

            # Their records vanish: mlp is held while the node serves it; ghost's first probe ends it.
            vanished = time.monotonic()
            for model in ready:
                await etcd.delete(keys.status("n1", model, 1))
            await eventually(lambda: not routed("ghost"), 5, "ghost dropped by its probe")
            assert routed("mlp") and watcher.held == {("n1", "mlp", 1)}
            # The grace bounds the hold even while the node answers.
            await eventually(lambda: not routed("mlp"), grace + 5, "mlp dropped at the end of its grace")
            assert time.monotonic() - vanished >= grace - 0.1

            # Written again (the node registered again): routed with no grace; vanishing again holds
            # it anew, and the node stopping ends the hold at its next probe.
            await etcd.put(keys.status("n1", "mlp", 1), ready["mlp"])
            await eventually(lambda: routed("mlp"), 10, "mlp routed again")
            await etcd.delete(keys.status("n1", "mlp", 1))
            await eventually(lambda: watcher.held, 5, "mlp held again")
        stopped = time.monotonic()
        await eventually(lambda: not routed("mlp"), 5, "mlp dropped once its node stopped")
        assert time.monotonic() - stopped < grace
        assert not await NodeProbe()(address)  # the scheduler's probe: gone
    finally:
        await watcher.stop()
        await upstream.close()
        await etcd.close()
