"""services.common.errors: the one exception -> status mapping every service and the gateway use."""

from __future__ import annotations

import grpc
from grpc.aio import AioRpcError, Metadata

from services.common.errors import InvalidArgument, grpc_status_for, http_status_for


def upstream(code: grpc.StatusCode, details: str) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details=details)


def test_domain_errors_keep_their_code_and_message():
    assert grpc_status_for(InvalidArgument("bad shape")) == (grpc.StatusCode.INVALID_ARGUMENT, "bad shape")


def test_an_upstream_grpc_status_keeps_its_meaning():
    assert grpc_status_for(upstream(grpc.StatusCode.NOT_FOUND, "model 'x' not found")) == (
        grpc.StatusCode.NOT_FOUND, "model 'x' not found",
    )
    assert grpc_status_for(upstream(grpc.StatusCode.UNAVAILABLE, "")) == (grpc.StatusCode.UNAVAILABLE, "unavailable")
    assert http_status_for(grpc_status_for(upstream(grpc.StatusCode.NOT_FOUND, "x"))[0]) == 404


def test_unexpected_errors_leak_nothing():
    assert grpc_status_for(RuntimeError("/secret/path")) == (grpc.StatusCode.INTERNAL, "internal error")
