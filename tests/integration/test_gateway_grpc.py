"""The gateway's gRPC port against a real mesh (etcd, registry, scheduler and two inference node
processes): stock tritonclient.grpc (metadata, infer, statistics, index), precise errors, the
management services passed through (unary, client- and server-streaming), and auth."""

from __future__ import annotations

import uuid

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from aimaas.auth.v1 import auth_pb2, auth_pb2_grpc
from aimaas.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from aimaas.registry.v1 import registry_pb2, registry_pb2_grpc
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.settings import EtcdSettings
from tests.support.gateway import ADMIN_TOKEN, bearer, deploy, running_gateway, start_mesh
from tests.support.models import mlp_bytes

MODEL = mlp_bytes(seed=11)


@pytest.fixture(scope="module")
def mesh(etcd_server, tmp_path_factory):
    etcd = EtcdSettings(
        endpoints=etcd_server.endpoint, namespace=f"/test-{uuid.uuid4().hex[:12]}/aimaas/v1", session_ttl_seconds=3
    )
    mesh = start_mesh(etcd, tmp_path_factory.mktemp("gateway-grpc"))
    yield mesh
    mesh.stop()


@pytest.fixture
async def gateway(mesh):
    async with running_gateway(mesh.gateway_settings()) as app:
        yield app


def _infer_request(model: str, rows: np.ndarray, version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="x", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype(np.float32).tobytes())
    return request


async def test_tritonclient_metadata_and_infer_through_the_gateway(gateway):
    await deploy(gateway, "tri", [MODEL], min_replicas=2)
    client = triton_aio.InferenceServerClient(gateway.grpc_address)
    try:
        assert await client.is_server_live() and await client.is_server_ready()
        server = await client.get_server_metadata()
        assert server.name == "aimaas-gateway" and server.version
        assert await client.is_model_ready("tri") and await client.is_model_ready("tri", "1")
        assert not await client.is_model_ready("nope")
        metadata = await client.get_model_metadata("tri")
        assert metadata.name == "tri" and list(metadata.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, 4])]

        rows = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
        tensor = InferInput("x", [3, 4], "FP32")
        tensor.set_data_from_numpy(rows)
        result = await client.infer("tri", [tensor], request_id="req-1")
        expected = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"]).run(None, {"x": rows})[0]
        np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-5)
        response = result.get_response()
        assert response.model_name == "tri" and response.model_version == "1" and response.id == "req-1"

        for _ in range(10):
            await client.infer("tri", [tensor])
        stats = (await client.get_inference_statistics("tri")).model_stats
        assert [(s.name, s.version) for s in stats] == [("tri", "1")]
        # Summed over both replicas' nodes (least outstanding spreads the requests over them).
        assert stats[0].inference_stats.success.count == 11

        index = await client.get_model_repository_index()
        assert ("tri", "1", "READY") in {(m.name, m.version, m.state) for m in index.models}
        config = await client.get_model_config("tri")
        assert config.config.name == "tri"

        # The same data plane behind the REST port (composition check; the REST API has its own tests).
        async with httpx.AsyncClient(base_url=gateway.http_url) as http:
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 4], "data": rows.flatten().tolist()}]}
            answer = await http.post("/v2/models/tri/infer", json=body, timeout=20)
            assert answer.status_code == 200, answer.text
            output = answer.json()["outputs"][0]
            np.testing.assert_allclose(np.array(output["data"]).reshape(output["shape"]), expected, rtol=1e-5)

        with pytest.raises(InferenceServerException) as info:
            await client.load_model("tri")
        assert info.value.status() == "StatusCode.FAILED_PRECONDITION" and "ApplyDeployment" in info.value.message()
    finally:
        await client.close()


async def test_precise_errors_from_the_gateway_and_from_nodes(gateway):
    await deploy(gateway, "errs", [MODEL])
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        cases = [
            (_infer_request("missing", np.zeros((1, 4))), grpc.StatusCode.NOT_FOUND, "unknown model 'missing'"),
            (_infer_request("", np.zeros((1, 4))), grpc.StatusCode.INVALID_ARGUMENT, "names no model"),
            (_infer_request("errs", np.zeros((1, 4)), "7"), grpc.StatusCode.NOT_FOUND, "no deployed version 7"),
            (_infer_request("errs", np.zeros((1, 4)), "x1"), grpc.StatusCode.INVALID_ARGUMENT, "positive integer"),
            # The node's own validation reaches the caller unchanged.
            (_infer_request("errs", np.zeros((1, 5))), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        ]
        for request, code, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request, timeout=10)
            assert info.value.code() == code, info.value.details()
            assert message in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="missing"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="errs"), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        # Stream inference: errors in-band, the stream goes on.
        async def requests():
            yield _infer_request("missing", np.zeros((1, 4)))
            request = _infer_request("errs", np.ones((2, 4)))
            request.id = "ok"
            yield request

        answers = [r async for r in stub.ModelStreamInfer(requests(), timeout=20)]
        assert sorted(bool(a.error_message) for a in answers) == [False, True]
        good = next(a for a in answers if not a.error_message)
        assert good.infer_response.id == "ok" and good.infer_response.model_name == "errs"
        assert "unknown model 'missing'" in next(a.error_message for a in answers if a.error_message)


async def test_management_services_pass_through(gateway, mesh):
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        await deploy(gateway, "pass", [MODEL, mlp_bytes(seed=12)])  # client-streaming UploadVersion x2
        models = await registry.ListModels(registry_pb2.ListModelsRequest(), timeout=10)
        assert "pass" in {m.name for m in models.models}
        versions = await registry.ListVersions(registry_pb2.ListVersionsRequest(model="pass"), timeout=10)
        assert [v.version for v in versions.versions] == [1, 2]
        # Server streaming: the artifact bytes come back unchanged.
        chunks = registry.DownloadVersion(registry_pb2.DownloadVersionRequest(model="pass", version=1), timeout=30)
        data = b"".join([c.chunk async for c in chunks if c.HasField("chunk")])
        assert data == MODEL
        # The owner's errors reach the caller unchanged.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await registry.GetModel(registry_pb2.GetModelRequest(name="absent"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "absent" in info.value.details()

        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        got = await scheduler.GetDeployment(spb.GetDeploymentRequest(name="pass"), timeout=10)
        assert got.deployment.spec.model == "pass"
        watch = scheduler.WatchDeployment(spb.WatchDeploymentRequest(name="pass"), timeout=10)
        first = await watch.read()
        assert first.deployment.spec.name == "pass"
        watch.cancel()
        # Deadlines travel: a watch with a short deadline ends with DEADLINE_EXCEEDED.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in scheduler.WatchDeployment(spb.WatchDeploymentRequest(name="pass"), timeout=0.5):
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        monitor = monitor_pb2_grpc.MonitorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await monitor.ListAlertRules(monitor_pb2.ListAlertRulesRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "no monitor is configured" in info.value.details()


async def test_auth_on_the_grpc_port(mesh):
    async with running_gateway(mesh.gateway_settings(auth=True)) as gateway:
        async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            # Probes stay public.
            assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=5)).live
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(_infer_request("scoped", np.zeros((1, 4))), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await deploy_with_token(gateway, channel)

            keys = auth_pb2_grpc.AuthServiceStub(channel)
            scoped = await keys.CreateApiKey(
                auth_pb2.CreateApiKeyRequest(name="scoped", role=auth_pb2.ROLE_INVOKER, model_scope=["other"]),
                metadata=bearer(),
                timeout=10,
            )
            invoker = await keys.CreateApiKey(
                auth_pb2.CreateApiKeyRequest(name="inv", role=auth_pb2.ROLE_INVOKER), metadata=bearer(), timeout=10
            )
            viewer = await keys.CreateApiKey(
                auth_pb2.CreateApiKeyRequest(name="view", role=auth_pb2.ROLE_VIEWER), metadata=bearer(), timeout=10
            )

            async def infer(token: str):
                return await stub.ModelInfer(
                    _infer_request("scoped", np.zeros((1, 4))), metadata=bearer(token), timeout=10
                )

            async def key_known(token: str) -> bool:
                try:
                    await stub.ModelReady(pb.ModelReadyRequest(name="scoped"), metadata=bearer(token), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    return exc.code() != grpc.StatusCode.UNAUTHENTICATED
                return True

            from tests.support.scheduler import eventually

            for created in (scoped, invoker, viewer):
                await eventually(lambda t=created.token: key_known(t), 10, "the new key in the gateway's cache")
            assert (await infer(invoker.token)).model_name == "scoped"
            assert (await infer(ADMIN_TOKEN)).model_name == "scoped"
            for token, code, text in (
                (scoped.token, grpc.StatusCode.PERMISSION_DENIED, "scoped"),
                (viewer.token, grpc.StatusCode.PERMISSION_DENIED, ""),
                ("aimaas_nokey_nosecret", grpc.StatusCode.UNAUTHENTICATED, ""),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await infer(token)
                assert info.value.code() == code, (token, info.value.details())
                assert text in info.value.details()
            # Stream inference (a handler that writes with context.write) is admitted per call, and
            # each request's model is checked in-band.
            async def stream(token: str | None):
                async def requests():
                    request = _infer_request("scoped", np.zeros((1, 4)))
                    request.id = "s1"
                    yield request

                metadata = bearer(token) if token else None
                return [r async for r in stub.ModelStreamInfer(requests(), metadata=metadata, timeout=20)]

            (answer,) = await stream(invoker.token)
            assert not answer.error_message and answer.infer_response.id == "s1"
            (answer,) = await stream(scoped.token)
            assert "scoped" in answer.error_message and not answer.infer_response.outputs
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stream(None)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # A viewer reads, but may not write through the passthrough.
            scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            await scheduler.GetDeployment(spb.GetDeploymentRequest(name="scoped"), metadata=bearer(viewer.token), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await scheduler.DeleteDeployment(
                    spb.DeleteDeploymentRequest(name="scoped"), metadata=bearer(viewer.token), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # The scoped key does not see other models in the index.
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=bearer(scoped.token), timeout=10)
            assert not [m for m in index.models if m.name == "scoped"]


async def deploy_with_token(gateway, channel) -> None:
    """Upload and deploy with the admin token through the passthrough (auth is on)."""
    from aimaas.types.v1 import types_pb2 as tpb
    from tests.support.registry import upload_requests
    from tests.support.scheduler import eventually

    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    await registry.UploadVersion(upload_requests("scoped", MODEL, create_model=True), metadata=bearer(), timeout=60)
    scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    spec = spb.DeploymentSpec(
        name="scoped", model="scoped", traffic=[spb.TrafficTarget(version=1, weight=100)],
        min_replicas=1, max_replicas=1, accelerator=tpb.ACCELERATOR_CPU,
    )  # fmt: skip
    await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec), metadata=bearer(), timeout=30)
    await eventually(lambda: (r := gateway.routing.table.find("scoped")) is not None and r.ready, 60, "scoped READY")


async def test_request_statistics_reach_the_monitor_and_its_api_passes_through(mesh):
    from tests.support.monitor import MonitorServer
    from tests.support.scheduler import eventually

    monitor = MonitorServer()
    await monitor.start()
    try:
        async with running_gateway(mesh.gateway_settings(monitor=monitor.address)) as gateway:
            await deploy(gateway, "counted", [MODEL])
            async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(7):
                    await stub.ModelInfer(_infer_request("counted", np.ones((1, 4))), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.ModelInfer(_infer_request("counted", np.ones((1, 9))), timeout=10)

                def gateway_deltas():
                    return [
                        d
                        for r in monitor.servicer.requests
                        if r.reporter_kind == monitor_pb2.REPORTER_KIND_GATEWAY
                        for d in r.deltas
                        if d.model == "counted"
                    ]

                await eventually(lambda: sum(d.success_count for d in gateway_deltas()) >= 7, 15, "gateway report")
                deltas = gateway_deltas()
                assert sum(d.success_count for d in deltas) == 7
                assert sum(d.failure_counts["INVALID_ARGUMENT"] for d in deltas) == 1
                assert {d.version for d in deltas} == {1} and sum(d.latency.count for d in deltas) == 7

                # Passthrough to the monitor: client streaming, and its UNIMPLEMENTED unchanged.
                monitor_stub = monitor_pb2_grpc.MonitorServiceStub(channel)
                report = monitor_pb2.ReportStatsRequest(
                    reporter_id="via-gateway", deltas=[monitor_pb2.StatsDelta(model="x", version=1, success_count=1)]
                )
                response = await monitor_stub.ReportStats(iter([report]), timeout=10)
                assert response.accepted_deltas == 1
                assert any(r.reporter_id == "via-gateway" for r in monitor.servicer.requests)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await monitor_stub.ListAlertRules(monitor_pb2.ListAlertRulesRequest(), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await monitor.stop()


async def test_oversized_grpc_messages_are_refused(mesh):
    async with running_gateway(mesh.gateway_settings(limits={"max_body_bytes": 4096})) as gateway:
        async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(_infer_request("anything", np.zeros((1000, 4))), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "4096" in info.value.details()
