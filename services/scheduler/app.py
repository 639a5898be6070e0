"""Composition root of the scheduler process: builds every dependency once and wires them.

Every replica serves the API (health SERVING whenever etcd answers, leader or not); one replica,
elected through etcd, reconciles. See leadership.py and reconciler.py.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Counter, Gauge, Histogram

from aimaas.scheduler.v1 import scheduler_pb2
from services.common.grpc_server import serve_until_signal
from services.common.aio import run_service
from services.common.etcd import EtcdClient
from services.common.grpc_server import GrpcService
from services.common.logs import configure_logging
from services.common.metrics import Metrics, MetricsEndpoint
from services.common.settings import load_settings
from services.common.tracing import Telemetry, setup_telemetry
from services.scheduler.autoscaler import (
    Autoscaler,
    FallbackSignalSource,
    MonitorSignalSource,
    NodeStatsSignalSource,
    SignalSource,
)
from services.scheduler.canary import CanaryMetricsSource, MonitorCanaryMetrics
from services.scheduler.core import DeploymentService
from services.scheduler.leadership import Leadership
from services.scheduler.planner import Plan
from services.scheduler.probe import NodeProbe
from services.scheduler.reconciler import Reconciler
from services.scheduler.servicer import SchedulerServicer, register
from services.scheduler.settings import SchedulerServerSettings, SchedulerSettings

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name


class SchedulerMetrics:
    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.leader = Gauge("aimaas_scheduler_leader", "1 while this scheduler leads and reconciles", registry=registry)
        self.terms = Counter("aimaas_scheduler_leader_terms_total", "Terms of leadership started", registry=registry)
        self.passes = Histogram(
            "aimaas_scheduler_reconcile_seconds", "Duration of a reconcile pass (plan and writes)", registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.writes = Counter(
            "aimaas_scheduler_writes_total", "Records written by reconcile passes", ["kind"], registry=registry
        )

    def leading(self, leading: bool) -> None:
        self.leader.set(1 if leading else 0)
        if leading:
            self.terms.inc()

    def observe_pass(self, seconds: float, plan: Plan) -> None:
        self.passes.observe(seconds)
        self.writes.labels("assignment_put").inc(len(plan.assignment_puts))
        self.writes.labels("assignment_delete").inc(len(plan.assignment_deletes))
        self.writes.labels("status_put").inc(len(plan.status_puts))


def signal_source(settings: SchedulerServerSettings) -> SignalSource | None:
    """The monitor's load signal, with node-reported statistics as the fallback (see autoscaler.py)."""
    node_stats = NodeStatsSignalSource() if settings.node_stats_fallback else None
    if settings.monitor_address:
        monitor = MonitorSignalSource(settings.monitor_address, max_age_seconds=settings.signal_max_age_seconds)
        return FallbackSignalSource(monitor, node_stats) if node_stats is not None else monitor
    return node_stats


class SchedulerApp:
    """The running scheduler: start() binds, serves and campaigns; stop() shuts down gracefully."""

    def __init__(
        self,
        settings: SchedulerSettings,
        *,
        telemetry: Telemetry | None = None,
        load_signal: SignalSource | None = None,
        canary_metrics: CanaryMetricsSource | None = None,
    ) -> None:
        """`load_signal` replaces the configured load signal source (monitor / node statistics);
        `canary_metrics` the canary's metrics source (the monitor's QueryMetrics)."""
        self.settings = settings
        config = settings.scheduler
        self.log = configure_logging(settings.log, "scheduler")
        self.telemetry = telemetry or setup_telemetry(settings.telemetry, "scheduler")
        self.metrics = Metrics()
        self.scheduler_metrics = SchedulerMetrics(self.metrics)
        self.etcd = EtcdClient(settings.etcd)
        self.autoscaler = Autoscaler(
            load_signal if load_signal is not None else signal_source(config),
            up_window_seconds=config.scale_up_stabilization_seconds,
            down_window_seconds=config.scale_down_stabilization_seconds,
            scale_to_zero_after_seconds=config.scale_to_zero_after_seconds,
            logger=self.log,
        )
        if canary_metrics is None and config.monitor_address:
            canary_metrics = MonitorCanaryMetrics(config.monitor_address)
        self.canary_metrics = canary_metrics
        self.reconciler = Reconciler(
            self.etcd, config, self.autoscaler, logger=self.log, metrics=self.scheduler_metrics,
            canary_metrics=canary_metrics, node_probe=NodeProbe(timeout_seconds=max(1.0, config.node_grace_probe_seconds)),
        )  # fmt: skip
        self.leadership = Leadership(
            self.etcd,
            self.reconciler,
            self.autoscaler,
            ttl_seconds=settings.etcd.session_ttl_seconds,
            logger=self.log,
            on_change=self.scheduler_metrics.leading,
        )
        self.service = DeploymentService(
            self.etcd, self.leadership, max_replicas_limit=config.max_replicas_limit,
            canary_enabled=canary_metrics is not None, instance_types=config.instance_types, logger=self.log,
        )  # fmt: skip
        self.grpc = GrpcService(
            config,
            metrics=self.metrics,
            telemetry=self.telemetry,
            logger=self.log,
            # Followers serve reads and spec writes: readiness is etcd's, not leadership.
            health_checks=[self.etcd.ping],
        )
        self.grpc.add_service(SERVICE_NAME, register(SchedulerServicer(self.service)))
        # Resign before in-flight calls drain, so a follower takes over at once.
        self.grpc.on_shutdown(self.leadership.stop)
        self.metrics_endpoint = (
            MetricsEndpoint(self.metrics.registry, config.host, config.metrics_port) if config.metrics_port >= 0 else None
        )

    @property
    def is_leader(self) -> bool:
        return self.leadership.is_leader

    async def start(self) -> None:
        await self.etcd.connect()
        await self.grpc.start()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.start()
        self.leadership.start(self.settings.scheduler.advertise_address or self.grpc.address)
        self.log.info(
            "scheduler started",
            grpc=self.grpc.address,
            metrics_port=self.metrics_endpoint.port if self.metrics_endpoint else None,
        )

    async def stop(self) -> None:
        await self.grpc.stop()
        await self.leadership.stop()
        await self.autoscaler.close()
        if self.canary_metrics is not None:
            await self.canary_metrics.close()
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.stop)
        await self.etcd.close()
        self.telemetry.shutdown()
        self.log.info("scheduler stopped")


async def serve(settings: SchedulerSettings) -> None:
    await serve_until_signal(SchedulerApp(settings))


def main() -> None:
    run_service(serve(load_settings(SchedulerSettings)))
