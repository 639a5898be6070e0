"""Stock tritonclient.grpc (sync and asyncio), unchanged, against a standalone inference server."""

from __future__ import annotations

import asyncio
import queue

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

from tests.support.inference import inference_settings, running_inference, write_model
from tests.support.models import add_model, identity_model, mlp_model, two_output_model

MLP = mlp_model()


@pytest.fixture
def repository(tmp_path):
    root = tmp_path / "models"
    write_model(root, "mlp", MLP)
    write_model(root, "adder", add_model(TensorProto.INT64, ["batch", 2]))
    write_model(root, "half", add_model(TensorProto.FLOAT16, ["batch", 3]))
    write_model(root, "brain", identity_model(TensorProto.BFLOAT16, ["batch", 2]))
    write_model(root, "strings", identity_model(TensorProto.STRING, ["batch", 2]))
    write_model(root, "two", two_output_model())
    return root


@pytest.fixture
async def server(repository):
    async with running_inference(inference_settings(repository)) as app:
        yield app


@pytest.fixture
async def aio_client(server):
    client = triton_aio.InferenceServerClient(server.grpc.address)
    yield client
    await client.close()


@pytest.fixture
def client(server):
    client = triton.InferenceServerClient(server.grpc.address)
    yield client
    client.close()


def sync(function, *args, **kwargs):
    """The sync client blocks; the server shares this thread's event loop, so call it from a thread."""
    return asyncio.to_thread(function, *args, **kwargs)


def infer_input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def reference(model_bytes: bytes, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


async def test_server_health_and_metadata(client, aio_client):
    assert await sync(client.is_server_live) and await sync(client.is_server_ready)
    assert await aio_client.is_server_live() and await aio_client.is_server_ready()
    metadata = await sync(client.get_server_metadata)
    assert metadata.name == "aimaas" and metadata.version
    assert {"model_repository", "statistics", "binary_tensor_data", "model_configuration"} <= set(metadata.extensions)
    assert await sync(client.is_model_ready, "mlp") and await aio_client.is_model_ready("mlp", "1")
    assert not await sync(client.is_model_ready, "mlp", "2")
    assert not await aio_client.is_model_ready("nope")


async def test_model_metadata_and_config(client, aio_client):
    metadata = await sync(client.get_model_metadata, "mlp")
    assert metadata.name == "mlp" and list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("y", "FP32", [-1, 3])]

    config = (await aio_client.get_model_config("mlp")).config
    assert config.name == "mlp" and config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", triton.model_config_pb2.TYPE_FP32, [4])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [3])]
    assert config.HasField("dynamic_batching")
    as_json = await sync(client.get_model_config, "strings", as_json=True)
    assert as_json["config"]["input"][0]["data_type"] == "TYPE_STRING"


async def test_infer_fp32_matches_onnxruntime(client, aio_client):
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    (expected,) = reference(MLP.SerializeToString(), {"x": x})
    result = await sync(client.infer, "mlp", [infer_input("x", x, "FP32")], request_id="req-42")
    assert result.get_response().id == "req-42" and result.get_response().model_version == "1"
    np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-6, atol=1e-6)
    result = await aio_client.infer("mlp", [infer_input("x", x, "FP32")], model_version="1", request_id="aio")
    assert result.get_response().id == "aio"
    np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-6, atol=1e-6)


async def test_infer_int64_fp16_bf16_bytes(aio_client):
    a = np.array([[1, -2], [2**40, 7]], dtype=np.int64)
    b = np.array([[10, 20], [1, -7]], dtype=np.int64)
    result = await aio_client.infer("adder", [infer_input("a", a, "INT64"), infer_input("b", b, "INT64")])
    assert result.as_numpy("sum").dtype == np.int64
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)

    h = np.array([[0.5, 1.25, -3.0]], dtype=np.float16)
    result = await aio_client.infer("half", [infer_input("a", h, "FP16"), infer_input("b", h, "FP16")])
    assert result.get_output("sum").datatype == "FP16"
    np.testing.assert_array_equal(result.as_numpy("sum"), h + h)

    bf = np.array([[1.5, -0.25], [3.0, 8.0]], dtype=ml_dtypes.bfloat16)
    result = await aio_client.infer("brain", [infer_input("x", bf, "BF16")])
    assert result.get_output("y").datatype == "BF16"
    np.testing.assert_array_equal(result.as_numpy("y").view(np.uint16), bf.view(np.uint16))

    s = np.array([[b"hello", b""], ["w\xc3\xb6rld".encode("latin-1"), b"a\x00b"]], dtype=object)
    result = await aio_client.infer("strings", [infer_input("x", s, "BYTES")])
    assert result.get_output("y").datatype == "BYTES" and list(result.get_output("y").shape) == [2, 2]
    np.testing.assert_array_equal(result.as_numpy("y"), s)


async def test_requested_outputs(aio_client):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = await aio_client.infer("two", [infer_input("x", x, "FP32")], outputs=[triton.InferRequestedOutput("plus_one")])
    assert [o.name for o in result.get_response().outputs] == ["plus_one"]
    np.testing.assert_array_equal(result.as_numpy("plus_one"), x + 1)
    assert result.as_numpy("doubled") is None
    result = await aio_client.infer("two", [infer_input("x", x, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("doubled"), x * 2)
    np.testing.assert_array_equal(result.as_numpy("plus_one"), x + 1)


async def test_statistics_count_requests(client, aio_client):
    before = (await aio_client.get_inference_statistics("mlp", "1")).model_stats[0]
    for n in (1, 3):
        await aio_client.infer("mlp", [infer_input("x", np.ones((n, 4), np.float32), "FP32")])
    with pytest.raises(InferenceServerException):
        await aio_client.infer("mlp", [infer_input("x", np.ones((1, 5), np.float32), "FP32")])
    stats = (await sync(client.get_inference_statistics, "mlp")).model_stats[0]
    assert stats.name == "mlp" and stats.version == "1"
    assert stats.inference_count - before.inference_count == 4
    assert stats.execution_count - before.execution_count == 2
    assert stats.inference_stats.success.count - before.inference_stats.success.count == 2
    assert stats.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert stats.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert stats.last_inference > 0
    everything = await aio_client.get_inference_statistics()
    assert {s.name for s in everything.model_stats} == {"mlp", "adder", "half", "brain", "strings", "two"}
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as info:
        await aio_client.get_inference_statistics("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


async def test_repository_index_load_and_unload(repository, client, aio_client):
    index = await sync(client.get_model_repository_index)
    assert {(m.name, m.version, m.state) for m in index.models} >= {("mlp", "1", "READY"), ("two", "1", "READY")}

    # A model added to the directory at runtime is listed, then loaded on request (with a second version).
    write_model(repository, "late", MLP, version=1)
    write_model(repository, "late", MLP, version=2)
    index = await aio_client.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models if m.name == "late"} == {
        ("late", "1", "UNAVAILABLE"), ("late", "2", "UNAVAILABLE")
    }
    await sync(client.load_model, "late")
    assert await aio_client.is_model_ready("late", "1") and await aio_client.is_model_ready("late", "2")
    result = await aio_client.infer("late", [infer_input("x", np.ones((1, 4), np.float32), "FP32")])
    assert result.get_response().model_version == "2"  # the highest ready version

    await sync(client.unload_model, "late")
    assert not await aio_client.is_model_ready("late")
    with pytest.raises(InferenceServerException, match="unknown model 'late'"):
        await aio_client.infer("late", [infer_input("x", np.ones((1, 4), np.float32), "FP32")])
    await aio_client.load_model("late")
    assert await aio_client.is_model_ready("late")
    await aio_client.unload_model("late")

    with pytest.raises(InferenceServerException, match="not in the model repository") as info:
        await aio_client.load_model("ghost")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="is not loaded"):
        await aio_client.unload_model("ghost")
    index = await aio_client.get_model_repository_index()
    assert {(m.name, m.state) for m in index.models if m.name == "late"} == {("late", "UNAVAILABLE")}


async def test_stream_infer_with_error_in_band(client):
    responses: queue.Queue = queue.Queue()
    await sync(client.start_stream, callback=lambda result, error: responses.put((result, error)))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (expected,) = reference(MLP.SerializeToString(), {"x": x})
    await sync(client.async_stream_infer, "mlp", [infer_input("x", x, "FP32")], request_id="ok-1")
    await sync(client.async_stream_infer, "mlp", [infer_input("x", np.ones((1, 7), np.float32), "FP32")], request_id="bad")
    await sync(client.async_stream_infer, "nope", [infer_input("x", x, "FP32")], request_id="missing")
    await sync(client.async_stream_infer, "mlp", [infer_input("x", x, "FP32")], request_id="ok-2")
    got = [await sync(responses.get, timeout=10) for _ in range(4)]
    await sync(client.stop_stream)
    results = {r.get_response().id: r for r, e in got if e is None}
    errors = sorted(str(e) for r, e in got if e is not None)
    assert sorted(results) == ["ok-1", "ok-2"]
    for result in results.values():
        np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-6, atol=1e-6)
    assert len(errors) == 2
    assert "input 'x' has shape [1, 7]" in errors[0] and "unknown model 'nope'" in errors[1]


async def test_aio_stream_infer(aio_client):
    x = np.ones((1, 4), np.float32)

    async def requests():
        for i in range(5):
            yield {"model_name": "mlp", "inputs": [infer_input("x", x * i, "FP32")], "request_id": str(i)}
        yield {"model_name": "mlp", "inputs": [infer_input("x", x, "FP32")], "model_version": "9", "request_id": "v9"}

    seen, errors = set(), []
    async for result, error in aio_client.stream_infer(requests()):
        if error is not None:
            errors.append(str(error))
        else:
            seen.add(result.get_response().id)
        if len(seen) + len(errors) == 6:
            break
    assert seen == {"0", "1", "2", "3", "4"}
    assert len(errors) == 1 and "model 'mlp' has no version 9" in errors[0]
