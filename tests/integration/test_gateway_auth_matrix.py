"""Auth matrix of the gateway: every kind of caller against every endpoint class, on both ports.

One real mesh per module (etcd, registry, scheduler, an in-process inference node in mesh mode serving
the `mlp` model) and two real gateways in front of it: auth on (keys created through AuthService with
the bootstrap admin token) and auth off. Expected outcomes are written out as a table; each row is one
test that reports every cell that differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass

import grpc
import httpx
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimaas.auth.v1 import auth_pb2, auth_pb2_grpc
from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.registry.v1 import registry_pb2_grpc
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc
from services.common.settings import EtcdSettings, LogSettings, ObjectStoreKind, ObjectStoreSettings
from services.inference.settings import InferenceServerSettings, InferenceSettings
from tests.support.gateway import ADMIN_TOKEN, gateway_settings, running_gateway
from tests.support.inference import running_inference
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry, upload, upload_requests
from tests.support.scheduler import eventually, running_scheduler, scheduler_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "mlp"
OK, E401, E403 = "2xx", "401", "403"
GRPC_CODE = {OK: grpc.StatusCode.OK, E401: grpc.StatusCode.UNAUTHENTICATED, E403: grpc.StatusCode.PERMISSION_DENIED}

# Endpoint classes, in the column order of the tables below.
COLUMNS = (
    "infer",  # REST POST /v2/models/mlp/infer          | gRPC inference ModelInfer
    "metadata",  # REST GET /v2/models/mlp               | gRPC inference ModelMetadata
    "model_read",  # REST GET /v1/models/mlp             | gRPC passthrough RegistryService/GetModel
    "model_create",  # REST POST /v1/models              | gRPC passthrough RegistryService/CreateModel
    "deploy",  # REST PUT /v1/deployments/mlp            | gRPC passthrough SchedulerService/ApplyDeployment
    "keys",  # REST GET /v1/api-keys                     | gRPC AuthService/ListApiKeys
    "probe",  # REST GET /v2/health/live                 | gRPC grpc.health.v1.Health/Check
)
EXPECTED = {
    #                 infer metadata model_read model_create deploy keys  probe
    "admin":        (OK,   OK,      OK,        OK,          OK,    OK,   OK),
    "developer":    (OK,   OK,      OK,        OK,          OK,    E403, OK),
    "invoker":      (OK,   OK,      OK,        E403,        E403,  E403, OK),
    "viewer":       (E403, OK,      OK,        E403,        E403,  E403, OK),
    "no-token":     (E401, E401,    E401,      E401,        E401,  E401, OK),
    "bad-token":    (E401, E401,    E401,      E401,        E401,  E401, OK),
    "unknown-key":  (E401, E401,    E401,      E401,        E401,  E401, OK),
    "revoked":      (E401, E401,    E401,      E401,        E401,  E401, OK),
    "expired":      (E401, E401,    E401,      E401,        E401,  E401, OK),
    "out-of-scope": (E403, E403,    E403,      E403,        E403,  E403, OK),
}  # fmt: skip
# Role and model scope of the API key behind each row that has one (created through AuthService).
KEYS = {
    "admin": (auth_pb2.ROLE_ADMIN, ()),
    "developer": (auth_pb2.ROLE_DEVELOPER, ()),
    "invoker": (auth_pb2.ROLE_INVOKER, ()),
    "viewer": (auth_pb2.ROLE_VIEWER, ()),
    "revoked": (auth_pb2.ROLE_DEVELOPER, ()),
    "expired": (auth_pb2.ROLE_DEVELOPER, ()),  # created with a 1 s lifetime
    # A developer whose scope does not include `mlp` (nor the models the row tries to create).
    "out-of-scope": (auth_pb2.ROLE_DEVELOPER, ("other-model",)),
}


@dataclass
class Gateway:
    http_url: str
    grpc_channel: grpc.aio.Channel
    tokens: dict[str, str | None]
    deployment: spb.DeploymentSpec


@dataclass
class Mesh:
    on: Gateway
    off: Gateway


def _infer_body() -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}


def _infer_request() -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 4], contents=pb.InferTensorContents(fp32_contents=[1, 2, 3, 4])
    )
    return pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])


async def _ready(http_url: str) -> bool:
    async with httpx.AsyncClient(base_url=http_url, timeout=10) as client:
        response = await client.get(f"/v2/models/{MODEL}/ready", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    return response.status_code == 200


async def _tokens(channel: grpc.aio.Channel) -> dict[str, str | None]:
    """One token per row: API keys created (and one revoked) through AuthService by the bootstrap admin."""
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    tokens: dict[str, str | None] = {"no-token": None, "bad-token": "not-an-api-key"}
    for row, (role, scope) in KEYS.items():
        ttl = 1 if row == "expired" else 0
        reply = await stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(name=f"matrix-{row}", role=role, model_scope=scope, ttl_seconds=ttl),
            metadata=admin,
        )
        tokens[row] = reply.token
        if row == "revoked":
            await stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(id=reply.key.id), metadata=admin)
    # Well-formed, but no such key.
    tokens["unknown-key"] = "aimaas_0123456789abcdef_" + "A" * 43
    await asyncio.sleep(1.1)  # let the 1 s key expire
    return tokens


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(etcd_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth-matrix")
    etcd = EtcdSettings(endpoints=etcd_server.endpoint, namespace=f"/test-{uuid.uuid4().hex[:12]}/aimaas/v1", session_ttl_seconds=3)
    store = ObjectStoreSettings(kind=ObjectStoreKind.LOCAL, path=tmp / "objects")
    node_settings = InferenceSettings(
        etcd=etcd,
        object_store=store,
        log=LogSettings(level="WARNING"),
        inference=InferenceServerSettings(
            node_id="node-a", host="127.0.0.1", grpc_port=0, metrics_port=-1, cache_dir=tmp / "cache",
            backends=["onnxruntime"], intra_op_threads=1, inter_op_threads=1, shutdown_grace_seconds=1,
        ),
    )  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        registry_app, registry = await stack.enter_async_context(running_registry(registry_settings(etcd, store)))
        scheduler_app, scheduler = await stack.enter_async_context(running_scheduler(scheduler_settings(etcd)))
        await stack.enter_async_context(running_inference(node_settings))
        await upload(registry, MODEL, mlp_bytes())
        spec = spb.DeploymentSpec(
            name=MODEL, model=MODEL, traffic=[spb.TrafficTarget(version=1, weight=100)], min_replicas=1, max_replicas=1
        )
        await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec))
        deployment = (await scheduler.GetDeployment(spb.GetDeploymentRequest(name=MODEL))).deployment.spec

        gateways = {}
        for name, auth in (("on", True), ("off", False)):
            settings = gateway_settings(
                etcd, registry=registry_app.grpc.address, scheduler=scheduler_app.grpc.address, auth=auth
            )
            app = await stack.enter_async_context(running_gateway(settings))
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(app.grpc_address))
            await eventually(lambda: _ready(app.http_url), 60, f"{MODEL} ready behind the gateway (auth {name})")
            tokens = await _tokens(channel) if auth else {row: None for row in EXPECTED}
            gateways[name] = Gateway(app.http_url, channel, tokens, deployment)
        yield Mesh(on=gateways["on"], off=gateways["off"])


# -- one call per endpoint class ---------------------------------------------------------------------


def _status_class(status: int) -> str:
    if 200 <= status < 300:
        return OK
    return str(status)


async def rest_outcomes(gateway: Gateway, row: str, token: str | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    suffix = uuid.uuid4().hex[:6]
    calls = {
        "infer": ("POST", f"/v2/models/{MODEL}/infer", _infer_body()),
        "metadata": ("GET", f"/v2/models/{MODEL}", None),
        "model_read": ("GET", f"/v1/models/{MODEL}", None),
        "model_create": ("POST", "/v1/models", {"name": f"r-{row}-{suffix}"}),
        "deploy": ("PUT", f"/v1/deployments/{MODEL}", {
            "model": MODEL, "traffic": [{"version": 1, "weight": 100}], "min_replicas": 1, "max_replicas": 1,
        }),
        "keys": ("GET", "/v1/api-keys", None),
        "probe": ("GET", "/v2/health/live", None),
    }  # fmt: skip
    outcomes = {}
    async with httpx.AsyncClient(base_url=gateway.http_url, headers=headers, timeout=30) as client:
        for column, (method, path, body) in calls.items():
            response = await client.request(method, path, json=body)
            outcomes[column] = _status_class(response.status_code)
            if outcomes[column] != OK:
                # Refusals are precise JSON errors, never a bare status.
                assert set(response.json()) == {"error"} and response.json()["error"], response.text
            if response.status_code == 401:
                assert token is None or token not in response.text
    return outcomes


async def _grpc_code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            assert exc.details(), "refusals carry a message"
        return exc.code()
    return grpc.StatusCode.OK


async def grpc_outcomes(gateway: Gateway, row: str, token: str | None) -> dict[str, grpc.StatusCode]:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    channel = gateway.grpc_channel
    inference = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    suffix = uuid.uuid4().hex[:6]
    calls = {
        "infer": lambda: inference.ModelInfer(_infer_request(), metadata=metadata, timeout=30),
        "metadata": lambda: inference.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), metadata=metadata, timeout=30),
        "model_read": lambda: registry.GetModel(rpb.GetModelRequest(name=MODEL), metadata=metadata, timeout=30),
        "model_create": lambda: registry.CreateModel(
            rpb.CreateModelRequest(name=f"g-{row}-{suffix}"), metadata=metadata, timeout=30
        ),
        "deploy": lambda: scheduler.ApplyDeployment(
            spb.ApplyDeploymentRequest(spec=gateway.deployment), metadata=metadata, timeout=30
        ),
        "keys": lambda: auth_pb2_grpc.AuthServiceStub(channel).ListApiKeys(
            auth_pb2.ListApiKeysRequest(), metadata=metadata, timeout=30
        ),
        "probe": lambda: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=metadata, timeout=30
        ),
    }
    return {column: await _grpc_code(call()) for column, call in calls.items()}


# -- the matrix -------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", list(EXPECTED))
async def test_rest_matrix(mesh: Mesh, row: str):
    expected = dict(zip(COLUMNS, EXPECTED[row], strict=True))
    assert await rest_outcomes(mesh.on, row, mesh.on.tokens[row]) == expected


@pytest.mark.parametrize("row", list(EXPECTED))
async def test_grpc_matrix(mesh: Mesh, row: str):
    expected = {column: GRPC_CODE[outcome] for column, outcome in zip(COLUMNS, EXPECTED[row], strict=True)}
    assert await grpc_outcomes(mesh.on, row, mesh.on.tokens[row]) == expected


@pytest.mark.parametrize("row", ["no-token", "bad-token", "viewer"])
async def test_auth_off_allows_everything(mesh: Mesh, row: str):
    # With auth off the gateway ignores credentials: any header (or none) is the anonymous admin.
    token = {"no-token": None, "bad-token": "not-an-api-key", "viewer": mesh.on.tokens["viewer"]}[row]
    everything_ok = dict.fromkeys(COLUMNS, OK)
    assert await rest_outcomes(mesh.off, row, token) == everything_ok
    assert await grpc_outcomes(mesh.off, row, token) == dict.fromkeys(COLUMNS, grpc.StatusCode.OK)


async def test_revoked_key_is_refused_on_the_next_call(mesh: Mesh):
    channel = mesh.on.grpc_channel
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    reply = await stub.CreateApiKey(auth_pb2.CreateApiKeyRequest(name="late", role=auth_pb2.ROLE_INVOKER), metadata=admin)
    inference = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    token_md = (("authorization", f"Bearer {reply.token}"),)
    assert await _grpc_code(inference.ModelInfer(_infer_request(), metadata=token_md, timeout=30)) == grpc.StatusCode.OK
    await stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(id=reply.key.id), metadata=admin)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await inference.ModelInfer(_infer_request(), metadata=token_md, timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "was revoked" in info.value.details()


async def test_scoped_key_on_a_client_stream_through_the_passthrough(mesh: Mesh):
    """UploadVersion is forwarded as raw bytes; the scope check reads the model from the first message."""
    channel = mesh.on.grpc_channel
    admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    reply = await auth_pb2_grpc.AuthServiceStub(channel).CreateApiKey(
        auth_pb2.CreateApiKeyRequest(name="uploader", role=auth_pb2.ROLE_DEVELOPER, model_scope=["scoped-model"]),
        metadata=admin,
    )
    scoped = (("authorization", f"Bearer {reply.token}"),)
    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    data = mlp_bytes(seed=3)
    uploaded = await registry.UploadVersion(upload_requests("scoped-model", data, create_model=True), metadata=scoped, timeout=30)
    assert uploaded.version.model == "scoped-model" and uploaded.version.version == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry.UploadVersion(upload_requests("elsewhere", data, create_model=True), metadata=scoped, timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not scoped to model 'elsewhere'" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry.GetModel(rpb.GetModelRequest(name="elsewhere"), metadata=admin, timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # nothing reached the registry
