"""The HTTP edge middleware: trace context, access log, concurrency limits, body limit, request timeout.

One pure ASGI middleware (no BaseHTTPMiddleware: it costs a task and a stream copy per request),
outermost in the app, so every response (413, 429 and 504 included) is logged and traced:

- W3C `traceparent`/`tracestate` are extracted with OpenTelemetry's propagator and a server span
  is made current; handlers inject it into the data plane call's metadata.
- When the request carries `Authorization`, the key is authenticated once here (for the per-key
  limit and the log's key_id); handlers reuse the principal from the scope state, and a failed
  authentication is left to the handler that needs one (health probes need none).
- Concurrency: at most `max_concurrency` requests in flight overall and `max_concurrency_per_key`
  per API key (0: unlimited); beyond, 429 with Retry-After. Health probes are exempt.
- Body: a Content-Length over `max_body_bytes` is refused before reading; a streamed (chunked)
  body is counted while it is read, and crossing the limit raises BodyTooLarge (413). Model
  uploads (`unlimited_body`) are exempt: the registry bounds artifacts itself while they stream.
- Timeout: the request must start its response within `request_timeout_seconds` after the last
  body bytes arrived (a long upload is not cut while it still streams; the timer moves in steps of
  1% of the timeout); once the response has started (event streams), no timeout applies. On expiry
  the handler is cancelled and 504 sent.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from services.common.auth import Principal
from services.gateway.settings import LimitSettings

PRINCIPAL_STATE = "aimaas_principal"
REQUEST_DEADLINE_STATE = "aimaas_deadline"
MODEL_STATE = "aimaas_model"
_PROPAGATOR = TraceContextTextMapPropagator()
_UNLIMITED_PREFIXES = ("/v2/health/",)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)


class BodyTooLarge(Exception):
    """The request body exceeds the configured limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


def set_model(request: Request, model: str) -> None:
    """Name the model a request is for, for the access log."""
    request.scope.setdefault("state", {})[MODEL_STATE] = model


async def read_body(request: Request) -> bytes:
    """The whole request body (the middleware enforces the size limit while it streams in)."""
    return await request.body()


async def receive_body(receive: Any) -> bytes:
    """The whole request body straight from ASGI `receive`, as read_body without a Request (the
    inference fast path). A client gone mid-body raises ClientDisconnect, as Starlette does."""
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        return message.get("body", b"")
    chunks = []
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


def error_body(message: str) -> bytes:
    """The body of every error response, `{"error": "..."}`."""
    # ASCII JSON: messages may echo client input, and lone surrogates stay encodable as escapes.
    return json.dumps({"error": message}).encode()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The gateway's one error shape, `{"error": "..."}`, for every REST route."""
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


def validation_message(exc: Any) -> str:
    """A request-validation failure (FastAPI's RequestValidationError) as one line naming each field."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


async def send_error(send: Any, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = error_body(message)
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


def _path_model(scope: dict) -> str | None:
    # Routes that do not name their model explicitly (the /v1 management API uses {name} under /v1/models/).
    params = scope.get("path_params") or {}
    if "model" in params:
        return params["model"]
    if "name" in params and scope["path"].startswith("/v1/models/"):
        return params["name"]
    return None


class EdgeMiddleware:
    def __init__(
        self,
        app: Any,
        *,
        authenticator: Any,
        limits: LimitSettings,
        tracer: trace.Tracer | None,
        logger: structlog.stdlib.BoundLogger,
        unlimited_body: Callable[[str, str], bool] | None = None,
    ) -> None:
        """`tracer`: None when spans go nowhere (no exporter). `unlimited_body(method, path)`: requests
        whose body the limit does not apply to (streamed uploads that the upstream service bounds
        itself while they stream)."""
        self.app = app
        self._unlimited_body = unlimited_body or (lambda _method, _path: False)
        self._auth = authenticator
        self._limits = limits
        self._tracer = tracer
        self._log = logger
        self._in_flight = 0
        self._per_key: dict[str, int] = {}
        self._retry_after = [(b"retry-after", str(limits.retry_after_seconds).encode())]

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        carrier: dict[str, str] = {}
        authorization = content_length = None
        for key, value in scope["headers"]:
            if key == b"traceparent" or key == b"tracestate":
                carrier[key.decode("latin-1")] = value.decode("latin-1")
            elif key == b"authorization":
                authorization = value.decode("latin-1")
            elif key == b"content-length":
                content_length = value
        method = scope["method"]
        path = scope["path"]
        span, token = self.open_span(method, path, carrier)
        state = scope.setdefault("state", {})
        outcome = {"status": None}
        key_id = None
        try:
            if authorization is not None:
                principal = await self.authenticate(authorization)
                if principal is not None:
                    state[PRINCIPAL_STATE] = principal
                    key_id = principal.key_id
            await self._limited(scope, receive, send, state, key_id, content_length, outcome)
        finally:
            self.finish(span, token, method=method, path=path, status=outcome["status"] or 500, started=started,
                        model=state.get(MODEL_STATE) or _path_model(scope), key_id=key_id)

    # -- the steps of a request, shared with the inference lane (services.gateway.rest.lane) --------------

    def open_span(self, method: str, path: str, carrier: dict[str, str]) -> tuple[Span, object]:
        """The request's server span, in the caller's trace (W3C headers in `carrier`), made current.
        Returns it with the token that `finish` detaches."""
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self._server_span(method, path, parent)
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    def finish(self, span: Span, token: object, *, method: str, path: str, status: int, started: float,
               model: str | None, key_id: str | None) -> None:
        """End the request's span and write its access log line."""
        span.set_attribute("http.status_code", status)
        if status >= 500:
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        context = span.get_span_context()
        span.end()
        otel_context.detach(token)
        self._log.info(
            "http request",
            method=method,
            path=path,
            status=status,
            duration_ms=round((time.perf_counter() - started) * 1e3, 3),
            model=model,
            key_id=key_id,
            trace_id=format(context.trace_id, "032x") if context.is_valid else None,
        )

    def _server_span(self, method: str, path: str, parent: otel_context.Context | None) -> Span:
        if self._tracer is not None:
            return self._tracer.start_span(f"HTTP {method}", context=parent, kind=SpanKind.SERVER,
                                           attributes={"http.method": method, "http.target": path})
        # Spans go nowhere: fresh ids in the caller's trace (or a new one) are all the access log and
        # the upstream call need, at a third of the SDK's cost for a span it would not record.
        inherited = trace.get_current_span(parent).get_span_context() if parent is not None else None
        if inherited is not None and inherited.is_valid:
            trace_id, trace_state = inherited.trace_id, inherited.trace_state
        else:
            trace_id, trace_state = random.getrandbits(128) or 1, None
        return NonRecordingSpan(SpanContext(trace_id, random.getrandbits(64) or 1, is_remote=False,
                                            trace_flags=_UNSAMPLED, trace_state=trace_state))

    async def authenticate(self, authorization: str) -> Principal | None:
        """The key's principal, or None when it does not authenticate (the handler that needs a
        principal authenticates again and reports the precise error)."""
        try:
            return await self._auth.authenticate(authorization)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the handler re-authenticates and reports the precise error
            return None

    def body_limit(self, method: str, path: str) -> int | None:
        return None if self._unlimited_body(method, path) else self._limits.max_body_bytes

    @staticmethod
    def content_length_refusal(content_length: bytes | str | None, max_body: int | None) -> tuple[int, str] | None:
        """(status, message) when the Content-Length header alone rules the request out."""
        if content_length is None:
            return None
        if not content_length.isdigit():
            return 400, "Content-Length must be a non-negative integer"
        if max_body is not None and int(content_length) > max_body:
            return 413, f"request body of {int(content_length)} bytes exceeds the limit of {max_body} bytes"
        return None

    def admit(self, path: str, key_id: str | None) -> tuple[int, str, list] | None:
        """Count a request in against the concurrency limits: None when admitted (`release` it once
        answered), else the 429 (status, message, headers) to answer. Health probes are never limited."""
        if path.startswith(_UNLIMITED_PREFIXES):
            return None
        limits = self._limits
        if limits.max_concurrency and self._in_flight >= limits.max_concurrency:
            return (429, f"too many concurrent requests (limit {limits.max_concurrency}); retry later",
                    self._retry_after)
        if key_id is not None and limits.max_concurrency_per_key and \
                self._per_key.get(key_id, 0) >= limits.max_concurrency_per_key:
            message = f"too many concurrent requests for this API key (limit {limits.max_concurrency_per_key}); retry later"
            return 429, message, self._retry_after
        self._in_flight += 1
        if key_id is not None:
            self._per_key[key_id] = self._per_key.get(key_id, 0) + 1
        return None

    def release(self, path: str, key_id: str | None) -> None:
        """The admitted request is answered."""
        if path.startswith(_UNLIMITED_PREFIXES):
            return
        self._in_flight -= 1
        if key_id is not None:
            left = self._per_key[key_id] - 1
            if left:
                self._per_key[key_id] = left
            else:
                del self._per_key[key_id]

    async def _limited(
        self, scope: dict, receive: Any, send: Any, state: dict, key_id: str | None,
        content_length: bytes | None, outcome: dict,
    ) -> None:
        max_body = self.body_limit(scope["method"], scope["path"])

        async def respond(status: int, message: str, headers: list = ()) -> None:
            outcome["status"] = status
            await send_error(send, status, message, headers)

        refusal = self.content_length_refusal(content_length, max_body)
        if refusal is not None:
            await respond(*refusal)
            return
        path = scope["path"]
        refusal = self.admit(path, key_id)
        if refusal is not None:
            await respond(*refusal)
            return
        try:
            await self._run(scope, receive, send, state, outcome, max_body)
        finally:
            self.release(path, key_id)

    async def _run(self, scope: dict, receive: Any, send: Any, state: dict, outcome: dict, max_body: int | None) -> None:
        timeout = self._limits.request_timeout_seconds
        loop = asyncio.get_running_loop()
        state[REQUEST_DEADLINE_STATE] = loop.time() + timeout
        received = 0
        reschedule_slack = timeout / 100
        # asyncio.timeout can be moved: each body chunk pushes the deadline, the response start
        # removes it.
        guard = asyncio.timeout_at(state[REQUEST_DEADLINE_STATE])

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if max_body is not None and received > max_body:
                    raise BodyTooLarge(max_body)
                deadline = loop.time() + timeout
                state[REQUEST_DEADLINE_STATE] = deadline
                # Moving the timer costs a timer handle each time: a body that arrived with its headers
                # (nearly every request) leaves it where it is.
                if outcome["status"] is None and deadline - guard.when() > reschedule_slack:
                    guard.reschedule(deadline)
            return message

        async def tracked_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                guard.reschedule(None)
            await send(message)

        try:
            async with guard:
                await self.app(scope, limited_receive, tracked_send)
        except TimeoutError:
            if outcome["status"] is not None:
                raise
            outcome["status"] = 504
            await send_error(send, 504, f"request timed out after {timeout:g} s")
        except BodyTooLarge as exc:
            # Normally the app's handler answers 413; this covers a handler that let it escape.
            if outcome["status"] is not None:
                raise
            outcome["status"] = 413
            await send_error(send, 413, str(exc))
