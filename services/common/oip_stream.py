"""What travels per request on a multiplexed Open Inference Protocol stream (`ModelStreamInfer`).

A stream's metadata and deadline are set once, at its start, and its errors travel in-band as a
bare `error_message`. The gateway keeps one long-lived stream per node and sends many independent
requests over it (services.gateway.upstream), so what a unary call carries in metadata and status
travels in request and response parameters instead; clients that do not know them are unaffected:
- `timeout` (request, int64 microseconds; Triton's own parameter): the request's deadline;
- `traceparent` / `tracestate` (request, string; W3C trace context): the request's trace parent;
- `aimaas_status` (error response, string): the status code name of an in-band error, so a gateway
  maps a node's error exactly as it would a unary call's status (400 vs 404 vs 503, retry or not).
"""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidArgument, grpc_status_for

TIMEOUT_PARAMETER = "timeout"
STATUS_PARAMETER = "aimaas_status"
TRACE_PARAMETERS = frozenset({"traceparent", "tracestate"})
_PROPAGATOR = TraceContextTextMapPropagator()


def request_deadline(request: pb.ModelInferRequest, now: float, deadline: float | None) -> float | None:
    """The earlier of `deadline` (the call's, absolute on the `now` clock) and the request's own
    `timeout` parameter (microseconds from `now`; 0 or absent: none)."""
    parameters = request.parameters
    if TIMEOUT_PARAMETER not in parameters:
        return deadline
    parameter = parameters[TIMEOUT_PARAMETER]
    if parameter.WhichOneof("parameter_choice") != "int64_param" or parameter.int64_param < 0:
        raise InvalidArgument("request parameter 'timeout' must be a non-negative int64 (microseconds)")
    if parameter.int64_param == 0:
        return deadline
    own = now + parameter.int64_param / 1e6
    return own if deadline is None else min(own, deadline)


def trace_parent(request: pb.ModelInferRequest) -> otel_context.Context | None:
    """The trace context the request's parameters carry (None: none, the stream's own applies)."""
    parameters = request.parameters
    if "traceparent" not in parameters:
        return None
    carrier = {key: parameters[key].string_param for key in TRACE_PARAMETERS if key in parameters}
    return _PROPAGATOR.extract(carrier)


def set_trace_parameters(request: pb.ModelInferRequest, carrier: dict[str, str]) -> None:
    for key, value in carrier.items():
        request.parameters[key].string_param = value


def error_response(request: pb.ModelInferRequest, exc: BaseException, log: Any) -> pb.ModelStreamInferResponse:
    """The in-band answer of a request that failed with `exc`: message, id and status code name.
    An unexpected error (INTERNAL: its details stay out of the answer) is logged to `log`."""
    code, message = grpc_status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("stream inference failed unexpectedly", model=request.model_name, exc_info=exc)
    response = pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
    response.infer_response.parameters[STATUS_PARAMETER].string_param = code.name
    return response


def error_status(response: pb.ModelStreamInferResponse) -> grpc.StatusCode:
    """The status code of an in-band error (UNKNOWN when the sender did not say)."""
    parameters = response.infer_response.parameters
    if STATUS_PARAMETER in parameters:
        code = grpc.StatusCode.__members__.get(parameters[STATUS_PARAMETER].string_param)
        if code is not None and code is not grpc.StatusCode.OK:
            return code
    return grpc.StatusCode.UNKNOWN
