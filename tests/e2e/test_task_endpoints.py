"""Hugging Face task models end to end: the SDK imports a model directory (exported to ONNX here,
pushed to the real registry, deployed by the real scheduler onto a real inference node process) and
callers use it as a new user would: task-shaped REST JSON at /v1/models/<name>/predict, images as
base64, multipart or a raw body, the OpenAI embeddings API, stock tritonclient over gRPC, and the
deployment's docs page with a working example. Every answer is checked against transformers (or
sentence-transformers) run in-process on the same model; every bad input gets a precise 4xx."""

from __future__ import annotations

import asyncio
import base64
import io
import tempfile
import uuid
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc.aio as triton_aio

from aimaas import AimaasError, AsyncModelService
from aimaas.huggingface import SOURCE_DIGEST_LABEL
from services.common.settings import EtcdSettings
from tests.e2e.test_cli import needs_etcd
from tests.support.gateway import ADMIN_TOKEN, Mesh, running_gateway, start_mesh
from tests.support.hf_models import CORPUS, png, pipeline
from tests.support.models import mlp_bytes

pytestmark = needs_etcd
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}
NAMES = {"sentiment": "text-classification", "entities": "token-classification", "pets": "image-classification",
         "minilm": "feature-extraction"}  # fmt: skip


@pytest.fixture(scope="module")
def mesh(etcd_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    etcd = EtcdSettings(
        endpoints=etcd_server.endpoint, namespace=f"/test-{uuid.uuid4().hex[:12]}/aimaas/v1", session_ttl_seconds=3
    )
    running = start_mesh(etcd, tmp_path_factory.mktemp("task-mesh"), nodes=("node-a",))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def deployed(mesh: Mesh, task_models) -> dict[str, object]:
    """The four task models imported with the SDK (provider="huggingface") and deployed, once."""

    async def run() -> dict[str, object]:
        async with running_gateway(mesh.gateway_settings(auth=True)) as gateway:
            async with AsyncModelService(gateway.grpc_address, ADMIN_TOKEN, http_url=gateway.http_url) as service:
                deployments = {}
                for name in NAMES:
                    deployment = await service.deploy(
                        str(task_models.sources[name]), provider="huggingface", min_instances=1, max_instances=2,
                        instance_type="cpu.small" if name == "sentiment" else None,
                    )
                    deployments[name] = deployment
                for deployment in deployments.values():
                    await deployment.wait_ready(timeout=120)
                return deployments

    return asyncio.run(run())


@pytest.fixture
async def gateway(mesh: Mesh, deployed):
    async with running_gateway(mesh.gateway_settings(auth=True)) as app:
        for name in NAMES:
            await _routed(app, name)
        yield app


async def _routed(app, name: str) -> None:
    for _ in range(200):
        route = app.routing.table.find(name)
        if route is not None and route.ready:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} is not routed")


@pytest.fixture
async def http(gateway):
    async with httpx.AsyncClient(base_url=gateway.http_url, headers=AUTH, timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"], response.json()


async def test_the_sdk_deploys_a_hugging_face_model_and_rest_answers_like_transformers(deployed, http, task_models):
    deployment = deployed["sentiment"]
    assert deployment.name == "sentiment" and deployment.task == "text-classification"
    assert deployment.status == "READY"
    # instance_type="cpu.small": a CPU replica reserving 1 GiB on its node.
    assert deployment.raw.spec.instance_type == "cpu.small" and deployment.raw.spec.memory_bytes == 1024**3
    assert deployment.raw.spec.accelerator == 1  # ACCELERATOR_CPU
    assert deployment.endpoint.endswith("/v1/models/sentiment/predict")
    assert deployment.docs_url.endswith("/docs/deployments/sentiment")
    text = "i love this movie it is wonderful"
    response = await http.post("/v1/models/sentiment/predict", json={"text": text})
    assert response.status_code == 200, response.text
    answer = response.json()
    [expected] = pipeline("text-classification", task_models.sources["sentiment"])([text])
    assert answer["label"] == expected["label"] and answer["score"] == pytest.approx(expected["score"], abs=1e-5)
    assert answer["model"] == "sentiment" and answer["model_version"] == "1" and answer["task"] == "text-classification"
    assert answer["truncated"] is False


async def test_many_texts_top_k_and_truncation(http, task_models):
    texts = ["an awful experience never again", " ".join(CORPUS * 3)]
    response = await http.post("/v1/models/sentiment/predict", json={"inputs": texts, "parameters": {"top_k": 5}})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    reference = pipeline("text-classification", task_models.sources["sentiment"], top_k=None)(
        texts, truncation=True, max_length=64
    )
    for prediction, expected in zip(predictions, reference):
        assert [p["label"] for p in prediction["labels"]] == [e["label"] for e in expected]  # top 5 of 2: both, sorted
        np.testing.assert_allclose([p["score"] for p in prediction["labels"]], [e["score"] for e in expected], atol=1e-5)
    assert [p["truncated"] for p in predictions] == [False, True]
    refused = await http.post("/v1/models/sentiment/predict", json={"text": texts[1], "parameters": {"truncation": False}})
    assert_error(refused, 400, "more than the model's maximum of 64")


async def test_entities_come_with_character_offsets(http, task_models):
    text = "bob went to london and berlin last week"
    response = await http.post("/v1/models/entities/predict", json={"text": text})
    assert response.status_code == 200, response.text
    expected = pipeline("token-classification", task_models.sources["entities"], aggregation_strategy="simple")(text)
    entities = response.json()["entities"]
    assert [(e["entity_group"], e["start"], e["end"]) for e in entities] == [
        (e["entity_group"], e["start"], e["end"]) for e in expected
    ]


async def test_images_as_base64_data_url_multipart_and_raw_body(http, task_models):
    from PIL import Image

    images = [png(40, 30, seed=5), png(32, 32, seed=6)]
    classify = pipeline("image-classification", task_models.sources["pets"], top_k=None)
    expected = [max(classify(Image.open(io.BytesIO(data))), key=lambda e: e["score"]) for data in images]
    encoded = [base64.b64encode(data).decode() for data in images]

    single = await http.post("/v1/models/pets/predict", json={"image": encoded[0], "parameters": {"top_k": 2}})
    assert single.status_code == 200, single.text
    assert single.json()["label"] == expected[0]["label"]
    assert single.json()["score"] == pytest.approx(expected[0]["score"], abs=1e-4)
    assert len(single.json()["labels"]) == 2 and "truncated" not in single.json()

    many = await http.post("/v1/models/pets/predict", json={"inputs": [f"data:image/png;base64,{encoded[0]}", encoded[1]]})
    assert [p["label"] for p in many.json()["predictions"]] == [e["label"] for e in expected]

    files = [("image", ("a.png", images[0], "image/png")), ("image", ("b.png", images[1], "image/png"))]
    form = await http.post("/v1/models/pets/predict", files=files, data={"parameters": '{"top_k": 1}'})
    assert form.status_code == 200, form.text
    assert [p["label"] for p in form.json()["predictions"]] == [e["label"] for e in expected]

    raw = await http.post("/v1/models/pets/predict", content=images[1], headers={"content-type": "image/png"})
    assert raw.status_code == 200, raw.text
    assert raw.json()["label"] == expected[1]["label"]


@pytest.mark.parametrize(
    ("name", "kwargs", "status", "fragment"),
    [
        ("sentiment", {"json": {"text": ""}}, 400, "text 0 is empty"),
        ("sentiment", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ("sentiment", {"json": {"txt": "hello"}}, 400, "unknown field 'txt'"),
        ("sentiment", {"json": {"image": "aGVsbG8="}}, 400, "is a text-classification model"),
        ("sentiment", {"json": {"text": "hi", "parameters": {"top_k": 0}}}, 400, "'top_k' must be a positive integer"),
        ("sentiment", {"json": {"inputs": []}}, 400, "'inputs' is empty"),
        ("pets", {"json": {"image": "not base64!"}}, 400, "not valid base64"),
        ("pets", {"json": {"image": base64.b64encode(b"GIF89a nope").decode()}}, 400, "not a readable image"),
        ("pets", {"json": {"text": "a cat"}}, 400, "is a image-classification model"),
        ("pets", {"content": b"\x89PNG broken", "headers": {"content-type": "image/png"}}, 400, "not a readable image"),
        ("nope", {"json": {"text": "hi"}}, 404, "nope"),
    ],
)
async def test_bad_predict_requests_get_precise_errors(http, name, kwargs, status, fragment):
    assert_error(await http.post(f"/v1/models/{name}/predict", **kwargs), status, fragment)


async def test_a_tensor_model_is_not_a_task_model(gateway, http):
    async with AsyncModelService(gateway.grpc_address, ADMIN_TOKEN) as service:
        with tempfile.NamedTemporaryFile(suffix=".onnx") as handle:
            handle.write(mlp_bytes())
            handle.flush()
            pushed = await service.push(handle.name, "plain-mlp")
        deployment = await service.deploy("plain-mlp", pushed.version)
        assert deployment.task is None and deployment.endpoint.endswith("/v2/models/plain-mlp")
        await deployment.wait_ready(timeout=60)
    await _routed(gateway, "plain-mlp")
    assert_error(await http.post("/v1/models/plain-mlp/predict", json={"text": "hi"}), 400, "not a task model")


async def test_openai_embeddings_and_model_list(http, task_models):
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "A man is riding a horse."]
    expected = SentenceTransformer(str(task_models.sources["minilm"]), device="cpu").encode(texts)
    response = await http.post("/v1/embeddings", json={"model": "minilm", "input": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["object"] == "embedding"
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], expected, atol=1e-5)
    assert body["usage"] == {"prompt_tokens": 17, "total_tokens": 17}
    # The OpenAI Python client asks for base64 by default.
    encoded = (await http.post("/v1/embeddings", json={"model": "minilm", "input": texts[0], "encoding_format": "base64"})).json()
    vector = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, expected[0], atol=1e-5)

    listed = (await http.get("/v1/models")).json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["minilm"] and listed["data"][0]["object"] == "model"
    assert {m["name"] for m in listed["models"]} >= set(NAMES)  # the registry listing stays as it was

    assert_error(await http.post("/v1/embeddings", json={"model": "sentiment", "input": "x"}), 400,
                 "needs a feature-extraction model")  # fmt: skip
    assert_error(await http.post("/v1/embeddings", json={"model": "minilm", "input": [[101, 102]]}), 400,
                 "token-id arrays are not supported")  # fmt: skip
    assert_error(await http.post("/v1/embeddings", json={"model": "minilm", "input": "x", "dimensions": 64}), 400,
                 "384 dimensions")  # fmt: skip
    assert_error(await http.post("/v1/embeddings", json={"input": "x"}), 400, "'model'")


async def test_task_predict_needs_a_key(gateway):
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=30) as anonymous:
        assert (await anonymous.post("/v1/models/sentiment/predict", json={"text": "hi"})).status_code == 401
        assert (await anonymous.post("/v1/embeddings", json={"model": "minilm", "input": "hi"})).status_code == 401


async def test_tritonclient_grpc_through_the_gateway_with_bytes_text(gateway, task_models):
    import tritonclient.grpc as triton

    client = triton_aio.InferenceServerClient(gateway.grpc_address)
    try:
        tensor = triton.InferInput("text", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([b"i love this movie", b"this film was terrible"], dtype=object))
        result = await client.infer("sentiment", [tensor], headers=AUTH)
    finally:
        await client.close()
    expected = pipeline("text-classification", task_models.sources["sentiment"])(
        ["i love this movie", "this film was terrible"]
    )
    assert [label.decode() for label in result.as_numpy("label")] == [e["label"] for e in expected]
    np.testing.assert_allclose(result.as_numpy("score"), [e["score"] for e in expected], atol=1e-5)


async def test_the_deployment_docs_page_shows_the_task_with_a_working_example(http):
    for name, content_type in (("sentiment", "application/json"), ("pets", "application/json")):
        spec = (await http.get(f"/docs/deployments/{name}/openapi.json")).json()
        operation = spec["paths"][f"/v1/models/{name}/predict"]["post"]
        assert NAMES[name] in spec["info"]["description"]
        example = operation["requestBody"]["content"][content_type]["example"]
        response = await http.post(f"/v1/models/{name}/predict", json=example)
        assert response.status_code == 200, (name, response.text)
        assert "label" in response.json()
    embeddings_page = (await http.get("/docs/deployments/minilm/openapi.json")).json()
    example = embeddings_page["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert (await http.post("/v1/embeddings", json=example)).status_code == 200
    # A tensor model's page has no predict operation.
    assert not any(p.endswith("/predict") for p in (await http.get("/docs/deployments/plain/openapi.json")).json()["paths"])


async def test_importing_the_same_source_again_reuses_its_version(gateway, task_models):
    async with AsyncModelService(gateway.grpc_address, ADMIN_TOKEN) as service:
        again = await service.push(task_models.sources["sentiment"], provider="huggingface")
        assert (again.model, again.version, again.deduplicated) == ("sentiment", 1, True)
        assert again.raw.labels[SOURCE_DIGEST_LABEL]
        assert again.raw.task.task == "text-classification" and list(again.raw.task.labels) == ["negative", "positive"]
        assert [s.name for s in again.raw.signature.inputs] == ["text"]
        with pytest.raises(AimaasError) as caught:
            await service.push(task_models.sources["sentiment"], provider="huggingface", task="summarization")
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT and "unknown task 'summarization'" in caught.value.message()


async def test_an_unknown_instance_type_is_refused_with_the_known_ones(gateway):
    async with AsyncModelService(gateway.grpc_address, ADMIN_TOKEN) as service:
        with pytest.raises(AimaasError) as caught:
            await service.deploy("sentiment", 1, instance_type="gpu.huge")
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown instance type 'gpu.huge'" in caught.value.message() and "cpu.small (CPU, 1 GiB" in caught.value.message()


def _without(path, key: str) -> bytes:
    model = onnx.load(str(path))
    kept = [entry for entry in model.metadata_props if entry.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    return model.SerializeToString()


def _with_manifest(path, **changes) -> bytes:
    import json

    model = onnx.load(str(path))
    for entry in model.metadata_props:
        if entry.key == "aimaas.task":
            entry.value = json.dumps({**json.loads(entry.value), **changes})
    return model.SerializeToString()


@pytest.mark.parametrize(
    ("broken", "fragment"),
    [
        (lambda m: _without(m.onnx["sentiment"], "aimaas.tokenizer"), "carries no tokenizer"),
        (lambda m: _with_manifest(m.onnx["sentiment"], labels=["a", "b", "c"]), "does not fit 3 labels"),
        (lambda m: _with_manifest(m.onnx["sentiment"], task="summarization"), "invalid task manifest"),
        (lambda m: _with_manifest(m.onnx["pets"], image=None), "needs image processing"),
    ],
)
async def test_a_broken_task_model_is_refused_and_nothing_is_registered(gateway, task_models, broken, fragment):
    from aimaas.registry.v1 import registry_pb2 as rpb
    from aimaas.registry.v1 import registry_pb2_grpc

    name = f"broken-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        metadata = tuple(AUTH.items())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry.UploadVersion(_requests(name, broken(task_models)), metadata=metadata, timeout=60)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in caught.value.details()
        # Nothing half-registered: the model the upload would have created does not exist either.
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await registry.GetModel(rpb.GetModelRequest(name=name), metadata=metadata, timeout=10)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND


def _requests(name: str, data: bytes):
    from tests.support.registry import upload_requests

    return upload_requests(name, data, create_model=True)
