"""REST transport of the Open Inference Protocol (KServe v2 over HTTP) in front of the gateway data plane.

Translation only: bodies go through the codec (services.gateway.rest.codec) into the same protobuf
messages the gRPC edge uses, and the one GatewayDataPlane does the routing. Errors are raised as
domain errors; the app's handlers (services.gateway.http_app) turn them into `{"error": "..."}`
with the status of services.common.errors.http_status_for.

Auth: health endpoints are open (probes); everything else needs a principal, READ for metadata,
readiness, statistics and the index, INFER for inference, both within the key's model scope.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import Response
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from inference import grpc_predict_v2_pb2 as pb
from services.common.auth import Permission, Principal
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.gateway.rest import codec
from services.gateway.rest.edge import (
    MODEL_STATE, PRINCIPAL_STATE, REQUEST_DEADLINE_STATE, read_body, receive_body, set_model,
)

SERVER_NAME = "aimaas"
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
_PROPAGATOR = TraceContextTextMapPropagator()
_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_ERRORS = {
    status: {"description": text, "content": {JSON: {"schema": _ERROR_SCHEMA}}}
    for status, text in (
        (400, "malformed request"), (401, "missing or invalid API key"), (403, "not permitted"),
        (404, "unknown model or version"), (413, "request body too large"), (429, "too many concurrent requests"),
        (503, "no replica available"), (504, "request timed out"),
    )
}
_TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                                 "INT32", "INT64", "FP16", "FP32", "FP64", "BF16", "BYTES"]},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "Inference request JSON; with the binary tensor data extension the JSON is followed "
        "by raw tensor bytes and its length is given in Inference-Header-Content-Length.",
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _TENSOR_SCHEMA},
                        "outputs": {
                            "type": "array",
                            "items": {"type": "object", "required": ["name"],
                                      "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}},
                        },
                    },
                }
            },
            OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_INDEX_BODY = {
    "requestBody": {
        "required": False,
        "content": {JSON: {"schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}},
    }
}


class Authenticator(Protocol):
    async def authenticate(self, authorization_header: str | None) -> Principal: ...

    def authorize(self, principal: Principal, permission: Permission, model: str | None = None) -> None: ...


class DataPlane(Protocol):
    async def server_live(self) -> bool: ...
    async def server_ready(self) -> bool: ...
    async def model_ready(self, model: str, version: str = "") -> bool: ...
    async def model_metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse: ...
    async def model_infer(self, request: pb.ModelInferRequest, *, principal: Principal, timeout: float | None,
                          sticky_key: str | None = None, metadata: Any = ()) -> pb.ModelInferResponse: ...
    async def model_statistics(self, model: str = "", version: str = "") -> pb.ModelStatisticsResponse: ...
    async def repository_index(self) -> pb.RepositoryIndexResponse: ...


def json_response(document: Any, status: int = 200) -> Response:
    return Response(json.dumps(document, separators=(",", ":")).encode(), status_code=status, media_type=JSON)


def _version(version: str) -> str:
    # Versions are positive integers in this mesh; anything else can only be a typo.
    if not version.isascii() or not version.isdigit():
        raise InvalidArgument(f"model version must be a positive integer, got {version[:40]!r}")
    return version


InferHandler = Callable[[dict, Any, str, str], Awaitable[codec.EncodedResponse]]
_HEADER_LENGTH_KEY = codec.HEADER_LENGTH.encode()
_INFER_PREFIX = "/v2/models/"
_INFER_SUFFIX = "/infer"


def infer_response_headers(encoded: codec.EncodedResponse) -> list[tuple[str, str]]:
    """Content type and, with binary outputs, Inference-Header-Content-Length of an inference response."""
    if encoded.header_length is None:
        return [("content-type", JSON)]
    return [("content-type", OCTET_STREAM), ("inference-header-content-length", str(encoded.header_length))]


def build_oip_router(
    dataplane: DataPlane,
    auth: Authenticator,
    *,
    max_body_bytes: int,
    sticky_header: str = "",
    server_version: str = "",
) -> APIRouter:
    """The /v2 routes. `max_body_bytes` also bounds a decompressed (gzip/deflate) body."""
    return build_oip_routes(dataplane, auth, max_body_bytes=max_body_bytes, sticky_header=sticky_header,
                            server_version=server_version)[0]


def build_oip_routes(
    dataplane: DataPlane,
    auth: Authenticator,
    *,
    max_body_bytes: int,
    sticky_header: str = "",
    server_version: str = "",
) -> tuple[APIRouter, InferHandlers]:
    """The /v2 router, and its inference handler for InferFastPath and the inference lane."""
    router = APIRouter(prefix="/v2", tags=["inference (Open Inference Protocol)"], responses=_ERRORS)

    async def principal_for(request: Request, permission: Permission, model: str | None) -> Principal:
        # The edge middleware authenticated already when the request carried a key (for the
        # per-key limit and the access log); otherwise authenticate here (raises 401).
        principal = request.scope.get("state", {}).get(PRINCIPAL_STATE)
        if principal is None:
            principal = await auth.authenticate(request.headers.get("authorization"))
        auth.authorize(principal, permission, model)
        return principal

    @router.get("", summary="Server metadata")
    async def server_metadata(request: Request) -> Response:
        await principal_for(request, Permission.READ, None)
        return json_response({"name": SERVER_NAME, "version": server_version, "extensions": EXTENSIONS})

    @router.get("/health/live", summary="Server live (no auth: liveness probe)")
    async def health_live() -> Response:
        live = await dataplane.server_live()
        return json_response({"live": live} if live else {"live": False, "error": "server is not live"}, 200 if live else 503)

    @router.get("/health/ready", summary="Server ready (no auth: readiness probe)")
    async def health_ready() -> Response:
        # 503 rather than the spec's generic 4xx: "not ready yet" is not a client error, and
        # every probe treats any non-2xx alike.
        ready = await dataplane.server_ready()
        return json_response({"ready": ready} if ready else {"ready": False, "error": "server is not ready"}, 200 if ready else 503)

    async def model_ready(request: Request, model: str, version: str) -> Response:
        set_model(request, model)
        await principal_for(request, Permission.READ, model)
        ready = await dataplane.model_ready(model, version)
        if ready:
            return json_response({"name": model, "ready": True})
        return json_response({"name": model, "ready": False, "error": f"model '{model}' is not ready"}, 503)

    async def model_metadata(request: Request, model: str, version: str) -> Response:
        set_model(request, model)
        await principal_for(request, Permission.READ, model)
        return json_response(codec.metadata_to_json(await dataplane.model_metadata(model, version)))

    async def model_stats(request: Request, model: str, version: str) -> Response:
        if model:
            set_model(request, model)
        principal = await principal_for(request, Permission.READ, model or None)
        stats = await dataplane.model_statistics(model, version)
        document = codec.message_to_json(stats)
        if not model and principal.model_scope:
            document["model_stats"] = [s for s in document["model_stats"] if principal.in_scope(s["name"])]
        return json_response(document)

    sticky_key = sticky_header.lower().encode("latin-1") if sticky_header else None
    decoder = codec.RequestDecoder()

    async def infer(scope: dict, receive: Any, model: str, version: str) -> codec.EncodedResponse:
        # Works on the ASGI scope, not a Starlette Request: this is the hot path (InferFastPath),
        # and one pass over the raw headers replaces a Headers object and its per-lookup scans.
        state = scope.setdefault("state", {})
        state[MODEL_STATE] = model
        authorization = encoding = header_length = sticky = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                authorization = value.decode("latin-1")
            elif key == b"content-encoding":
                encoding = value.decode("latin-1")
            elif key == _HEADER_LENGTH_KEY:
                header_length = value.decode("latin-1")
            elif key == sticky_key:
                sticky = value.decode("latin-1")
        principal = state.get(PRINCIPAL_STATE)
        if principal is None:
            principal = await auth.authenticate(authorization)
        auth.authorize(principal, Permission.INFER, model)
        body = await receive_body(receive)
        return await infer_body(model, version, body, principal=principal, encoding=encoding,
                                header_length=header_length, sticky=sticky,
                                deadline=state.get(REQUEST_DEADLINE_STATE))

    async def infer_body(
        model: str, version: str, body: bytes, *, principal: Principal, encoding: str | None,
        header_length: str | None, sticky: str | None, deadline: float | None,
    ) -> codec.EncodedResponse:
        """An authorized inference request's body through the data plane; its encoded response."""
        body = codec.decompress(body, encoding, max_body_bytes)
        decoded = decoder.decode(body, codec.parse_header_length(header_length, len(body)), model=model, version=version)
        timeout = remaining_seconds(deadline, decoded.timeout_s)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        response = await dataplane.model_infer(
            decoded.request,
            principal=principal,
            timeout=timeout,
            sticky_key=sticky or None,
            metadata=tuple(carrier.items()),
        )
        return codec.encode_infer_response(response, decoded)

    async def infer_lane(model: str, version: str, body: bytes, *, principal: Principal | None,
                         authorization: str | None, encoding: str | None, header_length: str | None,
                         sticky: str | None, deadline: float) -> codec.EncodedResponse:
        version = _version(version) if version else ""
        if principal is None:
            principal = await auth.authenticate(authorization)
        auth.authorize(principal, Permission.INFER, model)
        return await infer_body(model, version, body, principal=principal, encoding=encoding,
                                header_length=header_length, sticky=sticky, deadline=deadline)

    async def infer_route(request: Request, model: str, version: str) -> Response:
        encoded = await infer(request.scope, request.receive, model, version)
        return Response(encoded.body, headers=dict(infer_response_headers(encoded)))

    async def repository_index(request: Request) -> Response:
        principal = await principal_for(request, Permission.READ, None)
        body = await read_body(request)
        ready_only = False
        if body.strip():
            try:
                document = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise InvalidArgument("repository index request is not valid JSON") from None
            if not isinstance(document, dict):
                raise InvalidArgument("repository index request must be a JSON object")
            ready_only = document.get("ready", False)
            if not isinstance(ready_only, bool):
                raise InvalidArgument("'ready' must be a boolean")
        index = await dataplane.repository_index()
        entries = [
            {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
            for m in index.models
            if principal.in_scope(m.name) and (not ready_only or m.state == "READY")
        ]
        return json_response(entries)

    # Before /models/{model}, which would otherwise take "stats" for a model name.
    @router.get("/models/stats", summary="Statistics of every model")
    async def all_stats(request: Request) -> Response:
        return await model_stats(request, "", "")

    # Unversioned and versioned forms share one handler each.
    for suffix, versioned in (("", False), ("/versions/{version}", True)):
        base = "/models/{model}" + suffix

        def bind(handler, versioned=versioned):
            if versioned:
                async def endpoint(request: Request, model: str, version: str) -> Response:
                    return await handler(request, model, _version(version))
            else:
                async def endpoint(request: Request, model: str) -> Response:
                    return await handler(request, model, "")
            endpoint.__name__ = handler.__name__ + ("_version" if versioned else "")
            return endpoint

        router.add_api_route(base, bind(model_metadata), methods=["GET"], summary="Model metadata")
        router.add_api_route(base + "/ready", bind(model_ready), methods=["GET"], summary="Model ready")
        router.add_api_route(base + "/stats", bind(model_stats), methods=["GET"], summary="Model statistics")
        router.add_api_route(base + "/infer", bind(infer_route), methods=["POST"], summary="Inference",
                             openapi_extra=_INFER_BODY)

    router.add_api_route("/repository/index", repository_index, methods=["POST"], summary="Repository index",
                         openapi_extra=_INDEX_BODY)

    async def infer_entry(scope: dict, receive: Any, model: str, version: str) -> codec.EncodedResponse:
        return await infer(scope, receive, model, _version(version) if version else "")

    return router, InferHandlers(asgi=infer_entry, lane=infer_lane, sticky_header=sticky_key)


@dataclass(frozen=True, slots=True)
class InferHandlers:
    """The inference handler in its two entries: `asgi(scope, receive, model, version)` for
    InferFastPath, and `lane(model, version, body, ...)` for the inference lane, whose request is
    parsed already (services.gateway.rest.lane). `sticky_header`: the lowercase sticky routing header."""

    asgi: InferHandler
    lane: Callable[..., Awaitable[codec.EncodedResponse]]
    sticky_header: bytes | None


def infer_target(path: str) -> tuple[str, str] | None:
    """(model, version or "") of an inference path `/v2/models/{m}[/versions/{v}]/infer`, else None."""
    if not (path.startswith(_INFER_PREFIX) and path.endswith(_INFER_SUFFIX)):
        return None
    parts = path[len(_INFER_PREFIX):-len(_INFER_SUFFIX)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], ""
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


class InferFastPath:
    """ASGI layer that sends `POST /v2/models/{m}[/versions/{v}]/infer` straight to the inference handler.

    FastAPI's route matching (a regex per route) and dependency solving cost more than the rest of
    the edge together on a small request; the FastAPI route stays registered (OpenAPI document,
    identical behaviour) and still serves anything this path does not recognise.
    """

    def __init__(self, app: Any, infer: InferHandler, on_error: Callable[[Request, Exception], Response]) -> None:
        self.app = app
        self._infer = infer
        self._on_error = on_error

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            target = infer_target(scope["path"])
            if target is not None:
                try:
                    encoded = await self._infer(scope, receive, *target)
                except Exception as exc:  # noqa: BLE001 - mapped exactly as the app's handlers do
                    await self._on_error(Request(scope, receive), exc)(scope, receive, send)
                    return
                headers = [(key.encode(), value.encode()) for key, value in infer_response_headers(encoded)]
                headers.append((b"content-length", str(len(encoded.body)).encode()))
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": encoded.body})
                return
        await self.app(scope, receive, send)


def remaining_seconds(deadline: float | None, requested: float | None) -> float | None:
    """Seconds left for the data plane call: the edge deadline (loop time), shortened by the request's
    own timeout."""
    loop_time = asyncio.get_running_loop().time()
    remaining = None if deadline is None else deadline - loop_time
    if requested is not None:
        remaining = requested if remaining is None else min(remaining, requested)
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("request timed out before it reached a model replica")
    return remaining
