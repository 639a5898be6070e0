"""Pieces of the monitor stats stream without a network: statistics windows in the data plane,
delta encoding, the bounded drop-oldest report buffer, and resource sampling."""

from __future__ import annotations

import numpy as np
import pytest
import structlog
from prometheus_client import CollectorRegistry

from aimaas.monitor.v1 import monitor_pb2 as mpb
from inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.settings import TelemetrySettings
from services.common.sketch import LatencySketch
from services.common.tracing import setup_telemetry
from services.inference.backends import cuda
from services.inference.dataplane import DataPlane, ModelSpec
from services.inference.reporter import ResourceSampler, StatsReporter, deltas, standalone_reporter_id
from services.inference.settings import InferenceServerSettings
from services.inference.stats import ClosedWindow, ModelStats, StatsWindow
from services.inference.tensors import add_raw_input
from tests.support.inference import fake_backend
from tests.unit import tensorrt_fakes

MONITOR = "127.0.0.1:1"  # never contacted: these tests do not start the reporter's tasks


def plane(**settings) -> DataPlane:
    fields = {"backends": ["fake"], "monitor_address": MONITOR, **settings}
    return DataPlane(
        InferenceServerSettings(**fields),
        registry=CollectorRegistry(),
        telemetry=setup_telemetry(TelemetrySettings(), "test"),
        logger=structlog.get_logger(),
        backends={"fake": fake_backend()},
    )


def request(rows: int, version: str = "1", width: int = 4) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", model_version=version)
    add_raw_input(message, "x", np.ones((rows, width), np.float32))
    return message


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"fake")
    return path


async def test_data_plane_windows_count_every_request_once(artifact):
    data_plane = plane()
    await data_plane.load(ModelSpec("m", "1", artifact))
    for rows in (1, 2, 3):
        await data_plane.infer(request(rows))
    with pytest.raises(InvalidArgument):
        await data_plane.infer(request(1, width=5))
    [closed] = data_plane.close_stats_windows()
    window = closed.window
    assert (closed.name, closed.version, closed.in_flight, closed.queued) == ("m", "1", 0, 0)
    assert window.success == 3 and window.failures == {"invalid_argument": 1}
    assert window.latency.count == 3 and window.queue_time.count == 3
    assert window.batch_sizes == {1: 1, 2: 1, 3: 1}
    assert window.started_ns < closed.ended_ns
    # The next window starts where this one ended and holds only what came after.
    await data_plane.infer(request(2))
    [following] = data_plane.close_stats_windows()
    assert following.window.started_ns == closed.ended_ns
    assert following.window.success == 1 and following.window.failures == {}

    # A replaced instance (reload with another spec) and an unloaded one hand their last window over.
    await data_plane.infer(request(1))
    await data_plane.load(ModelSpec("m", "1", artifact, labels={"changed": "yes"}))
    await data_plane.infer(request(1))
    await data_plane.load(ModelSpec("m", "2", artifact))
    await data_plane.infer(request(4, version="2"))
    await data_plane.unload("m", "2")
    closed = data_plane.close_stats_windows()
    by_version: dict[str, list[ClosedWindow]] = {}
    for item in closed:
        by_version.setdefault(item.version, []).append(item)
    assert sorted(w.window.success for w in by_version["1"]) == [1, 1]  # the old and the new instance
    assert [w.window.success for w in by_version["2"]] == [1]
    assert data_plane.close_stats_windows() != [] and all(
        w.window.success == 0 for w in data_plane.close_stats_windows()
    )
    # One delta per model version: the two windows of version 1 are summed.
    encoded = {(d.model, d.version): d for d in deltas(closed)}
    assert encoded[("m", 1)].success_count == 2 and encoded[("m", 1)].latency.count == 2
    assert encoded[("m", 2)].batch_sizes == {4: 1}
    await data_plane.close()


async def test_without_a_monitor_no_windows_are_kept(artifact):
    data_plane = plane(monitor_address="")
    await data_plane.load(ModelSpec("m", "1", artifact))
    await data_plane.infer(request(1))
    assert data_plane.close_stats_windows() == []
    assert data_plane.statistics()[0].inference_stats.success.count == 1
    await data_plane.close()


def closed_window(name: str, version: str, *, success: int, latencies=(), failures=None, start=0, end=10) -> ClosedWindow:
    window = StatsWindow(start)
    window.success = success
    window.failures = dict(failures or {})
    window.latency.add_many(latencies)
    window.batch_sizes = {1: success}
    return ClosedWindow(name, version, window, end, in_flight=1, queued=2)


def test_delta_encoding():
    encoded = deltas(
        [
            closed_window("b", "2", success=3, latencies=[100, 200, 300], failures={"invalid_argument": 2}, start=5, end=20),
            closed_window("a", "10", success=1, latencies=[50]),
            closed_window("b", "2", success=2, latencies=[400, 500], failures={"invalid_argument": 1, "cancelled": 4}, start=1, end=15),
            closed_window("x", "latest", success=9),  # not a number: the monitor cannot key it
        ]
    )
    assert [(d.model, d.version) for d in encoded] == [("a", 10), ("b", 2)]
    b = encoded[1]
    assert b.success_count == 5 and dict(b.failure_counts) == {"INVALID_ARGUMENT": 3, "CANCELLED": 4}
    assert dict(b.batch_sizes) == {1: 5} and b.in_flight == 2 and b.queued == 4
    assert b.interval_start.ToNanoseconds() == 1 and b.interval_end.ToNanoseconds() == 20
    latency = LatencySketch.from_proto(b.latency)
    assert latency.count == 5 and latency.sum_us == pytest.approx(1500)
    assert latency.quantile(1.0) == pytest.approx(500, rel=0.01)


async def test_report_buffer_drops_the_oldest_and_warns_once():
    sequence = iter(range(100))

    def source() -> list[ClosedWindow]:
        # Each report carries one delta whose success count numbers it.
        return [closed_window("m", "1", success=next(sequence))]

    settings = InferenceServerSettings(monitor_address=MONITOR, monitor_buffer_max_reports=3)
    reporter = StatsReporter(settings, source=source, reporter_id="node-a", logger=structlog.get_logger())
    with structlog.testing.capture_logs() as logs:
        for _ in range(7):
            await reporter.collect()
    assert reporter.pending == 3 and reporter.reports_dropped == 4
    assert [r.deltas[0].success_count for r in reporter.destinations[0].buffer] == [4, 5, 6]
    first = reporter.destinations[0].buffer[0]
    assert first.reporter_kind == mpb.REPORTER_KIND_INFERENCE_NODE and first.reporter_id == "node-a"
    assert first.resources.memory_total_bytes > 0
    dropping = [e for e in logs if e["log_level"] == "warning"]
    assert len(dropping) == 1 and "dropping the oldest" in dropping[0]["event"]
    with pytest.raises(ValueError, match="monitor_address"):
        StatsReporter(InferenceServerSettings(), source=source, reporter_id="x", logger=structlog.get_logger())


def test_resource_sampler(monkeypatch):
    usage = ResourceSampler().sample()
    assert 0 <= usage.cpu_percent <= 100
    assert 0 < usage.memory_used_bytes < usage.memory_total_bytes
    assert usage.gpu_memory_total_bytes == 0
    # On a GPU node device memory is reported too (here the CPU fake of the CUDA runtime: 80 GiB).
    fake = tensorrt_fakes.FakeCudaRuntime()
    monkeypatch.setattr(cuda, "_import_runtime", lambda: fake)
    cuda.reset_detection_cache()
    try:
        fake.cudaMalloc(1 << 20)
        gpu = ResourceSampler(gpu=True).sample()
        assert gpu.gpu_memory_total_bytes == 80 << 30 and gpu.gpu_memory_used_bytes == 1 << 20
    finally:
        cuda.reset_detection_cache()


def test_standalone_reporter_id():
    assert standalone_reporter_id("127.0.0.1:8301") == "127.0.0.1:8301"
    assert standalone_reporter_id("0.0.0.0:8301", "node-7.example:8301") == "node-7.example:8301"
    host = standalone_reporter_id("0.0.0.0:8301")
    assert host.endswith(":8301") and not host.startswith("0.0.0.0")


def test_model_stats_windows_are_opt_in():
    assert ModelStats("m", "1").close_window() is None
    stats = ModelStats("m", "1", windowed=True)
    stats.record_success(2_000_000)
    stats.record_failure(1_000, "internal")
    closed = stats.close_window()
    assert closed.window.success == 1 and closed.window.failures == {"internal": 1}
    assert closed.window.latency.quantile(0.5) == pytest.approx(2000, rel=0.01)
