"""Acceptance (issue 6) through the gateway: the same known mix as test_monitor_acceptance, sent to a
real gateway (in-process, routing from etcd) in front of a real inference node; both report to a real
monitor. The monitor's version-level figures come from the gateway's end-to-end series (the node's are
not counted twice), and agree with the generator's ground truth within 5 %."""

from __future__ import annotations

import random
import time

import grpc
import pytest

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.etcd import EtcdClient, to_json
from tests.integration.test_monitor_acceptance import TimedBackend, order_statistic, request
from tests.support.gateway import gateway_settings, running_gateway
from tests.support.inference import inference_settings, running_inference, write_model
from tests.support.monitor import eventually, monitor_settings, running_monitor


async def route_to(etcd_settings, node_address: str) -> None:
    """What the scheduler would write for a deployment `timed` with one READY replica on the node."""
    async with EtcdClient(etcd_settings) as etcd:
        keys = etcd.keys
        spec = spb.DeploymentSpec(name="timed", model="timed", min_replicas=1, max_replicas=1,
                                  traffic=[spb.TrafficTarget(version=1, weight=100)])
        await etcd.put(keys.deployment("timed"), to_json(spec))
        status = spb.DeploymentStatus(versions=[spb.VersionStatus(version=1, weight=100, ready_replicas=1)])
        await etcd.put(keys.deployment_status("timed"), to_json(status))
        replica = spb.ReplicaStatus(node_id="node-1", model="timed", version=1, state=tpb.REPLICA_STATE_READY,
                                    address=node_address)
        await etcd.put(keys.status("node-1", "timed", 1), to_json(replica))


@pytest.mark.timeout(90)
async def test_monitor_agrees_with_the_generator_through_the_gateway(etcd_settings, tmp_path):
    repository = tmp_path / "models"
    write_model(repository, "timed", b"fake", config={"backend": "timed"})
    settings = monitor_settings(etcd_settings, window_scale=1.0, fine_bucket_seconds=1.0, coarse_bucket_seconds=60.0)
    async with running_monitor(settings) as monitor:
        node_settings = inference_settings(repository, monitor_address=monitor.address, stats_interval_seconds=0.1)
        async with running_inference(node_settings, backends={"timed": TimedBackend}) as node:
            await route_to(etcd_settings, node.grpc.address)
            gw_settings = gateway_settings(etcd_settings, monitor=monitor.address, stats_interval_seconds=0.1)
            async with running_gateway(gw_settings) as gateway:
                await eventually(lambda: gateway.routing.table.find("timed"), what="the route")
                rng = random.Random(7)
                delays_ok: list[float] = []
                sent = failed = 0
                async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    started = time.perf_counter()
                    while time.perf_counter() - started < 8.0:
                        valid = rng.random() >= 0.12
                        # The slow mode is longer than in the direct test: the gateway adds its hop at the tail.
                        delay = rng.uniform(5.0, 25.0) if rng.random() >= 0.04 else rng.uniform(395.0, 405.0)
                        try:
                            await stub.ModelInfer(request(delay, valid=valid), timeout=10)
                            delays_ok.append(delay)
                        except grpc.aio.AioRpcError as exc:
                            assert not valid and exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                            failed += 1
                        sent += 1
                    duration = time.perf_counter() - started
        truth_qps, truth_error_rate, truth_p99 = sent / duration, failed / sent, order_statistic(delays_ok, 0.99)
        assert failed > 10 and len(delays_ok) > 100 and truth_p99 > 390
        async with grpc.aio.insecure_channel(monitor.address) as channel:
            stub = mpb_grpc.MonitorServiceStub(channel)

            async def complete():
                response = await stub.QueryMetrics(mpb.QueryMetricsRequest(model="timed", version=1))
                return next((s for s in response.samples if s.request_count == sent), None)

            sample = await eventually(complete, timeout=10, what="every request reported by the gateway")
            # The node reported the same requests; they are not added to the version's figures.
            (by_node,) = (await stub.QueryMetrics(
                mpb.QueryMetricsRequest(model="timed", version=1, node_id=node.reporter.reporter_id))).samples
        seen_error_rate = sample.failure_count / sample.request_count
        print(
            f"truth qps={truth_qps:.2f} err={truth_error_rate:.4f} p99={truth_p99:.2f}ms | monitor "
            f"qps={sample.qps:.2f} err={seen_error_rate:.4f} p99={sample.p99_latency_ms:.2f}ms | node "
            f"requests={by_node.request_count}"
        )
        assert sample.qps == pytest.approx(truth_qps, rel=0.05)
        assert seen_error_rate == pytest.approx(truth_error_rate, rel=0.05)
        assert sample.p99_latency_ms == pytest.approx(truth_p99, rel=0.05)
        assert by_node.request_count <= sent
