"""OpenTelemetry setup: OTLP export when an endpoint is configured, W3C propagation, gRPC hooks."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Tracer

from services.common.settings import TelemetrySettings


@dataclass
class Telemetry:
    provider: TracerProvider
    service_name: str
    # False when spans go nowhere: then no gRPC tracing interceptors are installed at all (they
    # cost ~40% of a small request's handler time even when spans are not recorded).
    exporting: bool = True

    def tracer(self, name: str) -> Tracer:
        return self.provider.get_tracer(name)

    def server_interceptors(self) -> list:
        if not self.exporting:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self.provider), _WritingStreamsAsGenerators()]

    def client_interceptors(self) -> list:
        if not self.exporting:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        return list(aio_client_interceptors(tracer_provider=self.provider))

    def shutdown(self) -> None:
        self.provider.shutdown()


def setup_telemetry(
    settings: TelemetrySettings, service: str, *, extra_processors: list[SpanProcessor] | None = None
) -> Telemetry:
    """A tracer provider for this process; spans are exported only when an endpoint is configured.

    The provider is passed down explicitly rather than installed globally, so tests can run several
    services in one process, each with its own exporter. W3C trace context is OpenTelemetry's
    default propagator, used by the gRPC interceptors for metadata.
    """
    service_name = f"{settings.service_name_prefix}-{service}"
    exporting = bool(settings.otlp_endpoint or extra_processors)
    # With nowhere to send spans, recording them is pure cost on the hot path; non-recording spans
    # still carry the (possibly inherited) trace id into logs and outgoing calls.
    sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio)) if exporting else ParentBased(ALWAYS_OFF, remote_parent_sampled=ALWAYS_OFF, local_parent_sampled=ALWAYS_OFF)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=sampler)
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = settings.otlp_endpoint.startswith("http://")
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=insecure)))
    for processor in extra_processors or ():
        provider.add_span_processor(processor)
    return Telemetry(provider=provider, service_name=service_name, exporting=exporting)


class _WritingStreamsAsGenerators(grpc.aio.ServerInterceptor):
    """Presents streaming handlers that write with `context.write` (a coroutine, such as
    ModelStreamInfer with services.common.aio.answer_concurrently) as async generators that yield
    nothing: OpenTelemetry's aio server interceptor, which sits right outside this one, can only
    wrap generators. The writes still go through the context it passes down."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        behavior = handler.unary_stream or handler.stream_stream
        if not inspect.iscoroutinefunction(behavior):
            return handler

        async def as_generator(request_or_iterator: Any, context: grpc.aio.ServicerContext):
            await behavior(request_or_iterator, context)
            return
            yield  # an async generator with no items

        make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return make(as_generator, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
