"""gRPC server factory: health with real status, reflection, error mapping, metrics, tracing,
graceful shutdown on SIGTERM (NOT_SERVING, shutdown hooks such as deregistration, drain, stop)."""

from __future__ import annotations

import asyncio
import inspect
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import grpc
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from services.common.errors import grpc_status_for
from services.common.h2grpc import H2GrpcServer
from services.common.metrics import Metrics
from services.common.settings import ServerSettings
from services.common.tracing import Telemetry

HealthCheck = Callable[[], Awaitable[bool]]


def reflection_pool_of(*files: FileDescriptor) -> descriptor_pool.DescriptorPool:
    """A descriptor pool with `files` (and their dependencies) plus health and reflection, for
    services whose generated stubs live outside protobuf's default pool."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR, *files):
        add(file)
    return pool


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns escaped exceptions into precise status codes, and records RPC metrics and errors.

    The one place where domain errors become gRPC statuses (see services.common.errors).
    """

    def __init__(self, metrics: Metrics, logger: structlog.stdlib.BoundLogger) -> None:
        self._metrics = metrics
        self._log = logger
        # Bound label children, so a call costs no label lookup (each takes a lock).
        self._totals: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._durations: dict[str, Any] = {}
        # method → (the handler we wrapped, our wrapper): registered handlers are stable objects, so
        # a call reuses the wrapper instead of building closures and a handler every time.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler):
        if method.startswith("/grpc.health.v1.Health/") or method.startswith("/grpc.reflection."):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_responses(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_responses(method, handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        total = self._totals.get((method, code))
        if total is None:
            total = self._totals[(method, code)] = self._metrics.rpc_total.labels(method, code.name)
        duration = self._durations.get(method)
        if duration is None:
            duration = self._durations[method] = self._metrics.rpc_seconds.labels(method)
        total.inc()
        duration.observe(time.perf_counter() - started)

    async def _fail(self, method: str, exc: Exception, context: grpc.aio.ServicerContext, started: float):
        code, message = grpc_status_for(exc)
        self._record(method, code, started)
        if code is grpc.StatusCode.INTERNAL:
            self._log.exception("rpc failed unexpectedly", method=method)
        else:
            self._log.info("rpc failed", method=method, code=code.name, error=message)
        await context.abort(code, message)

    def _wrap_unary(self, method: str, behavior):
        async def wrapper(request_or_iterator: Any, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            try:
                response = await behavior(request_or_iterator, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                self._record(method, context.code() or grpc.StatusCode.CANCELLED, started)
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never a crash
                await self._fail(method, exc, context, started)
            self._record(method, context.code() or grpc.StatusCode.OK, started)
            return response

        return wrapper

    def _wrap_responses(self, method: str, behavior):
        # A streaming handler either yields its responses (an async generator) or writes them with
        # context.write and returns (a coroutine, awaited like a unary one).
        if inspect.iscoroutinefunction(behavior):
            return self._wrap_unary(method, behavior)
        return self._wrap_stream(method, behavior)

    def _wrap_stream(self, method: str, behavior):
        async def wrapper(request_or_iterator: Any, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            try:
                async for response in behavior(request_or_iterator, context):
                    yield response
            except (asyncio.CancelledError, grpc.aio.AbortError):
                self._record(method, context.code() or grpc.StatusCode.CANCELLED, started)
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fail(method, exc, context, started)
            self._record(method, context.code() or grpc.StatusCode.OK, started)

        return wrapper


class GrpcService:
    """One gRPC server process: servicers, health, reflection, shutdown hooks, readiness checks."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        metrics: Metrics,
        telemetry: Telemetry,
        logger: structlog.stdlib.BoundLogger,
        health_checks: Iterable[HealthCheck] = (),
        health_interval_seconds: float = 1.0,
        reflection_pool: descriptor_pool.DescriptorPool | None = None,
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
        frontend: str = "grpcio",
    ) -> None:
        """`reflection_pool`: where reflection finds the services' descriptors; None is protobuf's
        default pool. Services whose stubs live in a private pool (the inference protocol) pass a
        pool holding their files plus health and reflection (see `reflection_pool_of`).
        `interceptors` run inside the error mapping (e.g. authentication); `credentials` serve TLS.
        `frontend`: "grpcio" (grpc.aio's server) or "h2" (services.common.h2grpc, cleartext only:
        the same servicers and interceptors at a fraction of the per-call cost)."""
        self._credentials = credentials
        self._settings = settings
        self._reflection_pool = reflection_pool
        self._log = logger
        self._health_checks = list(health_checks)
        self._health_interval = health_interval_seconds
        self._service_names: list[str] = []
        self._shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        self._health = health.aio.HealthServicer()
        self._health_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._stopped = False
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        all_interceptors = [*telemetry.server_interceptors(), ErrorMappingInterceptor(metrics, logger), *interceptors]
        self.server: Any
        if frontend == "h2":
            if credentials is not None:
                raise ValueError("the h2 front end serves cleartext only")
            self.server = H2GrpcServer(
                interceptors=all_interceptors, max_message_bytes=settings.max_message_bytes, logger=logger
            )
        elif frontend == "grpcio":
            self.server = grpc.aio.server(interceptors=all_interceptors, options=options)
        else:
            raise ValueError(f"unknown gRPC front end {frontend!r}")
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        self.port: int | None = None

    def add_service(self, service_name: str, register: Callable[[grpc.aio.Server], None]) -> None:
        """Register a servicer (`register(server)`) under its full name, for health and reflection."""
        register(self.server)
        self._service_names.append(service_name)

    def on_shutdown(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook` after health turns NOT_SERVING and before in-flight calls are drained."""
        self._shutdown_hooks.append(hook)

    @property
    def address(self) -> str:
        return f"{self._settings.host}:{self.port}"

    async def start(self) -> int:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], pool=self._reflection_pool
            ),
            self.server,
        )
        if isinstance(self.server, H2GrpcServer):
            self.port = await self.server.start(self._settings.host, self._settings.grpc_port)
        else:
            if self._credentials is not None:
                self.port = self.server.add_secure_port(self._settings.grpc_address(), self._credentials)
            else:
                self.port = self.server.add_insecure_port(self._settings.grpc_address())
            if self.port == 0:
                raise RuntimeError(f"cannot bind gRPC port {self._settings.grpc_address()}")
            await self.server.start()
        await self._update_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="health-checks")
        return self.port

    async def refresh_health(self) -> None:
        """Re-run the health checks now (e.g. right after the process became ready)."""
        if not self._stopping.is_set():
            await self._update_health()

    async def _set_status(self, status: int) -> None:
        for name in ("", *self._service_names):
            await self._health.set(name, status)

    async def _update_health(self) -> None:
        serving = True
        for check in self._health_checks:
            try:
                serving = serving and await check()
            except Exception:  # noqa: BLE001 - a failing probe means not serving
                serving = False
        await self._set_status(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def _health_loop(self) -> None:
        # Dependency reachability is only observable by probing it.
        while not self._stopping.is_set():
            await asyncio.sleep(self._health_interval)
            if not self._stopping.is_set():
                await self._update_health()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)

    async def wait_for_stop_signal(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """NOT_SERVING first, then shutdown hooks, then drain in-flight calls, then stop."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        if self._health_task is not None:
            self._health_task.cancel()
        await self._health.enter_graceful_shutdown()
        for hook in self._shutdown_hooks:
            try:
                await hook()
            except Exception:  # noqa: BLE001 - shutdown continues whatever a hook does
                self._log.exception("shutdown hook failed")
        await self.server.stop(self._settings.shutdown_grace_seconds)


class ServiceApp(Protocol):
    grpc: GrpcService

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def serve_until_signal(app: ServiceApp) -> None:
    """Start a service process's app, serve until SIGTERM/SIGINT, then stop it gracefully."""
    app.grpc.install_signal_handlers()
    try:
        await app.start()
        await app.grpc.wait_for_stop_signal()
    finally:
        await app.stop()
