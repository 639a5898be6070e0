"""Per model-version statistics (the protocol's ModelStatistics) and the inference Prometheus metrics.

Semantics follow Triton's statistics extension:
- `success`/`fail`: requests, with their whole time inside the server (decode to response);
- `queue`: per executed request, its wait in the batcher;
- `compute_input`/`compute_infer`/`compute_output`: per executed request, the durations of the batch
  it ran in (merging inputs / running the model / splitting and encoding outputs), so their counts
  equal the number of executed requests;
- `inference_count` counts rows (a batch of 8 rows counts 8), `execution_count` counts executions;
- `batch_stats`: per executed batch size (rows), the number of executions and their durations;
- `last_inference`: milliseconds since the epoch of the last execution.

With a monitor configured, each ModelStats also keeps the current reporting window (`StatsWindow`:
counts, latency and queue-time sketches, batch sizes since the last report); the stats reporter closes
it every interval with `close_window()`, which swaps in a fresh one (services.inference.reporter).

Updates happen on the event loop thread only (the batcher reports timings back to it), so plain
numbers suffice. The Prometheus metrics (counters, gauges and histograms) are read from these objects
when scraped (`InferenceCollector`): the request path takes no locks and does no label lookups.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from inference import grpc_predict_v2_pb2 as pb
from services.common.sketch import LatencySketch

_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_SECONDS_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass(slots=True)
class _BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class _Histogram:
    """A Prometheus-style histogram on plain integers: observing is a bisect and an increment.

    prometheus_client's Histogram takes a lock per bucket and per sum on every observation, which is
    a noticeable share of a sub-millisecond request; these are exported at scrape time instead.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. Prometheus' "le" bucket.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def exported(self) -> tuple[list[tuple[str, float]], float]:
        counts, total = list(self.counts), self.sum
        buckets, cumulative = [], 0
        for bound, count in zip(self.bounds, counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        buckets.append(("+Inf", cumulative + counts[-1]))
        return buckets, total


class StatsWindow:
    """What one model version did since the last report: the monitor's StatsDelta before encoding.

    `latency` holds the in-server time of successful requests and `queue_time` the batcher wait of
    executed ones, in microseconds; `batch_sizes` maps rows per execution to executions.
    """

    __slots__ = ("batch_sizes", "failures", "latency", "queue_time", "started_ns", "success")

    def __init__(self, started_ns: int) -> None:
        # Wall clock (time.time_ns()) of the window's start.
        self.started_ns = started_ns
        self.success = 0
        self.failures: dict[str, int] = {}
        self.latency = LatencySketch()
        self.queue_time = LatencySketch()
        self.batch_sizes: dict[int, int] = {}


@dataclass(frozen=True, slots=True)
class ClosedWindow:
    """A finished window of one model version, with the gauges read when it closed."""

    name: str
    version: str
    window: StatsWindow
    ended_ns: int
    in_flight: int
    queued: int


class ModelStats:
    """Cumulative statistics of one loaded model version (reset when it is reloaded, as in Triton)."""

    def __init__(
        self,
        name: str,
        version: str,
        *,
        backend: str = "",
        memory_bytes: int = 0,
        memory_type: str = "CPU",
        queued: Callable[[], int] = lambda: 0,
        windowed: bool = False,
    ) -> None:
        """`windowed`: also keep per-interval windows for the stats reporter (a monitor is configured)."""
        self.name = name
        self.version = version
        self.backend = backend
        self.memory_bytes = memory_bytes
        # "CPU" or "GPU": where the backend keeps the model.
        self.memory_type = memory_type
        # Requests waiting in the batcher right now.
        self.queued = queued
        # Requests inside the server for this version right now (decode to response).
        self.in_flight: Callable[[], int] = lambda: 0
        # The open reporting window; None when no monitor is configured.
        self.window: StatsWindow | None = StatsWindow(time.time_ns()) if windowed else None
        self.success = Duration()
        self.fail = Duration()
        # Failed requests by reason (a lower-case status code name, or "cancelled").
        self.failures: dict[str, int] = {}
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self._batches: dict[int, _BatchDurations] = {}
        # Prometheus histograms (seconds; rows per execution).
        self.request_seconds = _Histogram(_SECONDS_BUCKETS)
        self.queue_seconds = _Histogram(_SECONDS_BUCKETS)
        self.compute_seconds = {phase: _Histogram(_SECONDS_BUCKETS) for phase in ("input", "infer", "output")}
        self.batch_rows = _Histogram(_ROWS_BUCKETS)

    def record_success(self, total_ns: int) -> None:
        self.success.add(total_ns)
        self.request_seconds.observe(total_ns / 1e9)
        window = self.window
        if window is not None:
            window.success += 1
            window.latency.add(total_ns / 1000)

    def record_failure(self, total_ns: int, reason: str) -> None:
        self.fail.add(total_ns)
        self.failures[reason] = self.failures.get(reason, 0) + 1
        window = self.window
        if window is not None:
            window.failures[reason] = window.failures.get(reason, 0) + 1

    def record_queue(self, queue_ns: int) -> None:
        self.queue.add(queue_ns)
        self.queue_seconds.observe(queue_ns / 1e9)
        window = self.window
        if window is not None:
            window.queue_time.add(queue_ns / 1000)

    def record_execution(self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One batch of `rows` rows from `requests` requests ran with these phase durations."""
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        batch = self._batches.get(rows)
        if batch is None:
            batch = self._batches[rows] = _BatchDurations()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)
        self.batch_rows.observe(rows)
        compute = self.compute_seconds
        compute["input"].observe(input_ns / 1e9)
        compute["infer"].observe(infer_ns / 1e9)
        compute["output"].observe(output_ns / 1e9)
        window = self.window
        if window is not None:
            window.batch_sizes[rows] = window.batch_sizes.get(rows, 0) + 1

    def close_window(self, now_ns: int | None = None) -> ClosedWindow | None:
        """End the open window at `now_ns` (wall clock, default now) and open the next one; None when
        this ModelStats keeps no windows. Event loop thread only, like every update."""
        window = self.window
        if window is None:
            return None
        now_ns = time.time_ns() if now_ns is None else now_ns
        self.window = StatsWindow(now_ns)
        return ClosedWindow(self.name, self.version, window, now_ns, self.in_flight(), self.queued())

    def to_proto(self) -> pb.ModelStatistics:
        return pb.ModelStatistics(
            name=self.name,
            version=self.version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.to_proto(),
                fail=self.fail.to_proto(),
                queue=self.queue.to_proto(),
                compute_input=self.compute_input.to_proto(),
                compute_infer=self.compute_infer.to_proto(),
                compute_output=self.compute_output.to_proto(),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=durations.compute_input.to_proto(),
                    compute_infer=durations.compute_infer.to_proto(),
                    compute_output=durations.compute_output.to_proto(),
                )
                for size, durations in sorted(self._batches.items())
            ],
            memory_usage=[pb.MemoryUsage(type=self.memory_type, id=0, byte_size=self.memory_bytes)],
        )


class InferenceCollector:
    """The inference metrics of the loaded model versions, read from their ModelStats at scrape time.

    Series restart from zero when a version is reloaded and vanish when it is unloaded (Prometheus
    rate() handles the reset); the request path updates nothing but plain numbers for them.
    Runs on the scraping thread: it only reads numbers and snapshots of lists and dicts.
    """

    def __init__(self, source: Callable[[], Iterable[ModelStats]]) -> None:
        self._source = source

    def _families(self) -> dict[str, Metric]:
        labels = ["model", "version"]
        return {
            "requests": CounterMetricFamily(
                "aimaas_inference_requests",
                "Inference requests by outcome: success, or the failure reason (status code name)",
                labels=[*labels, "outcome"],
            ),
            "inferences": CounterMetricFamily(
                "aimaas_inference_inferences", "Inferences performed (rows; a batch of N counts N)", labels=labels
            ),
            "executions": CounterMetricFamily(
                "aimaas_inference_executions", "Model executions (a batch counts once)", labels=labels
            ),
            "pending": GaugeMetricFamily(
                "aimaas_inference_pending_requests", "Requests waiting in the batcher", labels=labels
            ),
            "memory": GaugeMetricFamily(
                "aimaas_inference_model_memory_bytes", "Memory held by a loaded model version, measured at load",
                labels=[*labels, "backend"],
            ),
            "loaded": GaugeMetricFamily(
                "aimaas_inference_loaded_models", "Model versions loaded, by backend", labels=["backend"]
            ),
            "request_seconds": HistogramMetricFamily(
                "aimaas_inference_request_seconds", "Time of a successful request inside the server", labels=labels
            ),
            "queue_seconds": HistogramMetricFamily(
                "aimaas_inference_queue_seconds", "Time a request waited in the batcher", labels=labels
            ),
            "compute_seconds": HistogramMetricFamily(
                "aimaas_inference_compute_seconds",
                "Duration of one batch execution by phase: input (merge), infer (model), output (split, encode)",
                labels=[*labels, "phase"],
            ),
            "batch_rows": HistogramMetricFamily("aimaas_inference_batch_rows", "Rows per execution", labels=labels),
        }

    def describe(self) -> Iterator[Metric]:
        return iter(self._families().values())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        loaded: dict[str, int] = {}
        for stats in list(self._source()):
            labels = [stats.name, stats.version]
            families["requests"].add_metric([*labels, "success"], stats.success.count)
            for reason, count in list(stats.failures.items()):
                families["requests"].add_metric([*labels, reason], count)
            families["inferences"].add_metric(labels, stats.inference_count)
            families["executions"].add_metric(labels, stats.execution_count)
            families["pending"].add_metric(labels, stats.queued())
            families["memory"].add_metric([*labels, stats.backend], stats.memory_bytes)
            loaded[stats.backend] = loaded.get(stats.backend, 0) + 1
            for key, histogram in (
                ("request_seconds", stats.request_seconds),
                ("queue_seconds", stats.queue_seconds),
                ("batch_rows", stats.batch_rows),
            ):
                buckets, total = histogram.exported()
                families[key].add_metric(labels, buckets, total)
            for phase, histogram in stats.compute_seconds.items():
                buckets, total = histogram.exported()
                families["compute_seconds"].add_metric([*labels, phase], buckets, total)
        for backend, count in sorted(loaded.items()):
            families["loaded"].add_metric([backend], count)
        return iter(families.values())
