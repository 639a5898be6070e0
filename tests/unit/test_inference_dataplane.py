"""DataPlane lifecycle and request validation, on a pure-Python fake backend (no runtime needed)."""

from __future__ import annotations

import asyncio
import pathlib

import numpy as np
import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest

from inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.settings import TelemetrySettings
from services.common.tracing import setup_telemetry
from services.inference.backends.base import TensorInfo
from services.inference.dataplane import DataPlane, ModelLoadFailed, ModelSpec, ModelState
from services.inference.settings import BatchingDefaults, InferenceServerSettings
from services.inference.tensors import add_raw_input
from tests.support.inference import fake_backend


def make_plane(classes: dict, *, registry: CollectorRegistry | None = None, **settings) -> DataPlane:
    """A data plane over `classes` (name → backend class, or why it is unavailable)."""
    # Executions on the model thread, so tests can hold a batch there (see test_inference_batcher for inline).
    fields = {"backends": ["fake"], "unload_drain_seconds": 5.0, "inline_execution_below_us": 0, **settings}
    return DataPlane(
        InferenceServerSettings(**fields),
        registry=registry or CollectorRegistry(),
        telemetry=setup_telemetry(TelemetrySettings(), "test"),
        logger=structlog.get_logger(),
        backends=classes,
    )


@pytest.fixture
def artifact(tmp_path) -> pathlib.Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not read by the fake backend")
    return path


def spec(artifact: pathlib.Path, name: str = "m", version: str = "1", **kwargs) -> ModelSpec:
    return ModelSpec(name=name, version=version, artifact=artifact, **kwargs)


def request(x: np.ndarray, model: str = "m", version: str = "", **fields) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, model_version=version, **fields)
    add_raw_input(message, "x", x)
    return message


def output(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = response.outputs[index]
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(tuple(tensor.shape))


def rows(n: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(n * 4, dtype=np.float32) + start).reshape(n, 4)


# ------------------------------------------------------------------------------------ lifecycle


async def test_load_infer_unload(artifact):
    backend = fake_backend()
    plane = make_plane({"fake": backend})
    info = await plane.load(spec(artifact))
    assert info.backend == "fake" and info.memory_bytes == 1234
    assert info.inputs == [TensorInfo("x", "FP32", (-1, 4))] and [t.name for t in info.outputs] == ["y"]
    assert plane.state("m", "1") == (ModelState.READY, "")
    assert plane.loaded() == [("m", "1")]
    assert plane.available_backends() == ["fake"]

    response = await plane.infer(request(rows(2), id="req-7"))
    assert response.id == "req-7" and response.model_name == "m" and response.model_version == "1"
    np.testing.assert_array_equal(output(response), rows(2) * 2)

    await plane.unload("m", "1")
    assert backend.instances[0].unloaded
    assert plane.state("m", "1") == (ModelState.UNAVAILABLE, "")
    with pytest.raises(NotFound, match="unknown model 'm'"):
        await plane.infer(request(rows(1)))
    await plane.unload("m", "1")  # unknown: a no-op
    await plane.close()


async def test_mark_loading_then_unavailable_until_ready(artifact):
    plane = make_plane({"fake": fake_backend()})
    plane.mark_loading("m", "1")
    assert plane.state("m", "1") == (ModelState.LOADING, "")
    assert [(e.name, e.version, e.state) for e in plane.index()] == [("m", "1", ModelState.LOADING)]
    with pytest.raises(Unavailable, match="model 'm' version 1 is still loading"):
        await plane.infer(request(rows(1)))
    with pytest.raises(Unavailable, match="still loading"):
        await plane.infer(request(rows(1), version="1"))
    await plane.load(spec(artifact))
    assert plane.state("m", "1")[0] is ModelState.READY
    # A placeholder that never loads is removed by unload (the node agent's failed download).
    plane.mark_loading("m", "2")
    await plane.unload("m", "2")
    assert plane.state("m", "2")[0] is ModelState.UNAVAILABLE
    await plane.close()


async def test_load_failure_is_failed_with_reason(artifact):
    plane = make_plane({"fake": fake_backend(fail_load="unsupported operator FancyOp")})
    with pytest.raises(ModelLoadFailed) as info:
        await plane.load(spec(artifact))
    assert "unsupported operator FancyOp" in info.value.reason
    assert plane.state("m", "1") == (ModelState.FAILED, info.value.reason)
    with pytest.raises(Unavailable, match="failed to load: unsupported operator FancyOp"):
        await plane.infer(request(rows(1)))
    await plane.close()


async def test_missing_artifact_and_warm_up_failure(tmp_path, artifact):
    plane = make_plane({"fake": fake_backend(), "bad": fake_backend(input_specs=(TensorInfo("x", "FP8", (-1,)),))})
    with pytest.raises(ModelLoadFailed, match="does not exist"):
        await plane.load(spec(tmp_path / "missing.onnx"))
    with pytest.raises(ModelLoadFailed, match="datatype FP8"):
        await plane.load(spec(artifact, name="bad", backend="bad"))

    class Failing(fake_backend()):
        def infer(self, inputs, output_names):
            raise RuntimeError("shape mismatch in node Reshape_3")

    plane2 = make_plane({"fake": Failing})
    with pytest.raises(ModelLoadFailed, match="warm-up inference .* failed: shape mismatch in node Reshape_3"):
        await plane2.load(spec(artifact))
    assert Failing.instances[0].unloaded
    await plane.close()
    await plane2.close()


async def test_backend_selection(artifact):
    plane = make_plane(
        {"fake": fake_backend(), "tensorrt": "TensorRT is not installed"}, backends=["tensorrt", "fake"]
    )
    assert plane.available_backends() == ["fake"]
    with pytest.raises(ModelLoadFailed, match="backend 'tensorrt' is not available on this node: TensorRT is not installed"):
        await plane.load(spec(artifact, backend="tensorrt"))
    with pytest.raises(ModelLoadFailed, match="unknown backend 'nope'"):
        await plane.load(spec(artifact, name="b", backend="nope"))
    with pytest.raises(ModelLoadFailed, match="no available backend loads format 'tensorrt_plan'.*tensorrt: TensorRT is not installed"):
        await plane.load(spec(artifact, name="c", format="tensorrt_plan"))
    with pytest.raises(ModelLoadFailed, match="unknown model format 'pt'"):
        await plane.load(spec(artifact, name="d", format="pt"))
    # No backend named: the first available one in preference order that takes the format.
    assert (await plane.load(spec(artifact, name="e"))).backend == "fake"
    await plane.close()


async def test_versions_side_by_side_and_resolution(artifact, tmp_path):
    plane = make_plane({"fake": fake_backend()})
    await plane.load(spec(artifact, version="1"))
    await plane.load(spec(artifact, version="10"))
    plane.mark_loading("m", "11")
    assert plane.loaded() == [("m", "1"), ("m", "10")]
    assert (await plane.infer(request(rows(1)))).model_version == "10"  # highest READY (numeric order)
    assert (await plane.infer(request(rows(1), version="1"))).model_version == "1"
    with pytest.raises(NotFound, match="model 'm' has no version 3 \\(versions: 1, 10, 11\\)"):
        await plane.infer(request(rows(1), version="3"))
    metadata = plane.metadata("m")
    assert list(metadata.versions) == ["1", "10"] and metadata.platform == "fake_platform"
    await plane.unload("m", "10")
    assert (await plane.infer(request(rows(1)))).model_version == "1"
    await plane.close()


async def test_reload_is_a_no_op_for_the_same_artifact_and_swaps_otherwise(artifact):
    backend = fake_backend()
    plane = make_plane({"fake": backend})
    await plane.load(spec(artifact))
    await plane.load(spec(artifact))
    assert len(backend.instances) == 1
    await plane.load(spec(artifact, batching=BatchingDefaults(max_batch_size=4)))
    assert len(backend.instances) == 2 and backend.instances[0].unloaded and not backend.instances[1].unloaded
    assert plane.config("m").max_batch_size == 4
    # A failed reload leaves the loaded instance serving.
    artifact.unlink()
    with pytest.raises(ModelLoadFailed):
        await plane.load(spec(artifact))
    assert plane.state("m", "1")[0] is ModelState.READY
    assert (await plane.infer(request(rows(1)))).model_version == "1"
    await plane.close()


async def test_unload_drains_in_flight_requests(artifact):
    backend = fake_backend()
    plane = make_plane({"fake": backend}, batching=BatchingDefaults(enabled=False))
    await plane.load(spec(artifact))
    instance = backend.instances[0]
    instance.release.clear()  # executions block until released
    in_flight = [asyncio.create_task(plane.infer(request(rows(1, start=i)))) for i in range(3)]
    await asyncio.sleep(0.05)
    unloading = asyncio.create_task(plane.unload("m", "1"))
    await asyncio.sleep(0.05)
    assert plane.state("m", "1")[0] is ModelState.UNLOADING
    with pytest.raises(Unavailable, match="model 'm' version 1 is unloading"):
        await plane.infer(request(rows(1)))
    assert not unloading.done() and not instance.unloaded
    instance.release.set()
    responses = await asyncio.gather(*in_flight)
    await unloading
    for i, response in enumerate(responses):
        np.testing.assert_array_equal(output(response), rows(1, start=i) * 2)
    assert instance.unloaded


async def test_unload_drain_is_bounded(artifact):
    backend = fake_backend()
    plane = make_plane({"fake": backend}, batching=BatchingDefaults(enabled=False))
    await plane.load(spec(artifact))
    instance = backend.instances[0]
    instance.release.clear()
    running = asyncio.create_task(plane.infer(request(rows(1))))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(plane.infer(request(rows(1))))
    await asyncio.sleep(0.01)
    unloading = asyncio.create_task(plane.unload("m", "1", drain_seconds=0.1))
    with pytest.raises(Unavailable, match="was unloaded before the request ran"):
        await queued
    instance.release.set()  # the executing batch cannot be interrupted; it completes
    await running
    await unloading
    assert instance.unloaded


# ------------------------------------------------------------------------------------ validation


@pytest.fixture
async def plane(artifact):
    backend = fake_backend(input_specs=(TensorInfo("x", "FP32", (-1, 4)), TensorInfo("x2", "INT64", (-1, 2))))
    plane = make_plane({"fake": backend})
    await plane.load(spec(artifact))
    yield plane
    await plane.close()


def two_inputs(x: np.ndarray, x2: np.ndarray, **fields) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", **fields)
    add_raw_input(message, "x", x)
    add_raw_input(message, "x2", x2)
    return message


@pytest.mark.parametrize(
    ("build", "fragments"),
    [
        (lambda: request(rows(1)), ["missing input 'x2'", "its inputs: x, x2"]),
        (lambda: two_inputs(rows(1), np.zeros((1, 2), np.int64)).__class__(), ["missing input 'x'"]),
        (
            lambda: (lambda m: (add_raw_input(m, "z", rows(1)), m)[1])(two_inputs(rows(1), np.zeros((1, 2), np.int64))),
            ["unknown input 'z'", "its inputs: x, x2"],
        ),
        (lambda: two_inputs(rows(1).astype(np.float64), np.zeros((1, 2), np.int64)), ["input 'x' has datatype FP64", "expects FP32"]),
        (lambda: two_inputs(np.zeros((1, 5), np.float32), np.zeros((1, 2), np.int64)), ["input 'x' has shape [1, 5]", "expects [-1, 4]"]),
        (lambda: two_inputs(np.zeros(4, np.float32), np.zeros((1, 2), np.int64)), ["input 'x' has shape [4]"]),
        (lambda: two_inputs(rows(2), np.zeros((3, 2), np.int64)), ["disagree on the batch size", "'x' has 2 rows", "'x2' has 3"]),
        (lambda: two_inputs(rows(0), np.zeros((0, 2), np.int64)), ["input 'x' has an empty batch"]),
        (
            lambda: two_inputs(rows(1), np.zeros((1, 2), np.int64), outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="nope")]),
            ["unknown requested output 'nope'", "its outputs: y, y2"],
        ),
        (
            lambda: two_inputs(rows(1), np.zeros((1, 2), np.int64), outputs=[{"name": "y"}, {"name": "y"}]),
            ["output 'y' is requested more than once"],
        ),
    ],
)
async def test_invalid_requests_name_the_tensor(plane, build, fragments):
    message = build()
    message.model_name = "m"
    with pytest.raises(InvalidArgument) as info:
        await plane.infer(message)
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    assert plane.statistics("m")[0].inference_stats.fail.count == 1


async def test_requested_outputs_are_selected_in_order(plane):
    message = two_inputs(rows(2), np.ones((2, 2), np.int64), outputs=[{"name": "y2"}])
    response = await plane.infer(message)
    assert [o.name for o in response.outputs] == ["y2"] and list(response.outputs[0].shape) == [2, 2]
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == [2, 2, 2, 2]
    response = await plane.infer(two_inputs(rows(1), np.ones((1, 2), np.int64)))
    assert [o.name for o in response.outputs] == ["y", "y2"]


async def test_unknown_model_and_version(plane):
    with pytest.raises(NotFound, match="unknown model 'other'"):
        await plane.infer(request(rows(1), model="other"))
    with pytest.raises(InvalidArgument, match="names no model"):
        await plane.infer(request(rows(1), model=""))
    with pytest.raises(NotFound, match="unknown model 'other'"):
        plane.metadata("other")
    with pytest.raises(NotFound, match="unknown model 'other'"):
        plane.statistics("other")
    with pytest.raises(NotFound, match="no version 9"):
        plane.statistics("m", "9")


async def test_statistics_and_prometheus(artifact):
    registry = CollectorRegistry()
    plane = make_plane({"fake": fake_backend()}, registry=registry)
    await plane.load(spec(artifact))
    for n in (1, 2, 3):
        await plane.infer(request(rows(n)))
    with pytest.raises(InvalidArgument):
        await plane.infer(request(np.zeros((1, 3), np.float32)))
    (stats,) = plane.statistics()
    assert (stats.name, stats.version) == ("m", "1")
    assert stats.inference_count == 6 and stats.execution_count == 3
    assert stats.inference_stats.success.count == 3 and stats.inference_stats.fail.count == 1
    assert stats.inference_stats.queue.count == 3 and stats.inference_stats.compute_infer.count == 3
    assert stats.inference_stats.compute_infer.ns > 0 and stats.last_inference > 0
    assert [b.batch_size for b in stats.batch_stats] == [1, 2, 3]
    assert all(b.compute_infer.count == 1 for b in stats.batch_stats)
    assert stats.memory_usage[0].byte_size == 1234

    text = generate_latest(registry).decode()
    for line in (
        'aimaas_inference_requests_total{model="m",outcome="success",version="1"} 3.0',
        'aimaas_inference_requests_total{model="m",outcome="invalid_argument",version="1"} 1.0',
        'aimaas_inference_inferences_total{model="m",version="1"} 6.0',
        'aimaas_inference_executions_total{model="m",version="1"} 3.0',
        'aimaas_inference_pending_requests{model="m",version="1"} 0.0',
        'aimaas_inference_loaded_models{backend="fake"} 1.0',
        'aimaas_inference_model_memory_bytes{backend="fake",model="m",version="1"} 1234.0',
        'aimaas_inference_queue_seconds_count{model="m",version="1"} 3.0',
        'aimaas_inference_request_seconds_count{model="m",version="1"} 3.0',
        'aimaas_inference_compute_seconds_count{model="m",phase="infer",version="1"} 3.0',
        'aimaas_inference_batch_rows_bucket{le="2.0",model="m",version="1"} 2.0',
    ):
        assert line in text, line
    await plane.unload("m", "1")
    assert 'model="m"' not in generate_latest(registry).decode()


async def test_close_unloads_everything(artifact):
    backend = fake_backend()
    plane = make_plane({"fake": backend})
    await plane.load(spec(artifact, name="a"))
    await plane.load(spec(artifact, name="b"))
    await plane.close()
    assert all(instance.unloaded for instance in backend.instances)
    assert plane.loaded() == []
    with pytest.raises(Unavailable, match="shutting down"):
        await plane.infer(request(rows(1), model="a"))
    with pytest.raises(ModelLoadFailed, match="shutting down"):
        await plane.load(spec(artifact, name="c"))
