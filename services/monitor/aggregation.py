"""In-memory aggregation of reported statistics: bounded time-bucketed ring buffers per series.

A series is one (model, version, reporter) triple. Each series keeps two rings of buckets: a fine
ring (`fine_bucket_seconds`, spanning 5 minutes by default) answering the 1m and 5m windows and the
charts, and a coarse ring (`coarse_bucket_seconds`, spanning an hour) answering 1h. A bucket holds the
sums of every delta received while it was current (monitor clock): success count, failures by
reason, a mergeable latency sketch, queue-time count and sum (only its mean is served), batch sizes,
plus the reporter-clock span of the
deltas with traffic, from which rates are computed.

Memory is bounded whatever the runtime or traffic: the number of buckets per series is fixed, a
sketch's size is bounded by the latency range (not the request count), batch sizes and failure
reasons are capped per bucket, a bucket's sketches are compacted into dense arrays once its time
has passed (CompactSketch), series idle for longer than the retention are evicted, and past
`max_series` the least recently reported series is evicted first.

Rates: qps = requests / covered time, where the covered time runs from the start of the first
reporting interval with traffic to the end of the last reported interval, clipped to the window.
For steady traffic this equals requests / window; for traffic that started within the window it is
the rate since it started (a node that just began serving is not reported at a fraction of its rate);
once traffic stops, the empty intervals still reported make the rate decay to zero.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from aimaas.monitor.v1 import monitor_pb2 as mpb
from services.common.errors import InvalidArgument
from services.common.sketch import DEFAULT_ALPHA, LatencySketch

# Distinct failure reasons / batch sizes kept per bucket; the rest are folded into one entry, so a
# reporter sending garbage labels cannot grow memory.
MAX_REASONS = 16
MAX_BATCH_SIZES = 64
OTHER_REASON = "OTHER"

WINDOW_SECONDS = {mpb.WINDOW_1M: 60.0, mpb.WINDOW_5M: 300.0, mpb.WINDOW_1H: 3600.0}
WINDOW_NAMES = {mpb.WINDOW_1M: "1m", mpb.WINDOW_5M: "5m", mpb.WINDOW_1H: "1h"}


class CompactSketch:
    """A LatencySketch that will not change any more, as a dense array of counts from its lowest index:
    4 bytes per bucket instead of a dict entry and an int object (~90 bytes). Buckets of the rings are
    compacted once their time has passed, which keeps a full hour of them small and lets queries merge
    them with vector adds."""

    __slots__ = ("alpha", "offset", "counts", "zero_count", "count", "sum_us")

    def __init__(
        self, alpha: float, offset: int, counts: np.ndarray, zero_count: int = 0, count: int = 0, sum_us: float = 0.0
    ) -> None:
        self.alpha, self.offset, self.counts = alpha, offset, counts
        self.zero_count, self.count, self.sum_us = zero_count, count, sum_us

    @classmethod
    def from_proto(cls, message: mpb.LatencySketch) -> CompactSketch:
        """As LatencySketch.from_proto (alpha 0 means the default; count at least the bucket total),
        vectorized: reports are the monitor's hot path."""
        alpha = message.alpha or DEFAULT_ALPHA
        size = len(message.buckets)
        zero = int(message.zero_count)
        if not size:
            return cls(alpha, 0, np.zeros(0, np.int64), zero, max(int(message.count), zero), float(message.sum_us))
        keys = np.fromiter(message.buckets.keys(), np.int64, size)
        values = np.fromiter(message.buckets.values(), np.int64, size)
        offset = int(keys.min())
        counts = np.zeros(int(keys.max()) - offset + 1, np.int64)
        np.add.at(counts, keys - offset, values)
        count = max(int(message.count), zero + int(values.sum()))
        return cls(alpha, offset, counts, zero, count, float(message.sum_us))

    @classmethod
    def from_dense(cls, dense: DenseSketch) -> CompactSketch:
        """The final form of a bucket's sketch: trimmed to its non-zero range, 4-byte counts."""
        nonzero = np.flatnonzero(dense.counts)
        if not len(nonzero):
            return cls(dense.alpha, 0, np.zeros(0, np.uint32), dense.zero_count, dense.count, dense.sum_us)
        low, high = int(nonzero[0]), int(nonzero[-1])
        counts = dense.counts[low : high + 1]
        counts = counts.astype(np.uint32) if int(counts.max()) < 2**32 else counts.copy()
        return cls(dense.alpha, dense.base + low, counts, dense.zero_count, dense.count, dense.sum_us)


class DenseSketch:
    """The merge target of queries: counts in one growable int64 array, so merging a compacted bucket is
    one vector add. Quantiles follow LatencySketch exactly (same ranks, same bucket estimates)."""

    __slots__ = ("alpha", "base", "counts", "zero_count", "count", "sum_us")

    def __init__(self, alpha: float = DEFAULT_ALPHA) -> None:
        self.alpha = alpha
        self.base = 0
        self.counts = np.zeros(0, np.int64)
        self.zero_count = 0
        self.count = 0
        self.sum_us = 0.0

    def _cover(self, low: int, high: int) -> None:
        """Grow the array to hold indexes low..high (inclusive)."""
        if not len(self.counts):
            self.base, self.counts = low, np.zeros(high - low + 1, np.int64)
            return
        top = self.base + len(self.counts) - 1
        if low >= self.base and high <= top:
            return
        new_base, new_top = min(low, self.base), max(high, top)
        grown = np.zeros(new_top - new_base + 1, np.int64)
        grown[self.base - new_base : self.base - new_base + len(self.counts)] = self.counts
        self.base, self.counts = new_base, grown

    def _check(self, alpha: float) -> None:
        if not math.isclose(alpha, self.alpha, rel_tol=1e-12, abs_tol=0.0):
            raise ValueError(f"cannot merge sketches of different accuracy (alpha {self.alpha} and {alpha})")

    def merge(self, source: LatencySketch | CompactSketch | DenseSketch) -> None:
        self._check(source.alpha)
        if isinstance(source, (CompactSketch, DenseSketch)):
            offset = source.offset if isinstance(source, CompactSketch) else source.base
            if len(source.counts):
                self._cover(offset, offset + len(source.counts) - 1)
                start = offset - self.base
                self.counts[start : start + len(source.counts)] += source.counts
        elif source.buckets:
            self._cover(min(source.buckets), max(source.buckets))
            counts, base = self.counts, self.base
            for key, value in source.buckets.items():
                counts[key - base] += value
        self.zero_count += source.zero_count
        self.count += source.count
        self.sum_us += source.sum_us

    def quantile(self, q: float) -> float | None:
        """As LatencySketch.quantile: the estimate of the order statistic of rank floor(q·(count-1))."""
        if self.count == 0:
            return None
        rank = q * (self.count - 1)
        if self.zero_count > rank:
            return 0.0
        if not len(self.counts):
            return 0.0
        cumulative = np.cumsum(self.counts) + self.zero_count
        position = int(np.searchsorted(cumulative, rank, side="right"))
        position = min(position, len(self.counts) - 1)
        return self.estimate(self.base + position)

    def estimate(self, index: int) -> float:
        gamma = (1.0 + self.alpha) / (1.0 - self.alpha)
        return 2.0 * gamma**index / (gamma + 1.0)

    def to_sketch(self) -> LatencySketch:
        sketch = LatencySketch(self.alpha)
        sketch.buckets = {self.base + int(i): int(self.counts[i]) for i in np.flatnonzero(self.counts)}
        sketch.zero_count, sketch.count, sketch.sum_us = self.zero_count, self.count, self.sum_us
        return sketch


class _Bucket:
    __slots__ = (
        "index", "success", "failures", "latency", "queue_count", "queue_sum_us", "batch_sizes", "first_active_ns",
        "last_end_ns", "frozen",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.success = 0
        self.failures: dict[str, int] = {}
        # Created on the first delta that carries values (most buckets of idle series stay light).
        # DenseSketch while the bucket is current, CompactSketch once its time has passed.
        self.latency: DenseSketch | CompactSketch | None = None
        self.queue_count = 0
        self.queue_sum_us = 0.0
        self.batch_sizes: dict[int, int] = {}
        self.first_active_ns = 0
        self.last_end_ns = 0
        self.frozen = False

    def freeze(self) -> None:
        """Compact the sketch of a bucket whose time has passed (it receives no more deltas)."""
        if isinstance(self.latency, DenseSketch):
            self.latency = CompactSketch.from_dense(self.latency)
        self.frozen = True

    def add(self, delta: mpb.StatsDelta, latency: CompactSketch) -> None:
        failures = sum(delta.failure_counts.values())
        self.success += delta.success_count
        for reason, count in delta.failure_counts.items():
            if reason not in self.failures and len(self.failures) >= MAX_REASONS - 1:
                reason = OTHER_REASON  # the last slot is reserved for the rest
            self.failures[reason] = self.failures.get(reason, 0) + count
        if latency.count:
            if self.latency is None:
                self.latency = DenseSketch(latency.alpha)
            self.latency.merge(latency)  # type: ignore[union-attr]  # a current bucket is never compacted
        self.queue_count += delta.queue_time.count
        self.queue_sum_us += delta.queue_time.sum_us
        for size, count in delta.batch_sizes.items():
            if size not in self.batch_sizes and len(self.batch_sizes) >= MAX_BATCH_SIZES:
                size = max(self.batch_sizes)
            self.batch_sizes[size] = self.batch_sizes.get(size, 0) + count
        start_ns = delta.interval_start.ToNanoseconds()
        end_ns = delta.interval_end.ToNanoseconds()
        if delta.success_count + failures and start_ns > 0:
            self.first_active_ns = start_ns if not self.first_active_ns else min(self.first_active_ns, start_ns)
        self.last_end_ns = max(self.last_end_ns, end_ns)


class _Ring:
    """`count` buckets of `seconds` each; a slot is reused (reset) when its index comes round again."""

    __slots__ = ("seconds", "slots")

    def __init__(self, seconds: float, count: int) -> None:
        self.seconds = seconds
        self.slots: list[_Bucket | None] = [None] * count

    def index_of(self, now: float) -> int:
        return int(now // self.seconds)

    def current(self, now: float) -> _Bucket:
        index = self.index_of(now)
        slot = index % len(self.slots)
        bucket = self.slots[slot]
        if bucket is None or bucket.index != index:
            bucket = self.slots[slot] = _Bucket(index)
            # Time moved on: every other bucket of this ring is final now.
            for other in self.slots:
                if other is not None and not other.frozen and other is not bucket:
                    other.freeze()
        return bucket

    def recent(self, now: float, seconds: float) -> Iterable[_Bucket]:
        """Buckets of the last `seconds` (the current bucket included)."""
        newest = self.index_of(now)
        oldest = newest - max(1, math.ceil(seconds / self.seconds)) + 1
        for bucket in self.slots:
            if bucket is not None and oldest <= bucket.index <= newest:
                yield bucket


@dataclass
class Series:
    model: str
    version: int
    node: str
    rings: tuple[_Ring, ...]
    kind: int = mpb.REPORTER_KIND_INFERENCE_NODE
    last_report: float = 0.0
    in_flight: int = 0
    queued: int = 0


@dataclass
class Aggregate:
    """Merged buckets of one or more series over a window."""

    window_seconds: float
    success: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latency: DenseSketch = field(default_factory=DenseSketch)
    queue_count: int = 0
    queue_sum_us: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    first_active_ns: int = 0
    last_end_ns: int = 0

    def add(self, bucket: _Bucket) -> None:
        self.success += bucket.success
        for reason, count in bucket.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + count
        if bucket.latency is not None:
            self.latency.merge(bucket.latency)
        self.queue_count += bucket.queue_count
        self.queue_sum_us += bucket.queue_sum_us
        for size, count in bucket.batch_sizes.items():
            self.batch_sizes[size] = self.batch_sizes.get(size, 0) + count
        if bucket.first_active_ns:
            self.first_active_ns = (
                bucket.first_active_ns if not self.first_active_ns else min(self.first_active_ns, bucket.first_active_ns)
            )
        self.last_end_ns = max(self.last_end_ns, bucket.last_end_ns)

    @property
    def failure_count(self) -> int:
        return sum(self.failures.values())

    @property
    def requests(self) -> int:
        return self.success + self.failure_count

    @property
    def covered_seconds(self) -> float:
        if not self.first_active_ns or self.last_end_ns <= self.first_active_ns:
            return self.window_seconds
        return min(self.window_seconds, (self.last_end_ns - self.first_active_ns) / 1e9)

    @property
    def qps(self) -> float:
        requests = self.requests
        return requests / max(self.covered_seconds, 1e-3) if requests else 0.0

    @property
    def error_rate(self) -> float:
        requests = self.requests
        return self.failure_count / requests if requests else 0.0

    @property
    def success_rate(self) -> float:
        requests = self.requests
        return self.success / requests if requests else 1.0

    def latency_ms(self, q: float) -> float:
        value = self.latency.quantile(q)
        return value / 1000.0 if value is not None else 0.0

    def mean_queue_ms(self) -> float:
        return self.queue_sum_us / self.queue_count / 1000.0 if self.queue_count else 0.0

    def to_sample(self, model: str, version: int, node: str) -> mpb.MetricsSample:
        return mpb.MetricsSample(
            model=model,
            version=version,
            node_id=node,
            qps=self.qps,
            success_rate=self.success_rate,
            p50_latency_ms=self.latency_ms(0.50),
            p95_latency_ms=self.latency_ms(0.95),
            p99_latency_ms=self.latency_ms(0.99),
            mean_queue_time_ms=self.mean_queue_ms(),
            batch_sizes=self.batch_sizes,
            request_count=self.requests,
            failure_count=self.failure_count,
        )


@dataclass
class LoadSignal:
    in_flight_per_replica: float
    mean_queue_time_ms: float
    qps: float
    reporting_replicas: int
    age_seconds: float


@dataclass
class NodeResources:
    usage: mpb.ResourceUsage
    kind: int
    last_report: float


def preferred(series: Iterable[Series]) -> list[Series]:
    """The series that describe a model version as a whole, without counting a request twice: the
    gateways' (end-to-end, including failures that never reached a replica) when any gateway reports
    the version, else the inference nodes'."""
    members = list(series)
    gateways = [s for s in members if s.kind == mpb.REPORTER_KIND_GATEWAY]
    return gateways or members


class MetricsStore:
    """Every series and reporter this monitor has heard from; not thread-safe (one event loop)."""

    def __init__(
        self,
        *,
        fine_bucket_seconds: float = 5.0,
        fine_span_seconds: float = 300.0,
        coarse_bucket_seconds: float = 60.0,
        coarse_span_seconds: float = 3600.0,
        max_series: int = 5000,
        idle_eviction_seconds: float = 3600.0,
        replica_stale_seconds: float = 15.0,
        load_window_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if fine_bucket_seconds <= 0 or coarse_bucket_seconds < fine_bucket_seconds:
            raise ValueError("bucket seconds must be positive, coarse >= fine")
        self._ring_specs = (
            (fine_bucket_seconds, max(1, math.ceil(fine_span_seconds / fine_bucket_seconds)) + 1),
            (coarse_bucket_seconds, max(1, math.ceil(coarse_span_seconds / coarse_bucket_seconds)) + 1),
        )
        self.fine_bucket_seconds = fine_bucket_seconds
        self._fine_span = fine_span_seconds
        self._max_series = max_series
        self._idle = idle_eviction_seconds
        self._stale = replica_stale_seconds
        self._load_window = load_window_seconds
        self._clock = clock
        # Least recently reported first (moved to the end on every report): eviction order.
        self._series: OrderedDict[tuple[str, int, str], Series] = OrderedDict()
        self._nodes: OrderedDict[str, NodeResources] = OrderedDict()
        self.deltas_accepted = 0
        self.series_evicted = 0
        self.last_report = 0.0

    # -- ingest ----------------------------------------------------------------------------------------

    def ingest(self, request: mpb.ReportStatsRequest) -> int:
        """Add one report's deltas; returns how many were accepted (a delta without a model is not).
        InvalidArgument, with nothing added, when a sketch cannot be merged (another accuracy)."""
        now = self._clock()
        reporter = request.reporter_id or "unknown"
        accepted = 0
        for delta in request.deltas:
            alpha = delta.latency.alpha or DEFAULT_ALPHA
            if not math.isclose(alpha, DEFAULT_ALPHA, rel_tol=1e-12, abs_tol=0.0):
                raise InvalidArgument(
                    f"latency sketch of {delta.model}:{delta.version} has alpha {alpha}; this monitor merges "
                    f"sketches of alpha {DEFAULT_ALPHA} only"
                )
        for delta in request.deltas:
            if not delta.model:
                continue
            key = (delta.model, int(delta.version), reporter)
            series = self._series.get(key)
            if series is None:
                series = Series(
                    delta.model, int(delta.version), reporter, tuple(_Ring(s, n) for s, n in self._ring_specs),
                    request.reporter_kind or mpb.REPORTER_KIND_INFERENCE_NODE,
                )
                self._series[key] = series
                self._evict_over_limit()
            else:
                self._series.move_to_end(key)
            latency = CompactSketch.from_proto(delta.latency)
            for ring in series.rings:
                ring.current(now).add(delta, latency)
            series.last_report = now
            series.in_flight = delta.in_flight
            series.queued = delta.queued
            accepted += 1
        if request.HasField("resources") or request.deltas:
            self._nodes[reporter] = NodeResources(mpb.ResourceUsage(), request.reporter_kind, now)
            self._nodes[reporter].usage.CopyFrom(request.resources)
            self._nodes.move_to_end(reporter)
            while len(self._nodes) > self._max_series:
                self._nodes.popitem(last=False)
        self.deltas_accepted += accepted
        self.last_report = now
        return accepted

    def _evict_over_limit(self) -> None:
        while len(self._series) > self._max_series:
            self._series.popitem(last=False)
            self.series_evicted += 1

    def evict_idle(self) -> int:
        """Drop series and reporters silent for longer than the idle limit (their buckets are all old)."""
        cutoff = self._clock() - self._idle
        evicted = 0
        while self._series:
            key, series = next(iter(self._series.items()))
            if series.last_report >= cutoff:
                break
            del self._series[key]
            evicted += 1
        while self._nodes:
            node, resources = next(iter(self._nodes.items()))
            if resources.last_report >= cutoff:
                break
            del self._nodes[node]
        self.series_evicted += evicted
        return evicted

    # -- queries ---------------------------------------------------------------------------------------

    @property
    def series_count(self) -> int:
        return len(self._series)

    def series(self) -> list[Series]:
        return list(self._series.values())

    def _ring_for(self, window_seconds: float) -> int:
        return 0 if window_seconds <= self._fine_span else 1

    def aggregate(self, series: Iterable[Series], window_seconds: float) -> Aggregate:
        now = self._clock()
        ring = self._ring_for(window_seconds)
        result = Aggregate(window_seconds)
        for one in series:
            for bucket in one.rings[ring].recent(now, window_seconds):
                result.add(bucket)
        return result

    def select(self, model: str = "", version: int = 0, node: str = "") -> list[Series]:
        return [
            s
            for s in self._series.values()
            if (not model or s.model == model) and (not version or s.version == version) and (not node or s.node == node)
        ]

    def query(
        self, *, model: str = "", version: int = 0, node: str = "", window_seconds: float = 60.0
    ) -> list[mpb.MetricsSample]:
        """One sample per group: with a node (or node only), one per series of that node; with
        model+version, the version's merge across reporters (see `preferred`); with model only, one per
        version; with nothing, one per model version. Node queries also carry the node's resource use."""
        return [sample for sample in self._query(model, version, node, window_seconds) if sample is not None]

    async def aquery(
        self, *, model: str = "", version: int = 0, node: str = "", window_seconds: float = 60.0
    ) -> list[mpb.MetricsSample]:
        """`query` for the event loop: yields to other tasks between groups, so a query over thousands
        of series never holds up reports or the etcd session's keep-alive."""
        samples = []
        for sample in self._query(model, version, node, window_seconds):
            if sample is None:
                await asyncio.sleep(0)
            else:
                samples.append(sample)
        return samples

    def _query(self, model: str, version: int, node: str, window_seconds: float) -> Iterator[mpb.MetricsSample | None]:
        """The samples of `query`, with None between groups (a point where the caller may yield)."""
        matched = self.select(model, version, node)
        groups: dict[tuple[str, int, str], list[Series]] = {}
        for s in matched:
            groups.setdefault((s.model, s.version, s.node if node else ""), []).append(s)
        found = False
        for (g_model, g_version, g_node), members in sorted(groups.items()):
            aggregate = self.aggregate(members if g_node else preferred(members), window_seconds)
            sample = aggregate.to_sample(g_model, g_version, g_node)
            if g_node and g_node in self._nodes:
                sample.resources.CopyFrom(self._nodes[g_node].usage)
            found = True
            yield sample
            yield None
        if node and not model and node in self._nodes and not found:
            # A node that serves nothing still reports its resources.
            sample = mpb.MetricsSample(node_id=node, success_rate=1.0)
            sample.resources.CopyFrom(self._nodes[node].usage)
            yield sample

    def load_signal(self, model: str, version: int) -> LoadSignal:
        now = self._clock()
        # Replicas are inference nodes; gateways do not hold requests in flight for a replica.
        every = [s for s in self.select(model, version) if s.kind != mpb.REPORTER_KIND_GATEWAY]
        members = [s for s in every if now - s.last_report <= self._stale]
        if not members:
            age = now - max((s.last_report for s in every), default=0.0) if every else float("inf")
            return LoadSignal(0.0, 0.0, 0.0, 0, age if math.isfinite(age) else 1e9)
        aggregate = self.aggregate(members, self._load_window)
        return LoadSignal(
            in_flight_per_replica=sum(s.in_flight for s in members) / len(members),
            mean_queue_time_ms=aggregate.mean_queue_ms(),
            qps=aggregate.qps,
            reporting_replicas=len(members),
            age_seconds=max(0.0, now - max(s.last_report for s in members)),
        )

    def timeline(self, series: Iterable[Series], points: int | None = None) -> list[dict[str, float]]:
        """Per complete fine bucket (oldest first): time, qps, error rate and p99 of the merged series."""
        now = self._clock()
        seconds = self.fine_bucket_seconds
        count = points or int(self._fine_span // seconds)
        # The current bucket is still filling: charts end at the last complete one.
        newest = int(now // seconds) - 1
        merged: dict[int, Aggregate] = {}
        members = list(series)
        for one in members:
            for bucket in one.rings[0].recent(now, (count + 1) * seconds):
                merged.setdefault(bucket.index, Aggregate(seconds)).add(bucket)
        result = []
        for index in range(newest - count + 1, newest + 1):
            aggregate = merged.get(index)
            if aggregate is None:
                result.append({"t": index * seconds, "qps": 0.0, "error_rate": 0.0, "p99_ms": 0.0})
                continue
            # Per bucket the rate is over the bucket's length (charts want a steady time base).
            result.append(
                {
                    "t": index * seconds,
                    "qps": aggregate.requests / seconds,
                    "error_rate": aggregate.error_rate,
                    "p99_ms": aggregate.latency_ms(0.99),
                }
            )
        return result

    def nodes(self) -> dict[str, NodeResources]:
        return dict(self._nodes)

    def resources(self, node: str) -> NodeResources | None:
        return self._nodes.get(node)
