"""The gateway's REST edge (Open Inference Protocol over HTTP) on a real uvicorn server in front of a real
inference node: curl-style JSON via httpx, stock tritonclient.http with the binary extension on and off,
every datatype, and every error path (400/401/403/404/413/429/503/504, validation errors never 422).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import json
import logging

import grpc
import httpx
import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import structlog
import tritonclient.http as triton_http
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc
from services.common.auth import AuthSettings
from services.common.auth.authenticator import Authenticator
from services.common.auth.store import ApiKeyStore
from services.common.etcd import EtcdClient
from aimaas.auth.v1 import auth_pb2
from services.gateway.http_app import build_http_app, serve_http
from services.gateway.settings import GatewayServerSettings, GatewaySettings, LimitSettings
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from tests.support.inference import fake_backend, inference_settings, running_inference, write_model
from tests.support.models import add_model, identity_model, mlp_model, two_output_model

MLP = mlp_model()
SLOW = fake_backend(delay_seconds=1.5)
TOKEN = "t" * 40


class NodeDataPlane:
    """The GatewayDataPlane interface served by one inference node over gRPC (the gateway's routing is
    not under test here: this is the REST edge's view of the data plane)."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self.infer_metadata: list[tuple] = []
        self.sticky_keys: list[str | None] = []

    async def close(self) -> None:
        await self._channel.close()

    async def server_live(self) -> bool:
        return (await self._stub.ServerLive(pb.ServerLiveRequest())).live

    async def server_ready(self) -> bool:
        return (await self._stub.ServerReady(pb.ServerReadyRequest())).ready

    async def model_ready(self, model: str, version: str = "") -> bool:
        return (await self._stub.ModelReady(pb.ModelReadyRequest(name=model, version=version))).ready

    async def model_metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        return await self._stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version))

    async def model_infer(self, request, *, principal, timeout, sticky_key=None, metadata=()):
        self.infer_metadata.append(tuple(metadata))
        self.sticky_keys.append(sticky_key)
        return await self._stub.ModelInfer(request, timeout=timeout, metadata=tuple(metadata))

    async def model_statistics(self, model: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        return await self._stub.ModelStatistics(pb.ModelStatisticsRequest(name=model, version=version))

    async def repository_index(self) -> pb.RepositoryIndexResponse:
        return await self._stub.RepositoryIndex(pb.RepositoryIndexRequest())


@pytest.fixture
def repository(tmp_path):
    root = tmp_path / "models"
    write_model(root, "mlp", MLP)
    write_model(root, "adder", add_model(TensorProto.INT64, ["batch", 2]))
    write_model(root, "half", add_model(TensorProto.FLOAT16, ["batch", 3]))
    write_model(root, "brain", identity_model(TensorProto.BFLOAT16, ["batch", 2]))
    write_model(root, "strings", identity_model(TensorProto.STRING, ["batch", 2]))
    write_model(root, "flags", identity_model(TensorProto.BOOL, ["batch", 2]))
    write_model(root, "bytes8", identity_model(TensorProto.UINT8, ["batch", 2]))
    write_model(root, "two", two_output_model())
    write_model(root, "slow", b"fake", config={"backend": "slow"})
    return root


@pytest.fixture
async def node(repository):
    backends = {"onnxruntime": OnnxRuntimeBackend, "slow": SLOW}
    async with running_inference(inference_settings(repository), backends=backends) as app:
        yield app


@contextlib.asynccontextmanager
async def gateway(node, *, limits: LimitSettings | None = None, auth: AuthSettings | None = None, logger=None,
                  store: ApiKeyStore | None = None, telemetry=None):
    settings = GatewaySettings(gateway=GatewayServerSettings(
        limits=limits or LimitSettings(), auth=auth or AuthSettings(enabled=False)))
    dataplane = NodeDataPlane(node.grpc.address)
    app = build_http_app(dataplane, Authenticator(store, settings.gateway.auth), settings, logger=logger,
                         telemetry=telemetry)
    server = await serve_http(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.port}", dataplane
    finally:
        await server.stop()
        await dataplane.close()


@pytest.fixture
async def rest(node):
    async with gateway(node) as (url, dataplane):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            client.dataplane = dataplane
            yield client


class TritonHttp:
    """A stock tritonclient.http client on its own thread: it blocks (the server shares this event loop)
    and its gevent sockets must stay on the thread that made them."""

    def __init__(self, base_url) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1)
        self._url = str(base_url).removeprefix("http://")
        self.client: triton_http.InferenceServerClient | None = None

    async def __aenter__(self) -> TritonHttp:
        self.client = await self.run(triton_http.InferenceServerClient, self._url)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.run(self.client.close)
        self._executor.shutdown()

    def run(self, function, *args, **kwargs):
        return asyncio.get_running_loop().run_in_executor(self._executor, lambda: function(*args, **kwargs))

    def __getattr__(self, name):
        method = getattr(self.client, name)
        return lambda *args, **kwargs: self.run(method, *args, **kwargs)


def reference(feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(MLP.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def assert_error(response: httpx.Response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert fragment.lower() in body["error"].lower(), body


# ----------------------------------------------------------------------------------- happy paths


async def test_health_server_and_model_metadata(rest):
    assert (await rest.get("/v2/health/live")).json() == {"live": True}
    assert (await rest.get("/v2/health/ready")).json() == {"ready": True}
    meta = (await rest.get("/v2")).json()
    assert meta["name"] == "aimaas" and "binary_tensor_data" in meta["extensions"]
    model = (await rest.get("/v2/models/mlp")).json()
    assert model["name"] == "mlp" and model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert (await rest.get("/v2/models/mlp/versions/1")).json()["outputs"][0]["name"] == "y"
    assert (await rest.get("/v2/models/mlp/ready")).status_code == 200
    assert (await rest.get("/v2/models/mlp/versions/1/ready")).json() == {"name": "mlp", "ready": True}
    not_ready = await rest.get("/v2/models/mlp/versions/7/ready")
    assert not_ready.status_code == 503 and not_ready.json()["ready"] is False


async def test_curl_style_json_infer_matches_onnxruntime(rest):
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    body = {"id": "req-1", "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": x.tolist()}]}
    response = await rest.post("/v2/models/mlp/infer", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    result = response.json()
    assert result["id"] == "req-1" and result["model_name"] == "mlp" and result["model_version"] == "1"
    (output,) = result["outputs"]
    assert output["name"] == "y" and output["datatype"] == "FP32" and output["shape"] == [3, 3]
    np.testing.assert_allclose(np.array(output["data"], dtype=np.float32).reshape(3, 3), reference({"x": x}), rtol=1e-6)
    # Flat data is as good as nested, and a pinned version routes the same.
    body["inputs"][0]["data"] = x.ravel().tolist()
    again = (await rest.post("/v2/models/mlp/versions/1/infer", json=body)).json()
    assert again["outputs"][0]["data"] == output["data"]


@pytest.mark.parametrize("binary", [True, False])
async def test_tritonclient_http_binary_on_and_off(rest, binary):
    async with TritonHttp(rest.base_url) as client:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("mlp")
        assert (await client.get_model_metadata("mlp"))["inputs"][0]["name"] == "x"
        x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
        tensor = triton_http.InferInput("x", [5, 4], "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = [triton_http.InferRequestedOutput("y", binary_data=binary)]
        result = await client.infer("mlp", [tensor], outputs=outputs, request_id="abc")
        np.testing.assert_allclose(result.as_numpy("y"), reference({"x": x}), rtol=1e-6)
        assert result.get_response()["id"] == "abc"
        # Without requested outputs tritonclient asks for every output in binary form.
        result = await client.infer("mlp", [tensor])
        assert result.get_output("y")["parameters"]["binary_data_size"] == 5 * 3 * 4
        np.testing.assert_allclose(result.as_numpy("y"), reference({"x": x}), rtol=1e-6)
        # Compressed request bodies (tritonclient's request_compression_algorithm).
        result = await client.infer("mlp", [tensor], request_compression_algorithm="gzip")
        np.testing.assert_allclose(result.as_numpy("y"), reference({"x": x}), rtol=1e-6)
        stats = await client.get_inference_statistics("mlp")
        assert stats["model_stats"][0]["name"] == "mlp" and stats["model_stats"][0]["inference_count"] >= 3
        with pytest.raises(InferenceServerException, match="unknown|not found|no model"):
            await client.infer("nope", [tensor])


@pytest.mark.parametrize("binary", [True, False])
async def test_every_kind_of_datatype_both_encodings(rest, binary):
    def infer(client, model, arrays, datatype):
        tensors = []
        for name, array in arrays.items():
            tensor = triton_http.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, binary_data=binary)
            tensors.append(tensor)
        return client.infer(model, tensors, outputs=None if binary else [
            triton_http.InferRequestedOutput(n, binary_data=False) for n in ("sum", "y") if n in OUTPUTS[model]
        ])

    async with TritonHttp(rest.base_url) as triton:
        def sync(function, *args):
            return triton.run(function, triton.client, *args)

        a = np.array([[1, -2], [2**40, 7]], dtype=np.int64)
        b = np.array([[10, 20], [1, -7]], dtype=np.int64)
        result = await sync(infer, "adder", {"a": a, "b": b}, "INT64")
        assert result.as_numpy("sum").dtype == np.int64
        np.testing.assert_array_equal(result.as_numpy("sum"), a + b)

        h = np.array([[0.5, 1.25, -3.0]], dtype=np.float16)
        result = await sync(infer, "half", {"a": h, "b": h}, "FP16")
        assert result.get_output("sum")["datatype"] == "FP16"
        np.testing.assert_array_equal(result.as_numpy("sum").astype(np.float16), h + h)

        flags = np.array([[True, False], [False, True]])
        result = await sync(infer, "flags", {"x": flags}, "BOOL")
        np.testing.assert_array_equal(result.as_numpy("y"), flags)

        small = np.array([[0, 255], [7, 128]], dtype=np.uint8)
        result = await sync(infer, "bytes8", {"x": small}, "UINT8")
        np.testing.assert_array_equal(result.as_numpy("y"), small)

        s = np.array([[b"hello", b""], ["w\xc3\xb6rld".encode("latin-1"), b"a b"]], dtype=object)
        result = await sync(infer, "strings", {"x": s}, "BYTES")
        assert result.get_output("y")["datatype"] == "BYTES" and result.get_output("y")["shape"] == [2, 2]
        # JSON carries BYTES as text, so tritonclient returns str there.
        expected = s if binary else np.vectorize(lambda b: b.decode())(s).astype(object)
        np.testing.assert_array_equal(result.as_numpy("y").astype(object), expected)


OUTPUTS = {"adder": {"sum"}, "half": {"sum"}, "flags": {"y"}, "bytes8": {"y"}, "strings": {"y"}}


async def test_bf16_json_and_binary(rest):
    bf = np.array([[1.5, -0.25], [3.0, 8.0]], dtype=ml_dtypes.bfloat16)
    # JSON: numbers in, numbers out.
    body = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "BF16", "data": bf.astype(np.float32).tolist()}]}
    result = (await rest.post("/v2/models/brain/infer", json=body)).json()
    assert result["outputs"][0]["datatype"] == "BF16"
    assert result["outputs"][0]["data"] == bf.astype(np.float32).ravel().tolist()
    # Binary: the bits travel unchanged, in and out.
    header = json.dumps({
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "BF16", "parameters": {"binary_data_size": 8}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }).encode()
    response = await rest.post("/v2/models/brain/infer", content=header + bf.tobytes(),
                               headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert response.content[length:] == bf.tobytes()


async def test_requested_outputs_order_parameters_and_mixed_encodings(rest):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    header = json.dumps({
        "id": "mixed",
        "parameters": {"custom": "kept", "binary_data_output": False},
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}],
        "outputs": [{"name": "plus_one", "parameters": {"binary_data": True}}, {"name": "doubled"}],
    }).encode()
    response = await rest.post("/v2/models/two/infer", content=header + x.tobytes(),
                               headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    result = triton_http.InferResult.from_response_body(
        response.content, header_length=int(response.headers["inference-header-content-length"]))
    np.testing.assert_array_equal(result.as_numpy("plus_one"), x + 1)
    np.testing.assert_array_equal(result.as_numpy("doubled").reshape(2, 4), x + x)
    assert result.get_response()["id"] == "mixed"
    assert {o["name"] for o in result.get_response()["outputs"]} == {"plus_one", "doubled"}
    only = (await rest.post("/v2/models/two/infer", json={
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.tolist()}],
        "outputs": [{"name": "doubled"}]})).json()
    assert [o["name"] for o in only["outputs"]] == ["doubled"]


async def test_statistics_and_repository_index(rest):
    await rest.post("/v2/models/mlp/infer", json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    stats = (await rest.get("/v2/models/mlp/stats")).json()
    (entry,) = stats["model_stats"]
    assert entry["name"] == "mlp" and entry["inference_count"] >= 1
    assert isinstance(entry["inference_stats"]["success"]["ns"], int)
    assert (await rest.get("/v2/models/mlp/versions/1/stats")).json()["model_stats"][0]["version"] == "1"
    every = (await rest.get("/v2/models/stats")).json()
    assert {"mlp", "two"} <= {s["name"] for s in every["model_stats"]}
    index = (await rest.post("/v2/repository/index")).json()
    assert {"name": "mlp", "version": "1", "state": "READY", "reason": ""} in index
    ready = (await rest.post("/v2/repository/index", json={"ready": True})).json()
    assert all(m["state"] == "READY" for m in ready)


async def test_traceparent_reaches_the_data_plane_and_the_access_log(node):
    lines: list[dict] = []

    def capture(_logger, _method, event):
        lines.append(dict(event))
        raise structlog.DropEvent

    logger = structlog.wrap_logger(None, processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with gateway(node, logger=logger) as (url, dataplane), httpx.AsyncClient(base_url=url) as client:
        response = await client.post(
            "/v2/models/mlp/infer",
            json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "x-aimaas-session": "user-7"},
        )
        assert response.status_code == 200
        await client.get("/v2/models/nope")
    (metadata,) = dataplane.infer_metadata
    assert dataplane.sticky_keys == ["user-7"]  # the sticky routing header reaches the data plane
    propagated = dict(metadata)["traceparent"]
    assert propagated.split("-")[1] == trace_id
    access = [line for line in lines if line.get("event") == "http request"]
    first, second = access
    assert first["method"] == "POST" and first["path"] == "/v2/models/mlp/infer" and first["status"] == 200
    assert first["model"] == "mlp" and first["trace_id"] == trace_id and first["duration_ms"] > 0
    assert "key_id" in first
    assert second["status"] == 404 and second["model"] == "nope" and len(second["trace_id"]) == 32


async def test_with_an_exporter_the_edge_records_a_server_span_in_the_callers_trace(node):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.common.settings import TelemetrySettings
    from services.common.tracing import setup_telemetry

    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(TelemetrySettings(), "gateway", extra_processors=[SimpleSpanProcessor(exporter)])
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with gateway(node, telemetry=telemetry) as (url, dataplane), httpx.AsyncClient(base_url=url) as client:
        response = await client.post(
            "/v2/models/mlp/infer",
            json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
        assert response.status_code == 200
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "HTTP POST"]
    assert format(span.context.trace_id, "032x") == trace_id and span.parent.span_id == 0x00F067AA0BA902B7
    assert span.attributes["http.target"] == "/v2/models/mlp/infer" and span.attributes["http.status_code"] == 200
    (metadata,) = dataplane.infer_metadata  # the upstream call's parent is this span
    assert dict(metadata)["traceparent"].split("-")[2] == format(span.context.span_id, "016x")
    telemetry.shutdown()


# ----------------------------------------------------------------------------------- error paths


async def test_bad_input_is_400_with_a_precise_message(rest):
    url = "/v2/models/mlp/infer"
    assert_error(await rest.post(url, content=b"{not json"), 400, "not valid json")
    assert_error(await rest.post(url, content=b"[1, 2]"), 400, "json object")
    assert_error(await rest.post(url, json={"inputs": []}), 400, "non-empty list")
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    assert_error(await rest.post(url, json={"inputs": [{**x, "shape": [2, 4]}]}), 400, "needs 8")
    assert_error(await rest.post(url, json={"inputs": [{**x, "datatype": "FP99"}]}), 400, "unknown datatype")
    assert_error(await rest.post(url, json={"inputs": [{**x, "data": [[1, 2], [3]]}]}), 400, "ragged")
    assert_error(await rest.post(url, json={"inputs": [{**x, "data": ["a", "b", "c", "d"]}]}), 400, "fp32")
    # The node rejects what only the model signature can tell: wrong datatype for the model.
    assert_error(await rest.post(url, json={"inputs": [{**x, "datatype": "INT32"}]}), 400, "")
    assert_error(await rest.post(url, json={"inputs": [{**x, "shape": [1, 5], "data": [1, 2, 3, 4, 5]}]}), 400, "")
    # Binary extension: header length beyond the body, sizes that do not add up.
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    assert_error(await rest.post(url, content=header + bytes(16), headers={"Inference-Header-Content-Length": "99999"}),
                 400, "Inference-Header-Content-Length")
    assert_error(await rest.post(url, content=header + bytes(16), headers={"Inference-Header-Content-Length": "-3"}),
                 400, "Inference-Header-Content-Length")
    assert_error(await rest.post(url, content=header + bytes(8), headers={"Inference-Header-Content-Length": str(len(header))}),
                 400, "binary_data_size")
    assert_error(await rest.post(url, content=header + bytes(20), headers={"Inference-Header-Content-Length": str(len(header))}),
                 400, "no input claims")
    assert_error(await rest.post(url, content=b"\x1f\x8b garbage", headers={"content-encoding": "gzip"}), 400, "gzip")
    assert_error(await rest.post(url, content=b"{}", headers={"content-encoding": "br"}), 400, "content-encoding")
    assert_error(await rest.get("/v2/models/mlp/versions/latest"), 400, "version")


async def test_unknown_model_and_route_are_404_wrong_method_405(rest):
    assert_error(await rest.get("/v2/models/nope"), 404, "nope")
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    assert_error(await rest.post("/v2/models/nope/infer", json=body), 404, "nope")
    assert_error(await rest.get("/v2/no/such/route"), 404)
    assert_error(await rest.get("/v2/models/mlp/infer"), 405)


async def test_node_down_is_503(node):
    async with gateway(node) as (url, _), httpx.AsyncClient(base_url=url) as client:
        await node.stop()
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        assert_error(await client.post("/v2/models/mlp/infer", json=body), 503)


async def test_missing_or_wrong_key_is_401_and_health_stays_open(node):
    async with gateway(node, auth=AuthSettings(bootstrap_admin_token=TOKEN)) as (url, _), \
            httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert_error(await client.get("/v2/models/mlp"), 401)
        assert_error(await client.get("/v2/models/mlp", headers={"authorization": "Bearer nope"}), 401)
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        assert_error(await client.post("/v2/models/mlp/infer", json=body), 401)
        ok = await client.post("/v2/models/mlp/infer", json=body, headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200


async def test_body_too_large_is_413_by_header_and_while_streaming(node):
    limits = LimitSettings(max_body_bytes=4096)
    async with gateway(node, limits=limits) as (url, _), httpx.AsyncClient(base_url=url) as client:
        assert_error(await client.post("/v2/models/mlp/infer", content=b"x" * 5000), 413, "4096")

        async def chunks():
            for _ in range(10):
                yield b" " * 1000

        assert_error(await client.post("/v2/models/mlp/infer", content=chunks()), 413, "4096")
        # A gzip body that inflates beyond the limit is refused as well.
        bomb = gzip.compress(b" " * 100_000)
        assert_error(await client.post("/v2/models/mlp/infer", content=bomb, headers={"content-encoding": "gzip"}), 413)
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        assert (await client.post("/v2/models/mlp/infer", json=body)).status_code == 200


async def test_timeout_is_504(node):
    limits = LimitSettings(request_timeout_seconds=0.3)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    async with gateway(node, limits=limits) as (url, _), httpx.AsyncClient(base_url=url) as client:
        assert_error(await client.post("/v2/models/slow/infer", json=body), 504)
        # The request's own timeout parameter (µs, as tritonclient sends it) shortens the deadline.
    async with gateway(node) as (url, _), httpx.AsyncClient(base_url=url) as client:
        assert_error(await client.post("/v2/models/slow/infer", json={**body, "parameters": {"timeout": 200_000}}), 504)
        assert (await client.post("/v2/models/mlp/infer", json=body)).status_code == 200


async def test_concurrency_limit_is_429_with_retry_after(node):
    limits = LimitSettings(max_concurrency=1, retry_after_seconds=2)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    async with gateway(node, limits=limits) as (url, _), httpx.AsyncClient(base_url=url) as client:
        slow = asyncio.create_task(client.post("/v2/models/slow/infer", json=body))
        for _ in range(200):  # until the slow request holds the only slot (it may itself lose a race)
            await asyncio.sleep(0.02)
            if slow.done():
                assert (await slow).status_code in (200, 429)
                slow = asyncio.create_task(client.post("/v2/models/slow/infer", json=body))
                continue
            response = await client.post("/v2/models/mlp/infer", json=body)
            if response.status_code == 429:
                break
        assert_error(response, 429, "concurrent")
        assert response.headers["retry-after"] == "2"
        assert (await client.get("/v2/health/live")).status_code == 200  # probes are never limited
        assert (await slow).status_code == 200
        assert (await client.post("/v2/models/mlp/infer", json=body)).status_code == 200


async def test_roles_scopes_and_per_key_limit_with_real_api_keys(node, etcd_settings):
    etcd = EtcdClient(etcd_settings)
    store = ApiKeyStore(etcd)
    await store.start()
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    try:
        _, viewer = await store.create("viewer", auth_pb2.ROLE_VIEWER)
        _, scoped = await store.create("scoped", auth_pb2.ROLE_INVOKER, model_scope=["slow"])
        _, other = await store.create("other", auth_pb2.ROLE_INVOKER)
        limits = LimitSettings(max_concurrency_per_key=1)
        async with gateway(node, limits=limits, auth=AuthSettings(), store=store) as (url, _), \
                httpx.AsyncClient(base_url=url) as client:
            def bearer(token):
                return {"authorization": f"Bearer {token}"}

            assert (await client.get("/v2/models/mlp", headers=bearer(viewer))).status_code == 200
            assert_error(await client.post("/v2/models/mlp/infer", json=body, headers=bearer(viewer)), 403)
            assert_error(await client.post("/v2/models/mlp/infer", json=body, headers=bearer(scoped)), 403)
            assert_error(await client.get("/v2/models/mlp", headers=bearer(scoped)), 403)
            index = (await client.post("/v2/repository/index", headers=bearer(scoped))).json()
            assert {m["name"] for m in index} == {"slow"}
            # One request in flight per key: the scoped key's slow call blocks only that key.
            slow = asyncio.create_task(client.post("/v2/models/slow/infer", json=body, headers=bearer(scoped)))
            for _ in range(200):
                await asyncio.sleep(0.02)
                if slow.done():
                    assert (await slow).status_code in (200, 429)
                    slow = asyncio.create_task(client.post("/v2/models/slow/infer", json=body, headers=bearer(scoped)))
                    continue
                response = await client.post("/v2/models/slow/infer", json=body, headers=bearer(scoped))
                if response.status_code == 429:
                    break
            assert_error(response, 429, "api key")
            assert "retry-after" in response.headers
            assert (await client.post("/v2/models/mlp/infer", json=body, headers=bearer(other))).status_code == 200
            assert (await slow).status_code == 200
    finally:
        await store.stop()
        await etcd.close()


async def test_validation_errors_are_400_and_unexpected_errors_a_generic_500(node):
    from fastapi import APIRouter

    extra = APIRouter(prefix="/v1")

    @extra.get("/items/{item}")
    async def item(item: int, limit: int = 10) -> dict:
        if item == 13:
            raise RuntimeError("secret internals /etc/passwd")
        return {"item": item, "limit": limit}

    settings = GatewaySettings(gateway=GatewayServerSettings(auth=AuthSettings(enabled=False)))
    dataplane = NodeDataPlane(node.grpc.address)
    app = build_http_app(dataplane, Authenticator(None, settings.gateway.auth), settings, management_router=extra)
    server = await serve_http(app, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/v1/items/3?limit=2")).json() == {"item": 3, "limit": 2}
            assert_error(await client.get("/v1/items/abc"), 400, "item")
            assert_error(await client.get("/v1/items/3?limit=x"), 400, "limit")
            failed = await client.get("/v1/items/13")
            assert_error(failed, 500, "internal error")
            assert "passwd" not in failed.text
            assert "/v1/items/{item}" in (await client.get("/openapi.json")).json()["paths"]
    finally:
        await server.stop()
        await dataplane.close()
