"""The one exception type of the SDK, in the style of tritonclient's InferenceServerException."""

from __future__ import annotations

import grpc


class AimaasError(Exception):
    """A failed SDK call: a gRPC status code and a message.

    Server errors keep the status the gateway or service answered with; errors the SDK finds before
    sending (bad inputs, an unreadable file) use INVALID_ARGUMENT, a wait that ran out DEADLINE_EXCEEDED.
    """

    def __init__(self, code: grpc.StatusCode, message: str, debug_details: str | None = None) -> None:
        super().__init__(f"[{code.name}] {message}")
        self.code = code
        self._message = message
        self._debug_details = debug_details

    def status(self) -> str:
        """Status name, e.g. "NOT_FOUND" (tritonclient's `status()`)."""
        return self.code.name

    def message(self) -> str:
        return self._message

    def debug_details(self) -> str | None:
        return self._debug_details

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> AimaasError:
        if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
            code = exc.code() or grpc.StatusCode.UNKNOWN
            details = exc.details() or code.name
            return cls(code, details, exc.debug_error_string())
        return cls(grpc.StatusCode.UNKNOWN, str(exc))


def invalid(message: str) -> AimaasError:
    return AimaasError(grpc.StatusCode.INVALID_ARGUMENT, message)
