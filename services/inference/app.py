"""Composition root of an inference node: builds every dependency once and wires them.

Standalone mode (settings.inference.model_repository set, e.g. `aimaas-inference --model-repository
DIR`): serves a local model directory, no etcd or object store. Mesh mode: the node agent registers
in etcd, watches its assignments and drives the data plane.

With `monitor_address` set, a stats reporter (services.inference.reporter) streams per-interval
statistics to the monitor; it starts once the node serves and never holds serving up.

Shutdown (SIGTERM): health NOT_SERVING → the node agent deregisters (a shutdown hook) → in-flight
RPCs drain (grace period) → the stats reporter sends the last interval → the data plane drains and
unloads every model.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import pathlib
from typing import Any

from pydantic import ValidationError

from inference import grpc_predict_v2_pb2 as pb
from services.common.grpc_server import serve_until_signal
from services.common.aio import run_service
from services.common.grpc_server import GrpcService, reflection_pool_of
from services.common.logs import configure_logging
from services.common.metrics import Metrics, MetricsEndpoint
from services.common.settings import load_settings
from services.common.tracing import Telemetry, setup_telemetry
from services.inference.backends.base import Backend
from services.inference.dataplane import DataPlane
from services.inference.reporter import StatsReporter, standalone_reporter_id
from services.inference.repository import DirectoryRepository
from services.inference.servicer import InferenceServicer, register
from services.inference.settings import InferenceServerSettings, InferenceSettings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def server_version() -> str:
    try:
        return importlib.metadata.version("aimaas")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


class InferenceApp:
    """The running inference node: start() binds, loads and serves; stop() shuts down gracefully."""

    def __init__(
        self,
        settings: InferenceSettings,
        *,
        telemetry: Telemetry | None = None,
        backends: dict[str, type[Backend] | str] | None = None,
    ) -> None:
        """`backends` replaces probing this node's backends (name → class, or why it is unavailable)."""
        self.settings = settings
        config = settings.inference
        self.log = configure_logging(settings.log, "inference")
        self.telemetry = telemetry or setup_telemetry(settings.telemetry, "inference")
        self.metrics = Metrics()
        self.standalone = config.model_repository is not None
        self.repository: DirectoryRepository | None = None
        self.etcd: Any = None
        self.store: Any = None
        self.agent: Any = None
        self.reporter: StatsReporter | None = None
        self._ready = False
        health_checks = [self._health]
        if not self.standalone:
            from services.common.etcd import EtcdClient
            from services.common.objectstore import create_object_store

            self.etcd = EtcdClient(settings.etcd)
            self.store = create_object_store(settings.object_store)
        # Mesh mode: TensorRT engines are shared through the object store (built once per GPU kind).
        self.data_plane = DataPlane(
            config,
            registry=self.metrics.registry,
            telemetry=self.telemetry,
            logger=self.log,
            backends=backends,
            engine_store=self.store,
        )
        if self.standalone:
            self.repository = DirectoryRepository(config.model_repository, self.data_plane, config, self.log)
        self.grpc = GrpcService(
            config,
            metrics=self.metrics,
            telemetry=self.telemetry,
            logger=self.log,
            health_checks=health_checks,
            reflection_pool=reflection_pool_of(pb.DESCRIPTOR),
            frontend=config.grpc_frontend,
        )
        self.servicer = InferenceServicer(
            self.data_plane,
            self.repository,
            version=server_version(),
            is_ready=self.ready,
            logger=self.log,
            tracer=self.telemetry.tracer("aimaas.inference") if self.telemetry.exporting else None,
        )
        self.grpc.add_service(SERVICE_NAME, register(self.servicer))
        self.metrics_endpoint = (
            MetricsEndpoint(self.metrics.registry, config.host, config.metrics_port) if config.metrics_port >= 0 else None
        )

    def ready(self) -> bool:
        """Accepting requests and, in standalone mode, done with the initial repository load."""
        return self._ready

    async def _health(self) -> bool:
        # Readiness means "can serve": an etcd outage must not pull a node that serves loaded models
        # (invariant 1), so the agent's registration is not part of it; `aimaas status` and the
        # scheduler see registration through the lease-bound node record instead.
        return self._ready

    async def start(self) -> None:
        if not self.standalone:
            await self.etcd.connect()
            try:
                await self.store.ensure_ready()
            except Exception:  # noqa: BLE001 - loads retry; serving does not need the store
                self.log.warning("object store not ready at start; model loads will retry")
        await self.grpc.start()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.start()
        if self.repository is not None:
            await self.repository.load_all()
        else:
            # Imported here: the node agent (and its etcd machinery) is only needed in mesh mode.
            from services.inference.node import NodeAgent

            self.agent = NodeAgent(self.settings, self.data_plane, self.etcd, self.store, self.grpc.address, self.log)
            # Deregistration must happen after NOT_SERVING and before in-flight calls drain.
            self.grpc.on_shutdown(self.agent.stop)
            await self.agent.start()
        self._ready = True
        await self.grpc.refresh_health()
        if self.settings.inference.monitor_address:
            await self._start_reporter()
        self.log.info(
            "inference node started",
            grpc=self.grpc.address,
            mode="standalone" if self.standalone else "mesh",
            model_repository=str(self.settings.inference.model_repository or ""),
            backends=self.data_plane.available_backends(),
            loaded=[f"{name}:{version}" for name, version in self.data_plane.loaded()],
            metrics_port=self.metrics_endpoint.port if self.metrics_endpoint else None,
        )

    async def _start_reporter(self) -> None:
        config = self.settings.inference
        reporter_id = (
            self.agent.node_id
            if self.agent is not None
            else standalone_reporter_id(self.grpc.address, config.advertise_address)
        )
        self.reporter = StatsReporter(
            config,
            source=self.data_plane.close_stats_windows,
            reporter_id=reporter_id,
            logger=self.log,
            gpu="tensorrt" in self.data_plane.available_backends(),
        )
        await self.reporter.start()

    async def stop(self) -> None:
        self._ready = False
        await self.grpc.stop()
        if self.reporter is not None:
            # After the drain, so the last interval holds every request.
            await self.reporter.stop()
        await self.data_plane.close()
        if self.metrics_endpoint is not None:
            # Its HTTP server's shutdown waits for a 0.5 s poll: not on the event loop.
            await asyncio.to_thread(self.metrics_endpoint.stop)
        if self.store is not None:
            await self.store.close()
        if self.etcd is not None:
            await self.etcd.close()
        self.telemetry.shutdown()
        self.log.info("inference node stopped")


async def serve(settings: InferenceSettings) -> None:
    await serve_until_signal(InferenceApp(settings))


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535)")
    return port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aimaas-inference",
        description="AIMaaS inference node (Open Inference Protocol over gRPC). With --model-repository it "
        "serves a local directory (<model>/<version>/model.onnx) without etcd; otherwise it joins the "
        "mesh configured by AIMAAS_* variables.",
    )
    parser.add_argument("--model-repository", type=pathlib.Path, help="serve this model directory (standalone mode)")
    parser.add_argument("--host", help="listen address (AIMAAS_INFERENCE__HOST)")
    parser.add_argument("--port", type=_port, help="gRPC port, 0 for any free one (AIMAAS_INFERENCE__GRPC_PORT)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port, -1 to disable (AIMAAS_INFERENCE__METRICS_PORT)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace, settings: InferenceSettings) -> InferenceSettings:
    """Command-line flags override the AIMAAS_* environment."""
    overrides: dict[str, Any] = {}
    if args.model_repository is not None:
        if not args.model_repository.is_dir():
            raise SystemExit(f"aimaas-inference: model repository {args.model_repository} is not a directory")
        overrides["model_repository"] = args.model_repository
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["grpc_port"] = args.port
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    if not overrides:
        return settings
    try:
        server = InferenceServerSettings.model_validate({**settings.inference.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"aimaas-inference: invalid option: {problems}") from None
    return settings.model_copy(update={"inference": server})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from_args(args, load_settings(InferenceSettings))
    run_service(serve(settings))
