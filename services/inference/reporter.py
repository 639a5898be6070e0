"""Streams per-interval statistics of an inference node to the monitor (`MonitorService.ReportStats`).

Every `stats_interval_seconds` the reporter closes the data plane's statistics windows (a
`StatsDelta` per model version: success and failure counts, latency and queue-time sketches, batch
sizes, in-flight and queued requests) and queues one `ReportStatsRequest` with the host's resource
use (CPU, memory, and GPU memory/utilization through NVML where a driver is present). A sender task
writes queued reports, oldest first, to one long-lived client stream.

High availability: `monitor_address` may list several monitor replicas ("a:8401,b:8401"); every
report goes to every replica, each through its own buffer, stream and backoff, so a dead replica
delays nothing and every live replica holds the full statistics (services/monitor/README.md).

Serving never waits for the monitor: requests only update plain numbers in their ModelStats
(services.inference.stats); everything here runs in two background tasks. When the monitor is
unreachable, reports wait in a bounded buffer (the oldest are dropped beyond
`monitor_buffer_max_reports`) and the stream is reopened with exponential backoff; one WARNING is
logged per outage (and one when reports start being dropped), not one per attempt.

Delivery avoids duplicates (the monitor sums deltas, so a duplicate would be worse than a gap): a
report leaves the buffer once its write succeeds and only reports whose write failed are retried. A
client stream has no per-message acknowledgement, so reports written just before a connection breaks
(at most the transport's window) can be lost.

`stop()` closes the last windows, flushes them (bounded by `monitor_flush_timeout_seconds`) and
half-closes the stream, so the monitor's response reports how many deltas it accepted.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import psutil

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from services.common.aio import Backoff
from services.common.sketch import LatencySketch
from services.inference.settings import InferenceServerSettings
from services.inference.stats import ClosedWindow

# A write that cannot complete in this long means a stuck connection (a dead peer filling the window).
_MIN_WRITE_TIMEOUT_SECONDS = 10.0
# Waiting for the monitor's response after half-closing the stream at shutdown (within the flush timeout).
_CLOSE_TIMEOUT_SECONDS = 1.0


def standalone_reporter_id(address: str, advertise_address: str = "") -> str:
    """`host:port` of a standalone node: its advertised address, or its listen address with a
    wildcard host replaced by the hostname."""
    if advertise_address:
        return advertise_address
    host, sep, port = address.rpartition(":")
    if sep and host in ("0.0.0.0", "[::]", "::", ""):
        return f"{socket.gethostname()}:{port}"
    return address


def deltas(windows: Iterable[ClosedWindow]) -> list[mpb.StatsDelta]:
    """One StatsDelta per model version: windows of the same version (an instance replaced by a
    reload, and its successor) are summed, sketches merged, the interval spanning both."""
    merged: dict[tuple[str, int], mpb.StatsDelta] = {}
    sketches: dict[tuple[str, int], tuple[LatencySketch, LatencySketch]] = {}
    spans: dict[tuple[str, int], list[int]] = {}
    for closed in windows:
        if not closed.version.isdigit():
            continue  # the monitor's versions are numbers (both repository kinds only use numbers)
        key = (closed.name, int(closed.version))
        window = closed.window
        delta = merged.get(key)
        if delta is None:
            delta = merged[key] = mpb.StatsDelta(model=closed.name, version=key[1])
            sketches[key] = (window.latency.copy(), window.queue_time.copy())
            spans[key] = [window.started_ns, closed.ended_ns]
        else:
            latency, queue_time = sketches[key]
            latency.merge(window.latency)
            queue_time.merge(window.queue_time)
            span = spans[key]
            span[0], span[1] = min(span[0], window.started_ns), max(span[1], closed.ended_ns)
        delta.success_count += window.success
        for reason, count in window.failures.items():
            delta.failure_counts[reason.upper()] += count
        for rows, count in window.batch_sizes.items():
            delta.batch_sizes[rows] += count
        delta.in_flight += closed.in_flight
        delta.queued += closed.queued
    result = []
    for key in sorted(merged):
        delta = merged[key]
        latency, queue_time = sketches[key]
        delta.latency.CopyFrom(latency.to_proto())
        delta.queue_time.CopyFrom(queue_time.to_proto())
        delta.interval_start.FromNanoseconds(spans[key][0])
        delta.interval_end.FromNanoseconds(spans[key][1])
        result.append(delta)
    return result


class NvmlGpus:
    """Memory and utilization of every GPU on the host through NVML (nvidia-ml-py), summed (memory) and
    averaged (utilization). `sample()` is None where there is no NVML library, driver or device: after
    the first failure it stops asking (GPU figures are then absent, not zero)."""

    def __init__(self) -> None:
        self._handles: list[Any] | None = None
        self.failure: str | None = None

    def sample(self) -> tuple[int, int, float] | None:
        if self.failure is not None:
            return None
        try:
            import pynvml

            if self._handles is None:
                pynvml.nvmlInit()
                self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            if not self._handles:
                self.failure = "no GPU devices"
                return None
            used = total = 0
            utilization = 0.0
            for handle in self._handles:
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                used += int(memory.used)
                total += int(memory.total)
                utilization += float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            return used, total, utilization / len(self._handles)
        except Exception as exc:  # noqa: BLE001 - NVML absent or broken: GPU figures are optional
            self.failure = f"{type(exc).__name__}: {exc}"
            return None


class ResourceSampler:
    """Host CPU and memory (psutil) and GPU memory and utilization: through NVML wherever it works (any
    node with an NVIDIA driver), else, on GPU nodes (`gpu=True`), device memory from the CUDA runtime.
    Blocking: call off the loop.

    CPU use is the busy share of all CPUs since the previous sample, computed from its own
    `psutil.cpu_times()` snapshots (psutil.cpu_percent keeps one process-wide baseline that other
    callers would disturb).
    """

    def __init__(self, *, gpu: bool = False, logger: Any = None, nvml: NvmlGpus | None = None) -> None:
        self._gpu = gpu
        self._log = logger
        self._nvml = nvml if nvml is not None else NvmlGpus()
        self._last = psutil.cpu_times()

    @staticmethod
    def _busy_total(times: Any) -> tuple[float, float]:
        total = sum(times)
        idle = times.idle + getattr(times, "iowait", 0.0)
        return total - idle, total

    def sample(self) -> mpb.ResourceUsage:
        now = psutil.cpu_times()
        busy0, total0 = self._busy_total(self._last)
        busy1, total1 = self._busy_total(now)
        self._last = now
        elapsed = total1 - total0
        cpu = max(0.0, min(100.0, 100.0 * (busy1 - busy0) / elapsed)) if elapsed > 0 else 0.0
        memory = psutil.virtual_memory()
        usage = mpb.ResourceUsage(
            cpu_percent=round(cpu, 2),
            memory_used_bytes=max(0, memory.total - memory.available),
            memory_total_bytes=memory.total,
        )
        gpus = self._nvml.sample()
        if gpus is not None:
            usage.gpu_memory_used_bytes, usage.gpu_memory_total_bytes = gpus[0], gpus[1]
            usage.gpu_utilization_percent = round(gpus[2], 2)
        elif self._gpu:
            self._sample_gpu(usage)
        return usage

    def _sample_gpu(self, usage: mpb.ResourceUsage) -> None:
        from services.inference.backends import cuda

        try:
            gpus = cuda.detect_gpus()
            if not gpus:
                return
            free, total = cuda.memory_info(gpus[0].index)
        except Exception as exc:  # noqa: BLE001 - GPU figures are optional; stop asking after a failure
            self._gpu = False
            if self._log is not None:
                self._log.info("GPU memory is not reported to the monitor", error=str(exc))
            return
        usage.gpu_memory_total_bytes = total
        usage.gpu_memory_used_bytes = max(0, total - free)


class _StreamBroken(Exception):
    """The stream ended or a write failed; the message says how. `clean`: the monitor ended it with OK."""

    def __init__(self, reason: str, *, clean: bool = False) -> None:
        super().__init__(reason)
        self.clean = clean


def monitor_addresses(value: str) -> list[str]:
    """The monitor addresses of `monitor_address`: one host:port, or several separated by commas (every
    monitor replica gets every report, so losing one loses no statistics; see services/monitor/README.md)."""
    addresses = []
    for part in value.split(","):
        part = part.strip()
        if part and part not in addresses:
            addresses.append(part)
    return addresses


class _Destination:
    """One monitor address: its own buffer, channel and client stream, so a slow or dead monitor never
    holds back the others."""

    def __init__(self, address: str, *, buffer_max: int, retry: tuple[float, float], write_timeout: float,
                 flush_timeout: float, logger: Any) -> None:
        self.address = address
        self._buffer_max = buffer_max
        self._retry_initial, self._retry_max = retry
        self._write_timeout = write_timeout
        self._flush_timeout = flush_timeout
        self._log = logger.bind(monitor=address)
        self.buffer: deque[mpb.ReportStatsRequest] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._channel: grpc.aio.Channel | None = None
        self._stub: mpb_grpc.MonitorServiceStub | None = None
        self.task: asyncio.Task[None] | None = None
        self.connected = False
        self._outage_logged = False
        self._drop_logged = False
        self.reports_sent = 0
        self.reports_dropped = 0
        self.connections = 0
        self.outages = 0

    def start(self) -> None:
        backoff_ms = int(self._retry_initial * 1000)
        options = [
            # The channel's own reconnection follows our backoff, so a returning monitor is found soon.
            ("grpc.initial_reconnect_backoff_ms", max(100, backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", max(100, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", max(100, int(self._retry_max * 1000))),
            # Notice a vanished monitor host; 5 minutes is the ping rate servers accept by default.
            ("grpc.keepalive_time_ms", 300_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.enable_retries", 0),
        ]
        self._channel = grpc.aio.insecure_channel(self.address, options=options)
        self._stub = mpb_grpc.MonitorServiceStub(self._channel)
        self.task = asyncio.get_running_loop().create_task(self._send_loop(), name=f"stats-reporter-send-{self.address}")

    def close_soon(self) -> None:
        self._closing = True
        self._wake.set()

    async def close_channel(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def enqueue(self, request: mpb.ReportStatsRequest) -> None:
        if len(self.buffer) >= self._buffer_max:
            self.buffer.popleft()
            self.reports_dropped += 1
            if not self._drop_logged:
                self._drop_logged = True
                self._log.warning(
                    "monitor unreachable and the report buffer is full; dropping the oldest reports",
                    max_reports=self._buffer_max,
                )
        self.buffer.append(request)
        self._wake.set()

    async def _send_loop(self) -> None:
        backoff = Backoff(self._retry_initial, self._retry_max)
        while True:
            if self._closing and not self.buffer:
                return
            if not self.buffer:
                self._wake.clear()
                await self._wake.wait()
                continue
            assert self._stub is not None
            call = self._stub.ReportStats(wait_for_ready=False)
            try:
                await self._stream(call, backoff)
                return  # closing, everything written
            except _StreamBroken as exc:
                if exc.clean:
                    # The monitor finished the stream on purpose (e.g. rebalancing): reopen at once.
                    self.connected = False
                    self._log.info("the monitor closed the statistics stream; reopening")
                    await asyncio.sleep(self._retry_initial)
                    continue
                self._disconnected(str(exc))
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - whatever broke the stream, reconnect
                self._disconnected(f"{type(exc).__name__}: {exc}")
            call.cancel()
            if self._closing and self._flush_timeout <= 0:
                return
            await asyncio.sleep(backoff.next())

    async def _stream(self, call: Any, backoff: Backoff) -> None:
        """Write queued reports to `call` until closing with an empty buffer; _StreamBroken when it fails."""
        while True:
            while not self.buffer:
                if self._closing:
                    await self._close(call)
                    return
                self._wake.clear()
                await self._wake.wait()
            if call.done():
                raise await self._ended(call)
            request = self.buffer.popleft()
            try:
                await asyncio.wait_for(call.write(request), self._write_timeout)
            except BaseException as exc:
                self._requeue(request)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if isinstance(exc, TimeoutError):
                    raise _StreamBroken(f"a write took longer than {self._write_timeout:.0f}s") from None
                if isinstance(exc, grpc.aio.AioRpcError):
                    raise _StreamBroken(f"{exc.code().name}: {exc.details()}") from None
                if isinstance(exc, asyncio.InvalidStateError):
                    raise await self._ended(call) from None
                raise
            self.reports_sent += 1
            if not self.connected:
                self._reconnected()
                backoff.reset()

    def _requeue(self, request: mpb.ReportStatsRequest) -> None:
        """Put a report that was not written back in front (unless newer ones filled the buffer)."""
        if len(self.buffer) < self._buffer_max:
            self.buffer.appendleft(request)
        else:
            self.reports_dropped += 1

    @staticmethod
    async def _ended(call: Any) -> _StreamBroken:
        code = await call.code()
        details = await call.details()
        return _StreamBroken(
            f"the stream ended: {code.name}{f': {details}' if details else ''}", clean=code is grpc.StatusCode.OK
        )

    async def _close(self, call: Any) -> None:
        """Half-close and wait briefly for the monitor's summary."""
        try:
            await asyncio.wait_for(call.done_writing(), _CLOSE_TIMEOUT_SECONDS)
            response = await asyncio.wait_for(call, _CLOSE_TIMEOUT_SECONDS)
        except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self._log.debug("closing the monitor stream did not complete", error=str(exc) or type(exc).__name__)
            call.cancel()
            return
        self._log.debug("monitor stream closed", accepted_deltas=response.accepted_deltas)

    def _reconnected(self) -> None:
        self.connected = True
        self.connections += 1
        if self._outage_logged:
            self._log.info(
                "monitor reachable again; statistics stream re-established",
                pending=len(self.buffer),
                reports_dropped=self.reports_dropped,
            )
        elif self.connections == 1:
            self._log.info("statistics stream to the monitor established")
        self._outage_logged = False
        self._drop_logged = False

    def _disconnected(self, reason: str) -> None:
        was_connected, self.connected = self.connected, False
        if not self._outage_logged:
            self._outage_logged = True
            self.outages += 1
            self._log.warning(
                "monitor unreachable; buffering statistics and reconnecting in the background",
                reason=reason,
                was_connected=was_connected,
                pending=len(self.buffer),
            )
        else:
            self._log.debug("monitor still unreachable", reason=reason, pending=len(self.buffer))


class StatsReporter:
    """Collects statistics windows every interval and streams them to every monitor address; see the
    module docstring. With several addresses (`monitor_address` = "a:8401,b:8401") each report goes to
    each monitor through its own buffer and stream; the counters below are sums over the monitors."""

    def __init__(
        self,
        settings: InferenceServerSettings,
        *,
        source: Callable[[], list[ClosedWindow]],
        reporter_id: str,
        logger: Any,
        gpu: bool = False,
    ) -> None:
        """`source`: closes and returns the statistics windows (`DataPlane.close_stats_windows`).
        `gpu`: also report device memory (the node runs a GPU backend)."""
        addresses = monitor_addresses(settings.monitor_address)
        if not addresses:
            raise ValueError("the stats reporter needs settings.monitor_address")
        self.address = ",".join(addresses)
        self.addresses = addresses
        self.reporter_id = reporter_id
        self._interval = settings.stats_interval_seconds
        self._flush_timeout = settings.monitor_flush_timeout_seconds
        self._source = source
        self._log = logger.bind(component="stats-reporter", monitor=self.address)
        self._sampler = ResourceSampler(gpu=gpu, logger=self._log)
        self.destinations = [
            _Destination(
                address,
                buffer_max=settings.monitor_buffer_max_reports,
                retry=(settings.monitor_retry_initial_seconds, settings.monitor_retry_max_seconds),
                write_timeout=max(_MIN_WRITE_TIMEOUT_SECONDS, 2 * self._interval),
                flush_timeout=self._flush_timeout,
                logger=logger.bind(component="stats-reporter"),
            )
            for address in addresses
        ]
        self._collect_task: asyncio.Task[None] | None = None
        self._stopped = False

    # Observable counters (logs, tests): sums over the monitors.
    @property
    def reports_sent(self) -> int:
        return sum(d.reports_sent for d in self.destinations)

    @property
    def reports_dropped(self) -> int:
        return sum(d.reports_dropped for d in self.destinations)

    @property
    def connections(self) -> int:
        return sum(d.connections for d in self.destinations)

    @property
    def outages(self) -> int:
        return sum(d.outages for d in self.destinations)

    @property
    def pending(self) -> int:
        """Reports waiting to be written (to the monitor furthest behind)."""
        return max(len(d.buffer) for d in self.destinations)

    @property
    def connected(self) -> bool:
        """Whether every monitor's stream is up."""
        return all(d.connected for d in self.destinations)

    @property
    def _buffer(self) -> deque[mpb.ReportStatsRequest]:
        return self.destinations[0].buffer

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        for destination in self.destinations:
            destination.start()
        self._collect_task = asyncio.get_running_loop().create_task(self._collect_loop(), name="stats-reporter-collect")
        self._log.info("streaming statistics to the monitor", interval_seconds=self._interval, reporter_id=self.reporter_id)

    async def stop(self) -> None:
        """Report the last interval, flush (bounded by monitor_flush_timeout_seconds), close the streams."""
        if self._stopped:
            return
        self._stopped = True
        if self._collect_task is not None:
            self._collect_task.cancel()
            await asyncio.wait([self._collect_task])
        try:
            await self.collect()
        except Exception:  # noqa: BLE001 - shutdown goes on without the last report
            self._log.exception("could not collect the last statistics")
        for destination in self.destinations:
            destination.close_soon()
        sends = [d.task for d in self.destinations if d.task is not None]
        if sends:
            _, pending = await asyncio.wait(sends, timeout=self._flush_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for destination in self.destinations:
            if destination.buffer:
                self._log.warning(
                    "statistics not delivered to the monitor at shutdown",
                    monitor=destination.address,
                    reports=len(destination.buffer),
                )
            await destination.close_channel()
        self._log.info(
            "stats reporter stopped", reports_sent=self.reports_sent, reports_dropped=self.reports_dropped
        )

    # -- collecting ------------------------------------------------------------------------------------

    async def collect(self) -> None:
        """Close the statistics windows now and queue one report for every monitor (the interval loop
        calls this)."""
        resources = await asyncio.to_thread(self._sampler.sample)
        request = mpb.ReportStatsRequest(
            reporter_kind=mpb.REPORTER_KIND_INFERENCE_NODE,
            reporter_id=self.reporter_id,
            deltas=deltas(self._source()),
            resources=resources,
        )
        for destination in self.destinations:
            destination.enqueue(request)

    async def _collect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self._interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            # On a fixed schedule: a slow round does not shift every later interval.
            next_at += self._interval
            now = loop.time()
            if next_at <= now:
                next_at = now + self._interval
            try:
                await self.collect()
            except Exception:  # noqa: BLE001 - a bad round must not end reporting
                self._log.exception("collecting statistics failed")
