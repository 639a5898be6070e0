"""SLO-gated canary end to end: real etcd, registry, scheduler(s) and inference node processes; the
canary's metrics come over gRPC from a MonitorService (QueryMetrics) that this test scripts: a real
gRPC server answering from data the test controls (the error rate / p99 the candidate "has").

Covers: a healthy candidate walks its steps (effective weights in deployment-status change step by
step) and is promoted to 100% with the stable replicas unloaded; a candidate whose error rate
exceeds the bound is rolled back automatically (stable traffic restored, candidate unloaded, the
reason with the measured value in the Canary condition); the progress survives a leader change.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from aimaas.cli.health import grpc_serving
from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from aimaas.types.v1 import types_pb2 as tpb
from services.common.etcd import EtcdClient
from services.scheduler.app import SchedulerApp
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry, upload
from tests.support.scheduler import (
    Process,
    assignments,
    condition,
    eventually,
    inference_node,
    replica_states,
    scheduler_settings,
)

READY = tpb.REPLICA_STATE_READY


class ScriptedMonitor(mpb_grpc.MonitorServiceServicer):
    """QueryMetrics answers with the sample the test set for (model, version); none: no data."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, int], list[mpb.MetricsSample]] = {}
        self.queries: list[mpb.QueryMetricsRequest] = []

    def set(self, model: str, version: int, requests: int, failures: int = 0, p99_ms: float = 5.0) -> None:
        self.samples[(model, version)] = [
            mpb.MetricsSample(
                model=model, version=version, request_count=requests, failure_count=failures,
                success_rate=1 - failures / requests if requests else 1.0, p99_latency_ms=p99_ms,
            )
        ]  # fmt: skip

    async def QueryMetrics(self, request, context):  # noqa: N802 - gRPC method name
        self.queries.append(request)
        return mpb.QueryMetricsResponse(window=request.window, samples=self.samples.get((request.model, request.version), []))


@contextlib.asynccontextmanager
async def scripted_monitor():
    servicer = ScriptedMonitor()
    server = grpc.aio.server()
    mpb_grpc.add_MonitorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def wait_serving(process: Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process is not None and process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        if await asyncio.to_thread(grpc_serving, process.address, 1.0):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{process.name} did not become SERVING:\n{process.log_tail()}")


@contextlib.asynccontextmanager
async def scheduler(etcd_settings, monitor_address: str):
    settings = scheduler_settings(
        etcd_settings, monitor_address=monitor_address, canary_check_interval_seconds=0.2,
        canary_min_requests=10, canary_max_hold_seconds=60,
    )  # fmt: skip
    app = SchedulerApp(settings)
    await app.start()
    channel = grpc.aio.insecure_channel(app.grpc.address)
    try:
        yield app, scheduler_pb2_grpc.SchedulerServiceStub(channel)
    finally:
        await channel.close()
        await app.stop()


@pytest.fixture
async def cluster(etcd_settings, local_store_settings, tmp_path):
    """Registry (model `m`: versions 1 and 2), two inference nodes, the scripted monitor, an etcd client."""
    nodes = [inference_node(f"node-{i}", etcd_settings, local_store_settings, tmp_path) for i in range(2)]
    try:
        for node in nodes:
            node.start()
        async with running_registry(registry_settings(etcd_settings, local_store_settings)) as (_, registry):
            await upload(registry, "m", mlp_bytes(seed=1))
            await upload(registry, "m", mlp_bytes(seed=2))
            await asyncio.gather(*(wait_serving(node) for node in nodes))
            etcd = EtcdClient(etcd_settings)
            try:
                async with scripted_monitor() as (monitor, address):
                    yield etcd, monitor, address
            finally:
                await etcd.close()
    finally:
        for node in nodes:
            node.stop()


def stable_spec(**fields) -> spb.DeploymentSpec:
    return spb.DeploymentSpec(
        name="d", model="m", traffic=[spb.TrafficTarget(version=1, weight=100)], min_replicas=1, max_replicas=2,
        accelerator=tpb.ACCELERATOR_CPU, **fields,
    )  # fmt: skip


def canary_policy(steps=(50, 100), step_seconds=1, max_error_rate=0.05, max_p99=200.0) -> spb.CanaryPolicy:
    return spb.CanaryPolicy(
        candidate=spb.TrafficTarget(version=2), steps=list(steps), step_seconds=step_seconds,
        max_error_rate=max_error_rate, max_p99_latency_ms=max_p99,
    )  # fmt: skip


def effective(deployment: spb.Deployment) -> dict[int, int]:
    return {vs.version: vs.weight for vs in deployment.status.versions if vs.weight > 0}


async def serving_v1(stub, etcd) -> None:
    await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=stable_spec()))

    async def ready():
        deployment = (await stub.GetDeployment(spb.GetDeploymentRequest(name="d"))).deployment
        found = condition(deployment, "Ready")
        return found is not None and found.status and effective(deployment) == {1: 100}

    await eventually(ready, 30, "version 1 READY and serving")


class Recorder:
    """Every effective split the deployment passes through (WatchDeployment), and the last state."""

    def __init__(self, stub) -> None:
        self.splits: list[dict[int, int]] = []
        self.last: spb.Deployment | None = None
        self._task = asyncio.create_task(self._run(stub))

    async def _run(self, stub) -> None:
        async for response in stub.WatchDeployment(spb.WatchDeploymentRequest(name="d")):
            self.last = response.deployment
            split = effective(response.deployment)
            if not self.splits or self.splits[-1] != split:
                self.splits.append(split)

    def canary(self, reason: str) -> spb.Condition | None:
        found = condition(self.last, "Canary") if self.last is not None else None
        return found if found is not None and found.reason == reason else None

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._task


async def test_a_healthy_canary_is_promoted_to_100_percent(cluster, etcd_settings):
    etcd, monitor, address = cluster
    monitor.set("m", 2, requests=200, failures=1, p99_ms=12.0)  # 0.5% errors, p99 12 ms: within bounds
    async with scheduler(etcd_settings, address) as (_, stub):
        await serving_v1(stub, etcd)
        watch = Recorder(stub)
        try:
            await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=stable_spec(canary=canary_policy())))
            promoted = await eventually(lambda: watch.canary("Promoted"), 40, "the canary promoted")
            assert "version 2 promoted to 100%" in promoted.message
            assert "over 200 requests" in promoted.message
            # Stepped: stable alone, then 50/50, then the candidate alone.
            assert watch.splits[0] == {1: 100}
            assert {1: 50, 2: 50} in watch.splits
            assert watch.splits[-1] == {2: 100}
        finally:
            await watch.close()
        state = (await stub.GetDeployment(spb.GetDeploymentRequest(name="d"))).deployment.status.canary
        assert state.phase == spb.CANARY_PHASE_PROMOTED and state.weight == 100
        # The stable version's replicas are gone; the candidate serves.
        await eventually(lambda: _versions_assigned(etcd, {2}), 15, "only version 2 assigned")
        await eventually(lambda: _ready(etcd, 2), 15, "version 2 READY")
        # The scheduler asked the monitor about the candidate, over the 1-minute window.
        assert any(q.model == "m" and q.version == 2 and q.window == mpb.WINDOW_1M for q in monitor.queries)


async def test_a_canary_with_errors_is_rolled_back_with_the_reason(cluster, etcd_settings):
    etcd, monitor, address = cluster
    monitor.set("m", 2, requests=100, failures=40, p99_ms=8.0)  # 40% errors, bound 5%
    async with scheduler(etcd_settings, address) as (_, stub):
        await serving_v1(stub, etcd)
        watch = Recorder(stub)
        try:
            spec = stable_spec(canary=canary_policy(steps=(25, 100), step_seconds=30))
            await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec))
            rolled = await eventually(lambda: watch.canary("RolledBack"), 40, "the canary rolled back")
            assert not rolled.status
            assert "ErrorRateExceeded at step 25%: error rate 0.4000 > max 0.05 over 100 requests" in rolled.message
            assert "traffic on 1 (100%)" in rolled.message
            # The candidate did get its step's traffic before the verdict; then stable alone again.
            assert {1: 75, 2: 25} in watch.splits
            assert watch.splits[-1] == {1: 100}
        finally:
            await watch.close()
        deployment = (await stub.GetDeployment(spb.GetDeploymentRequest(name="d"))).deployment
        assert deployment.status.canary.phase == spb.CANARY_PHASE_ROLLED_BACK
        assert deployment.status.canary.error_rate == pytest.approx(0.4)
        # Failing fast: long before the 30 s step would have ended. The candidate is unloaded.
        await eventually(lambda: _versions_assigned(etcd, {1}), 15, "only version 1 assigned")
        await eventually(lambda: _no_replica(etcd, 2), 15, "version 2 unloaded by its node")
        # Re-applying the same spec does not retry the rolled-back canary.
        again = await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec))
        assert not again.changed
        await asyncio.sleep(1.0)
        deployment = (await stub.GetDeployment(spb.GetDeploymentRequest(name="d"))).deployment
        assert effective(deployment) == {1: 100}


async def test_canary_progress_survives_a_leader_change(cluster, etcd_settings):
    etcd, monitor, address = cluster
    monitor.set("m", 2, requests=3)  # too little traffic for a verdict: the first step holds
    spec = stable_spec(canary=canary_policy(steps=(20, 100), step_seconds=1))
    async with scheduler(etcd_settings, address) as (first, stub):
        await serving_v1(stub, etcd)
        async with scheduler(etcd_settings, address) as (second, _):
            await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec))

            async def step_started():
                status = (await stub.GetDeployment(spb.GetDeploymentRequest(name="d"))).deployment.status
                return status.canary if status.canary.HasField("step_started") else None

            before = await eventually(step_started, 30, "the first step in effect")
            assert before.weight == 20
            await asyncio.sleep(1.5)  # past step_seconds: held for lack of traffic, not advanced
            assert (await step_started()).weight == 20
            assert first.is_leader and not second.is_leader
            await first.leadership.stop()  # resign: the other scheduler takes over
            await eventually(lambda: second.is_leader, 15, "the second scheduler leads")
            await asyncio.sleep(0.5)
            held = await step_started()
            # Same run, same step, same start: resumed, not restarted.
            assert held.weight == 20 and held.step_started == before.step_started
            assert held.phase == spb.CANARY_PHASE_PROGRESSING
            monitor.set("m", 2, requests=500, failures=0, p99_ms=3.0)
            async with grpc.aio.insecure_channel(second.grpc.address) as channel:
                second_stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

                async def promoted():
                    deployment = (await second_stub.GetDeployment(spb.GetDeploymentRequest(name="d"))).deployment
                    canary = deployment.status.canary
                    return canary.phase == spb.CANARY_PHASE_PROMOTED and effective(deployment) == {2: 100}

                await eventually(promoted, 40, "promoted by the new leader")


async def _versions_assigned(etcd, versions: set[int]) -> bool:
    return {v for (_, _, v) in await assignments(etcd, "m")} == versions


async def _ready(etcd, version: int) -> bool:
    return any(v == version and s == READY for (_, v), s in (await replica_states(etcd, "m")).items())


async def _no_replica(etcd, version: int) -> bool:
    return all(v != version for (_, v) in await replica_states(etcd, "m"))


async def test_monitor_metrics_source_reads_query_metrics():
    from services.scheduler.canary import MonitorCanaryMetrics

    async with scripted_monitor() as (monitor, address):
        source = MonitorCanaryMetrics(address, clock=lambda: 123.0)
        try:
            assert await source.measure("m", 2, 1.0) is None  # no data for the version
            monitor.set("m", 2, requests=80, failures=20, p99_ms=42.0)
            measured = await source.measure("m", 2, 90.0)
            assert (measured.request_count, measured.error_rate, measured.p99_latency_ms, measured.at) == (
                80, 0.25, 42.0, 123.0,
            )  # fmt: skip
            assert monitor.queries[-1].window == mpb.WINDOW_5M  # the smallest window covering 90 s
            # Per-node samples only: counts add up, the worst node's p99 bounds the p99.
            monitor.samples[("m", 3)] = [
                mpb.MetricsSample(model="m", version=3, node_id="a", request_count=30, failure_count=3, p99_latency_ms=10.0),
                mpb.MetricsSample(model="m", version=3, node_id="b", request_count=10, failure_count=1, p99_latency_ms=70.0),
            ]
            merged = await source.measure("m", 3, 1.0)
            assert merged.request_count == 40 and merged.error_rate == pytest.approx(0.1)
            assert merged.p99_latency_ms == 70.0
        finally:
            await source.close()
    # The monitor gone: unknown, not an error.
    gone = MonitorCanaryMetrics(address, timeout_seconds=0.5)
    try:
        assert await gone.measure("m", 2, 1.0) is None
    finally:
        await gone.close()
