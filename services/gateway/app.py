"""Composition root of the gateway: builds every dependency once and wires them.

etcd client → routing table (watched) and API-key store (watched) → authenticator → upstream
channels, scale-from-zero holder → the one data plane → gRPC edge (port 8001: inference routed,
registry/scheduler/monitor passed through, AuthService) and the HTTP app (port 8000, built by
`services.gateway.http_app.build_http_app`) under uvicorn → Prometheus /metrics (port 8002).

Shutdown (SIGTERM): health NOT_SERVING → HTTP stops accepting and drains → in-flight gRPC calls
drain (grace period) → watchers and channels close.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from typing import Any

import grpc

from aimaas.auth.v1 import auth_pb2
from aimaas.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from aimaas.registry.v1 import registry_pb2, registry_pb2_grpc
from aimaas.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from inference import grpc_predict_v2_pb2 as pb
from services.common.aio import run_service
from services.common.auth import (
    AUTH_SERVICE_NAME,
    ApiKeyStore,
    Authenticator,
    AuthServicer,
    GrpcAuthInterceptor,
    method_permission,
)
from services.common.auth import register as register_auth
from services.common.etcd import EtcdClient, EtcdError
from services.common.grpc_server import GrpcService, reflection_pool_of, serve_until_signal
from services.common.logs import configure_logging
from services.common.monitor_client import monitor_channel
from services.common.metrics import Metrics, MetricsEndpoint
from services.common.settings import load_settings
from services.common.tracing import Telemetry, setup_telemetry
from services.gateway.dataplane import GatewayDataPlane
from services.gateway.grpc_edge import (
    server_version,
    INFERENCE_SERVICE,
    PASSTHROUGH_SERVICES,
    GatewayInferenceServicer,
    Passthrough,
    Unconfigured,
    register_inference,
)
from services.gateway.rest.tasks import TaskCatalog
from services.gateway.routing import RoutingTable, RoutingWatcher
from services.gateway.settings import GatewaySettings
from services.gateway.stats import GatewayStats
from services.gateway.upstream import Upstream, ZeroScaler


def _read(path: Any) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class GatewayApp:
    """The running gateway: start() binds and serves both ports; stop() shuts down gracefully."""

    def __init__(self, settings: GatewaySettings, *, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        config = settings.gateway
        self.log = configure_logging(settings.log, "gateway")
        self.telemetry = telemetry or setup_telemetry(settings.telemetry, "gateway")
        self.metrics = Metrics()
        self.etcd = EtcdClient(settings.etcd)
        self.api_keys = ApiKeyStore(self.etcd, max_ttl_seconds=config.auth.max_key_ttl_seconds)
        self.authenticator = Authenticator(self.api_keys, config.auth)
        self.upstream = Upstream(
            eject_seconds=config.replica_eject_seconds,
            max_message_bytes=config.limits.max_body_bytes,
            interceptors=self.telemetry.client_interceptors(),
            poll_seconds=config.upstream_poll_microseconds / 1e6,
        )
        self.routing = RoutingWatcher(self.etcd, logger=self.log, on_change=self._routing_changed, probe=self.upstream.probe,
                                      grace_seconds=config.replica_grace_seconds, probe_seconds=config.replica_grace_probe_seconds)
        interceptors = self.telemetry.client_interceptors() or None
        options = [
            ("grpc.max_receive_message_length", config.limits.max_body_bytes),
            ("grpc.max_send_message_length", config.limits.max_body_bytes),
        ]
        self.registry_channel = grpc.aio.insecure_channel(config.registry_address, options=options, interceptors=interceptors)
        self.scheduler_channel = grpc.aio.insecure_channel(config.scheduler_address, options=options, interceptors=interceptors)
        # Queries and pass-through calls go to one monitor replica that answers; reports to each.
        self.monitor_channel = (
            monitor_channel(config.monitor_address, options=options, interceptors=interceptors)
            if config.monitor_address
            else None
        )
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.registry_channel)
        self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(self.scheduler_channel)
        self.monitor = monitor_pb2_grpc.MonitorServiceStub(self.monitor_channel) if self.monitor_channel else None
        self.scaler = ZeroScaler(
            self.scheduler,
            self.routing,
            hold_seconds=config.scale_from_zero_hold_seconds,
            queue_size=config.scale_from_zero_queue_size,
            logger=self.log,
        )
        self.stats = GatewayStats(
            self.metrics,
            config.monitor_address,
            reporter_id=f"gateway-{socket.gethostname()}-{config.grpc_port}",
            interval_seconds=config.stats_interval_seconds,
            logger=self.log,
        )
        self.dataplane = GatewayDataPlane(
            self.routing,
            self.upstream,
            self.scaler,
            self.authenticator,
            config,
            logger=self.log,
            stats=self.stats,
            inject_trace_context=self.telemetry.exporting,
        )
        # Task cards of deployed versions, shared by the REST task endpoints, the model list and docs.
        self.catalog = TaskCatalog(self.dataplane)
        self.grpc = self._build_grpc()
        self.metrics_endpoint = (
            MetricsEndpoint(self.metrics.registry, config.host, config.metrics_port) if config.metrics_port >= 0 else None
        )
        self.http_server: Any = None
        self.http_port: int | None = None
        self._backends: Any = None

    # -- wiring ----------------------------------------------------------------------------------

    def _routing_changed(self, table: RoutingTable) -> None:
        self.upstream.retain(table.addresses())
        self.catalog.retain({route.model for route in table.routes.values()})

    def _credentials(self) -> grpc.ServerCredentials | None:
        config = self.settings.gateway
        if not config.tls_enabled:
            return None
        return grpc.ssl_server_credentials([(_read(config.tls_key_file), _read(config.tls_cert_file))])

    def _build_grpc(self) -> GrpcService:
        config = self.settings.gateway
        server_settings = config.model_copy(update={"max_message_bytes": config.limits.max_body_bytes})
        service = GrpcService(
            server_settings,
            metrics=self.metrics,
            telemetry=self.telemetry,
            logger=self.log,
            health_checks=[self.dataplane.server_ready],
            reflection_pool=reflection_pool_of(
                pb.DESCRIPTOR, registry_pb2.DESCRIPTOR, scheduler_pb2.DESCRIPTOR, monitor_pb2.DESCRIPTOR, auth_pb2.DESCRIPTOR
            ),
            interceptors=[GrpcAuthInterceptor(self.authenticator, method_permission)],
            credentials=self._credentials(),
        )
        inference = GatewayInferenceServicer(
            self.dataplane,
            self.authenticator.authorize,
            sticky_header=config.sticky_header,
            limits=config.limits,
            logger=self.log,
        )
        service.add_service(INFERENCE_SERVICE, register_inference(inference))
        channels = {
            "aimaas.registry.v1.RegistryService": self.registry_channel,
            "aimaas.scheduler.v1.SchedulerService": self.scheduler_channel,
            "aimaas.monitor.v1.MonitorService": self.monitor_channel,
        }
        for descriptor in PASSTHROUGH_SERVICES:
            channel = channels[descriptor.full_name]
            handler: Passthrough | Unconfigured = (
                Passthrough(descriptor, channel)
                if channel is not None
                else Unconfigured(descriptor, "no monitor is configured (AIMAAS_GATEWAY__MONITOR_ADDRESS)")
            )
            service.add_service(descriptor.full_name, handler.register)
        service.add_service(AUTH_SERVICE_NAME, register_auth(AuthServicer(self.api_keys, self.authenticator)))
        service.on_shutdown(self._stop_http)
        return service

    def _build_http(self) -> Any:
        """The FastAPI app of the REST port: OIP routes, the /v1 management API and the docs."""
        from services.gateway.http_app import build_http_app
        from services.gateway.rest.docs import mount_docs
        from services.gateway.rest.management import ManagementBackends, build_management_router
        catalog = self.catalog
        backends = self._backends = ManagementBackends(
            registry=self.registry,
            scheduler=self.scheduler,
            monitor=self.monitor,
            api_keys=self.api_keys,
            public_http_url=self.http_url,
            embedding_models=catalog.embedding_models,
        )
        return build_http_app(
            self.dataplane,
            self.authenticator,
            self.settings,
            build_management_router(backends, self.authenticator),
            functools.partial(mount_docs, task_card=catalog.card),
            telemetry=self.telemetry,
            logger=self.log,
            version=server_version(),
            catalog=catalog,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def grpc_address(self) -> str:
        return self.grpc.address

    @property
    def http_url(self) -> str:
        return self.settings.gateway.http_url(self.http_port)

    async def start(self) -> None:
        config = self.settings.gateway
        try:
            await self.etcd.connect()
        except EtcdError as exc:
            # Come up during an etcd outage: the watchers keep retrying, health says NOT_SERVING
            # until the first routing table is in.
            self.log.warning("etcd unreachable at start; retrying in the background", error=str(exc))
        self.routing.start()
        await self.api_keys.start()
        # Serve as soon as the routing table is in (or etcd answers); health reports readiness.
        await self.routing.wait_loaded(config.start_wait_seconds)
        await self.grpc.start()
        await self._start_http()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.start()
        self.stats.start()
        self.log.info(
            "gateway started",
            grpc=self.grpc.address,
            http=self.http_url if self.http_port is not None else None,
            metrics_port=self.metrics_endpoint.port if self.metrics_endpoint else None,
            auth=config.auth.enabled,
            tls=config.tls_enabled,
        )

    async def _start_http(self) -> None:
        from services.gateway.http_app import serve_http

        config = self.settings.gateway
        if config.http_port < 0:
            return
        self.http_server = await serve_http(
            self._build_http(),
            config.host,
            config.http_port,
            ssl_certfile=str(config.tls_cert_file) if config.tls_cert_file else None,
            ssl_keyfile=str(config.tls_key_file) if config.tls_key_file else None,
            graceful_seconds=int(config.shutdown_grace_seconds),
        )
        self.http_port = self.http_server.port
        # With port 0 the actual port is known only now.
        self._backends.public_http_url = self.http_url

    async def _stop_http(self) -> None:
        if self.http_server is not None:
            server, self.http_server = self.http_server, None
            await server.stop(self.settings.gateway.shutdown_grace_seconds)

    async def stop(self) -> None:
        await self.grpc.stop()
        await self._stop_http()
        await self.stats.stop()
        await self.routing.stop()
        await self.api_keys.stop()
        await self.scaler.close()
        await self.upstream.close()
        for channel in (self.registry_channel, self.scheduler_channel, self.monitor_channel):
            if channel is not None:
                await channel.close()
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.stop)
        await self.etcd.close()
        self.telemetry.shutdown()
        self.log.info("gateway stopped")


async def serve(settings: GatewaySettings) -> None:
    await serve_until_signal(GatewayApp(settings))


def main() -> None:
    run_service(serve(load_settings(GatewaySettings)))

