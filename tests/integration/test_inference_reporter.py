"""Statistics streamed to the monitor (issue 3, item 7): a standalone inference node with
`monitor_address` set reports per-interval deltas over one ReportStats client stream to a real gRPC
test monitor; its counts match what the clients did, and a monitor outage costs serving nothing."""

from __future__ import annotations

import asyncio
import collections
import time

import numpy as np
import pytest
import structlog
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from aimaas.monitor.v1 import monitor_pb2 as mpb
from inference import grpc_predict_v2_pb2 as pb
from services.common.sketch import DEFAULT_ALPHA, LatencySketch
from tests.support.inference import inference_settings, running_inference, write_model
from tests.support.models import mlp_model
from tests.support.monitor import MonitorServer
from tests.support.servers import free_port

MLP = mlp_model(inputs=4, hidden=8, outputs=3)
FAST = {
    "stats_interval_seconds": 0.2,
    "monitor_retry_initial_seconds": 0.05,
    "monitor_retry_max_seconds": 0.3,
    "monitor_flush_timeout_seconds": 2.0,
}


@pytest.fixture
def repository(tmp_path):
    root = tmp_path / "models"
    write_model(root, "mlp", MLP, version=1)
    write_model(root, "mlp", MLP, version=2)
    write_model(root, "other", mlp_model(inputs=4, hidden=4, outputs=2, seed=5), version=3)
    return root


@pytest.fixture
async def monitor():
    server = MonitorServer()
    await server.start()
    yield server
    await server.stop()


def infer_input(array: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("x", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def run_clients(address: str, plan: list[tuple[str, str, str]]) -> collections.Counter:
    """Blocking: send `plan` ((model, version, kind) with kind "ok", "shape" or "dtype") with the stock
    sync client; returns outcomes counted by (model, version, "ok" | status)."""
    client = triton.InferenceServerClient(address)
    outcomes: collections.Counter = collections.Counter()
    rng = np.random.default_rng(0)
    try:
        for model, version, kind in plan:
            rows = int(rng.integers(1, 5))
            if kind == "ok":
                inputs = [infer_input(rng.standard_normal((rows, 4)).astype(np.float32))]
            elif kind == "shape":
                inputs = [infer_input(np.ones((rows, 7), np.float32))]
            else:
                inputs = [infer_input(np.ones((rows, 4), np.int32), "INT32")]
            try:
                result = client.infer(model, inputs, model_version=version)
                assert result.as_numpy("y").shape[0] == rows
                outcomes[(model, version, "ok")] += 1
            except InferenceServerException as exc:
                outcomes[(model, version, exc.status())] += 1
    finally:
        client.close()
    return outcomes


def totals(deltas: list[mpb.StatsDelta]) -> dict[tuple[str, int], dict]:
    """Per (model, version): summed counts and merged sketches of every delta received."""
    result: dict[tuple[str, int], dict] = {}
    for delta in deltas:
        entry = result.setdefault(
            (delta.model, delta.version),
            {"success": 0, "failures": collections.Counter(), "latency": LatencySketch(),
             "queue": LatencySketch(), "batches": collections.Counter(), "deltas": []},
        )
        entry["success"] += delta.success_count
        entry["failures"].update(dict(delta.failure_counts))
        entry["latency"].merge(LatencySketch.from_proto(delta.latency))
        entry["queue"].merge(LatencySketch.from_proto(delta.queue_time))
        entry["batches"].update(dict(delta.batch_sizes))
        entry["deltas"].append(delta)
    return result


def successes(monitor: MonitorServer) -> int:
    return sum(d.success_count for d in monitor.servicer.deltas())


async def test_deltas_add_up_to_what_the_clients_did(repository, monitor):
    settings = inference_settings(repository, monitor_address=monitor.address, **FAST)
    plan = (
        [("mlp", "1", "ok")] * 30 + [("mlp", "1", "shape")] * 4 + [("mlp", "2", "ok")] * 12
        + [("mlp", "2", "dtype")] * 3 + [("other", "3", "ok")] * 5 + [("nope", "1", "ok")] * 2
    )
    async with running_inference(settings) as app:
        assert app.reporter is not None and app.reporter.reporter_id == app.grpc.address
        outcomes = await asyncio.to_thread(run_clients, app.grpc.address, plan)
        assert outcomes[("mlp", "1", "ok")] == 30 and outcomes[("mlp", "1", "StatusCode.INVALID_ARGUMENT")] == 4
        assert outcomes[("mlp", "2", "StatusCode.INVALID_ARGUMENT")] == 3
        assert outcomes[("nope", "1", "StatusCode.NOT_FOUND")] == 2  # no model version: no delta
        await monitor.wait_for(lambda m: sum(d.success_count for d in m.deltas()) == 47)
        # A few more intervals: every loaded version keeps reporting (zero-count deltas), nothing doubles.
        reports = len(monitor.servicer.requests)
        await monitor.wait_for(lambda m: len(m.requests) >= reports + 3)
        server_stats = {(s.name, s.version): s for s in app.data_plane.statistics()}

    received = totals(monitor.servicer.deltas())
    assert set(received) == {("mlp", 1), ("mlp", 2), ("other", 3)}
    expected = {("mlp", 1): (30, {"INVALID_ARGUMENT": 4}), ("mlp", 2): (12, {"INVALID_ARGUMENT": 3}), ("other", 3): (5, {})}
    for key, (ok, failures) in expected.items():
        entry = received[key]
        assert entry["success"] == ok and dict(entry["failures"]) == failures, key
        latency, queue = entry["latency"], entry["queue"]
        assert latency.count == ok and latency.zero_count == 0 and latency.alpha == DEFAULT_ALPHA
        # The node's own statistics (ModelStatistics) agree: same requests, same total time.
        stats = server_stats[(key[0], str(key[1]))]
        assert stats.inference_stats.success.count == ok
        assert latency.sum_us == pytest.approx(stats.inference_stats.success.ns / 1000, rel=1e-6)
        p50, p99, top = latency.quantile(0.5), latency.quantile(0.99), latency.quantile(1.0)
        assert 10 < p50 <= p99 <= top < 5_000_000, (p50, p99, top)  # microseconds: 10 µs .. 5 s
        assert p50 <= latency.mean() * 10
        # Every executed request waited in the batcher once; executions add up by batch size.
        assert queue.count == ok == stats.inference_stats.queue.count
        assert sum(entry["batches"].values()) == stats.execution_count
        assert sum(size * n for size, n in entry["batches"].items()) == stats.inference_count
        # Windows are contiguous: each starts where the previous one ended, so none was lost.
        windows = sorted(entry["deltas"], key=lambda d: d.interval_start.ToNanoseconds())
        for before, after in zip(windows, windows[1:]):
            assert after.interval_start.ToNanoseconds() == before.interval_end.ToNanoseconds()
        assert all(d.interval_start.ToNanoseconds() < d.interval_end.ToNanoseconds() for d in windows)
        assert all(d.in_flight == 0 and d.queued == 0 for d in windows[-2:])

    for request in monitor.servicer.requests:
        assert request.reporter_kind == mpb.REPORTER_KIND_INFERENCE_NODE
        assert request.reporter_id.startswith("127.0.0.1:")
        resources = request.resources
        assert 0 <= resources.cpu_percent <= 100
        assert 0 < resources.memory_used_bytes < resources.memory_total_bytes
    # One long-lived stream for the node's whole life, half-closed at shutdown.
    assert monitor.servicer.streams == 1 and monitor.servicer.closed_streams == 1


async def test_monitor_outage_never_touches_serving_and_reports_resume(repository, monitor):
    settings = inference_settings(repository, monitor_address=monitor.address, **FAST)
    async with running_inference(settings) as app:
        reporter = app.reporter
        first = await asyncio.to_thread(run_clients, app.grpc.address, [("mlp", "1", "ok")] * 10)
        assert first[("mlp", "1", "ok")] == 10
        await monitor.wait_for(lambda m: successes(monitor) == 10)
        assert reporter.connected and reporter.outages == 0

        with structlog.testing.capture_logs() as logs:
            await monitor.stop()
            # Serving during the outage: every call succeeds, and fast.
            started = time.monotonic()
            during = await asyncio.to_thread(run_clients, app.grpc.address, [("mlp", "1", "ok")] * 40)
            elapsed = time.monotonic() - started
            assert during == {("mlp", "1", "ok"): 40}
            # Several intervals and reconnection attempts pass while the monitor is down.
            await asyncio.sleep(1.2)
            assert not reporter.connected and reporter.pending >= 3 and reporter.outages == 1
        warnings = [e for e in logs if e["log_level"] == "warning" and "monitor unreachable" in e["event"]]
        assert len(warnings) == 1, logs  # once per outage, not per attempt
        assert elapsed < 10

        await monitor.start()  # same port
        await monitor.wait_for(lambda m: successes(monitor) == 50)
        assert reporter.connected and reporter.outages == 1 and reporter.connections == 2
        after = await asyncio.to_thread(run_clients, app.grpc.address, [("mlp", "2", "ok")] * 5)
        assert after == {("mlp", "2", "ok"): 5}
        await monitor.wait_for(lambda m: successes(monitor) == 55)
        stats = {(s.name, s.version): s for s in app.data_plane.statistics()}
        assert stats[("mlp", "1")].inference_stats.fail.count == 0
    received = totals(monitor.servicer.deltas())
    assert received[("mlp", 1)]["success"] == 50 and received[("mlp", 1)]["latency"].count == 50
    assert not received[("mlp", 1)]["failures"]
    assert monitor.servicer.streams == 2


async def test_shutdown_flushes_the_last_interval(repository, monitor):
    # An interval far longer than the test: only the final flush at stop() can deliver these.
    settings = inference_settings(repository, monitor_address=monitor.address, stats_interval_seconds=600)
    async with running_inference(settings) as app:
        outcomes = await asyncio.to_thread(
            run_clients, app.grpc.address, [("other", "3", "ok")] * 7 + [("other", "3", "shape")] * 2
        )
        assert outcomes[("other", "3", "ok")] == 7
        assert monitor.servicer.requests == []
    assert len(monitor.servicer.requests) == 1
    received = totals(monitor.servicer.deltas())
    assert received[("other", 3)]["success"] == 7 and dict(received[("other", 3)]["failures"]) == {"INVALID_ARGUMENT": 2}
    assert monitor.servicer.closed_streams == 1


async def test_unreachable_monitor_neither_blocks_start_nor_stop(repository):
    settings = inference_settings(
        repository, monitor_address=f"127.0.0.1:{free_port()}", **{**FAST, "monitor_flush_timeout_seconds": 0.3}
    )
    app_started = time.monotonic()
    async with running_inference(settings) as app:
        outcomes = await asyncio.to_thread(run_clients, app.grpc.address, [("mlp", "1", "ok")] * 10)
        assert outcomes == {("mlp", "1", "ok"): 10}
        await asyncio.sleep(0.5)
        assert app.reporter.outages == 1 and app.reporter.reports_sent == 0 and app.reporter.pending >= 1
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 3
    assert time.monotonic() - app_started < 10


async def test_no_monitor_address_means_no_reporter_and_no_windows(repository):
    async with running_inference(inference_settings(repository)) as app:
        assert app.reporter is None
        await asyncio.to_thread(run_clients, app.grpc.address, [("mlp", "1", "ok")] * 3)
        assert app.data_plane.close_stats_windows() == []
        assert all(isinstance(s, pb.ModelStatistics) for s in app.data_plane.statistics())
