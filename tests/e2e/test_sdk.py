"""The SDK against a real gateway (in-process, gRPC port) in front of real registry, scheduler and two
inference node processes: push with progress, deploy with two replicas, predict and batch_predict,
errors with their status codes, deadlines, API keys and the bearer token (AIMAAS_API_KEY)."""

from __future__ import annotations

import asyncio
import pathlib
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import onnxruntime
import pytest

from aimaas import AimaasError, AsyncModelService, ModelService
from services.common.settings import EtcdSettings
from tests.e2e.test_cli import needs_etcd
from tests.support.gateway import ADMIN_TOKEN, Mesh, running_gateway, start_mesh
from tests.support.models import mlp_bytes
from tests.support.scheduler import eventually

pytestmark = needs_etcd


@pytest.fixture(scope="module")
def mesh(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    etcd = EtcdSettings(
        endpoints=etcd_server.endpoint, namespace=f"/test-{uuid.uuid4().hex[:12]}/aimaas/v1", session_ttl_seconds=3
    )
    running = start_mesh(etcd, tmp_path_factory.mktemp("sdk-mesh"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("sdk-models") / "mlp.onnx"
    path.write_bytes(mlp_bytes())
    return path


def reference(x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(mlp_bytes(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": np.asarray(x, dtype=np.float32)})[0]


@pytest.fixture
async def gateway(mesh: Mesh) -> AsyncIterator[str]:
    async with running_gateway(mesh.gateway_settings(http_port=-1)) as app:
        yield app.grpc_address


async def deployed(service: AsyncModelService, model_path: pathlib.Path, name: str, replicas: int = 2) -> None:
    progress: list[tuple[int, int]] = []
    pushed = await service.push(model_path, name, aliases=["production"], progress=lambda s, t: progress.append((s, t)))
    size = model_path.stat().st_size
    assert (pushed.model, pushed.version, pushed.size_bytes) == (name, 1, size)
    assert progress[0] == (0, size) and progress[-1] == (size, size)
    deployment = await service.deploy(name, alias="production", min_instances=replicas)
    assert deployment.name == name and deployment.status == "PENDING"
    await deployment.wait_ready(timeout=60)
    assert deployment.status == "READY"
    nodes = {r.node_id for v in deployment.raw.status.versions for r in v.replicas}
    assert len(nodes) == replicas and nodes <= {"node-a", "node-b"}
    # wait_ready also waits until the gateway routes it (its etcd watch follows the scheduler).
    assert await service.model_ready(name)


async def test_push_deploy_predict_through_the_gateway(gateway: str, model_path: pathlib.Path) -> None:
    async with AsyncModelService(gateway, http_url="http://gw.example:8000") as service:
        await deployed(service, model_path, "mlp")
        [deployment] = [d for d in await service.list_deployments() if d.name == "mlp"]
        assert deployment.endpoint == "http://gw.example:8000/v2/models/mlp"
        assert deployment.docs_url == "http://gw.example:8000/docs/deployments/mlp"
        assert deployment.grpc_endpoint == gateway
        assert {n.node.id for n in await service.list_nodes()} == {"node-a", "node-b"}

        x = np.random.default_rng(0).standard_normal((3, 4))
        for given in (x.tolist(), x, {"x": x.astype(np.float32)}):
            outputs = await service.predict("mlp", given)
            assert list(outputs) == ["y"] and outputs["y"].dtype == np.float32
            np.testing.assert_allclose(outputs["y"], reference(x), rtol=1e-5)
        result = await service.infer("mlp", x, request_id="r-1")
        assert (result.model_version, result.id, result.datatypes) == ("1", "r-1", {"y": "FP32"})

        rows = [np.full((1, 4), i, dtype=np.float32) for i in range(50)]
        seen: list[tuple[int, int]] = []
        results = await service.batch_predict("mlp", rows, concurrency=6, progress=lambda d, t: seen.append((d, t)))
        assert len(results) == 50 and seen[0] == (0, 50) and seen[-1] == (50, 50)
        for row, outputs in zip(rows, results, strict=True):  # order preserved
            np.testing.assert_allclose(outputs["y"], reference(row), rtol=1e-5)

        await service.delete_deployment("mlp")
        with pytest.raises(AimaasError) as excinfo:
            await service.get_deployment("mlp")
        assert excinfo.value.code is grpc.StatusCode.NOT_FOUND


async def test_errors_carry_status_and_message(gateway: str, model_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    async with AsyncModelService(gateway) as service:
        await deployed(service, model_path, "mlp-errors", replicas=1)
        cases = [
            (service.predict("mlp-errors", [[1.0, 2.0]]), "INVALID_ARGUMENT", "model expects [-1, 4]"),
            (service.predict("mlp-errors", {"x": [[1, 2, 3, 4]], "z": [1]}), "INVALID_ARGUMENT", "no input 'z'"),
            (service.predict("mlp-errors", [["a", "b", "c", "d"]]), "INVALID_ARGUMENT", "model expects FP32"),
            (service.predict("no-such-model", [[1.0]]), "NOT_FOUND", "no-such-model"),
            (service.deploy("no-such-model", 1), "NOT_FOUND", "no-such-model"),
            (service.deploy("mlp-errors", 1, alias="production"), "INVALID_ARGUMENT", "at most one of"),
            (service.deploy("mlp-errors", min_instances=3, max_instances=2), "INVALID_ARGUMENT", "min_instances"),
            (service.deploy("mlp-errors", accelerator="tpu"), "INVALID_ARGUMENT", "accelerator"),
            (service.push(tmp_path / "missing.onnx", "m"), "INVALID_ARGUMENT", "cannot read"),
            (service.batch_predict("mlp-errors", [[[1.0] * 4]], concurrency=0), "INVALID_ARGUMENT", "concurrency"),
            (service.create_api_key("k", "root"), "INVALID_ARGUMENT", "role 'root'"),
        ]
        for call, status, text in cases:
            with pytest.raises(AimaasError) as excinfo:
                await call
            assert excinfo.value.status() == status, (status, excinfo.value)
            assert text in excinfo.value.message(), excinfo.value.message()
        # A batch whose inputs are not all valid sends nothing and names the problem.
        with pytest.raises(AimaasError) as excinfo:
            await service.batch_predict("mlp-errors", [[[1.0] * 4], [[1.0] * 3]])
        assert excinfo.value.status() == "INVALID_ARGUMENT"
        # A wait that runs out is DEADLINE_EXCEEDED with the progress line.
        pending = await service.deploy("mlp-errors", 1, min_instances=3)  # two nodes only
        with pytest.raises(AimaasError) as excinfo:
            await pending.wait_ready(timeout=1)
        assert excinfo.value.code is grpc.StatusCode.DEADLINE_EXCEEDED and "mlp-errors" in excinfo.value.message()
        await service.delete_deployment("mlp-errors")


async def test_every_call_has_a_deadline() -> None:
    """A server that accepts TCP and never answers: each call ends at its deadline (the service's
    default, or the per-call one), never hangs. (A tiny deadline against a live server is no test: a
    fast reply may beat the client's timer.)"""
    connections: list[asyncio.StreamWriter] = []

    async def accept_and_stay_silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(accept_and_stay_silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with AsyncModelService(f"127.0.0.1:{port}", timeout=0.5) as service:
            for call in (service.list_models(), service.predict("m", [[1.0] * 4], timeout=0.3)):
                started = asyncio.get_running_loop().time()
                with pytest.raises(AimaasError) as excinfo:
                    await asyncio.wait_for(call, 10)
                assert excinfo.value.code is grpc.StatusCode.DEADLINE_EXCEEDED, excinfo.value
                assert asyncio.get_running_loop().time() - started < 5
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_unreachable_gateway_is_unavailable() -> None:
    async with AsyncModelService("127.0.0.1:1", timeout=2) as service:
        with pytest.raises(AimaasError) as excinfo:
            await service.list_models()
    assert excinfo.value.code is grpc.StatusCode.UNAVAILABLE


async def test_sync_wrapper(gateway: str, model_path: pathlib.Path) -> None:
    def use() -> None:
        with ModelService(gateway) as service:
            pushed = service.push(model_path, "mlp-sync")
            deployment = service.deploy("mlp-sync", pushed.version, min_instances=1).wait_ready(60)
            assert deployment.status == "READY" and deployment.refresh().status == "READY"
            x = [[0.5, -1.0, 2.0, 3.0]]
            np.testing.assert_allclose(service.predict("mlp-sync", x)["y"], reference(np.asarray(x)), rtol=1e-5)
            assert len(service.batch_predict("mlp-sync", [x] * 5, concurrency=2)) == 5
            assert "mlp-sync" in [m.name for m in service.list_models()]
        with pytest.raises(RuntimeError, match="closed"):
            service.list_models()

    # The gateway runs on this test's loop: the blocking wrapper runs in a thread.
    await asyncio.to_thread(use)


async def test_api_keys_and_bearer_tokens(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_gateway(mesh.gateway_settings(http_port=-1, auth=True)) as app:
        address = app.grpc_address
        async with AsyncModelService(address) as anonymous:
            with pytest.raises(AimaasError) as excinfo:
                await anonymous.list_models()
            assert excinfo.value.status() == "UNAUTHENTICATED"
        async with AsyncModelService(address, api_key=ADMIN_TOKEN) as admin:
            key, token = await admin.create_api_key("reader", "viewer")
            assert token.startswith("aimaas_") and key.name == "reader" and not key.secret_hash
            assert "reader" in [k.name for k in await admin.list_api_keys()]
        # Without an explicit key the SDK reads AIMAAS_API_KEY.
        monkeypatch.setenv("AIMAAS_API_KEY", token)
        async with AsyncModelService(address) as viewer:
            await viewer.list_models()
            with pytest.raises(AimaasError) as excinfo:
                await viewer.deploy("anything", 1)
            assert excinfo.value.status() == "PERMISSION_DENIED"
            async with AsyncModelService(address, api_key=ADMIN_TOKEN) as admin:
                await admin.revoke_api_key(key.id)

            async def revoked() -> bool:
                try:
                    await viewer.list_models()
                except AimaasError as exc:
                    return exc.status() == "UNAUTHENTICATED"
                return False

            await eventually(revoked, 15, "revoked key rejected")
