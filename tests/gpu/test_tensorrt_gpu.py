"""Real CUDA + TensorRT: detection, engine build, execution vs ONNX Runtime, plan round trip, caching.

Run on a GPU machine with `scripts/gpu_checks.sh` (or `pytest -m gpu tests/gpu -rs`).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from services.common.objectstore import LocalObjectStore
from services.common.objectstore.keys import engine_key
from services.common.settings import ObjectStoreKind, ObjectStoreSettings
from services.inference.backends import cuda
from services.inference.backends import tensorrt as trt_backend
from services.inference.backends.base import BackendLoadError, LoadOptions, TensorInfo
from services.inference.backends.tensorrt import TensorRTBackend, build_engine, is_plan, load_plan
from tests.support.models import mlp_bytes, mlp_model
from tests.support.trt_models import fp16_mlp_bytes, qdq_mlp_bytes

pytestmark = pytest.mark.gpu

FP32_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
FP16_TOLERANCE = {"rtol": 2e-2, "atol": 2e-2}


def _ort(model: bytes, x: np.ndarray) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _x(batch: int, width: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, width)).astype(np.float32)


@pytest.fixture
def backend():
    instance = TensorRTBackend()
    yield instance
    instance.unload()


@pytest.mark.cuda_only
def test_cuda_detection_reports_devices():
    gpus = cuda.detect_gpus()
    assert gpus and cuda.gpu_unavailable_reason() is None
    for gpu in gpus:
        assert re.fullmatch(r"sm_\d{2,3}", gpu.arch), gpu
        assert gpu.arch == cuda.arch_string(*gpu.compute_capability)
        assert gpu.name and gpu.total_memory_bytes > 1 << 30
    free, total = cuda.memory_info(gpus[0].index)
    assert 0 < free <= total


@pytest.mark.cuda_only
def test_device_buffer_round_trip():
    cuda.set_device(0)
    stream = cuda.Stream()
    data = np.random.default_rng(0).standard_normal((257, 33)).astype(np.float32)
    buffer = cuda.DeviceBuffer(data.nbytes)
    try:
        buffer.copy_from_host(data, stream)
        out = np.empty_like(data)
        buffer.copy_to_host(out, stream)
        stream.synchronize()
        np.testing.assert_array_equal(out, data)
    finally:
        buffer.free()
        stream.destroy()
    with pytest.raises(cuda.CudaError, match="could not allocate"):
        cuda.DeviceBuffer(1 << 50)


def test_fp32_engine_matches_onnxruntime(backend, tmp_path):
    model = mlp_bytes()
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(model)
    backend.load(artifact, LoadOptions(precision="FP32", max_batch_size=16))
    assert backend.inputs == [TensorInfo("x", "FP32", (-1, 4))]
    assert backend.outputs == [TensorInfo("y", "FP32", (-1, 3))]
    assert backend.batch_dimension and backend.max_batch_size == 16
    for batch in (1, 2, 7, 16):
        x = _x(batch, seed=batch)
        out = backend.infer({"x": x}, ["y"])["y"]
        assert out.shape == (batch, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out, _ort(model, x), **FP32_TOLERANCE)


def test_wider_mlp_and_chunked_batches(backend):
    model = mlp_model(inputs=64, hidden=256, outputs=10, seed=3).SerializeToString()
    backend.load_plan(build_engine(model, LoadOptions(max_batch_size=8)))
    x = _x(29, width=64, seed=5)  # larger than the profile: runs as 8+8+8+5
    np.testing.assert_allclose(backend.infer({"x": x}, ["y"])["y"], _ort(model, x), **FP32_TOLERANCE)


def test_fp16_precision_close_to_fp32_reference(backend):
    model = mlp_bytes()
    backend.load_plan(build_engine(model, LoadOptions(precision="FP16", max_batch_size=8)))
    x = _x(8, seed=11)
    np.testing.assert_allclose(backend.infer({"x": x}, ["y"])["y"], _ort(model, x), **FP16_TOLERANCE)


def test_fp16_typed_model(backend):
    backend.load_plan(build_engine(fp16_mlp_bytes(), LoadOptions(precision="FP16", max_batch_size=8)))
    assert backend.inputs == [TensorInfo("x", "FP16", (-1, 4))]
    x = _x(5, seed=12)
    out = backend.infer({"x": x.astype(np.float16)}, ["y"])["y"]
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), _ort(mlp_bytes(), x), **FP16_TOLERANCE)


def test_int8_needs_explicit_quantization(backend):
    with pytest.raises(BackendLoadError, match="INT8 needs calibration"):
        build_engine(mlp_bytes(), LoadOptions(precision="INT8"))
    model = qdq_mlp_bytes()
    backend.load_plan(build_engine(model, LoadOptions(precision="INT8", max_batch_size=8)))
    x = _x(8, seed=13)
    np.testing.assert_allclose(backend.infer({"x": x}, ["y"])["y"], _ort(model, x), rtol=5e-2, atol=5e-2)


def test_dynamic_non_batch_dimension_is_rejected():
    model = mlp_model()
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "features"
    with pytest.raises(BackendLoadError, match="static non-batch dimensions"):
        build_engine(model.SerializeToString(), LoadOptions())


def test_plan_round_trip_gives_the_same_outputs(backend, tmp_path):
    plan = build_engine(mlp_bytes(), LoadOptions(max_batch_size=8))
    assert is_plan(plan)
    backend.load_plan(plan)
    x = _x(6, seed=21)
    expected = backend.infer({"x": x}, ["y"])["y"]
    again = load_plan(plan)
    try:
        np.testing.assert_allclose(again.infer({"x": x}, ["y"])["y"], expected, rtol=1e-6, atol=1e-7)
    finally:
        again.unload()
    path = tmp_path / "model.plan"
    path.write_bytes(plan)
    from_file = TensorRTBackend()
    try:
        from_file.load(path, LoadOptions(extra={"format": "tensorrt_plan"}))
        np.testing.assert_allclose(from_file.infer({"x": x}, ["y"])["y"], expected, rtol=1e-6, atol=1e-7)
    finally:
        from_file.unload()


def test_corrupt_plan_is_a_load_error():
    with pytest.raises(BackendLoadError, match="could not deserialize"):
        load_plan(b"ftrt" + bytes(256))


def test_engine_cache_key_for_this_node():
    digest = hashlib.sha256(mlp_bytes()).hexdigest()
    gpu = cuda.detect_gpus()[0]
    version = trt_backend.tensorrt_version()
    key = trt_backend.local_engine_cache_key(digest, "fp16")
    assert key == engine_key(digest, gpu.arch, version, "FP16")
    assert re.fullmatch(rf"engines/{digest}/sm_\d+/[0-9][0-9A-Za-z.+-]*-FP16\.plan", key)


def test_memory_bytes_and_idempotent_unload(backend):
    plan = build_engine(mlp_bytes(), LoadOptions(max_batch_size=8))
    backend.load_plan(plan)
    loaded = backend.memory_bytes()
    assert loaded >= len(plan) > 0
    backend.infer({"x": _x(8)}, ["y"])
    assert backend.memory_bytes() > loaded  # I/O buffers now allocated
    backend.unload()
    backend.unload()
    assert backend.memory_bytes() == 0


async def test_engine_cache_in_object_store(tmp_path):
    store = LocalObjectStore(ObjectStoreSettings(kind=ObjectStoreKind.LOCAL, path=tmp_path / "objects"))
    await store.ensure_ready()
    model = mlp_bytes()
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(model)
    digest = hashlib.sha256(model).hexdigest()
    options = LoadOptions(precision="FP32", max_batch_size=8)
    first, second = TensorRTBackend(), TensorRTBackend()
    try:
        assert await trt_backend.load_with_engine_cache(first, store, digest, artifact, options) == "built"
        assert await store.exists(trt_backend.local_engine_cache_key(digest, "FP32"))
        assert await trt_backend.load_with_engine_cache(second, store, digest, artifact, options) == "cache"
        x = _x(4, seed=31)
        np.testing.assert_allclose(
            second.infer({"x": x}, ["y"])["y"], first.infer({"x": x}, ["y"])["y"], rtol=1e-6, atol=1e-7
        )
    finally:
        first.unload()
        second.unload()
        await store.close()


async def test_data_planes_share_one_engine_through_the_store(tmp_path, monkeypatch):
    """Mesh mode's path: a data plane with the object store builds and uploads the engine on the
    model's own thread; a second data plane ("another node") loads it without building."""
    import structlog
    from prometheus_client import CollectorRegistry

    from inference import grpc_predict_v2_pb2 as pb
    from services.common.settings import TelemetrySettings
    from services.common.tracing import setup_telemetry
    from services.inference.dataplane import DataPlane, ModelSpec
    from services.inference.settings import InferenceServerSettings
    from services.inference.tensors import add_raw_input

    store = LocalObjectStore(ObjectStoreSettings(kind=ObjectStoreKind.LOCAL, path=tmp_path / "objects"))
    await store.ensure_ready()
    model = mlp_bytes()
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(model)
    digest = hashlib.sha256(model).hexdigest()
    key = trt_backend.local_engine_cache_key(digest, "FP32")
    builds = []
    real_build = trt_backend.build_engine
    monkeypatch.setattr(trt_backend, "build_engine", lambda *args: builds.append(1) or real_build(*args))
    planes = [
        DataPlane(
            InferenceServerSettings(backends=["tensorrt"]),
            registry=CollectorRegistry(),
            telemetry=setup_telemetry(TelemetrySettings(), "gpu-test"),
            logger=structlog.get_logger(),
            backends={"tensorrt": TensorRTBackend},
            engine_store=store,
        )
        for _ in range(2)
    ]
    x = _x(3, seed=5)
    try:
        for plane in planes:
            info = await plane.load(ModelSpec("m", "1", artifact, sha256=digest))
            assert info.backend == "tensorrt" and info.memory_bytes > 0
            assert await store.exists(key) and len(builds) == 1  # built by the first, fetched by the second
            request = pb.ModelInferRequest(model_name="m")
            add_raw_input(request, "x", x)
            response = await plane.infer(request)
            y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, 3)
            np.testing.assert_allclose(y, _ort(model, x), **FP32_TOLERANCE)
    finally:
        for plane in planes:
            await plane.close()
        await store.close()
