"""The gateway's gRPC port: `inference.GRPCInferenceService` routed through the data plane, the
`aimaas.{registry,scheduler,monitor}.v1` services passed through to their owners unchanged (raw
bytes, all four call kinds, deadline and metadata propagated), and the AuthService served here.

Authentication and the method → permission check happen in G2's GrpcAuthInterceptor before any
handler runs; inference handlers add the model-scope check through the data plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
import structlog
from google.protobuf.descriptor import ServiceDescriptor

from aimaas.monitor.v1 import monitor_pb2
from aimaas.registry.v1 import registry_pb2
from aimaas.scheduler.v1 import scheduler_pb2
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc
from services.common import oip_stream
from services.common.aio import answer_concurrently
from services.common.auth import Permission, current_principal
from services.common.errors import FailedPrecondition, NotFound, ResourceExhausted
from services.gateway.dataplane import GatewayDataPlane
from services.gateway.settings import LimitSettings

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
REGISTRY_SERVICE = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]
SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]
MONITOR_SERVICE = monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"]
SERVER_NAME = "aimaas-gateway"
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics", "model_repository(read-only)")
GATEWAY_PLACEMENT = (
    "models behind the gateway are placed by the scheduler: deploy with "
    "aimaas.scheduler.v1.SchedulerService/ApplyDeployment (or `aimaas deploy`) instead of repository load/unload"
)
# Metadata that belongs to one hop only, or must not travel upstream (credentials).
_HOP_HEADERS = frozenset({"authorization", "user-agent", "content-type", "te", "host"})


def server_version() -> str:
    try:
        return importlib.metadata.version("aimaas")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def forwarded_metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, Any]]:
    """The caller's metadata minus transport and credential headers (traceparent, request ids and
    the sticky-session header travel on)."""
    return [
        (key, value)
        for key, value in (context.invocation_metadata() or ())
        if not key.startswith((":", "grpc-")) and key not in _HOP_HEADERS
    ]


def _metadata_value(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name and isinstance(value, str):
            return value
    return None


class ConcurrencyLimit:
    """In-flight inference calls on the gRPC port, overall and per API key (0: unlimited); beyond a
    limit the call fails at once with RESOURCE_EXHAUSTED (HTTP has its own counters: 429)."""

    def __init__(self, limits: LimitSettings) -> None:
        self._limits = limits
        self.in_flight = 0
        self._per_key: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, key_id: str) -> Iterator[None]:
        limits = self._limits
        if limits.max_concurrency and self.in_flight >= limits.max_concurrency:
            raise ResourceExhausted(
                f"too many concurrent requests (limit {limits.max_concurrency}); "
                f"retry after {limits.retry_after_seconds}s"
            )
        held = self._per_key.get(key_id, 0)
        if limits.max_concurrency_per_key and held >= limits.max_concurrency_per_key:
            raise ResourceExhausted(
                f"too many concurrent requests for this API key (limit {limits.max_concurrency_per_key}); "
                f"retry after {limits.retry_after_seconds}s"
            )
        self.in_flight += 1
        self._per_key[key_id] = held + 1
        try:
            yield
        finally:
            self.in_flight -= 1
            left = self._per_key[key_id] - 1
            if left:
                self._per_key[key_id] = left
            else:
                del self._per_key[key_id]


class GatewayInferenceServicer(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    """Translation only: the routing lives in GatewayDataPlane. Model-scope checks use the principal
    the auth interceptor published."""

    def __init__(
        self,
        dataplane: GatewayDataPlane,
        authorize: Callable[[Any, Permission, str | None], None],
        *,
        sticky_header: str,
        limits: LimitSettings,
        logger: structlog.stdlib.BoundLogger,
    ) -> None:
        self._dp = dataplane
        self.limit = ConcurrencyLimit(limits)
        self._authorize = authorize
        self._sticky_header = sticky_header
        self._log = logger
        self._metadata = pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    def _read(self, model: str) -> None:
        if model:
            self._authorize(current_principal(), Permission.READ, model)

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=await self._dp.server_live())

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self._dp.server_ready())

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return self._metadata

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        self._read(request.name)
        try:
            ready = await self._dp.model_ready(request.name, request.version)
        except NotFound:
            ready = False  # as a node answers for a model it does not have (tritonclient expects it)
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        self._read(request.name)
        return await self._call(context, self._dp.model_metadata(request.name, request.version))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        self._read(request.name)
        return await self._call(context, self._dp.model_config(request.name, request.version))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        self._read(request.name)
        response = await self._dp.model_statistics(request.name, request.version)
        principal = current_principal()
        if principal.model_scope:
            kept = [s for s in response.model_stats if principal.in_scope(s.name)]
            del response.model_stats[:]
            response.model_stats.extend(kept)
        return response

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        response = await self._dp.repository_index()
        principal = current_principal()
        kept = [m for m in response.models if principal.in_scope(m.name) and (not request.ready or m.state == "READY")]
        del response.models[:]
        response.models.extend(kept)
        return response

    async def RepositoryModelLoad(self, request, context) -> pb.RepositoryModelLoadResponse:
        raise FailedPrecondition(GATEWAY_PLACEMENT)

    async def RepositoryModelUnload(self, request, context) -> pb.RepositoryModelUnloadResponse:
        raise FailedPrecondition(GATEWAY_PLACEMENT)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        principal = current_principal()
        with self.limit.hold(principal.key_id):
            return await self._call(
                context,
                self._dp.model_infer(
                    request,
                    principal=principal,
                    timeout=context.time_remaining(),
                    sticky_key=_metadata_value(context, self._sticky_header),
                    metadata=forwarded_metadata(context),
                ),
            )

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest], context) -> None:
        # As on a node: requests of one stream run concurrently, each answered when done (matched by
        # id); errors travel in-band and the stream stays open.
        principal = current_principal()
        sticky = _metadata_value(context, self._sticky_header)
        metadata = forwarded_metadata(context)

        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                with self.limit.hold(principal.key_id):
                    result = await self._dp.model_infer(
                        request, principal=principal, timeout=context.time_remaining(), sticky_key=sticky, metadata=metadata
                    )
                return pb.ModelStreamInferResponse(infer_response=result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - in-band error, the stream stays open
                return oip_stream.error_response(request, exc, self._log)

        await answer_concurrently(request_iterator, answer, context.write)

    @staticmethod
    async def _call(context: grpc.aio.ServicerContext, work):
        # A node's own status (e.g. INVALID_ARGUMENT for a wrong shape) reaches the caller unchanged.
        try:
            return await work
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")


def register_inference(servicer: GatewayInferenceServicer) -> Callable[[grpc.aio.Server], None]:
    def _add(server: grpc.aio.Server) -> None:
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)

    return _add


# -- passthrough ----------------------------------------------------------------------------------


class Passthrough(grpc.GenericRpcHandler):
    """Forwards every method of one service to `channel` as raw bytes: no parsing, so the owner's
    validation and errors reach the caller unchanged."""

    def __init__(self, service: ServiceDescriptor, channel: grpc.aio.Channel) -> None:
        self.name = service.full_name
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            if method.client_streaming and method.server_streaming:
                handler = grpc.stream_stream_rpc_method_handler(_stream_stream(channel.stream_stream(path)))
            elif method.client_streaming:
                handler = grpc.stream_unary_rpc_method_handler(_unary(channel.stream_unary(path)))
            elif method.server_streaming:
                handler = grpc.unary_stream_rpc_method_handler(_stream(channel.unary_stream(path)))
            else:
                handler = grpc.unary_unary_rpc_method_handler(_unary(channel.unary_unary(path)))
            self._handlers[path] = handler

    def service(self, handler_call_details):
        return self._handlers.get(handler_call_details.method)

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((self,))


def _unary(multicallable):
    async def forward(request: Any, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await multicallable(
                request, timeout=context.time_remaining(), metadata=forwarded_metadata(context)
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "", trailing_metadata=_trailers(exc))

    return forward


def _stream(multicallable):
    async def forward(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        call = multicallable(request, timeout=context.time_remaining(), metadata=forwarded_metadata(context))
        async for item in _relay(call, context):
            yield item

    return forward


def _stream_stream(multicallable):
    async def forward(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        call = multicallable(request_iterator, timeout=context.time_remaining(), metadata=forwarded_metadata(context))
        async for item in _relay(call, context):
            yield item

    return forward


async def _relay(call, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    try:
        async for item in call:
            yield item
    except grpc.aio.AioRpcError as exc:
        await context.abort(exc.code(), exc.details() or "", trailing_metadata=_trailers(exc))
    finally:
        # The caller went away (or we failed): stop the upstream call too.
        call.cancel()


def _trailers(exc: grpc.aio.AioRpcError) -> Sequence[tuple[str, Any]]:
    return tuple((k, v) for k, v in (exc.trailing_metadata() or ()) if not k.startswith("grpc-"))


class Unconfigured(grpc.GenericRpcHandler):
    """Every method of a service whose upstream is not configured answers UNAVAILABLE, saying why."""

    def __init__(self, service: ServiceDescriptor, reason: str) -> None:
        self._prefix = f"/{service.full_name}/"
        message = f"{service.full_name} is not available: {reason}"

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> bytes:
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)
            yield b""  # pragma: no cover - makes this an async generator

        self._handlers = {}
        for method in service.methods:
            path = self._prefix + method.name
            if method.client_streaming and method.server_streaming:
                self._handlers[path] = grpc.stream_stream_rpc_method_handler(refuse_stream)
            elif method.client_streaming:
                self._handlers[path] = grpc.stream_unary_rpc_method_handler(refuse)
            elif method.server_streaming:
                self._handlers[path] = grpc.unary_stream_rpc_method_handler(refuse_stream)
            else:
                self._handlers[path] = grpc.unary_unary_rpc_method_handler(refuse)

    def service(self, handler_call_details):
        return self._handlers.get(handler_call_details.method)

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((self,))


PASSTHROUGH_SERVICES = (REGISTRY_SERVICE, SCHEDULER_SERVICE, MONITOR_SERVICE)
