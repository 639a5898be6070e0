"""AuthService and GrpcAuthInterceptor on a real grpc.aio server (with the shared error-mapping
interceptor) backed by a real etcd; `current_principal()` in unary and streaming handlers."""

from __future__ import annotations

import contextlib

import grpc
import pytest
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import SecretStr

from aimaas.auth.v1 import auth_pb2, auth_pb2_grpc
from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.registry.v1 import registry_pb2_grpc
from services.common.auth import (
    ApiKeyStore,
    AuthServicer,
    AuthSettings,
    Authenticator,
    GrpcAuthInterceptor,
    Permission,
    current_principal,
    register,
)
from services.common.etcd import EtcdClient
from services.common.grpc_server import ErrorMappingInterceptor
from services.common.metrics import Metrics
from services.common.settings import EtcdSettings

BOOT = "boot-" + "y" * 40


class PrincipalEcho(registry_pb2_grpc.RegistryServiceServicer):
    """Handlers that report the principal the interceptor published, and check model scope with it."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    async def GetModel(self, request, context):
        principal = current_principal()
        self._auth.authorize(principal, Permission.READ, request.name)
        return rpb.GetModelResponse(model=rpb.Model(name=request.name, description=principal.key_id))

    async def DownloadVersion(self, request, context):
        principal = current_principal()
        self._auth.authorize(principal, Permission.READ, request.model)
        yield rpb.DownloadVersionResponse(version=rpb.ModelVersion(model=request.model, sha256=principal.key_id))

    async def UploadVersion(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        return rpb.UploadVersionResponse(version=rpb.ModelVersion(sha256=current_principal().key_id))


@contextlib.asynccontextmanager
async def auth_server(etcd_settings: EtcdSettings, settings: AuthSettings):
    etcd = EtcdClient(etcd_settings)
    store = ApiKeyStore(etcd)
    await store.start()
    auth = Authenticator(store, settings)
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(Metrics(), structlog.get_logger("test")), GrpcAuthInterceptor(auth)]
    )
    register(AuthServicer(store, auth))(server)
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(PrincipalEcho(auth), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, store
    finally:
        await channel.close()
        await server.stop(0)
        await store.stop()
        await etcd.close()


def md(token: str | None):
    return None if token is None else (("authorization", f"Bearer {token}"),)


async def code_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


async def test_auth_service_through_a_real_server(etcd_settings):
    async with auth_server(etcd_settings, AuthSettings(bootstrap_admin_token=SecretStr(BOOT))) as (channel, _store):
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        # The bootstrap admin creates the first keys.
        created = await stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(name="admin-2", role=auth_pb2.ROLE_ADMIN), metadata=md(BOOT)
        )
        admin = created.token
        assert created.key.role == auth_pb2.ROLE_ADMIN and not created.key.secret_hash
        dev = (await stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(name="dev", role=auth_pb2.ROLE_DEVELOPER, model_scope=["resnet"]), metadata=md(admin)
        )).token  # fmt: skip

        listed = await stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=md(admin))
        assert sorted(k.name for k in listed.keys) == ["admin-2", "dev"]
        assert all(not k.secret_hash for k in listed.keys)

        # Non-admins and strangers are refused precisely.
        code, details = await code_of(stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=md(dev)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "role developer, which lacks the admin permission" in details
        code, details = await code_of(stub.ListApiKeys(auth_pb2.ListApiKeysRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("missing API key")
        code, details = await code_of(stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=md("aimaas_nope")))
        assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("malformed API key")

        # Validation errors map to INVALID_ARGUMENT.
        for request, message in [
            (auth_pb2.CreateApiKeyRequest(role=auth_pb2.ROLE_VIEWER), "name is required"),
            (auth_pb2.CreateApiKeyRequest(name="x"), "role is required"),
            (auth_pb2.CreateApiKeyRequest(name="x", role=auth_pb2.ROLE_VIEWER, model_scope=["No!"]), "invalid model_scope model name"),
        ]:
            code, details = await code_of(stub.CreateApiKey(request, metadata=md(admin)))
            assert (code, message in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), details
        code, details = await code_of(stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(id="0123456789abcdef"), metadata=md(admin)))
        assert code == grpc.StatusCode.NOT_FOUND

        # Handlers see the principal and enforce the key's model scope.
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        dev_id = dev.split("_")[1]
        response = await registry.GetModel(rpb.GetModelRequest(name="resnet"), metadata=md(dev))
        assert response.model.description == dev_id
        code, details = await code_of(registry.GetModel(rpb.GetModelRequest(name="bert"), metadata=md(dev)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not scoped to model 'bert'" in details
        stream = registry.DownloadVersion(rpb.DownloadVersionRequest(model="resnet"), metadata=md(dev))
        assert [r.version.sha256 async for r in stream] == [dev_id]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [r async for r in registry.DownloadVersion(rpb.DownloadVersionRequest(model="resnet"))]
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        async def chunks():
            yield rpb.UploadVersionRequest()

        uploaded = await registry.UploadVersion(chunks(), metadata=md(dev))
        assert uploaded.version.sha256 == dev_id

        # Client stream: the interceptor checks the model named in the first message.
        async def upload_to(model: str):
            yield rpb.UploadVersionRequest(metadata=rpb.UploadVersionMetadata(model=model))
            yield rpb.UploadVersionRequest(chunk=b"x")

        uploaded = await registry.UploadVersion(upload_to("resnet"), metadata=md(dev))
        assert uploaded.version.sha256 == dev_id
        code, details = await code_of(registry.UploadVersion(upload_to("bert"), metadata=md(dev)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not scoped to model 'bert'" in details

        # Probes need no key.
        health_stub = health_pb2_grpc.HealthStub(channel)
        assert (await health_stub.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING

        # Revocation takes effect on the next call.
        await stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(id=dev_id), metadata=md(admin))
        code, details = await code_of(registry.GetModel(rpb.GetModelRequest(name="resnet"), metadata=md(dev)))
        assert code == grpc.StatusCode.UNAUTHENTICATED and f"API key {dev_id} was revoked" in details
        revoked = [k for k in (await stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=md(admin))).keys if k.id == dev_id]
        assert revoked[0].HasField("revoked")


async def test_auth_disabled_lets_everyone_in(etcd_settings):
    async with auth_server(etcd_settings, AuthSettings(enabled=False)) as (channel, _store):
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        created = await stub.CreateApiKey(auth_pb2.CreateApiKeyRequest(name="k", role=auth_pb2.ROLE_VIEWER))
        assert created.token.startswith("aimaas_")
        response = await registry_pb2_grpc.RegistryServiceStub(channel).GetModel(
            rpb.GetModelRequest(name="any"), metadata=md("garbage")
        )
        assert response.model.description == "anonymous"


async def test_auth_servicer_is_admin_only_even_without_the_interceptor(etcd_settings):
    etcd = EtcdClient(etcd_settings)
    store = ApiKeyStore(etcd)
    try:
        server = grpc.aio.server(interceptors=[ErrorMappingInterceptor(Metrics(), structlog.get_logger("test"))])
        register(AuthServicer(store, Authenticator(store, AuthSettings())))(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            code, _ = await code_of(stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=md(BOOT)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        await server.stop(0)
    finally:
        await etcd.close()
