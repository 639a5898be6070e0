"""Composition root of the monitor process: builds every dependency once and wires them.

Every replica ingests every report (reporters send to all monitor addresses), answers QueryMetrics,
GetLoadSignal, rule CRUD, ListAlerts/WatchAlerts (from its etcd mirror of the alert state) and serves
the dashboard and /metrics; the replica leading the `monitor` election also evaluates alert rules and
sends notifications. See README.md.
"""

from __future__ import annotations

import asyncio
import contextlib

from aimaas.monitor.v1 import monitor_pb2
from services.common.aio import run_service
from services.common.auth import ApiKeyStore, Authenticator
from services.common.etcd import EtcdClient
from services.common.grpc_server import GrpcService, serve_until_signal
from services.common.logs import configure_logging
from services.common.metrics import Metrics, MetricsEndpoint
from services.common.settings import load_settings
from services.common.tracing import Telemetry, setup_telemetry
from services.monitor.aggregation import MetricsStore
from services.monitor.alerts import AlertEngine, AlertLeadership, AlertView, ClusterView, Evaluator, Notifier
from services.monitor.dashboard import DashboardServer, Overview, build_dashboard_app
from services.monitor.exposition import AggregateCollector
from services.monitor.rules import RuleStore
from services.monitor.servicer import MonitorServicer, register
from services.monitor.settings import MonitorSettings

SERVICE_NAME = monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name


class MonitorApp:
    """The running monitor: start() binds and serves; stop() shuts down gracefully."""

    def __init__(self, settings: MonitorSettings, *, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        config = settings.monitor
        self.log = configure_logging(settings.log, "monitor")
        self.telemetry = telemetry or setup_telemetry(settings.telemetry, "monitor")
        self.metrics = Metrics()
        self.etcd = EtcdClient(settings.etcd)
        self.windows = config.window_seconds()
        self.store = MetricsStore(
            fine_bucket_seconds=config.fine_bucket_seconds,
            fine_span_seconds=max(self.windows.values()) / 12,  # the 5m window
            coarse_bucket_seconds=config.coarse_bucket_seconds,
            coarse_span_seconds=max(self.windows.values()),  # the 1h window
            max_series=config.max_series,
            idle_eviction_seconds=max(self.windows.values()),
            replica_stale_seconds=config.replica_stale_seconds,
            load_window_seconds=self.windows[monitor_pb2.WINDOW_1M],
        )
        self.rules = RuleStore(self.etcd)
        self.alert_view = AlertView(self.etcd, logger=self.log)
        self.cluster = ClusterView(self.etcd, max_age_seconds=min(1.0, config.evaluation_interval_seconds))
        self.notifier = Notifier(
            logger=self.log,
            timeout_seconds=config.webhook_timeout_seconds,
            max_attempts=config.webhook_max_attempts,
            retry_initial_seconds=config.webhook_retry_initial_seconds,
            retry_max_seconds=config.webhook_retry_max_seconds,
        )
        self.engine = AlertEngine(
            self.etcd,
            self.rules,
            Evaluator(self.store, window_seconds=self.windows, node_stale_seconds=config.replica_stale_seconds),
            self.cluster,
            self.notifier,
            logger=self.log,
            resolved_retention_seconds=config.resolved_retention_seconds,
        )
        self.leadership = AlertLeadership(
            self.etcd,
            self.engine,
            interval_seconds=config.evaluation_interval_seconds,
            ttl_seconds=settings.etcd.session_ttl_seconds,
            logger=self.log,
        )
        self.grpc = GrpcService(config, metrics=self.metrics, telemetry=self.telemetry, logger=self.log)
        self.servicer = MonitorServicer(self.store, self.rules, self.alert_view, window_seconds=self.windows)
        self.grpc.add_service(SERVICE_NAME, register(self.servicer))
        # Resign before in-flight calls drain, so another replica evaluates alerts at once; end the
        # endless streams (reports, watches) so the drain does not wait for them.
        self.grpc.on_shutdown(self.leadership.stop)
        self.grpc.on_shutdown(self._end_streams)
        self.collector = AggregateCollector(
            self.store, self.alert_view, window_seconds=self.windows, is_leader=lambda: self.leadership.is_leader
        )
        self.metrics.registry.register(self.collector)
        self.metrics_endpoint = (
            MetricsEndpoint(self.metrics.registry, config.host, config.metrics_port) if config.metrics_port >= 0 else None
        )
        self.api_keys = ApiKeyStore(self.etcd, max_ttl_seconds=config.auth.max_key_ttl_seconds)
        self.authenticator = Authenticator(self.api_keys if config.auth.enabled else None, config.auth)
        self.dashboard = (
            DashboardServer(
                build_dashboard_app(
                    Overview(
                        self.store,
                        self.cluster,
                        self.alert_view,
                        window_seconds=self.windows[monitor_pb2.WINDOW_1M],
                        stale_seconds=config.replica_stale_seconds,
                        is_leader=lambda: self.leadership.is_leader,
                        rules=self.rules,
                    ),
                    self.authenticator,
                ),
                config.host,
                config.dashboard_port,
            )
            if config.dashboard_port >= 0
            else None
        )
        self._housekeeping: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def address(self) -> str:
        return self.grpc.address

    @property
    def is_leader(self) -> bool:
        return self.leadership.is_leader

    async def start(self) -> None:
        config = self.settings.monitor
        await self.etcd.connect()
        await self.grpc.start()
        if self.metrics_endpoint is not None:
            self.collector.refresh()
            self.metrics_endpoint.start()
        if config.auth.enabled:
            await self.api_keys.start()
        if self.dashboard is not None:
            await self.dashboard.start()
        self.alert_view.start()
        self.leadership.start(config.advertise_address or self.grpc.address)
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep(), name="monitor-housekeeping")
        self.log.info(
            "monitor started",
            grpc=self.grpc.address,
            dashboard_port=self.dashboard.port if self.dashboard else None,
            metrics_port=self.metrics_endpoint.port if self.metrics_endpoint else None,
            auth=config.auth.enabled,
        )

    async def _end_streams(self) -> None:
        self.servicer.stop_streams()

    async def _housekeep(self) -> None:
        # Exposition snapshots and idle-series eviction run on the loop that owns the store.
        interval = min(5.0, self.settings.monitor.fine_bucket_seconds)
        while True:
            await asyncio.sleep(interval)
            try:
                self.store.evict_idle()
                if self.metrics_endpoint is not None:
                    await self.collector.arefresh()
            except Exception:  # noqa: BLE001 - housekeeping must go on
                self.log.exception("monitor housekeeping failed")

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.grpc.stop()
        await self.leadership.stop()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self.dashboard is not None:
            await self.dashboard.stop()
        await self.alert_view.stop()
        await self.api_keys.stop()
        await self.notifier.close()
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.stop)
        await self.etcd.close()
        self.telemetry.shutdown()
        self.log.info("monitor stopped")


async def serve(settings: MonitorSettings) -> None:
    await serve_until_signal(MonitorApp(settings))


def main() -> None:
    run_service(serve(load_settings(MonitorSettings)))
