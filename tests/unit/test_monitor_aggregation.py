"""The monitor's aggregation: ring buffers, window merges, rates, bounds and eviction (pure logic)."""

from __future__ import annotations

import random

import pytest

from aimaas.monitor.v1 import monitor_pb2 as mpb
from services.common.sketch import LatencySketch
from services.monitor.aggregation import MAX_REASONS, OTHER_REASON, MetricsStore


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def delta(model="m", version=1, *, success=0, failures=None, latencies_us=(), start=0.0, end=0.0, in_flight=0,
          queue_us=(), batch_sizes=None) -> mpb.StatsDelta:
    latency = LatencySketch()
    latency.add_many(latencies_us)
    queue = LatencySketch()
    queue.add_many(queue_us)
    message = mpb.StatsDelta(
        model=model, version=version, success_count=success, failure_counts=failures or {},
        latency=latency.to_proto(), queue_time=queue.to_proto(), in_flight=in_flight, batch_sizes=batch_sizes or {},
    )
    message.interval_start.FromNanoseconds(int(start * 1e9))
    message.interval_end.FromNanoseconds(int(end * 1e9))
    return message


def report(node: str, *deltas: mpb.StatsDelta, cpu: float = 0.0) -> mpb.ReportStatsRequest:
    return mpb.ReportStatsRequest(
        reporter_kind=mpb.REPORTER_KIND_INFERENCE_NODE, reporter_id=node, deltas=deltas,
        resources=mpb.ResourceUsage(cpu_percent=cpu, memory_total_bytes=1 << 30),
    )


def test_steady_stream_rates_percentiles_and_merge_across_nodes():
    clock = Clock()
    store = MetricsStore(fine_bucket_seconds=1, coarse_bucket_seconds=10, clock=clock)
    rng = random.Random(7)
    truth = []
    # 30 s of 1 s reports from two nodes: 100 req/s each, 10 % failures on node b.
    for second in range(30):
        t0 = clock.now
        for node, fail in (("a", 0), ("b", 10)):
            values = [rng.uniform(1_000, 50_000) for _ in range(100 - fail)]
            truth.extend(values)
            store.ingest(report(node, delta(success=100 - fail, failures={"INTERNAL": fail} if fail else None,
                                            latencies_us=values, start=t0, end=t0 + 1, in_flight=3,
                                            queue_us=[100, 400])))
        clock.now += 1
    (sample,) = store.query(model="m", version=1, window_seconds=60)
    assert sample.request_count == 6000 and sample.failure_count == 300
    assert sample.qps == pytest.approx(200, rel=0.01)
    assert sample.success_rate == pytest.approx(0.95)
    truth.sort()
    assert sample.p99_latency_ms == pytest.approx(truth[int(0.99 * (len(truth) - 1))] / 1000, rel=0.02)
    assert sample.mean_queue_time_ms == pytest.approx(0.25)
    assert sample.p50_latency_ms == pytest.approx(truth[int(0.5 * (len(truth) - 1))] / 1000, rel=0.02)
    per_node = store.query(model="m", version=1, node="b", window_seconds=60)
    assert [s.node_id for s in per_node] == ["b"] and per_node[0].failure_count == 300
    assert per_node[0].resources.memory_total_bytes == 1 << 30
    # A 10 s window sees only the last 10 s (buckets of 1 s).
    (recent,) = store.query(model="m", window_seconds=10)
    assert recent.request_count == pytest.approx(2000, abs=200)
    assert recent.qps == pytest.approx(200, rel=0.05)
    signal = store.load_signal("m", 1)
    assert signal.reporting_replicas == 2 and signal.in_flight_per_replica == 3
    assert signal.qps == pytest.approx(200, rel=0.05) and signal.age_seconds <= 1.0


def test_rate_of_traffic_that_started_within_the_window_and_decays_after_it_stops():
    clock = Clock()
    store = MetricsStore(fine_bucket_seconds=1, clock=clock)
    # Idle intervals first: they do not dilute the rate of traffic that started later...
    for _ in range(20):
        store.ingest(report("a", delta(start=clock.now, end=clock.now + 1)))
        clock.now += 1
    for _ in range(10):
        store.ingest(report("a", delta(success=50, latencies_us=[1000] * 50, start=clock.now, end=clock.now + 1)))
        clock.now += 1
    (sample,) = store.query(model="m", window_seconds=60)
    assert sample.qps == pytest.approx(50, rel=0.01)
    # ...but idle intervals after it do: 10 s of traffic in 30 s covered.
    for _ in range(20):
        store.ingest(report("a", delta(start=clock.now, end=clock.now + 1)))
        clock.now += 1
    (sample,) = store.query(model="m", window_seconds=60)
    assert sample.qps == pytest.approx(500 / 30, rel=0.01)
    clock.now += 120
    (sample,) = store.query(model="m", window_seconds=60)
    assert sample.qps == 0 and sample.request_count == 0 and sample.success_rate == 1.0


def test_memory_is_bounded_by_buckets_series_and_labels():
    clock = Clock()
    store = MetricsStore(fine_bucket_seconds=1, fine_span_seconds=10, coarse_bucket_seconds=5, coarse_span_seconds=60,
                         max_series=50, idle_eviction_seconds=100, clock=clock)
    for i in range(200):
        store.ingest(report(f"node-{i}", delta(model=f"m{i}", success=1, failures={f"R{j}": 1 for j in range(40)})))
        clock.now += 0.1
    assert store.series_count == 50 and store.series_evicted == 150
    assert len(store.nodes()) == 50
    series = store.series()[-1]
    assert all(len(ring.slots) <= 13 for ring in series.rings)
    bucket = next(b for b in series.rings[0].slots if b is not None)
    assert len(bucket.failures) == MAX_REASONS and OTHER_REASON in bucket.failures
    assert sum(bucket.failures.values()) == 40
    # A long-running series keeps a fixed number of buckets.
    for _ in range(500):
        store.ingest(report("node-199", delta(model="m199", success=1)))
        clock.now += 1
    buckets = [b for ring in store.series()[-1].rings for b in ring.slots if b is not None]
    assert len(buckets) <= 11 + 13
    clock.now += 101
    store.ingest(report("fresh", delta(model="x", success=1)))
    assert store.evict_idle() == 49 and store.series_count == 1 and list(store.nodes()) == ["fresh"]


def test_query_grouping_node_only_and_unknown():
    clock = Clock()
    store = MetricsStore(clock=clock)
    store.ingest(report("a", delta("m", 1, success=1), delta("m", 2, success=2), delta("n", 1, success=3), cpu=42))
    store.ingest(report("idle", cpu=5))
    assert [(s.model, s.version) for s in store.query(window_seconds=60)] == [("m", 1), ("m", 2), ("n", 1)]
    assert [(s.model, s.version) for s in store.query(model="m", window_seconds=60)] == [("m", 1), ("m", 2)]
    node_samples = store.query(node="a", window_seconds=60)
    assert len(node_samples) == 3 and all(s.resources.cpu_percent == 42 for s in node_samples)
    (idle,) = store.query(node="idle", window_seconds=60)
    assert idle.resources.cpu_percent == 5 and idle.request_count == 0
    assert store.query(model="absent", window_seconds=60) == []
    signal = store.load_signal("absent", 1)
    assert signal.reporting_replicas == 0 and signal.age_seconds > 1e6
    # A delta without a model is not accepted.
    assert store.ingest(report("a", delta(model=""))) == 0


def test_timeline_has_one_point_per_fine_bucket():
    clock = Clock(1000.0)
    store = MetricsStore(fine_bucket_seconds=1, fine_span_seconds=10, clock=clock)
    for i in range(5):
        store.ingest(report("a", delta(success=10 * (i + 1), failures={"X": 1}, latencies_us=[2000], start=clock.now,
                                       end=clock.now + 1)))
        clock.now += 1
    points = store.timeline(store.series())
    assert len(points) == 10 and points[-1]["t"] == 1004.0
    assert [p["qps"] for p in points[-6:]] == [0.0, 11.0, 21.0, 31.0, 41.0, 51.0]
    assert points[-1]["error_rate"] == pytest.approx(1 / 51)
    assert points[-1]["p99_ms"] == pytest.approx(2.0, rel=0.01)


def test_gateway_and_node_reports_of_one_version_are_not_counted_twice():
    clock = Clock()
    store = MetricsStore(clock=clock)
    store.ingest(report("node-a", delta(success=90, failures={"INVALID_ARGUMENT": 10}, latencies_us=[1000] * 90,
                                        start=clock.now - 1, end=clock.now, in_flight=2)))
    gateway = mpb.ReportStatsRequest(
        reporter_kind=mpb.REPORTER_KIND_GATEWAY, reporter_id="gw-1",
        deltas=[delta(success=90, failures={"INVALID_ARGUMENT": 10, "UNAVAILABLE": 5}, latencies_us=[3000] * 90,
                      start=clock.now - 1, end=clock.now)],
    )
    store.ingest(gateway)
    # The version as a whole: the gateway's end-to-end view.
    (whole,) = store.query(model="m", version=1, window_seconds=60)
    assert whole.request_count == 105 and whole.failure_count == 15
    assert whole.p99_latency_ms == pytest.approx(3.0, rel=0.01)
    # Per reporter, each its own.
    assert [s.request_count for s in store.query(model="m", version=1, node="node-a", window_seconds=60)] == [100]
    # Replicas are nodes only.
    assert store.load_signal("m", 1).reporting_replicas == 1


def test_past_buckets_are_compacted_without_changing_answers():
    clock = Clock(5000.0)
    store = MetricsStore(fine_bucket_seconds=1, clock=clock)
    rng = random.Random(3)
    everything = LatencySketch()
    for _ in range(10):
        values = [rng.lognormvariate(9, 1) for _ in range(300)]
        everything.add_many(values)
        store.ingest(report("a", delta(success=300, latencies_us=values, queue_us=values[:10], start=clock.now,
                                       end=clock.now + 1)))
        clock.now += 1
    store.ingest(report("a", delta(start=clock.now, end=clock.now + 1)))  # moves the ring on
    fine = store.series()[0].rings[0]
    past = [b for b in fine.slots if b is not None and b.index < int(clock.now)]
    assert len(past) == 10 and all(b.frozen and type(b.latency).__name__ == "CompactSketch" for b in past)
    merged = store.aggregate(store.series(), 60).latency
    assert merged.to_sketch() == everything  # exact: compaction loses nothing
    for q in (0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0):
        assert merged.quantile(q) == everything.quantile(q)
