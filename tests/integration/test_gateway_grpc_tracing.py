"""W3C trace context through the gateway to the node that runs the request (real registry,
scheduler, inference node and gateway in-process; the node records spans in memory)."""

from __future__ import annotations

import grpc
import numpy as np
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.settings import LogSettings, TelemetrySettings
from services.common.tracing import setup_telemetry
from services.inference.servicer import STREAM_REQUEST_SPAN
from services.inference.settings import InferenceServerSettings, InferenceSettings
from tests.support.gateway import deploy, gateway_settings, running_gateway
from tests.support.inference import running_inference
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry
from tests.support.scheduler import running_scheduler, scheduler_settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def _request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="traced")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return request


def _node_rpc_spans(exporter: InMemorySpanExporter) -> list:
    # A unary call's server span, or the span of a request multiplexed on the gateway's stream.
    return [s for s in exporter.get_finished_spans() if s.name.endswith("ModelInfer") or s.name == STREAM_REQUEST_SPAN]


async def test_traceparent_reaches_the_node(etcd_settings, local_store_settings, tmp_path):
    node_spans = InMemorySpanExporter()
    node_settings = InferenceSettings(
        etcd=etcd_settings,
        object_store=local_store_settings,
        log=LogSettings(level="WARNING"),
        inference=InferenceServerSettings(
            grpc_port=0, metrics_port=-1, node_id="traced-node", cache_dir=tmp_path / "cache",
            backends=["onnxruntime"], intra_op_threads=1, shutdown_grace_seconds=1,
        ),
    )  # fmt: skip
    node_telemetry = setup_telemetry(TelemetrySettings(), "inference", extra_processors=[SimpleSpanProcessor(node_spans)])
    traceparent = (("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01"),)
    async with (
        running_inference(node_settings, telemetry=node_telemetry),
        running_registry(registry_settings(etcd_settings, local_store_settings)) as (registry_app, _),
        running_scheduler(scheduler_settings(etcd_settings)) as (scheduler_app, _),
    ):
        settings = gateway_settings(etcd_settings, registry=registry_app.grpc.address, scheduler=scheduler_app.grpc.address)
        # A gateway that records no spans forwards the caller's trace context unchanged.
        async with running_gateway(settings) as gateway:
            await deploy(gateway, "traced", [mlp_bytes(seed=51)])
            async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
                await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(), metadata=traceparent, timeout=20)
        (span,) = _node_rpc_spans(node_spans)
        # It went multiplexed on the gateway's stream to the node, its trace context in its parameters.
        assert span.name == STREAM_REQUEST_SPAN
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert format(span.parent.span_id, "016x") == CALLER_SPAN
        # The node's own spans of the request hang under it.
        assert any(s.name == "queue wait" and s.parent.span_id == span.context.span_id for s in node_spans.get_finished_spans())

        # A gateway that records spans joins the trace: caller → gateway server span → gateway client
        # span → node.
        node_spans.clear()
        gateway_spans = InMemorySpanExporter()
        telemetry = setup_telemetry(TelemetrySettings(), "gateway", extra_processors=[SimpleSpanProcessor(gateway_spans)])
        async with running_gateway(settings, telemetry=telemetry) as gateway:
            await gateway.routing.wait_loaded(10)
            async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
                await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(), metadata=traceparent, timeout=20)
        (span,) = _node_rpc_spans(node_spans)
        assert span.name.endswith("/ModelInfer")  # a call of its own, with the gateway's client span
        recorded = {s.context.span_id: s for s in gateway_spans.get_finished_spans()}
        assert format(span.context.trace_id, "032x") == TRACE_ID
        client_span = recorded[span.parent.span_id]  # the node's parent is a gateway span...
        server_span = recorded[client_span.parent.span_id]
        assert format(server_span.parent.span_id, "016x") == CALLER_SPAN  # ...under the caller's
