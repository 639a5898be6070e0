"""The /v1 REST management API: a thin facade over the registry, scheduler and monitor gRPC services
and the API key store.

Every route declares its permission (READ for reads, WRITE for model/deployment changes, ADMIN for
keys) and, where the path names a model or deployment, checks the caller's model scope. Errors of
the backends (gRPC status) and of the gateway (domain errors) map through services.common.errors to
HTTP with {"error": message}; malformed requests are 400, never FastAPI's 422.

Uploads stream the request body into UploadVersion chunks as they arrive (bounded memory, the
registry hashes and verifies); downloads stream DownloadVersion chunks back. The deployment event
stream is Server-Sent Events fed by WatchDeployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import grpc
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.requests import ClientDisconnect

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.common.auth import Permission, Principal, require
from services.common.errors import AimaasError, InvalidArgument, Unavailable, grpc_status_for, http_status_for
from services.gateway.rest import mgmt_schemas as s
from services.gateway.rest.docs import deployment_docs_path
from services.gateway.rest.edge import error_response, validation_message
from services.registry.servicer import UPLOAD_ACCEPTED

if TYPE_CHECKING:
    from aimaas.monitor.v1.monitor_pb2_grpc import MonitorServiceStub
    from aimaas.registry.v1.registry_pb2_grpc import RegistryServiceStub
    from aimaas.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceStub
    from services.common.auth import ApiKeyStore, Authenticator

# Upload chunks sent to the registry: large enough to keep per-message overhead low, far below
# gRPC's 4 MiB message limit.
UPLOAD_CHUNK_BYTES = 1024 * 1024
# Longest wait for the registry's verdict on an upload's metadata before streaming the bytes anyway
# (the registry answers with initial metadata as soon as it starts reading; see _stream_upload).
UPLOAD_VERDICT_SECONDS = 10.0
# SSE comment sent while nothing changes, so proxies and clients keep the stream open.
SSE_KEEPALIVE_SECONDS = 15.0


@dataclass
class ManagementBackends:
    registry: RegistryServiceStub
    scheduler: SchedulerServiceStub
    monitor: MonitorServiceStub | None
    api_keys: ApiKeyStore
    public_http_url: str
    # Deadline of each unary backend call (uploads, downloads and event streams have none).
    call_timeout_seconds: float = 30.0
    # OpenAI model objects of the feature-extraction deployments a principal may use: the `data` of
    # GET /v1/models, so OpenAI clients list what /v1/embeddings serves (services.gateway.rest.tasks).
    embedding_models: Callable[[Principal], Awaitable[list[dict[str, Any]]]] | None = None


# -- errors -----------------------------------------------------------------------------------------


def exception_response(exc: Exception) -> Response | None:
    """The {"error"} response for an exception of a backend or of the gateway; None for others."""
    if isinstance(exc, RequestValidationError):
        return error_response(400, validation_message(exc))
    if isinstance(exc, (AimaasError, grpc.aio.AioRpcError)):
        code, message = grpc_status_for(exc)
        return error_response(http_status_for(code), message)
    return None


class ErrorMappingRoute(APIRoute):
    """Maps backend and domain errors of the handler (dependencies included) to {"error"} responses,
    so the router behaves the same in any app."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def mapped(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                response = exception_response(exc)
                if response is None:
                    raise
                return response

        return mapped


_ERROR = {"model": s.Error}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Malformed request or invalid value",
        401: "Missing or invalid API key",
        403: "The key's role or model scope does not allow this",
        404: "Not found",
        409: "Conflict with the current state (exists, in use, compare-and-swap lost)",
        413: "The request body exceeds the gateway's limit",
        429: "Too many requests",
        503: "A backend service is unavailable or not configured",
        504: "A backend service did not answer in time",
    }
    responses: dict[int | str, dict[str, Any]] = {
        code: {**_ERROR, "description": descriptions[code]} for code in (400, 401, 403, 429, 503, 504, *codes)
    }
    # Declaring the class keeps FastAPI from documenting a 422 that this API never sends (it is 400).
    responses["4XX"] = {**_ERROR, "description": "Other client errors (e.g. 405 method not allowed)"}
    return responses


# -- auth ------------------------------------------------------------------------------------------

# Declares the Bearer scheme in the OpenAPI document (Swagger UI's "Authorize"); the header itself is
# read and checked by the Authenticator so malformed headers get its precise 401.
_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer aimaas_<id>_<secret>`")


def _guard(auth: Authenticator, permission: Permission, *, scoped: bool = False) -> Any:
    # The `name` path parameter of /v1/models/{name} and /v1/deployments/{name} is the model scope.
    return require(permission, auth, model_params=("name",) if scoped else ())


# -- helpers ---------------------------------------------------------------------------------------

# Examples prefill Swagger UI's "Try it out" (and seed the explicit phase of the schema fuzzing).
ModelName = Annotated[str, Path(description="Model name.", pattern=s.NAME_PATTERN, examples=["iris"])]
DeploymentName = Annotated[
    str, Path(description="Deployment name (the endpoint name clients call).", pattern=s.NAME_PATTERN, examples=["iris"])
]
VersionNumber = Annotated[int, Path(ge=1, le=s.MAX_VERSION, description="Version number.", examples=[1])]
AliasName = Annotated[str, Path(description="Alias name.", pattern=s.NAME_PATTERN, examples=["production"])]
PageSize = Annotated[int, Query(ge=0, le=1000, description="Items per page (0: server default).")]
PageToken = Annotated[str, Query(max_length=1024, description="next_page_token of the previous page.")]


def _page(page_size: int, page_token: str) -> tpb.PageRequest:
    return tpb.PageRequest(page_size=page_size, page_token=page_token)


def _parse_labels(selectors: list[str]) -> dict[str, str]:
    # The query pattern guarantees "key=value" with a non-empty key.
    return dict(selector.split("=", 1) for selector in selectors)


def _proto(build: Callable[[], Any]) -> Any:
    """Build a request message; values protobuf rejects are the caller's error, not a 500."""
    try:
        return build()
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"invalid value: {exc}") from None


# Each event of the deployment stream (Open API < 3.2: `schema` describes one event); `data` is JSON.
_SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["deployment", "deleted", "error"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "anyOf": [
                    {"$ref": "#/components/schemas/Deployment"},
                    {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                    {"$ref": "#/components/schemas/Error"},
                ]
            },
        },
    },
}


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# -- the router -------------------------------------------------------------------------------------


def build_management_router(backends: ManagementBackends, auth: Authenticator) -> APIRouter:
    router = APIRouter(prefix="/v1", route_class=ErrorMappingRoute, dependencies=[Depends(_bearer)])
    registry, scheduler = backends.registry, backends.scheduler
    timeout = backends.call_timeout_seconds

    read = _guard(auth, Permission.READ)
    write = _guard(auth, Permission.WRITE)
    admin = _guard(auth, Permission.ADMIN)
    read_model = _guard(auth, Permission.READ, scoped=True)
    write_model = _guard(auth, Permission.WRITE, scoped=True)

    def deployment_json(d: spb.Deployment) -> s.Deployment:
        # Read per call: with port 0 the composition root learns the public URL only after binding.
        base_url = backends.public_http_url.rstrip("/")
        name = d.spec.name
        return s.Deployment.of(
            d, endpoint=f"{base_url}/v2/models/{name}/infer", docs_url=f"{base_url}{deployment_docs_path(name)}"
        )

    # -- models --------------------------------------------------------------------------------

    @router.post(
        "/models", status_code=201, response_model=s.Model, tags=["models"], summary="Create a model",
        responses=_errors(409),
    )
    async def create_model(body: s.ModelCreate, principal: Principal = write) -> s.Model:
        auth.authorize(principal, Permission.WRITE, body.name)
        reply = await registry.CreateModel(
            _proto(lambda: rpb.CreateModelRequest(name=body.name, description=body.description, labels=body.labels)),
            timeout=timeout,
        )
        return s.Model.of(reply.model)

    @router.get(
        "/models", response_model=s.ModelList, tags=["models"], summary="List models",
        responses=_errors(),
    )
    async def list_models(
        principal: Principal = read,
        page_size: PageSize = 0,
        page_token: PageToken = "",
        label: Annotated[
            list[Annotated[str, Query(pattern=r"^[^=]+=.*$")]],
            Query(max_length=64, description="key=value; every one must match."),
        ] = [],  # noqa: B006
    ) -> s.ModelList:
        reply = await registry.ListModels(
            _proto(lambda: rpb.ListModelsRequest(page=_page(page_size, page_token), label_selector=_parse_labels(label))),
            timeout=timeout,
        )
        models = [s.Model.of(m) for m in reply.models if principal.in_scope(m.name)]
        embedding = await backends.embedding_models(principal) if backends.embedding_models is not None else []
        return s.ModelList(models=models, next_page_token=reply.page.next_page_token,
                           data=[s.OpenAIModel(**m) for m in embedding])

    @router.get(
        "/models/{name}", response_model=s.ModelDetail, tags=["models"], summary="Get a model with its aliases",
        responses=_errors(404), dependencies=[read_model],
    )
    async def get_model(name: ModelName) -> s.ModelDetail:
        reply = await registry.GetModel(rpb.GetModelRequest(name=name), timeout=timeout)
        return s.ModelDetail(**s.Model.of(reply.model).model_dump(), aliases=[s.Alias.of(a) for a in reply.aliases])

    @router.patch(
        "/models/{name}", response_model=s.Model, tags=["models"], summary="Update description and/or labels",
        responses=_errors(404), dependencies=[write_model],
    )
    async def update_model(name: ModelName, body: s.ModelUpdate) -> s.Model:
        if body.description is None and body.labels is None:  # an empty patch changes nothing
            return s.Model.of((await registry.GetModel(rpb.GetModelRequest(name=name), timeout=timeout)).model)
        request = _proto(
            lambda: rpb.UpdateModelRequest(
                name=name,
                description=body.description or "",
                update_description=body.description is not None,
                labels=body.labels or {},
                update_labels=body.labels is not None,
            )
        )
        reply = await registry.UpdateModel(request, timeout=timeout)
        return s.Model.of(reply.model)

    @router.delete(
        "/models/{name}", status_code=204, response_class=Response, tags=["models"],
        summary="Delete a model with its versions and aliases (409 while deployed)",
        responses=_errors(404, 409), dependencies=[write_model],
    )
    async def delete_model(name: ModelName) -> Response:
        await registry.DeleteModel(rpb.DeleteModelRequest(name=name), timeout=timeout)
        return Response(status_code=204)

    # -- versions ------------------------------------------------------------------------------

    @router.get(
        "/models/{name}/versions", response_model=s.VersionList, tags=["versions"], summary="List versions",
        responses=_errors(404), dependencies=[read_model],
    )
    async def list_versions(
        name: ModelName, page_size: PageSize = 0, page_token: PageToken = "", include_archived: bool = False
    ) -> s.VersionList:
        reply = await registry.ListVersions(
            rpb.ListVersionsRequest(model=name, page=_page(page_size, page_token), include_archived=include_archived),
            timeout=timeout,
        )
        return s.VersionList(versions=[s.Version.of(v) for v in reply.versions], next_page_token=reply.page.next_page_token)

    @router.get(
        "/models/{name}/versions/{version}", response_model=s.Version, tags=["versions"], summary="Get a version",
        responses=_errors(404), dependencies=[read_model],
    )
    async def get_version(name: ModelName, version: VersionNumber) -> s.Version:
        reply = await registry.GetVersion(rpb.GetVersionRequest(model=name, version=version), timeout=timeout)
        return s.Version.of(reply.version)

    @router.post(
        "/models/{name}/versions/{version}/archive", response_model=s.Version, tags=["versions"],
        summary="Archive a version (stays downloadable, can no longer be newly deployed)",
        responses=_errors(404), dependencies=[write_model],
    )
    async def archive_version(name: ModelName, version: VersionNumber) -> s.Version:
        reply = await registry.ArchiveVersion(rpb.ArchiveVersionRequest(model=name, version=version), timeout=timeout)
        return s.Version.of(reply.version)

    @router.post(
        "/models/{name}/versions",
        status_code=201,
        response_model=s.UploadResult,
        tags=["versions"],
        summary="Upload a new version (the raw artifact bytes as the request body, streamed)",
        description=(
            "The body is the artifact itself (e.g. an ONNX file), sent with any content type; it is "
            "streamed to the registry chunk by chunk as it arrives. The registry hashes it, rejects a "
            "mismatch with `sha256`/`size_bytes` (or the `X-Content-SHA256` header and Content-Length), "
            "inspects the graph, then records the version."
        ),
        responses=_errors(404, 409, 413),
        dependencies=[write_model],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload_version(
        name: ModelName,
        request: Request,
        sha256: Annotated[
            str | None, Query(pattern=r"^[0-9a-fA-F]{64}$", description="Expected hex sha256 of the body.")
        ] = None,
        size_bytes: Annotated[
            int | None, Query(ge=0, le=s.MAX_ARTIFACT_BYTES, description="Expected body size.")
        ] = None,
        create_model: Annotated[bool, Query(description="Create the model when it does not exist.")] = False,
        format: Annotated[  # noqa: A002 - the query parameter's name
            s.ModelFormat, Query(description="Artifact format (unspecified: detect).")  # type: ignore[valid-type]
        ] = s.ModelFormat("unspecified"),
        description: Annotated[str, Query(max_length=4096)] = "",
        alias: Annotated[
            list[Annotated[str, Query(pattern=s.NAME_PATTERN)]],
            Query(max_length=16, description="Aliases to point at the new version."),
        ] = [],  # noqa: B006
        x_content_sha256: Annotated[
            str | None, Header(pattern=r"^[0-9a-fA-F]{64}$", description="Expected sha256 (alternative to the query).")
        ] = None,
    ) -> s.UploadResult:
        expected_sha = (sha256 or x_content_sha256 or "").lower()
        expected_size = size_bytes
        if expected_size is None and request.headers.get("content-length", "").isdigit():
            expected_size = int(request.headers["content-length"])
        metadata = _proto(
            lambda: rpb.UploadVersionMetadata(
                model=name,
                create_model=create_model,
                expected_sha256=expected_sha,
                expected_size_bytes=expected_size or 0,
                format=s.enum_to_proto(format),
                description=description,
                aliases=alias,
            )
        )
        reply = await _stream_upload(registry, metadata, request)
        return s.UploadResult(version=s.Version.of(reply.version), deduplicated=reply.deduplicated)

    @router.get(
        "/models/{name}/versions/{version}/artifact",
        response_class=StreamingResponse,
        tags=["versions"],
        summary="Download the artifact bytes of a version (streamed)",
        responses={
            **_errors(404),
            200: {
                "description": "The artifact bytes",
                "headers": {
                    "X-Content-SHA256": {
                        "description": "sha256 of the artifact",
                        "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    },
                },
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
        },
        dependencies=[read_model],
    )
    async def download_version(name: ModelName, version: VersionNumber) -> StreamingResponse:
        call = registry.DownloadVersion(rpb.DownloadVersionRequest(model=name, version=version))
        try:
            first = await call.read()
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF or first.WhichOneof("payload") != "version":
            call.cancel()
            raise Unavailable("the registry ended the download without the version record")
        record = first.version

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while (message := await call.read()) is not grpc.aio.EOF:
                    if message.chunk:
                        yield message.chunk
            finally:
                call.cancel()

        headers = {
            "Content-Length": str(record.size_bytes),
            "X-Content-SHA256": record.sha256,
            "ETag": f'"{record.sha256}"',
            "Content-Disposition": f'attachment; filename="{record.model}-{record.version}.bin"',
        }
        return StreamingResponse(chunks(), media_type="application/octet-stream", headers=headers)

    # -- aliases -------------------------------------------------------------------------------

    @router.get(
        "/models/{name}/aliases", response_model=s.AliasList, tags=["aliases"], summary="List aliases",
        responses=_errors(404), dependencies=[read_model],
    )
    async def list_aliases(name: ModelName) -> s.AliasList:
        reply = await registry.ListAliases(rpb.ListAliasesRequest(model=name), timeout=timeout)
        return s.AliasList(aliases=[s.Alias.of(a) for a in reply.aliases])

    @router.get(
        "/models/{name}/aliases/{alias}", response_model=s.Alias, tags=["aliases"], summary="Get an alias",
        responses=_errors(404), dependencies=[read_model],
    )
    async def get_alias(name: ModelName, alias: AliasName) -> s.Alias:
        reply = await registry.GetAlias(rpb.GetAliasRequest(model=name, alias=alias), timeout=timeout)
        return s.Alias.of(reply.alias)

    @router.put(
        "/models/{name}/aliases/{alias}", response_model=s.Alias, tags=["aliases"],
        summary="Point an alias at a version (optional compare-and-swap on its current target)",
        responses=_errors(404, 409), dependencies=[write_model],
    )
    async def set_alias(name: ModelName, alias: AliasName, body: s.AliasSet) -> s.Alias:
        request = rpb.SetAliasRequest(
            model=name,
            alias=alias,
            version=body.version,
            expected_version=body.expected_version or 0,
            force=body.expected_version is None,
        )
        reply = await registry.SetAlias(request, timeout=timeout)
        return s.Alias.of(reply.alias)

    @router.delete(
        "/models/{name}/aliases/{alias}", status_code=204, response_class=Response, tags=["aliases"],
        summary="Delete an alias", responses=_errors(404, 409), dependencies=[write_model],
    )
    async def delete_alias(
        name: ModelName,
        alias: AliasName,
        expected_version: Annotated[int, Query(ge=0, le=s.MAX_VERSION, description="CAS: must point here (0: any).")] = 0,
    ) -> Response:
        await registry.DeleteAlias(
            rpb.DeleteAliasRequest(model=name, alias=alias, expected_version=expected_version), timeout=timeout
        )
        return Response(status_code=204)

    # -- deployments ---------------------------------------------------------------------------

    @router.put(
        "/deployments/{name}", response_model=s.Deployment, tags=["deployments"],
        summary="Create or replace a deployment (declarative, idempotent)",
        responses={
            **_errors(404, 409),
            200: {
                "description": "The deployment as stored",
                "headers": {
                    "X-Changed": {
                        "description": "false when the spec equals the stored one (nothing changed)",
                        "schema": {"type": "string", "enum": ["true", "false"]},
                    }
                },
            },
        },
    )
    async def apply_deployment(
        name: DeploymentName, body: s.DeploymentApply, response: Response, principal: Principal = write_model
    ) -> s.Deployment:
        model = body.model or name
        auth.authorize(principal, Permission.WRITE, model)
        if body.traffic:
            traffic = [t.to_proto() for t in body.traffic]
        else:
            latest = await registry.ResolveVersion(
                _proto(lambda: rpb.ResolveVersionRequest(model=model, reference="latest")), timeout=timeout
            )
            traffic = [spb.TrafficTarget(version=latest.version.version, weight=100)]
        spec = _proto(lambda: body.to_proto(name, traffic))
        reply = await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec), timeout=timeout)
        response.headers["X-Changed"] = "true" if reply.changed else "false"
        return deployment_json(reply.deployment)

    @router.get(
        "/deployments", response_model=s.DeploymentList, tags=["deployments"], summary="List deployments",
        responses=_errors(),
    )
    async def list_deployments(
        principal: Principal = read,
        page_size: PageSize = 0,
        page_token: PageToken = "",
        model: Annotated[str, Query(pattern=s.NAME_OR_EMPTY_PATTERN, description="Only deployments of this model.")] = "",
    ) -> s.DeploymentList:
        reply = await scheduler.ListDeployments(
            spb.ListDeploymentsRequest(page=_page(page_size, page_token), model=model), timeout=timeout
        )
        deployments = [
            deployment_json(d)
            for d in reply.deployments
            if principal.in_scope(d.spec.name) or principal.in_scope(d.spec.model)
        ]
        return s.DeploymentList(deployments=deployments, next_page_token=reply.page.next_page_token)

    @router.get(
        "/deployments/{name}", response_model=s.Deployment, tags=["deployments"], summary="Get a deployment",
        responses=_errors(404), dependencies=[read_model],
    )
    async def get_deployment(name: DeploymentName) -> s.Deployment:
        reply = await scheduler.GetDeployment(spb.GetDeploymentRequest(name=name), timeout=timeout)
        return deployment_json(reply.deployment)

    @router.delete(
        "/deployments/{name}", status_code=204, response_class=Response, tags=["deployments"],
        summary="Delete a deployment (its replicas are unloaded)", responses=_errors(404), dependencies=[write_model],
    )
    async def delete_deployment(name: DeploymentName) -> Response:
        await scheduler.DeleteDeployment(spb.DeleteDeploymentRequest(name=name), timeout=timeout)
        return Response(status_code=204)

    @router.get(
        "/deployments/{name}/events",
        response_class=StreamingResponse,
        tags=["deployments"],
        summary="Status event stream (Server-Sent Events)",
        description=(
            "`event: deployment` with the deployment JSON now and after every change; `event: deleted` "
            "when it is removed (the stream ends); `event: error` if the scheduler stream fails. "
            "Comment lines keep the connection alive."
        ),
        responses={
            **_errors(404),
            200: {"description": "An event stream.", "content": {"text/event-stream": {"schema": _SSE_EVENT_SCHEMA}}},
        },
        dependencies=[read_model],
    )
    async def deployment_events(
        name: DeploymentName,
        timeout_seconds: Annotated[
            float,
            Query(ge=0, le=86400, description="End the stream after this long (0: until deleted or closed).",
                  examples=[1]),
        ] = 0,
    ) -> StreamingResponse:
        call = scheduler.WatchDeployment(spb.WatchDeploymentRequest(name=name))
        try:
            first = await call.read()
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            call.cancel()
            raise Unavailable("the scheduler ended the event stream at once")
        return StreamingResponse(
            _events(call, first, name, deployment_json, timeout_seconds),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- nodes and metrics ---------------------------------------------------------------------

    @router.get(
        "/nodes", response_model=s.NodeList, tags=["nodes"], summary="Inference nodes with their replicas",
        responses=_errors(), dependencies=[read],
    )
    async def list_nodes() -> s.NodeList:
        reply = await scheduler.ListNodes(spb.ListNodesRequest(), timeout=timeout)
        return s.NodeList(nodes=[s.Node.of(n) for n in reply.nodes])

    @router.get(
        "/metrics", response_model=s.Metrics, tags=["metrics"],
        summary="Live metrics from the monitor (empty filters mean all)", responses=_errors(), dependencies=[read],
    )
    async def query_metrics(
        model: Annotated[str, Query(pattern=s.NAME_OR_EMPTY_PATTERN)] = "",
        version: Annotated[int, Query(ge=0, le=s.MAX_VERSION)] = 0,
        node_id: Annotated[str, Query(max_length=253)] = "",
        window: s.Window = s.Window("1m"),  # type: ignore[valid-type]
    ) -> s.Metrics:
        if backends.monitor is None:
            raise Unavailable("metrics are unavailable: this gateway has no monitor configured")
        reply = await backends.monitor.QueryMetrics(
            mpb.QueryMetricsRequest(model=model, version=version, node_id=node_id, window=s.enum_to_proto(window)),
            timeout=timeout,
        )
        return s.Metrics(
            window=s.enum_from_proto(s.Window, reply.window),
            as_of=s.ts(reply, "as_of"),
            samples=[s.MetricsSample.of(m) for m in reply.samples],
        )

    # -- API keys ------------------------------------------------------------------------------

    @router.post(
        "/api-keys", status_code=201, response_model=s.ApiKeyCreated, tags=["api-keys"],
        summary="Create an API key (the token is returned once)", responses=_errors(409), dependencies=[admin],
    )
    async def create_api_key(body: s.ApiKeyCreate) -> s.ApiKeyCreated:
        key, token = await backends.api_keys.create(
            body.name, s.enum_to_proto(s.Role(body.role)), body.model_scope, body.ttl_seconds
        )
        return s.ApiKeyCreated(key=s.ApiKey.of(key), token=token)

    @router.get(
        "/api-keys", response_model=s.ApiKeyList, tags=["api-keys"], summary="List API keys (no secrets)",
        responses=_errors(), dependencies=[admin],
    )
    async def list_api_keys() -> s.ApiKeyList:
        keys = await backends.api_keys.list()
        return s.ApiKeyList(keys=[s.ApiKey.of(k) for k in keys])

    @router.delete(
        "/api-keys/{key_id}", status_code=204, response_class=Response, tags=["api-keys"],
        summary="Revoke an API key", responses=_errors(404), dependencies=[admin],
    )
    async def revoke_api_key(key_id: Annotated[str, Path(max_length=253)]) -> Response:
        await backends.api_keys.revoke(key_id)
        return Response(status_code=204)

    return router


async def _stream_upload(
    registry: RegistryServiceStub, metadata: rpb.UploadVersionMetadata, request: Request
) -> rpb.UploadVersionResponse:
    """Forward the body to UploadVersion as it arrives: memory stays at about one chunk, and gRPC
    flow control slows the reading when the registry is slower than the client."""
    call = registry.UploadVersion()
    wrote_after_rejection = False
    try:
        try:
            await call.write(rpb.UploadVersionRequest(metadata=metadata))
            # Stream only after the registry accepted the metadata (it sends initial metadata when it
            # starts reading bytes) or rejected it (unknown model, size over its limit): a chunk in
            # flight while the registry ends the call makes grpc-python aio replace the registry's
            # status with INTERNAL "Internal error from Core" (grpc/grpc#36066).
            verdict = asyncio.ensure_future(call.initial_metadata())
            verdict.add_done_callback(lambda f: f.cancelled() or f.exception())
            await asyncio.wait({verdict}, timeout=UPLOAD_VERDICT_SECONDS)
            if verdict.done() and not _accepted(verdict) and await _ends_within(call, UPLOAD_VERDICT_SECONDS):
                return await call  # rejected (a trailers-only answer): raises the registry's status
            pending = bytearray()
            async for piece in request.stream():
                pending += piece
                while len(pending) >= UPLOAD_CHUNK_BYTES:
                    await call.write(rpb.UploadVersionRequest(chunk=bytes(pending[:UPLOAD_CHUNK_BYTES])))
                    del pending[:UPLOAD_CHUNK_BYTES]
            if pending:
                await call.write(rpb.UploadVersionRequest(chunk=bytes(pending)))
            await call.done_writing()
        except ClientDisconnect:
            # A truncated artifact must never be recorded: abort the upload instead of half-closing.
            call.cancel()
            raise InvalidArgument("the client disconnected before the upload was complete") from None
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            wrote_after_rejection = True  # the registry ended the call early: its status says why
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            if wrote_after_rejection and exc.code() == grpc.StatusCode.INTERNAL:
                # The registry's own status was lost to the race above (it stopped reading mid-stream).
                raise Unavailable(
                    "the registry stopped the upload before all bytes were sent (e.g. the artifact exceeds "
                    "its size limit); send Content-Length or size_bytes so it can check up front"
                ) from None
            raise
    finally:
        if not call.done():
            call.cancel()


async def _ends_within(call: Any, seconds: float) -> bool:
    ended = asyncio.Event()
    call.add_done_callback(lambda _: ended.set())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ended.wait(), seconds)
    return call.done()


def _accepted(verdict: asyncio.Future[Any]) -> bool:
    if verdict.cancelled() or verdict.exception() is not None:
        return False
    return UPLOAD_ACCEPTED in tuple(verdict.result() or ())


async def _events(
    call: Any,
    first: spb.WatchDeploymentResponse,
    name: str,
    to_json: Callable[[spb.Deployment], s.Deployment],
    timeout_seconds: float,
) -> AsyncIterator[bytes]:
    """SSE frames from a WatchDeployment stream; a reader task feeds a queue so keep-alives never
    cancel a pending gRPC read."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)

    async def pump() -> None:
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                await queue.put(message)
            await queue.put(None)
        except grpc.aio.AioRpcError as exc:
            await queue.put(exc)

    reader = asyncio.create_task(pump(), name=f"sse-{name}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds if timeout_seconds else None
    try:
        yield _sse("deployment", to_json(first.deployment).model_dump(mode="json"))
        while True:
            wait = SSE_KEEPALIVE_SECONDS
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    return
            try:
                item = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if item is None:
                yield _sse("deleted", {"name": name})
                return
            if isinstance(item, grpc.aio.AioRpcError):
                yield _sse("error", {"error": grpc_status_for(item)[1]})
                return
            yield _sse("deployment", to_json(item.deployment).model_dump(mode="json"))
    finally:
        reader.cancel()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


__all__ = ["ManagementBackends", "build_management_router", "exception_response", "error_response"]
