"""Composition root of the registry process: builds every dependency once and wires them."""

from __future__ import annotations


from aimaas.registry.v1 import registry_pb2
from services.common.grpc_server import serve_until_signal
from services.common.aio import run_service
from services.common.etcd import EtcdClient
from services.common.grpc_server import GrpcService
from services.common.logs import configure_logging
from services.common.metrics import Metrics, MetricsEndpoint
from services.common.objectstore import create_object_store
from services.common.tracing import Telemetry, setup_telemetry
from services.registry.core import ModelRegistry
from services.registry.servicer import RegistryServicer, register
from services.common.settings import load_settings
from services.registry.settings import RegistrySettings

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


class RegistryApp:
    """The running registry: start() binds and serves, stop() shuts down gracefully."""

    def __init__(self, settings: RegistrySettings, *, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.log = configure_logging(settings.log, "registry")
        self.telemetry = telemetry or setup_telemetry(settings.telemetry, "registry")
        self.metrics = Metrics()
        self.etcd = EtcdClient(settings.etcd)
        self.store = create_object_store(settings.object_store)
        self.registry = ModelRegistry(
            self.etcd, self.store, max_artifact_bytes=settings.registry.max_artifact_bytes, logger=self.log
        )
        self.grpc = GrpcService(
            settings.registry,
            metrics=self.metrics,
            telemetry=self.telemetry,
            logger=self.log,
            health_checks=[self.etcd.ping, self.store.ping],
        )
        self.grpc.add_service(SERVICE_NAME, register(RegistryServicer(self.registry, settings.registry.download_chunk_bytes)))
        self.metrics_endpoint = (
            MetricsEndpoint(self.metrics.registry, settings.registry.host, settings.registry.metrics_port)
            if settings.registry.metrics_port >= 0
            else None
        )

    async def start(self) -> None:
        await self.etcd.connect()
        try:
            await self.store.ensure_ready()
        except Exception:  # noqa: BLE001 - an unreachable store is reported by health, not fatal
            self.log.warning("object store not ready at start; health stays NOT_SERVING until it is")
        await self.grpc.start()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.start()
        self.log.info(
            "registry started",
            grpc=self.grpc.address,
            metrics_port=self.metrics_endpoint.port if self.metrics_endpoint else None,
        )

    async def stop(self) -> None:
        await self.grpc.stop()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        await self.store.close()
        await self.etcd.close()
        self.telemetry.shutdown()
        self.log.info("registry stopped")


async def serve(settings: RegistrySettings) -> None:
    await serve_until_signal(RegistryApp(settings))


def main() -> None:
    run_service(serve(load_settings(RegistrySettings)))
