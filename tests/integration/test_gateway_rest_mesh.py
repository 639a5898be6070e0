"""The REST edge of the real gateway (GatewayApp: routing table from etcd, upstream replica choice) in
front of a real mesh (registry, scheduler, inference node processes): a model pushed and deployed
through the gateway answers curl-style JSON and stock tritonclient.http with the binary extension on."""

from __future__ import annotations

import json
import httpx
import numpy as np
import pytest

from tests.integration.test_gateway_rest import MLP, TritonHttp, assert_error, reference
from tests.support.gateway import deploy, running_gateway, start_mesh


@pytest.fixture
def mesh(etcd_settings, tmp_path):
    mesh = start_mesh(etcd_settings, tmp_path, nodes=("node-a",))
    yield mesh
    mesh.stop()


async def test_json_and_tritonclient_binary_through_the_real_gateway(mesh):
    async with running_gateway(mesh.gateway_settings()) as gateway:
        await deploy(gateway, "mlp", [MLP.SerializeToString()], timeout=90)
        auth: dict[str, str] = {}  # auth has its own tests (test_gateway_rest, the auth matrix)
        async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as client:
            assert (await client.get("/v2/health/ready")).status_code == 200
            meta = (await client.get("/v2/models/mlp", headers=auth)).json()
            assert meta["name"] == "mlp" and meta["inputs"][0]["name"] == "x"
            assert (await client.get("/v2/models/mlp/ready", headers=auth)).status_code == 200

            x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
            body = {"id": "mesh", "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.tolist()}]}
            response = await client.post("/v2/models/mlp/infer", content=json.dumps(body),
                                         headers={**auth, "content-type": "application/json"})
            assert response.status_code == 200, response.text
            result = response.json()
            assert result["id"] == "mesh" and result["model_name"] == "mlp" and result["model_version"] == "1"
            np.testing.assert_allclose(np.array(result["outputs"][0]["data"], np.float32).reshape(2, 3),
                                       reference({"x": x}), rtol=1e-6)
            assert (await client.post("/v2/models/mlp/versions/1/infer", json=body, headers=auth)).status_code == 200
            assert_error(await client.post("/v2/models/mlp/versions/9/infer", json=body, headers=auth), 404)
            assert_error(await client.post("/v2/models/nope/infer", json=body, headers=auth), 404)
            bad = {"inputs": [{"name": "x", "shape": [2, 5], "datatype": "FP32", "data": [0] * 10}]}
            assert_error(await client.post("/v2/models/mlp/infer", json=bad, headers=auth), 400)

        import tritonclient.http as triton_http

        async with TritonHttp(gateway.http_url) as triton:
            def infer(client):
                tensor = triton_http.InferInput("x", [2, 4], "FP32")
                tensor.set_data_from_numpy(x, binary_data=True)
                return client.infer("mlp", [tensor], outputs=[triton_http.InferRequestedOutput("y", binary_data=True)],
                                    headers=auth)

            result = await triton.run(infer, triton.client)
            assert result.get_output("y")["parameters"]["binary_data_size"] == 2 * 3 * 4
            np.testing.assert_allclose(result.as_numpy("y"), reference({"x": x}), rtol=1e-6)
