"""Domain errors and the one mapping from errors to gRPC and HTTP status codes.

Service code raises these; the server interceptor (services.common.grpc_server) and the gateway
translate them, so no servicer calls `context.abort` with a hand-picked code.
"""

from __future__ import annotations

import grpc


class AimaasError(Exception):
    """Base of errors that carry a precise status for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AimaasError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(AimaasError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AimaasError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(AimaasError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Conflict(AimaasError):
    """A compare-and-swap lost: the state changed since the caller read it."""

    code = grpc.StatusCode.ABORTED


class Unavailable(AimaasError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(AimaasError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(AimaasError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(AimaasError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(AimaasError):
    code = grpc.StatusCode.PERMISSION_DENIED


_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def grpc_status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and caller-safe message for any exception a handler let escape."""
    if isinstance(exc, AimaasError):
        return exc.code, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        # The status of another AIMaaS service (or node) this call depended on keeps its meaning;
        # their details are caller-safe messages by the same rule.
        return exc.code(), exc.details() or exc.code().name.lower()
    # Infrastructure errors of the shared layers are outages from the caller's point of view.
    from services.common.etcd import EtcdUnavailable
    from services.common.objectstore import ObjectStoreUnavailable

    if isinstance(exc, EtcdUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"metadata store unavailable: {exc}"
    if isinstance(exc, ObjectStoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"object store unavailable: {exc}"
    # Never leak internals (paths, secrets) in an unexpected error.
    return grpc.StatusCode.INTERNAL, "internal error"


def http_status_for(code: grpc.StatusCode) -> int:
    return _HTTP_STATUS.get(code, 500)
