"""Acceptance (issue 6): a load generator with a known mix — an injected failure rate (requests that
fail validation) and a known latency distribution (a backend that sleeps as long as each request asks)
— runs against a real inference node that streams statistics to a real monitor; the monitor's QPS,
error rate and p99 agree with the generator's own ground truth within 5 %: its counts, its duration
and the latencies it asked for."""

from __future__ import annotations

import random
import time

import grpc
import numpy as np
import pytest

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.support.inference import FakeBackend, inference_settings, running_inference, write_model
from tests.support.monitor import eventually, monitor_settings, running_monitor


class TimedBackend(FakeBackend):
    """Each request sleeps for the milliseconds in its first element: the generator picks the latency."""

    instances: list[FakeBackend] = []

    def infer(self, inputs, output_names):
        time.sleep(float(inputs["x"].flat[0]) / 1000.0)
        return {name: inputs["x"] * 2 for name in output_names}


def request(delay_ms: float, *, valid: bool) -> pb.ModelInferRequest:
    # Invalid requests carry 3 columns where the model takes 4: INVALID_ARGUMENT before execution.
    columns = 4 if valid else 3
    x = np.full((1, columns), delay_ms, np.float32)
    return pb.ModelInferRequest(
        model_name="timed",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, columns])],
        raw_input_contents=[x.tobytes()],
    )


def order_statistic(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[int(q * (len(values) - 1))]


@pytest.mark.timeout(90)
async def test_monitor_agrees_with_the_generator(etcd_settings, tmp_path):
    repository = tmp_path / "models"
    write_model(repository, "timed", b"fake", config={"backend": "timed"})
    # Real windows here ("1m" is 60 s): the whole run fits in one window.
    settings = monitor_settings(etcd_settings, window_scale=1.0, fine_bucket_seconds=1.0, coarse_bucket_seconds=60.0)
    async with running_monitor(settings) as monitor:
        node_settings = inference_settings(
            repository, monitor_address=monitor.address, stats_interval_seconds=0.05,
            monitor_retry_initial_seconds=0.05, monitor_retry_max_seconds=0.2,
        )
        async with running_inference(node_settings, backends={"timed": TimedBackend}) as node:
            rng = random.Random(2026)
            failure_rate = 0.12
            delays_ok: list[float] = []  # the latency the generator asked for, ms, of the successful requests
            sent = failed = 0
            async with grpc.aio.insecure_channel(node.grpc.address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                started = time.perf_counter()
                while time.perf_counter() - started < 8.0:
                    valid = rng.random() >= failure_rate
                    # Known latency distribution: 96 % fast (5–25 ms), 4 % slow (195–205 ms), so the p99 lies
                    # inside the slow mode, where a loaded machine's timer slack is well under 5 %.
                    delay = rng.uniform(5.0, 25.0) if rng.random() >= 0.04 else rng.uniform(195.0, 205.0)
                    try:
                        await stub.ModelInfer(request(delay, valid=valid), timeout=10)
                        delays_ok.append(delay)
                    except grpc.aio.AioRpcError as exc:
                        assert not valid and exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                        failed += 1
                    sent += 1
                duration = time.perf_counter() - started
            truth_qps = sent / duration
            truth_error_rate = failed / sent
            truth_p99 = order_statistic(delays_ok, 0.99)
            assert failed > 10 and len(delays_ok) > 100 and truth_p99 > 190

            async with grpc.aio.insecure_channel(monitor.address) as channel:
                monitor_stub = mpb_grpc.MonitorServiceStub(channel)

                async def complete():
                    response = await monitor_stub.QueryMetrics(mpb.QueryMetricsRequest(model="timed", version=1))
                    samples = [s for s in response.samples if s.request_count == sent]
                    return samples[0] if samples else None

                sample = await eventually(complete, timeout=10, what="every request reported")
                seen_error_rate = sample.failure_count / sample.request_count
                print(
                    f"truth qps={truth_qps:.2f} err={truth_error_rate:.4f} p99={truth_p99:.2f}ms | monitor "
                    f"qps={sample.qps:.2f} err={seen_error_rate:.4f} p99={sample.p99_latency_ms:.2f}ms"
                )
                assert sample.qps == pytest.approx(truth_qps, rel=0.05)
                assert seen_error_rate == pytest.approx(truth_error_rate, rel=0.05)
                assert 1 - sample.success_rate == pytest.approx(truth_error_rate, rel=0.05)
                assert sample.p99_latency_ms == pytest.approx(truth_p99, rel=0.05)
                # The median sits in the fast mode, where timer slack weighs more: a looser sanity check.
                assert sample.p50_latency_ms == pytest.approx(order_statistic(delays_ok, 0.5), rel=0.15)
                # The node's host resources arrive with its reports.
                by_node = await monitor_stub.QueryMetrics(mpb.QueryMetricsRequest(node_id=node.reporter.reporter_id))
                assert by_node.samples and by_node.samples[0].resources.memory_total_bytes > 0
                assert 0 <= by_node.samples[0].resources.cpu_percent <= 100
