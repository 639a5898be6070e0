"""The gateway's HTTP app: OIP REST routes, the /v1 management API and docs, the edge middleware and
the one error mapping, plus a uvicorn runner for the composition root whose protocol hands simple
inference requests to the inference lane (services.gateway.rest.lane) and the rest to the app.

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

from services.common.aio import start_eagerly
from services.common.errors import AimaasError, grpc_status_for, http_status_for
from services.common.tracing import Telemetry
from services.gateway.rest.codec import BodyTooLargeAfterDecoding
from services.gateway.rest.edge import BodyTooLarge, EdgeMiddleware, error_response, validation_message
from services.gateway.rest.lane import InferLane
from services.gateway.rest.oip import InferFastPath, build_oip_routes
from services.gateway.rest.tasks import TaskCatalog, build_task_router
from services.gateway.settings import GatewaySettings



class ErrorMapper:
    """Exception -> `{"error": ...}` response: the one mapping, used by the app's exception handlers, by
    the inference fast path and by the inference lane."""

    def __init__(self, *, retry_after_seconds: int, logger: structlog.stdlib.BoundLogger) -> None:
        self._retry_after = {"Retry-After": str(retry_after_seconds)}
        self._log = logger

    def _status(self, code: grpc.StatusCode, message: str) -> tuple[int, str, dict[str, str] | None]:
        status = http_status_for(code)
        return status, message, self._retry_after if status == 429 else None

    def error(self, exc: Exception, path: str) -> tuple[int, str, dict[str, str] | None]:
        """(status, message, extra headers) of the error response for `exc`, raised serving `path`."""
        if isinstance(exc, (AimaasError, grpc.aio.AioRpcError)):
            code, message = grpc_status_for(exc)
            if (
                isinstance(exc, grpc.aio.AioRpcError)
                and http_status_for(code) >= 500
                and code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            ):
                self._log.warning("upstream call failed", path=path, code=code.name, details=exc.details())
            return self._status(code, message)
        if isinstance(exc, RequestValidationError):
            return 400, validation_message(exc), None
        if isinstance(exc, StarletteHTTPException):
            status = 400 if exc.status_code == 422 else exc.status_code
            detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
            return status, detail, dict(exc.headers) if exc.headers else None
        if isinstance(exc, (BodyTooLarge, BodyTooLargeAfterDecoding)):
            return 413, str(exc), None
        code, message = grpc_status_for(exc)  # infrastructure errors (etcd, object store) -> 503
        if code is grpc.StatusCode.INTERNAL:
            self._log.error("request failed unexpectedly", path=path, exc_info=exc)
        return self._status(code, message)

    def __call__(self, request: Request, exc: Exception) -> Response:
        return error_response(*self.error(exc, request.url.path))


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
    catalog: TaskCatalog | None = None,
) -> FastAPI:
    """The FastAPI app of the gateway's REST port.

    `docs` mounts the interactive docs (services.gateway.rest.docs.mount_docs); without it the app
    serves no docs pages, only /openapi.json. `catalog`: the task cards shared with the management
    router and the docs (default: a catalog of its own).
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
    oip_router, handlers = build_oip_routes(
        dataplane, auth,
        max_body_bytes=limits.max_body_bytes,
        sticky_header=settings.gateway.sticky_header,
        server_version=version,
    )
    app.include_router(oip_router)
    app.include_router(build_task_router(
        dataplane, auth, catalog or TaskCatalog(dataplane), sticky_header=settings.gateway.sticky_header
    ))
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
        InferFastPath(app.fastapi_call, infer=handlers.asgi, on_error=mapper),
        authenticator=auth, limits=limits, logger=log.bind(kind="access"),
        tracer=telemetry.tracer("services.gateway.http") if exporting else None,
        unlimited_body=_is_model_upload if management_router is not None else None,
    )
    if settings.gateway.rest_infer_lane:
        app.lane = InferLane(app.edge, handlers, mapper.error, request_timeout_seconds=limits.request_timeout_seconds)
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
    lane: InferLane | None = None  # served by serve_http's protocol, in front of the app

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


def _gateway_protocol(base: type, lane: InferLane | None) -> type:
    class GatewayHttpProtocol(base):  # type: ignore[misc, valid-type]
        """uvicorn's protocol, with small responses in one send (_CoalescingTransport) and simple
        inference requests answered by the inference lane (services.gateway.rest.lane).

        Responses leave in request order: the lane takes a request only while uvicorn has none
        open (its parser between requests, its last response complete), and whatever arrives while
        a lane request is open waits (reading paused) until that one is answered.
        """

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_CoalescingTransport(transport, self, self.loop))
            self.in_message = False  # uvicorn's parser is inside a request
            self.lane_open = False  # a lane request is being answered
            self.held = b""  # what arrived behind it
            self.close_after_lane = False
            self.lane_timer: asyncio.TimerHandle | None = None
            self.draining = False  # answers wait in the write buffer: read nothing more until they leave

        def on_message_begin(self) -> None:
            self.in_message = True
            super().on_message_begin()

        def on_message_complete(self) -> None:
            self.in_message = False
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self.lane_open or self.draining:
                self.held += data
                self.flow.pause_reading()
                return
            # A loop, not recursion: a read may hold many pipelined requests answered at once.
            while lane is not None and data and not self.in_message and (
                    self.cycle is None or self.cycle.response_complete):
                parsed = lane.parse(data)
                if parsed is None:
                    break
                request, data = parsed
                self._unset_keepalive_if_required()
                self.lane_open = True
                # Eagerly: the request reaches its node from this callback, with no loop trip.
                answer = start_eagerly(lane.serve(request, self.lane_write, self.server_state.default_headers))
                if not answer.done():
                    self.held = data
                    self.tasks.add(answer)  # uvicorn's graceful shutdown waits for it
                    answer.add_done_callback(self.lane_done)
                    self.lane_timer = self.loop.call_at(request.deadline, answer.cancel)
                    return
                if not self.lane_answered(answer):
                    return
                if self.draining:
                    self.held = data
                    return
            if data:
                super().data_received(data)

        def lane_write(self, response: bytes) -> None:
            if self.close_after_lane:
                # The server is stopping and closes the connection after this answer: say so, as
                # uvicorn's own responses do, so that the client does not send the next request here.
                line_end = response.index(b"\r\n") + 2
                response = response[:line_end] + b"connection: close\r\n" + response[line_end:]
            if not self.transport.is_closing():
                self.transport.write(response)

        def lane_done(self, answer: asyncio.Future) -> None:
            self.tasks.discard(answer)
            if self.lane_timer is not None:
                self.lane_timer.cancel()
                self.lane_timer = None
            if self.lane_answered(answer) and not self.draining:
                self.replay_held()

        def replay_held(self) -> None:
            held, self.held = self.held, b""
            if held:
                self.data_received(held)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.draining:
                self.draining = False
                self.flow.resume_reading()
                self.replay_held()

        def lane_answered(self, answer: asyncio.Future) -> bool:
            """Bookkeeping after a lane request; whether the connection goes on."""
            self.lane_open = False
            if not answer.cancelled() and answer.exception() is not None:
                self.logger.error("inference lane failed", exc_info=answer.exception())
                self.transport.close()  # its answer may be missing: the connection cannot go on
                return False
            if self.transport.is_closing():
                return False
            if self.close_after_lane or answer.cancelled():
                self.transport.close()
                return False
            self.on_response_complete()  # uvicorn's: counts it, resumes reading, arms the keep-alive timer
            if self.flow.write_paused:
                # The client does not read its answers: take no more requests from it until it does
                # (uvicorn's own cycle waits the same way), so answers cannot pile up in memory.
                self.draining = True
                self.flow.pause_reading()
            return True

        def shutdown(self) -> None:
            if self.lane_open:
                self.close_after_lane = True
            else:
                super().shutdown()

    return GatewayHttpProtocol


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
    keep_alive_seconds: float = 5.0,
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

        http = _gateway_protocol(HttpToolsProtocol, getattr(app, "lane", None))
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
        timeout_keep_alive=keep_alive_seconds,  # an idle keep-alive connection is closed after this long
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
