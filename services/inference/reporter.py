"""Streams per-interval statistics of an inference node to the monitor (`MonitorService.ReportStats`).

Every `stats_interval_seconds` the reporter closes the data plane's statistics windows (a
`StatsDelta` per model version: success and failure counts, latency and queue-time sketches, batch
sizes, in-flight and queued requests) and queues one `ReportStatsRequest` with the host's resource
use (CPU, memory, and GPU memory/utilization through NVML where a driver is present). A sender task
writes queued reports, oldest first, to one long-lived client stream.

Delivery (services.common.monitor_client.ReportFanOut): `monitor_address` may list several monitor
replicas ("a:8401,b:8401") and every report goes to every replica, each through its own bounded
buffer, stream and backoff, so an unreachable replica delays nothing and serving never waits for
the monitor (requests only update plain numbers in their ModelStats, services.inference.stats).

`stop()` closes the last windows, flushes them (bounded by `monitor_flush_timeout_seconds`) and
half-closes the stream, so the monitor's response reports how many deltas it accepted.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from aimaas.monitor.v1 import monitor_pb2 as mpb
from services.common.monitor_client import (
    MIN_WRITE_TIMEOUT_SECONDS,
    DeliverySettings,
    ReportFanOut,
    monitor_addresses,
)
from services.common.sketch import LatencySketch
from services.inference.settings import InferenceServerSettings
from services.inference.stats import ClosedWindow



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


class StatsReporter(ReportFanOut):
    """Collects statistics windows every interval and sends each report to every monitor replica
    (`ReportFanOut`); see the module docstring."""

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
        delivery = DeliverySettings(
            buffer_max_reports=settings.monitor_buffer_max_reports,
            retry_initial_seconds=settings.monitor_retry_initial_seconds,
            retry_max_seconds=settings.monitor_retry_max_seconds,
            write_timeout_seconds=max(MIN_WRITE_TIMEOUT_SECONDS, 2 * settings.stats_interval_seconds),
            flush_timeout_seconds=settings.monitor_flush_timeout_seconds,
        )
        super().__init__(addresses, delivery, logger=logger.bind(component="stats-reporter"))
        self.reporter_id = reporter_id
        self._interval = settings.stats_interval_seconds
        self._source = source
        self._log = logger.bind(component="stats-reporter", monitor=self.address)
        self._sampler = ResourceSampler(gpu=gpu, logger=self._log)
        self._collect_task: asyncio.Task[None] | None = None
        self._stopped = False

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:  # type: ignore[override]
        super().start()
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
        await self.close()
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
        self.enqueue(request)

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
