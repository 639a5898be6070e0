"""The gateway's HTTP app: OIP REST routes, the /v1 management API and docs, the edge middleware and
the one error mapping, plus a uvicorn runner for the composition root.

Every error leaves as `{"error": "..."}` with the status of services.common.errors.http_status_for
(domain errors, and gRPC errors passed through from upstream services). FastAPI's own request
validation errors become 400 (never 422), unknown routes 404, wrong methods 405, anything
unexpected 500 with a generic message (details only in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import socket
import ssl as ssl_module
from collections.abc import Callable
from typing import Any

import grpc
import structlog
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import AimaasError, grpc_status_for, http_status_for
from services.common.tracing import Telemetry
from services.gateway.rest.codec import BodyTooLargeAfterDecoding
from services.gateway.rest.edge import BodyTooLarge, EdgeMiddleware, error_response, validation_message
from services.gateway.rest.oip import InferFastPath, build_oip_routes
from services.gateway.settings import GatewaySettings



class ErrorMapper:
    """Exception -> `{"error": ...}` response: the one mapping, used by the app's exception handlers and
    by the inference fast path."""

    def __init__(self, *, retry_after_seconds: int, logger: structlog.stdlib.BoundLogger) -> None:
        self._retry_after = {"Retry-After": str(retry_after_seconds)}
        self._log = logger

    def _status(self, code: grpc.StatusCode, message: str) -> Response:
        status = http_status_for(code)
        return error_response(status, message, self._retry_after if status == 429 else None)

    def __call__(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, (AimaasError, grpc.aio.AioRpcError)):
            code, message = grpc_status_for(exc)
            if (
                isinstance(exc, grpc.aio.AioRpcError)
                and http_status_for(code) >= 500
                and code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            ):
                self._log.warning("upstream call failed", path=request.url.path, code=code.name, details=exc.details())
            return self._status(code, message)
        if isinstance(exc, RequestValidationError):
            return error_response(400, validation_message(exc))
        if isinstance(exc, StarletteHTTPException):
            status = 400 if exc.status_code == 422 else exc.status_code
            detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
            return error_response(status, detail, dict(exc.headers) if exc.headers else None)
        if isinstance(exc, (BodyTooLarge, BodyTooLargeAfterDecoding)):
            return error_response(413, str(exc))
        code, message = grpc_status_for(exc)  # infrastructure errors (etcd, object store) -> 503
        if code is grpc.StatusCode.INTERNAL:
            self._log.error("request failed unexpectedly", path=request.url.path, exc_info=exc)
        return self._status(code, message)


def install_error_handlers(app: FastAPI, mapper: ErrorMapper) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        return mapper(request, exc)

    for kind in (AimaasError, grpc.aio.AioRpcError, RequestValidationError, StarletteHTTPException, BodyTooLarge,
                 BodyTooLargeAfterDecoding, Exception):
        app.add_exception_handler(kind, handle)


def build_http_app(
    dataplane: Any,
    auth: Any,
    settings: GatewaySettings,
    management_router: APIRouter | None = None,
    docs: Callable[[FastAPI], None] | None = None,
    *,
    telemetry: Telemetry | None = None,
    logger: structlog.stdlib.BoundLogger | None = None,
    version: str = "",
) -> FastAPI:
    """The FastAPI app of the gateway's REST port.

    `docs` mounts the interactive docs (services.gateway.rest.docs.mount_docs); without it the app
    serves no docs pages, only /openapi.json.
    """
    log = logger or structlog.get_logger(service="gateway")
    app = GatewayHttpApp(
        title="AIMaaS gateway",
        version=version or "0",
        description="Open Inference Protocol (KServe v2) REST data plane and the AIMaaS management API.",
        docs_url=None,
        redoc_url=None,
    )
    limits = settings.gateway.limits
    oip_router, infer = build_oip_routes(
        dataplane, auth,
        max_body_bytes=limits.max_body_bytes,
        sticky_header=settings.gateway.sticky_header,
        server_version=version,
    )
    app.include_router(oip_router)
    if management_router is not None:
        app.include_router(management_router)
    if docs is not None:
        docs(app)
    mapper = ErrorMapper(retry_after_seconds=limits.retry_after_seconds, logger=log)
    install_error_handlers(app, mapper)
    # Without an exporter the edge records no spans, but still mints trace ids for the access log
    # and the upstream metadata.
    exporting = telemetry is not None and telemetry.exporting
    app.edge = EdgeMiddleware(
        InferFastPath(app.fastapi_call, infer=infer, on_error=mapper),
        authenticator=auth, limits=limits, logger=log.bind(kind="access"),
        tracer=telemetry.tracer("services.gateway.http") if exporting else None,
        unlimited_body=_is_model_upload if management_router is not None else None,
    )
    return app


# POST /v1/models/{name}/versions (G3's streamed upload): artifacts may be far larger than an
# inference body; the registry enforces AIMAAS_REGISTRY__MAX_ARTIFACT_BYTES as they stream.
_UPLOAD_PATH = re.compile(r"^/v1/models/[^/]+/versions/?$")


def _is_model_upload(method: str, path: str) -> bool:
    return method == "POST" and _UPLOAD_PATH.match(path) is not None


class GatewayHttpApp(FastAPI):
    """FastAPI with the edge middleware outside FastAPI's own stack: it sees every request and response
    (500s of FastAPI's error middleware included), and the inference fast path skips that stack."""

    edge: Any = None

    async def fastapi_call(self, scope: dict, receive: Any, send: Any) -> None:
        await super().__call__(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.edge(scope, receive, send)


class HttpServer:
    """One uvicorn server (uvloop + httptools when installed) running inside the caller's event loop.

    Signals stay with the composition root (services.common.aio.run_service), not uvicorn.
    """

    def __init__(self, server: uvicorn.Server, task: asyncio.Task, port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    async def stop(self, grace_seconds: float = 5.0) -> None:
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_seconds)
        except TimeoutError:
            self._server.force_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task


class _CoalescingTransport:
    """uvicorn's transport, holding a response's head until its first body write, so that a small
    response leaves in one send (uvicorn writes the status line and headers on `http.response.start`
    and the body on the next message: two loopback or TCP sends, and a client woken twice).

    The head is the first write after the connection's current response started; at the latest it
    leaves at the end of this event-loop iteration, so an event stream whose first event comes later
    still gets its headers at once. Anything else (100 Continue, a pipelined response, errors the
    protocol writes itself) passes straight through.
    """

    def __init__(self, transport: asyncio.Transport, protocol: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._protocol = protocol
        self._loop = loop
        self._head: bytes | None = None
        self._head_cycle: Any = None
        # The rest of the transport interface, bound once (uvicorn calls these per request).
        self.get_extra_info = transport.get_extra_info
        self.is_closing = transport.is_closing
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.set_protocol = transport.set_protocol
        self.get_protocol = transport.get_protocol
        self.get_write_buffer_size = transport.get_write_buffer_size
        self.set_write_buffer_limits = transport.set_write_buffer_limits
        self.can_write_eof = transport.can_write_eof
        self.abort = transport.abort

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data = self._head + data
            self._head = None
        else:
            cycle = self._protocol.cycle
            if cycle is not None and cycle is not self._head_cycle and cycle.response_started \
                    and not cycle.response_complete:
                self._head_cycle = cycle
                self._head = data
                self._loop.call_soon(self.flush)
                return
        self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()


def _coalescing_protocol(base: type) -> type:
    class CoalescingHttpProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_CoalescingTransport(transport, self, self.loop))

    return CoalescingHttpProtocol


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


async def serve_http(
    app: FastAPI,
    host: str,
    port: int,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    graceful_seconds: int = 5,
) -> HttpServer:
    """Start serving `app` on host:port (0: a free port, see HttpServer.port) and return once listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    actual_port = sock.getsockname()[1]
    http: Any = "h11"
    if importlib.util.find_spec("httptools"):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        http = _coalescing_protocol(HttpToolsProtocol)
    config = uvicorn.Config(
        app,
        loop="none",  # the caller's running loop (uvloop when the process runs on it)
        http=http,
        ws="none",  # no WebSocket routes
        proxy_headers=False,  # nothing reads the client address; X-Forwarded-* need no parsing
        lifespan="off",
        access_log=False,  # our middleware writes the structured access log
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=graceful_seconds,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        ssl_cert_reqs=ssl_module.CERT_NONE,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises the start-up error
            raise RuntimeError("HTTP server stopped during start-up")
        await asyncio.sleep(0.01)
    return HttpServer(server, task, actual_port)
