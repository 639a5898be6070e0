"""Per-deployment request statistics of the gateway: Prometheus metrics, and (with a monitor
configured) one `ReportStats` report per interval (`REPORTER_KIND_GATEWAY`, a StatsDelta per
deployment version: successes, failures by status code, end-to-end latency sketch).

Requests only update plain numbers; a background task closes the windows every interval and hands
the report to every monitor replica (services.common.monitor_client.ReportFanOut: bounded buffer,
reconnect with backoff, one WARNING per outage), as inference nodes do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import Counter, Histogram

from aimaas.monitor.v1 import monitor_pb2 as mpb
from services.common.metrics import Metrics
from services.common.monitor_client import (
    MIN_WRITE_TIMEOUT_SECONDS,
    DeliverySettings,
    ReportFanOut,
    monitor_addresses,
)
from services.common.sketch import LatencySketch


@dataclass
class _Window:
    started_ns: int = field(default_factory=time.time_ns)
    success: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latency: LatencySketch = field(default_factory=LatencySketch)


class GatewayStats:
    def __init__(
        self,
        metrics: Metrics,
        monitor_address: str,
        *,
        reporter_id: str,
        interval_seconds: float,
        logger: structlog.stdlib.BoundLogger,
    ) -> None:
        """`monitor_address`: the monitor replicas (comma-separated); empty: Prometheus metrics only."""
        addresses = monitor_addresses(monitor_address)
        self.reports = (
            ReportFanOut(
                addresses,
                DeliverySettings(write_timeout_seconds=max(MIN_WRITE_TIMEOUT_SECONDS, 2 * interval_seconds)),
                logger=logger.bind(component="gateway-stats"),
            )
            if addresses
            else None
        )
        self._reporter_id = reporter_id
        self._interval = interval_seconds
        self._log = logger
        self._windows: dict[tuple[str, int], _Window] = {}
        self._task: asyncio.Task[None] | None = None
        self._ok_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.requests = Counter(
            "aimaas_gateway_requests_total", "Inference requests routed, by deployment, version and status code",
            ["deployment", "version", "code"], registry=metrics.registry,
        )
        self.retries = Counter(
            "aimaas_gateway_retries_total", "Calls retried on another replica, by deployment and the failed attempt's code",
            ["deployment", "code"], registry=metrics.registry,
        )
        self.seconds = Histogram(
            "aimaas_gateway_request_seconds", "End-to-end inference time through the gateway, by deployment",
            ["deployment"], registry=metrics.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def _window(self, deployment: str, version: int) -> _Window:
        key = (deployment, version)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        return window

    def success(self, deployment: str, version: int, seconds: float) -> None:
        # Bound label children, cached: a labels() lookup costs more than the increment itself.
        children = self._ok_children.get((deployment, version))
        if children is None:
            children = self._ok_children[(deployment, version)] = (
                self.requests.labels(deployment, str(version), "OK"),
                self.seconds.labels(deployment),
            )
        children[0].inc()
        children[1].observe(seconds)
        if self.reports is not None:
            window = self._window(deployment, version)
            window.success += 1
            window.latency.add(seconds * 1e6)

    def retry(self, deployment: str, code: str) -> None:
        self.retries.labels(deployment, code).inc()

    def failure(self, deployment: str, version: int, code: str, seconds: float) -> None:
        self.requests.labels(deployment, str(version), code).inc()
        self.seconds.labels(deployment).observe(seconds)
        if self.reports is not None:
            failures = self._window(deployment, version).failures
            failures[code] = failures.get(code, 0) + 1

    def take(self) -> list[mpb.StatsDelta]:
        """Close the current windows: one delta per deployment version that saw requests."""
        windows, self._windows = self._windows, {}
        now = time.time_ns()
        deltas = []
        for (deployment, version), window in sorted(windows.items()):
            delta = mpb.StatsDelta(model=deployment, version=version, success_count=window.success)
            for code, count in window.failures.items():
                delta.failure_counts[code] = count
            delta.latency.CopyFrom(window.latency.to_proto())
            delta.interval_start.FromNanoseconds(window.started_ns)
            delta.interval_end.FromNanoseconds(now)
            deltas.append(delta)
        return deltas

    def start(self) -> None:
        if self.reports is not None:
            self.reports.start()
            self._task = asyncio.create_task(self._run(), name="gateway-stats-reporter")

    async def stop(self) -> None:
        """Report the last interval, flush it (bounded), close the streams."""
        if self._task is None or self.reports is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self.report()
        await self.reports.close()

    def report(self) -> int:
        """Close the windows and queue one report for every monitor replica; the number of deltas."""
        deltas = self.take()
        if deltas and self.reports is not None:
            self.reports.enqueue(
                mpb.ReportStatsRequest(reporter_kind=mpb.REPORTER_KIND_GATEWAY, reporter_id=self._reporter_id, deltas=deltas)
            )
        return len(deltas)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.report()
            except Exception:  # noqa: BLE001 - statistics never take serving down
                self._log.exception("reporting gateway statistics failed")
