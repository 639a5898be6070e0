"""How services reach several monitor replicas (services.common.monitor_client), against real gRPC
servers: queries fail over to a replica that answers, reports from the gateway go to every replica,
and monitor address lists are validated where each service reads them."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import structlog
from pydantic import ValidationError

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from services.common.metrics import Metrics
from services.common.monitor_client import monitor_addresses, monitor_channel
from services.gateway.settings import GatewayServerSettings
from services.gateway.stats import GatewayStats
from services.inference.settings import InferenceServerSettings
from services.scheduler.autoscaler import MonitorSignalSource
from services.scheduler.settings import SchedulerServerSettings
from tests.support.monitor import CollectingMonitor, MonitorServer


class ReplicaMonitor(CollectingMonitor):
    """Answers GetLoadSignal with its own replica number in `reporting_replicas`."""

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number
        self.queries = 0

    async def GetLoadSignal(self, request, context):  # noqa: N802 - gRPC method name
        self.queries += 1
        if request.model == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"replica {self.number} rejects it")
        return mpb.GetLoadSignalResponse(reporting_replicas=self.number, qps=1.0)


@pytest.fixture
async def replicas():
    servers = [MonitorServer(ReplicaMonitor(number)) for number in (1, 2)]
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        await server.stop()


async def test_queries_fail_over_to_a_replica_that_answers(replicas):
    first, second = replicas
    channel = monitor_channel(f"{first.address},{second.address}")
    stub = mpb_grpc.MonitorServiceStub(channel)
    try:
        ask = mpb.GetLoadSignalRequest(model="m", version=1)
        assert (await stub.GetLoadSignal(ask, timeout=5)).reporting_replicas == 1
        await first.stop()
        assert (await stub.GetLoadSignal(ask, timeout=5)).reporting_replicas == 2
        # The replica that answered stays preferred: no detour through the dead one.
        await first.start()
        assert (await stub.GetLoadSignal(ask, timeout=5)).reporting_replicas == 2
        # Only UNAVAILABLE moves on: a replica's own answer, an error included, is final.
        queries = (first.servicer.queries, second.servicer.queries)
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await stub.GetLoadSignal(mpb.GetLoadSignalRequest(model="bad", version=1), timeout=5)
        assert excinfo.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "replica 2" in excinfo.value.details()
        assert (first.servicer.queries, second.servicer.queries) == (queries[0], queries[1] + 1)
        # Every replica down: the caller gets UNAVAILABLE.
        await first.stop()
        await second.stop()
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await stub.GetLoadSignal(ask, timeout=5)
        assert excinfo.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()


async def test_the_scheduler_load_signal_survives_the_loss_of_a_replica(replicas):
    first, second = replicas
    source = MonitorSignalSource(f"{first.address},{second.address}", timeout_seconds=5)
    try:
        assert (await source.sample("m", 1, [])).replicas == 1
        await first.stop()
        assert (await source.sample("m", 1, [])).replicas == 2
    finally:
        await source.close()


async def test_gateway_statistics_reach_every_replica_and_survive_the_loss_of_one(replicas):
    first, second = replicas
    stats = GatewayStats(
        Metrics(), f"{first.address},{second.address}", reporter_id="gw", interval_seconds=60, logger=structlog.get_logger()
    )
    stats.start()
    try:
        stats.success("mlp", 1, 0.002)
        stats.failure("mlp", 1, "UNAVAILABLE", 0.001)
        assert stats.report() == 1
        for server in replicas:
            await server.wait_for(lambda monitor: len(monitor.deltas()) == 1)
            [delta] = server.servicer.deltas()
            assert delta.model == "mlp" and delta.success_count == 1 and dict(delta.failure_counts) == {"UNAVAILABLE": 1}
            assert server.servicer.requests[0].reporter_kind == mpb.REPORTER_KIND_GATEWAY
        await first.stop()
        # A report written the moment the replica stops may still be taken by its dying stream (and
        # lost with it, as with any stream cut mid-write); once the break is seen, reports wait.
        for attempt in range(20):
            stats.success("mlp", 1, 0.003)
            stats.report()
            await second.wait_for(lambda monitor, sent=attempt: len(monitor.deltas()) == 2 + sent)
            if stats.reports.pending:
                break
            await asyncio.sleep(0.05)
        assert stats.reports.pending >= 1  # kept for the replica that is down, within the buffer bound
    finally:
        await stats.stop()


def test_monitor_address_lists_are_validated_by_every_service():
    assert monitor_addresses(" a:1, b:2 ,a:1,") == ["a:1", "b:2"] and monitor_addresses("") == []
    for settings_type in (InferenceServerSettings, GatewayServerSettings, SchedulerServerSettings):
        assert settings_type(monitor_address=" a:1, b:2 ,a:1").monitor_address == "a:1,b:2"
        for bad in ("a:1,b", "a:1,b:0", "a,b:2", "a:1,:2"):
            with pytest.raises(ValidationError, match="monitor address"):
                settings_type(monitor_address=bad)
