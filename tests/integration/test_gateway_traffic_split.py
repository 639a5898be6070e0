"""Traffic splits through the gateway against a real mesh: a 90/10 split measured over 5,000
requests, pinned versions, sticky sessions (same key → same version and replica), and
least-outstanding spreading over replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import grpc
import numpy as np
import pytest

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.settings import EtcdSettings
from tests.support.gateway import deploy, running_gateway, start_mesh
from tests.support.models import mlp_bytes

REQUESTS = 5000
CONCURRENCY = 16


@pytest.fixture(scope="module")
def mesh(etcd_server, tmp_path_factory):
    etcd = EtcdSettings(
        endpoints=etcd_server.endpoint, namespace=f"/test-{uuid.uuid4().hex[:12]}/aimaas/v1", session_ttl_seconds=3
    )
    mesh = start_mesh(etcd, tmp_path_factory.mktemp("gateway-split"))
    yield mesh
    mesh.stop()


@pytest.fixture
async def gateway(mesh):
    async with running_gateway(mesh.gateway_settings()) as app:
        yield app


def _request(model: str, version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return request


async def _versions(stub, model: str, count: int, *, metadata=None, version: str = "") -> Counter[str]:
    counts: Counter[str] = Counter()
    queue = iter(range(count))

    async def client():
        for _ in queue:
            response = await stub.ModelInfer(_request(model, version), metadata=metadata, timeout=30)
            counts[response.model_version] += 1

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return counts


async def test_90_10_split_over_5000_requests(gateway):
    await deploy(gateway, "split", [mlp_bytes(seed=21), mlp_bytes(seed=22)], traffic=((1, 90), (2, 10)), min_replicas=1)
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        counts = await _versions(stub, "split", REQUESTS)
        share = counts["1"] / REQUESTS * 100
        print(f"\n90/10 split over {REQUESTS} requests: version 1 {share:.2f}%, version 2 {100 - share:.2f}%")
        assert sum(counts.values()) == REQUESTS and set(counts) == {"1", "2"}
        assert abs(share - 90) <= 3, counts

        # A pinned version gets only that version, whatever the split.
        assert await _versions(stub, "split", 40, version="2") == Counter({"2": 40})


async def test_sticky_sessions_and_least_outstanding(gateway, mesh):
    await deploy(
        gateway, "sticky", [mlp_bytes(seed=23), mlp_bytes(seed=24)], traffic=((1, 50), (2, 50)), min_replicas=4,
        ready_replicas=2,
    )
    route = gateway.routing.table.lookup("sticky")
    assert all(len(v.replicas) == 2 for v in route.versions)
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        seen: dict[str, set[str]] = {}
        for user in range(12):
            key = f"user-{user}"
            counts = await _versions(stub, "sticky", 20, metadata=(("x-aimaas-session", key),))
            seen[key] = set(counts)
        assert all(len(versions) == 1 for versions in seen.values()), seen
        # Keys spread over both versions (12 keys, 50/50: all on one side has probability 2^-11).
        assert {v for versions in seen.values() for v in versions} == {"1", "2"}

    # The same key lands on the same replica: count per node with ModelStatistics straight from the nodes.
    async def per_node_counts() -> dict[str, int]:
        counts = {}
        for node_id, process in mesh.nodes.items():
            async with grpc.aio.insecure_channel(process.address) as channel:
                stats = await pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                    pb.ModelStatisticsRequest(name="sticky"), timeout=10
                )
                counts[node_id] = sum(s.inference_stats.success.count for s in stats.model_stats)
        return counts

    before = await per_node_counts()
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await _versions(stub, "sticky", 30, metadata=(("x-aimaas-session", "one-user"),))
        after_sticky = await per_node_counts()
        moved = {n: after_sticky[n] - before[n] for n in before}
        assert sorted(moved.values()) == [0, 30], moved
        # Without a key, requests spread over both replicas of the chosen versions.
        await _versions(stub, "sticky", 200)
    after = await per_node_counts()
    spread = {n: after[n] - after_sticky[n] for n in after}
    assert sum(spread.values()) == 200 and min(spread.values()) > 20, spread
