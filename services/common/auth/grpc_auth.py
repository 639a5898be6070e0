"""gRPC side of auth: the server interceptor, the per-call principal, the method → permission table and
the aimaas.auth.v1.AuthService servicer."""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from aimaas.auth.v1 import auth_pb2, auth_pb2_grpc
from aimaas.monitor.v1 import monitor_pb2
from aimaas.registry.v1 import registry_pb2
from aimaas.scheduler.v1 import scheduler_pb2
from inference import grpc_predict_v2_pb2
from services.common.auth.authenticator import Authenticator
from services.common.auth.roles import Permission, Principal
from services.common.auth.store import ApiKeyStore
from services.common.errors import AimaasError, InvalidArgument, Unauthenticated

PermissionForMethod = Callable[[str], Permission | None]

_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("aimaas_principal", default=None)

# Methods anyone may call: probes (kubelet, load balancers) must work without a key.
_PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_PUBLIC_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"})

_R, _I, _W, _A = Permission.READ, Permission.INFER, Permission.WRITE, Permission.ADMIN
METHOD_PERMISSIONS: dict[str, Permission] = {
    **{f"/inference.GRPCInferenceService/{m}": p for m, p in {
        "ServerMetadata": _R, "ModelReady": _R, "ModelMetadata": _R, "ModelConfig": _R,
        "ModelStatistics": _R, "RepositoryIndex": _R,
        "ModelInfer": _I, "ModelStreamInfer": _I,
        "RepositoryModelLoad": _W, "RepositoryModelUnload": _W,
    }.items()},
    **{f"/aimaas.registry.v1.RegistryService/{m}": p for m, p in {
        "GetModel": _R, "ListModels": _R, "GetVersion": _R, "ListVersions": _R, "DownloadVersion": _R,
        "GetAlias": _R, "ListAliases": _R, "ResolveVersion": _R,
        "CreateModel": _W, "UpdateModel": _W, "DeleteModel": _W, "UploadVersion": _W, "ArchiveVersion": _W,
        "SetAlias": _W, "DeleteAlias": _W,
        "ListOrphanBlobs": _A, "DeleteOrphanBlobs": _A,
    }.items()},
    **{f"/aimaas.scheduler.v1.SchedulerService/{m}": p for m, p in {
        "GetDeployment": _R, "ListDeployments": _R, "WatchDeployment": _R, "ListNodes": _R,
        "ApplyDeployment": _W, "DeleteDeployment": _W,
        # Internal: the gateway itself asks for replicas of a deployment scaled to zero.
        "EnsureReplicas": _A,
    }.items()},
    **{f"/aimaas.monitor.v1.MonitorService/{m}": p for m, p in {
        "QueryMetrics": _R, "GetLoadSignal": _R, "GetAlertRule": _R, "ListAlertRules": _R,
        "ListAlerts": _R, "WatchAlerts": _R,
        "CreateAlertRule": _W, "UpdateAlertRule": _W, "DeleteAlertRule": _W,
        # Internal: nodes report statistics straight to the monitor, never through the edge.
        "ReportStats": _A,
    }.items()},
    **{f"/aimaas.auth.v1.AuthService/{m}": _A for m in ("CreateApiKey", "ListApiKeys", "RevokeApiKey")},
}


# Where a request names the models it touches (field paths; for client streams, in the first message),
# so the interceptor can enforce a key's model scope even on passthrough calls it forwards as raw bytes.
# Listings are not filtered here (names only; the REST API filters them).
ModelFields = tuple[type[Message], tuple[tuple[str, ...], ...]]
_REG, _SCH, _MON, _OIP = registry_pb2, scheduler_pb2, monitor_pb2, grpc_predict_v2_pb2
MODEL_FIELDS: dict[str, ModelFields] = {
    **{f"/aimaas.registry.v1.RegistryService/{m}": (getattr(_REG, f"{m}Request"), (("name",),)) for m in (
        "CreateModel", "GetModel", "UpdateModel", "DeleteModel")},
    **{f"/aimaas.registry.v1.RegistryService/{m}": (getattr(_REG, f"{m}Request"), (("model",),)) for m in (
        "GetVersion", "ListVersions", "DownloadVersion", "ArchiveVersion", "SetAlias", "GetAlias", "ListAliases",
        "DeleteAlias", "ResolveVersion")},
    "/aimaas.registry.v1.RegistryService/UploadVersion": (_REG.UploadVersionRequest, (("metadata", "model"),)),
    "/aimaas.scheduler.v1.SchedulerService/ApplyDeployment": (
        _SCH.ApplyDeploymentRequest, (("spec", "name"), ("spec", "model"))),
    **{f"/aimaas.scheduler.v1.SchedulerService/{m}": (getattr(_SCH, f"{m}Request"), (("name",),)) for m in (
        "GetDeployment", "DeleteDeployment", "WatchDeployment")},
    "/aimaas.scheduler.v1.SchedulerService/ListDeployments": (_SCH.ListDeploymentsRequest, (("model",),)),
    "/aimaas.scheduler.v1.SchedulerService/EnsureReplicas": (_SCH.EnsureReplicasRequest, (("deployment",),)),
    **{f"/aimaas.monitor.v1.MonitorService/{m}": (getattr(_MON, f"{m}Request"), (("model",),)) for m in (
        "QueryMetrics", "GetLoadSignal")},
    **{f"/aimaas.monitor.v1.MonitorService/{m}": (getattr(_MON, f"{m}Request"), (("rule", "model"),)) for m in (
        "CreateAlertRule", "UpdateAlertRule")},
    **{f"/inference.GRPCInferenceService/{m}": (getattr(_OIP, f"{m}Request"), (("name",),)) for m in (
        "ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics")},
    "/inference.GRPCInferenceService/ModelInfer": (_OIP.ModelInferRequest, (("model_name",),)),
}


def request_models(fields: ModelFields, request: Any) -> list[str]:
    """The non-empty model names a request names; `request` is a message or its raw bytes."""
    message_type, paths = fields
    if not isinstance(request, message_type):
        try:
            request = message_type.FromString(bytes(request))
        except (DecodeError, TypeError) as exc:
            raise InvalidArgument(f"malformed {message_type.DESCRIPTOR.name}: {exc}") from None
    names = []
    for path in paths:
        value: Any = request
        for name in path:
            value = getattr(value, name)
        if value:
            names.append(value)
    return names


def method_permission(method: str) -> Permission | None:
    """The permission a gRPC method needs; None for public probes. Unknown methods need ADMIN (fail
    closed), so a newly added RPC is never public by accident."""
    if method in _PUBLIC_METHODS or method.startswith(_PUBLIC_SERVICES):
        return None
    return METHOD_PERMISSIONS.get(method, Permission.ADMIN)


def current_principal() -> Principal:
    """The principal of the gRPC call being handled (set by GrpcAuthInterceptor); handlers use it for
    model-scope checks. Unauthenticated when the call did not pass the interceptor (fail closed)."""
    principal = _PRINCIPAL.get()
    if principal is None:
        raise Unauthenticated("this call carries no authenticated principal")
    return principal


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates the `authorization` metadata (`Bearer <token>`) and checks the method's permission
    before the handler runs; refusals are UNAUTHENTICATED / PERMISSION_DENIED with a precise message."""

    def __init__(
        self,
        authenticator: Authenticator,
        permission_for_method: PermissionForMethod = method_permission,
        *,
        model_fields: dict[str, ModelFields] = MODEL_FIELDS,
    ) -> None:
        self._auth = authenticator
        self._permission_for = permission_for_method
        self._model_fields = model_fields
        # method → (handler we wrapped, wrapper): handlers are stable, so wrap once per method.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        permission = self._permission_for(method)
        if permission is None:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, permission, self._model_fields.get(method))
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    async def _admit(self, context: grpc.aio.ServicerContext, permission: Permission) -> Principal:
        try:
            principal = await self._auth.authenticate(_authorization(context.invocation_metadata()))
            self._auth.authorize(principal, permission)
        except AimaasError as exc:
            await context.abort(exc.code, exc.message)
        return principal

    async def _check_scope(
        self, context: grpc.aio.ServicerContext, principal: Principal, permission: Permission,
        fields: ModelFields | None, request: Any,
    ) -> None:
        if fields is None or not principal.model_scope:
            return
        try:
            for model in request_models(fields, request):
                self._auth.authorize(principal, permission, model)
        except AimaasError as exc:
            await context.abort(exc.code, exc.message)

    def _wrap(self, handler, permission: Permission, fields: ModelFields | None):
        def unary_request(behavior):
            async def wrapper(request: Any, context: grpc.aio.ServicerContext):
                principal = await self._admit(context, permission)
                await self._check_scope(context, principal, permission, fields, request)
                token = _PRINCIPAL.set(principal)
                try:
                    return await behavior(request, context)
                finally:
                    _PRINCIPAL.reset(token)

            return wrapper

        def stream_request(behavior):
            async def wrapper(request_iterator: Any, context: grpc.aio.ServicerContext):
                principal = await self._admit(context, permission)
                if fields is not None and principal.model_scope:
                    # The first message names the model (e.g. UploadVersion's metadata): check it, then
                    # hand the handler the whole stream.
                    iterator = aiter(request_iterator)
                    try:
                        first = await anext(iterator)
                    except StopAsyncIteration:
                        first = None
                    if first is not None:
                        await self._check_scope(context, principal, permission, fields, first)
                    request_iterator = _prepend(first, iterator)
                token = _PRINCIPAL.set(principal)
                try:
                    return await behavior(request_iterator, context)
                finally:
                    _PRINCIPAL.reset(token)

            return wrapper

        def unary_stream(behavior):
            async def wrapper(request: Any, context: grpc.aio.ServicerContext):
                principal = await self._admit(context, permission)
                await self._check_scope(context, principal, permission, fields, request)
                # Each RPC runs in its own task, so the value cannot leak to another call; an async
                # generator may be finalised in another context, where a reset would fail.
                _PRINCIPAL.set(principal)
                async for response in behavior(request, context):
                    yield response

            return wrapper

        def stream_stream(behavior):
            # Per-message model checks belong to the handler (e.g. ModelStreamInfer).
            if inspect.iscoroutinefunction(behavior):  # writes with context.write (answer_concurrently)
                async def writing(request_iterator: Any, context: grpc.aio.ServicerContext):
                    _PRINCIPAL.set(await self._admit(context, permission))
                    return await behavior(request_iterator, context)

                return writing

            async def wrapper(request_iterator: Any, context: grpc.aio.ServicerContext):
                _PRINCIPAL.set(await self._admit(context, permission))
                async for response in behavior(request_iterator, context):
                    yield response

            return wrapper

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_request(handler.unary_unary), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(stream_request(handler.stream_unary), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(unary_stream(handler.unary_stream), **kwargs)
        return grpc.stream_stream_rpc_method_handler(stream_stream(handler.stream_stream), **kwargs)


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """aimaas.auth.v1.AuthService. Admin only: checked here too, so the service stays admin-only
    whatever permission table the server's interceptor uses."""

    def __init__(self, store: ApiKeyStore, authenticator: Authenticator) -> None:
        self._store = store
        self._auth = authenticator

    def _admin(self) -> None:
        self._auth.authorize(current_principal(), Permission.ADMIN)

    async def CreateApiKey(self, request: auth_pb2.CreateApiKeyRequest, context) -> auth_pb2.CreateApiKeyResponse:
        self._admin()
        key, token = await self._store.create(request.name, request.role, list(request.model_scope), request.ttl_seconds)
        return auth_pb2.CreateApiKeyResponse(key=key, token=token)

    async def ListApiKeys(self, request: auth_pb2.ListApiKeysRequest, context) -> auth_pb2.ListApiKeysResponse:
        self._admin()
        return auth_pb2.ListApiKeysResponse(keys=await self._store.list())

    async def RevokeApiKey(self, request: auth_pb2.RevokeApiKeyRequest, context) -> auth_pb2.RevokeApiKeyResponse:
        self._admin()
        await self._store.revoke(request.id)
        return auth_pb2.RevokeApiKeyResponse()


AUTH_SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


def register(servicer: AuthServicer) -> Callable[[grpc.aio.Server], None]:
    """For `GrpcService.add_service(AUTH_SERVICE_NAME, register(servicer))`."""

    def _add(server: grpc.aio.Server) -> None:
        auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)

    return _add
