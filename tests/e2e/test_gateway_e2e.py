"""Issue 5 acceptance, end to end on `aimaas up --auth` (etcd, registry, monitor, scheduler, two
inference nodes, gateway as real processes): push an ONNX model with the CLI, deploy it with two
replicas, then infer through the gateway via REST JSON (httpx, what curl sends), `tritonclient.http`
with the binary extension, `tritonclient.grpc` on the gateway's gRPC port and the SDK; `aimaas status
--json` shows it all; API keys from the CLI. Auth is on so every client also proves its bearer token
(the CLI uses the bootstrap admin token `up` stored; tests/e2e/test_cli*.py run with auth off).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import httpx
import numpy as np
import onnxruntime
import pytest

from aimaas import AimaasError, ModelService
from tests.e2e.test_cli import Mesh, cli_env, free_port_offset, needs_etcd, ok, run_cli
from tests.support.models import mlp_bytes

pytestmark = needs_etcd
T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - keep polling; reported at the end
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def start(state_dir: pathlib.Path, *extra: str) -> tuple[Mesh, subprocess.CompletedProcess[str]]:
    offset = free_port_offset()
    result = ok(
        run_cli(
            "up", "--state-dir", state_dir, "--base-port-offset", offset, "--timeout", 60, "--inference-nodes", 2,
            *extra, timeout=240,
        )
    )  # fmt: skip
    return Mesh(state_dir, offset), result


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, subprocess.CompletedProcess[str]]]:
    running, result = start(tmp_path_factory.mktemp("gateway-mesh"), "--auth")
    try:
        yield running, result
    finally:
        ok(running.cli("down"))
        assert not (running.state_dir / "admin-token").exists()


@pytest.fixture(scope="module")
def mesh(started: tuple[Mesh, subprocess.CompletedProcess[str]]) -> Mesh:
    return started[0]


@pytest.fixture(scope="module")
def token(mesh: Mesh) -> str:
    return (mesh.state_dir / "admin-token").read_text().strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    path.write_bytes(mlp_bytes())
    return path


def reference(x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(mlp_bytes(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x.astype(np.float32)})[0]


def endpoints(mesh: Mesh, name: str) -> dict[str, str]:
    return mesh.process(name)["endpoints"]


@pytest.fixture(scope="module")
def deployed(mesh: Mesh, model_path: pathlib.Path, token: str) -> str:
    ok(mesh.cli("models", "push", model_path, "--name", "mlp", "--alias", "production"))
    document = json.loads(
        ok(mesh.cli("deploy", "mlp", "--alias", "production", "--min", "2", "--timeout", "90", "--json")).stdout
    )
    nodes = {entry["address"] for entry in document["endpoints"]}
    assert len(nodes) == 2, document
    assert document["endpoint"].endswith("/v2/models/mlp")
    http = endpoints(mesh, "gateway")["http"]
    # The gateway learns READY replicas from its etcd watch, a moment after the scheduler does.
    ready = lambda: httpx.get(f"http://{http}/v2/models/mlp/ready", headers=bearer(token), timeout=5)  # noqa: E731
    assert ready().status_code == 200  # `aimaas deploy` waits until the gateway routes it
    return "mlp"


def test_rest_json_through_the_gateway(mesh: Mesh, deployed: str, token: str) -> None:
    http = endpoints(mesh, "gateway")["http"]
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    response = httpx.post(f"http://{http}/v2/models/{deployed}/infer", json=body, headers=bearer(token), timeout=10)
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert output["name"] == "y" and output["shape"] == [2, 3]
    np.testing.assert_allclose(np.asarray(output["data"], dtype=np.float32).reshape(2, 3), reference(x), rtol=1e-5)

    url = f"http://{http}/v2/models/{deployed}/infer"
    bad = httpx.post(url, json={"inputs": [{"name": "x"}]}, headers=bearer(token), timeout=10)
    assert bad.status_code == 400 and "error" in bad.json()
    assert httpx.post(url, json=body, timeout=10).status_code == 401


def test_tritonclient_http_binary_through_the_gateway(mesh: Mesh, deployed: str, token: str) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(endpoints(mesh, "gateway")["http"])
    try:
        x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
        given = httpclient.InferInput("x", [3, 4], "FP32")
        given.set_data_from_numpy(x, binary_data=True)
        wanted = [httpclient.InferRequestedOutput("y", binary_data=True)]
        result = client.infer(deployed, [given], outputs=wanted, headers=bearer(token))
        np.testing.assert_allclose(result.as_numpy("y"), reference(x), rtol=1e-5)
    finally:
        client.close()


def test_tritonclient_grpc_on_the_gateway_port(mesh: Mesh, deployed: str, token: str) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(endpoints(mesh, "gateway")["grpc"])
    try:
        # gRPC metadata keys are lower case.
        metadata = {"authorization": f"Bearer {token}"}
        assert client.is_model_ready(deployed, headers=metadata)
        x = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
        given = grpcclient.InferInput("x", [4, 4], "FP32")
        given.set_data_from_numpy(x)
        result = client.infer(deployed, [given], headers=metadata)
        np.testing.assert_allclose(result.as_numpy("y"), reference(x), rtol=1e-5)
    finally:
        client.close()


def test_sdk_through_the_gateway(mesh: Mesh, deployed: str, model_path: pathlib.Path, token: str) -> None:
    gateway = endpoints(mesh, "gateway")
    with ModelService(gateway["grpc"], api_key=token) as service:
        assert service.http_url == f"http://{gateway['http']}"
        x = np.random.default_rng(4).standard_normal((2, 4))
        # Plain lists and float64 arrays are converted to the model's FP32.
        np.testing.assert_allclose(service.predict(deployed, x.tolist())["y"], reference(x), rtol=1e-5)
        np.testing.assert_allclose(service.predict(deployed, {"x": x})["y"], reference(x), rtol=1e-5)

        rows = [np.full((1, 4), i, dtype=np.float32) for i in range(40)]
        seen: list[tuple[int, int]] = []
        results = service.batch_predict(deployed, rows, concurrency=8, progress=lambda d, t: seen.append((d, t)))
        for row, result in zip(rows, results, strict=True):  # order preserved
            np.testing.assert_allclose(result["y"], reference(row), rtol=1e-5)
        assert seen[-1] == (40, 40)

        with pytest.raises(AimaasError) as excinfo:
            service.predict(deployed, [[1.0, 2.0]])
        assert excinfo.value.status() == "INVALID_ARGUMENT" and "model expects [-1, 4]" in excinfo.value.message()
        with pytest.raises(AimaasError) as excinfo:
            service.predict("no-such-model", [[1.0]])
        assert excinfo.value.code is grpc.StatusCode.NOT_FOUND

        progress: list[tuple[int, int]] = []
        pushed = service.push(model_path, "mlp-sdk", progress=lambda sent, total: progress.append((sent, total)))
        assert pushed.version == 1 and progress[-1] == (model_path.stat().st_size,) * 2
        deployment = service.deploy("mlp-sdk", pushed.version, min_instances=1).wait_ready(timeout=90)
        assert deployment.status == "READY"
        assert deployment.endpoint == f"http://{gateway['http']}/v2/models/mlp-sdk"
        assert deployment.docs_url == f"http://{gateway['http']}/docs/deployments/mlp-sdk"
        assert service.model_ready("mlp-sdk")  # wait_ready waits for the gateway's routing too
        np.testing.assert_allclose(service.predict("mlp-sdk", x)["y"], reference(x), rtol=1e-5)


def test_cli_predict_and_status_go_through_the_gateway(mesh: Mesh, deployed: str) -> None:
    gateway = endpoints(mesh, "gateway")
    result = json.loads(ok(mesh.cli("predict", deployed, "--random", "--batch", "2", "--json")).stdout)
    assert result["node"] == gateway["grpc"]
    assert result["outputs"][0]["shape"] == [2, 3]

    document = mesh.status()
    by_name = {entry["name"]: entry for entry in document["processes"]}
    assert {"etcd", "registry", "monitor", "scheduler", "inference", "inference-2", "gateway"} <= by_name.keys()
    assert all(entry["healthy"] for entry in by_name.values()), by_name
    [mlp] = [d for d in document["deployments"] if d["name"] == deployed]
    assert mlp["status"] == "READY" and mlp["endpoint"] == f"http://{gateway['http']}/v2/models/mlp"
    [version] = mlp["versions"]
    assert version["ready_replicas"] == 2 and len({r["node_id"] for r in version["replicas"]}) == 2
    assert len(document["nodes"]) == 2
    table = ok(mesh.cli("status")).stdout
    assert "deployments" in table and "inference nodes" in table and "READY" in table


def test_keys_from_the_cli(
    started: tuple[Mesh, subprocess.CompletedProcess[str]], model_path: pathlib.Path, token: str
) -> None:
    mesh, result = started
    assert f"admin token (stored in {mesh.state_dir / 'admin-token'}" in result.stdout
    assert (mesh.state_dir / "admin-token").stat().st_mode & 0o077 == 0
    gateway = endpoints(mesh, "gateway")["grpc"]
    ok(mesh.cli("models", "push", model_path, "--name", "mlp-keys"))  # the CLI uses the stored admin token
    created = json.loads(ok(mesh.cli("keys", "create", "ci", "--role", "invoker", "--json")).stdout)
    invoker = created["token"]
    listed = json.loads(ok(mesh.cli("keys", "list", "--json")).stdout)["keys"]
    assert [key["name"] for key in listed] == ["ci"] and "secret_hash" not in listed[0]
    assert "ci" in ok(mesh.cli("keys", "list")).stdout

    with ModelService(gateway, api_key="") as anonymous, pytest.raises(AimaasError) as excinfo:
        anonymous.list_models()
    assert excinfo.value.status() == "UNAUTHENTICATED"
    with ModelService(gateway, api_key=invoker) as service:
        assert "mlp-keys" in [m.name for m in service.list_models()]
        with pytest.raises(AimaasError) as excinfo:
            service.deploy("mlp-keys", 1)
        assert excinfo.value.status() == "PERMISSION_DENIED"
    # The CLI reads AIMAAS_API_KEY before the stored token, and says what is wrong.
    denied = run_cli("keys", "list", "--state-dir", mesh.state_dir, env=cli_env(AIMAAS_API_KEY=invoker))
    assert denied.returncode == 1 and denied.stderr.startswith("error: PERMISSION_DENIED: "), denied.stderr

    ok(mesh.cli("keys", "revoke", created["key"]["id"]))

    def rejected() -> bool:
        with ModelService(gateway, api_key=invoker) as service:
            try:
                service.list_models()
            except AimaasError as exc:
                return exc.status() == "UNAUTHENTICATED"
        return False

    eventually(rejected, what="revoked key rejected")
    unknown = mesh.cli("keys", "revoke", "no-such-key")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: NOT_FOUND: "), unknown.stderr
