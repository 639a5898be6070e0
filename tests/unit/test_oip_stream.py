"""Per-request fields of a multiplexed inference stream (services.common.oip_stream)."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import trace

from inference import grpc_predict_v2_pb2 as pb
from services.common import oip_stream
from services.common.errors import InvalidArgument, NotFound


class RecordingLog:
    def __init__(self) -> None:
        self.errors: list[tuple[str, dict]] = []

    def error(self, event: str, **fields) -> None:
        self.errors.append((event, fields))


def _timed(microseconds: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.parameters["timeout"].int64_param = microseconds
    return request


def test_request_deadline_is_the_earlier_of_the_call_and_the_parameter():
    assert oip_stream.request_deadline(pb.ModelInferRequest(), 100.0, None) is None
    assert oip_stream.request_deadline(pb.ModelInferRequest(), 100.0, 105.0) == 105.0
    assert oip_stream.request_deadline(_timed(2_000_000), 100.0, None) == pytest.approx(102.0)
    assert oip_stream.request_deadline(_timed(2_000_000), 100.0, 101.0) == 101.0
    assert oip_stream.request_deadline(_timed(2_000_000), 100.0, 103.0) == pytest.approx(102.0)
    assert oip_stream.request_deadline(_timed(0), 100.0, 103.0) == 103.0  # 0: no timeout of its own


@pytest.mark.parametrize("value", [-1, "5", 1.5, True])
def test_a_malformed_timeout_parameter_is_invalid_argument(value):
    request = pb.ModelInferRequest()
    parameter = request.parameters["timeout"]
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = value
    with pytest.raises(InvalidArgument, match="'timeout' must be a non-negative int64"):
        oip_stream.request_deadline(request, 0.0, None)


def test_error_responses_carry_their_status_and_the_request_id():
    request = pb.ModelInferRequest(model_name="m", model_version="2", id="abc")
    log = RecordingLog()
    response = oip_stream.error_response(request, NotFound("unknown model 'm'"), log)
    assert response.error_message == "unknown model 'm'"
    assert (response.infer_response.model_name, response.infer_response.model_version, response.infer_response.id) == ("m", "2", "abc")
    assert oip_stream.error_status(response) is grpc.StatusCode.NOT_FOUND
    assert log.errors == []  # the caller's mistake, not ours
    # Unexpected errors say INTERNAL, leak nothing, and are logged with their cause.
    failure = RuntimeError("/secret/path")
    internal = oip_stream.error_response(request, failure, log)
    assert internal.error_message == "internal error" and oip_stream.error_status(internal) is grpc.StatusCode.INTERNAL
    assert log.errors == [("stream inference failed unexpectedly", {"model": "m", "exc_info": failure})]


@pytest.mark.parametrize("status", [None, "", "OK", "NO_SUCH_CODE"])
def test_an_error_without_a_usable_status_is_unknown(status):
    response = pb.ModelStreamInferResponse(error_message="boom")
    if status is not None:
        response.infer_response.parameters["aimaas_status"].string_param = status
    assert oip_stream.error_status(response) is grpc.StatusCode.UNKNOWN


def test_trace_context_round_trips_through_parameters():
    assert oip_stream.trace_parent(pb.ModelInferRequest()) is None
    request = pb.ModelInferRequest()
    oip_stream.set_trace_parameters(
        request, {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "k=v"}
    )
    context = trace.get_current_span(oip_stream.trace_parent(request)).get_span_context()
    assert format(context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert format(context.span_id, "016x") == "00f067aa0ba902b7"
    assert context.is_remote and context.trace_state.get("k") == "v"
