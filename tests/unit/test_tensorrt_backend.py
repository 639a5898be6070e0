"""TensorRT backend checks that run everywhere (no GPU, no TensorRT).

Three layers: the real environment (probe/detection give reasons, imports never raise); the pure
helpers (cache keys, magic bytes, dtype tables, profiles, precision decisions); and the backend's
orchestration against CPU fakes of `tensorrt` and the cuda-bindings runtime (tests/unit/
tensorrt_fakes.py). The real TensorRT path runs in tests/gpu on a GPU machine.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from onnx import helper

from services.common.objectstore import keys
from services.common.settings import ObjectStoreKind, ObjectStoreSettings
from services.inference.backends import cuda
from services.inference.backends import tensorrt as trt_backend
from services.inference.backends.base import BackendLoadError, BackendUnavailable, LoadOptions, TensorInfo
from services.inference.backends.tensorrt import (
    PROTOCOL_TO_NUMPY,
    TRT_ITEMSIZE,
    TRT_TO_PROTOCOL,
    TensorRTBackend,
    artifact_format,
    batch_capacity,
    engine_cache_key,
    has_explicit_quantization,
    is_plan,
    optimization_profile_shapes,
    precision_plan,
    profile_batch_sizes,
)
from tests.support.models import mlp_bytes, mlp_model
from tests.support.trt_models import fp16_mlp_bytes, qdq_mlp_bytes
from tests.unit import tensorrt_fakes

DIGEST = "ab" * 32
ROOT = pathlib.Path(__file__).resolve().parents[2]
# Every datatype the Open Inference Protocol defines (base.TensorInfo's comment lists them).
PROTOCOL_DATATYPES = {
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
}


# --- the real environment --------------------------------------------------------------------------


@pytest.fixture
def fresh_probe():
    trt_backend.reset_probe_cache()
    yield
    trt_backend.reset_probe_cache()


def test_modules_import_without_tensorrt_or_cuda():
    # A fresh interpreter: importing the backend must neither fail nor import tensorrt/cuda eagerly.
    code = (
        "import sys; import services.inference.backends.tensorrt as t; "
        "assert 'tensorrt' not in sys.modules and 'cuda' not in sys.modules, sorted(sys.modules); "
        "print(t.TensorRTBackend.name, t.TensorRTBackend.platform)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["tensorrt", "tensorrt_plan"]
    assert TensorRTBackend.formats == {"onnx", "tensorrt_plan"}
    assert TensorRTBackend().max_rows() is None  # larger batches are split into profile-sized runs


def test_probe_gives_a_reason_on_this_machine(fresh_probe):
    reason = TensorRTBackend.probe()
    if reason is None:
        pytest.skip("TensorRT and a CUDA GPU are present here")
    assert isinstance(reason, str) and reason
    assert "tensorrt" in reason or "CUDA GPU" in reason


def test_detect_gpus_is_empty_with_a_reason_without_a_gpu(fresh_probe):
    gpus = cuda.detect_gpus(refresh=True)
    if gpus:
        pytest.skip("a CUDA GPU is present here")
    reason = cuda.gpu_unavailable_reason()
    assert isinstance(reason, str) and reason


def test_load_without_tensorrt_raises_unavailable_with_the_reason(fresh_probe, tmp_path):
    reason = TensorRTBackend.probe()
    if reason is None:
        pytest.skip("TensorRT and a CUDA GPU are present here")
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(mlp_bytes())
    with pytest.raises(BackendUnavailable) as info:
        TensorRTBackend().load(artifact, LoadOptions())
    assert str(info.value) == reason


def test_probe_reason_when_tensorrt_is_missing(monkeypatch, fresh_probe):
    def missing():
        raise ModuleNotFoundError("No module named 'tensorrt'", name="tensorrt")

    monkeypatch.setattr(trt_backend, "_import_tensorrt", missing)
    monkeypatch.setattr(cuda, "_import_runtime", lambda: tensorrt_fakes.FakeCudaRuntime())
    assert TensorRTBackend.probe() == "tensorrt is not installed (pip install aimaas[gpu] and NVIDIA's TensorRT)"


def test_probe_reason_when_tensorrt_is_broken_or_lean(monkeypatch, fresh_probe):
    monkeypatch.setattr(cuda, "_import_runtime", lambda: tensorrt_fakes.FakeCudaRuntime())

    def broken():
        raise OSError("libnvinfer.so.10: cannot open shared object file")

    monkeypatch.setattr(trt_backend, "_import_tensorrt", broken)
    assert TensorRTBackend.probe() == "tensorrt failed to import: OSError: libnvinfer.so.10: cannot open shared object file"

    trt_backend.reset_probe_cache()
    lean = tensorrt_fakes.make_tensorrt()
    del lean.Builder, lean.OnnxParser
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: lean)
    assert "lacks Builder, OnnxParser" in TensorRTBackend.probe()

    trt_backend.reset_probe_cache()
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: tensorrt_fakes.make_tensorrt("8.5.3.1"))
    assert TensorRTBackend.probe() == "tensorrt 8.5.3.1 is too old: need >= 8.6"


def test_probe_reason_when_tensorrt_is_present_but_no_gpu(monkeypatch, fresh_probe):
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: tensorrt_fakes.make_tensorrt())
    fake = tensorrt_fakes.FakeCudaRuntime(count_error=tensorrt_fakes.cudaError_t.cudaErrorNoDevice)
    monkeypatch.setattr(cuda, "_import_runtime", lambda: fake)
    assert TensorRTBackend.probe() == "no CUDA GPU: no CUDA-capable device is detected"


def test_probe_reason_when_cuda_bindings_are_missing(monkeypatch, fresh_probe):
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: tensorrt_fakes.make_tensorrt())

    def missing():
        raise ModuleNotFoundError("No module named 'cuda'", name="cuda")

    monkeypatch.setattr(cuda, "_import_runtime", missing)
    assert TensorRTBackend.probe() == "no CUDA GPU: cuda-bindings is not installed (pip install aimaas[gpu])"
    assert cuda.detect_gpus() == []


def test_driver_reasons(monkeypatch, fresh_probe):
    insufficient = tensorrt_fakes.cudaError_t.cudaErrorInsufficientDriver
    fake = tensorrt_fakes.FakeCudaRuntime(count_error=insufficient, driver_version=0)
    monkeypatch.setattr(cuda, "_import_runtime", lambda: fake)
    assert cuda.detect_gpus(refresh=True) == []
    assert cuda.gpu_unavailable_reason().startswith("no NVIDIA driver is installed")

    fake.driver_version, fake.runtime_version = 12040, 13050
    cuda.detect_gpus(refresh=True)
    reason = cuda.gpu_unavailable_reason()
    assert "supports CUDA 12.4" in reason and "CUDA 13.5" in reason and "cudaErrorInsufficientDriver" in reason


# --- pure helpers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capability", "arch"), [((9, 0), "sm_90"), ((8, 6), "sm_86"), ((7, 5), "sm_75"), ((10, 0), "sm_100"), ((12, 0), "sm_120")]
)
def test_arch_string(capability, arch):
    assert cuda.arch_string(*capability) == arch
    assert re.fullmatch(r"sm_\d{2,3}", arch)


def test_fast_fp16_table():
    assert cuda.has_fast_fp16(9, 0) and cuda.has_fast_fp16(7, 0) and cuda.has_fast_fp16(6, 0) and cuda.has_fast_fp16(5, 3)
    assert not cuda.has_fast_fp16(6, 1) and not cuda.has_fast_fp16(5, 2)


def test_cuda_version_string():
    assert cuda.cuda_version_string(12040) == "12.4"
    assert cuda.cuda_version_string(13050) == "13.5"


def test_engine_cache_key_uses_the_object_store_key_layout():
    key = engine_cache_key(DIGEST, "sm_90", "10.3.0.26", "fp16")
    assert key == f"engines/{DIGEST}/sm_90/10.3.0.26-FP16.plan"
    assert key == keys.engine_key(DIGEST, "sm_90", "10.3.0.26", "FP16")
    for bad in [("not-a-digest", "sm_90", "10.3", "FP32"), (DIGEST, "sm/90", "10.3", "FP32"), (DIGEST, "sm_90", "", "FP32")]:
        with pytest.raises(ValueError):
            engine_cache_key(*bad)
    with pytest.raises(BackendLoadError, match="unknown precision"):
        engine_cache_key(DIGEST, "sm_90", "10.3", "FP8")


def test_engine_cache_key_delegates_to_keys_module(monkeypatch):
    calls = []
    monkeypatch.setattr(keys, "engine_key", lambda *a: calls.append(a) or "engines/x")
    assert engine_cache_key(DIGEST, "sm_80", "10.0.1", "INT8") == "engines/x"
    assert calls == [(DIGEST, "sm_80", "10.0.1", "INT8")]


def test_plan_magic_detection():
    assert is_plan(b"ftrt\x00\x00rest") and is_plan(b"ptrt....")
    assert not is_plan(mlp_bytes()) and not is_plan(b"") and not is_plan(b"ftr")
    from services.registry.inspect import TENSORRT_MAGIC_TAGS

    assert set(trt_backend.TENSORRT_MAGIC_TAGS) == set(TENSORRT_MAGIC_TAGS)


def test_artifact_format():
    assert artifact_format(b"ftrt....", LoadOptions()) == "tensorrt_plan"
    assert artifact_format(mlp_bytes(), LoadOptions()) == "onnx"
    assert artifact_format(b"xxxx", LoadOptions(extra={"format": "tensorrt_plan"})) == "tensorrt_plan"
    assert artifact_format(b"ftrt", LoadOptions(extra={"format": "onnx"})) == "onnx"
    with pytest.raises(BackendLoadError, match="unsupported artifact format"):
        artifact_format(b"", LoadOptions(extra={"format": "savedmodel"}))


def test_dtype_tables_are_consistent_with_the_protocol():
    assert set(TRT_TO_PROTOCOL.values()) <= PROTOCOL_DATATYPES
    assert set(TRT_TO_PROTOCOL) == set(TRT_ITEMSIZE)
    assert set(PROTOCOL_TO_NUMPY) == set(TRT_TO_PROTOCOL.values())
    for trt_name, protocol in TRT_TO_PROTOCOL.items():
        assert PROTOCOL_TO_NUMPY[protocol].itemsize == TRT_ITEMSIZE[trt_name], trt_name
    assert TRT_TO_PROTOCOL["FLOAT"] == "FP32" and TRT_TO_PROTOCOL["HALF"] == "FP16"
    # The same datatype names the registry derives from ONNX element types, with matching numpy types.
    from services.registry.inspect import ONNX_TO_PROTOCOL_DATATYPE

    onnx_names = set(ONNX_TO_PROTOCOL_DATATYPE.values())
    assert set(TRT_TO_PROTOCOL.values()) <= onnx_names
    for elem_type, protocol in ONNX_TO_PROTOCOL_DATATYPE.items():
        if protocol in PROTOCOL_TO_NUMPY and protocol != "BF16":
            assert PROTOCOL_TO_NUMPY[protocol] == helper.tensor_dtype_to_np_dtype(elem_type), protocol
    # TensorInfo is what the data plane reads.
    assert TensorInfo("x", TRT_TO_PROTOCOL["FLOAT"], (-1, 4)).datatype == "FP32"


def test_profile_shapes():
    assert profile_batch_sizes(32) == (1, 16, 32)
    assert profile_batch_sizes(1) == (1, 1, 1)
    assert profile_batch_sizes(3) == (1, 1, 3)
    with pytest.raises(BackendLoadError):
        profile_batch_sizes(0)
    assert optimization_profile_shapes([("x", (-1, 4)), ("s", (2, 3))], 8) == {"x": ((1, 4), (4, 4), (8, 4))}
    assert optimization_profile_shapes([("x", (1, 4))], 8) == {}
    for shape in [(-1, -1), (4, -1), (-1, 3, -1)]:
        with pytest.raises(BackendLoadError, match="static non-batch dimensions"):
            optimization_profile_shapes([("x", shape)], 8)


def test_explicit_quantization_detection():
    assert has_explicit_quantization(["CONVOLUTION", "QUANTIZE", "DEQUANTIZE"])
    assert has_explicit_quantization(["QuantizeLinear"])
    assert not has_explicit_quantization(["MATRIX_MULTIPLY", "ELEMENTWISE", "ACTIVATION"])


def test_precision_plans():
    plan = precision_plan("FP32", weak_typing=True, fast_fp16=True, explicit_quantization=False)
    assert plan.set_flags == () and plan.clear_flags == ("TF32",)
    assert precision_plan("fp16", weak_typing=True, fast_fp16=True, explicit_quantization=False).set_flags == ("FP16",)
    slow = precision_plan("FP16", weak_typing=True, fast_fp16=False, explicit_quantization=False)
    assert slow.set_flags == () and "no fast FP16" in slow.note
    strong = precision_plan("FP16", weak_typing=False, fast_fp16=True, explicit_quantization=False)
    assert strong.set_flags == () and "strongly typed" in strong.note
    with pytest.raises(BackendLoadError, match="INT8 needs calibration"):
        precision_plan("INT8", weak_typing=True, fast_fp16=True, explicit_quantization=False)
    with pytest.raises(BackendLoadError, match="INT8 needs calibration"):
        precision_plan("INT8", weak_typing=False, fast_fp16=True, explicit_quantization=False)
    assert precision_plan("INT8", weak_typing=True, fast_fp16=True, explicit_quantization=True).set_flags == ("INT8", "FP16")
    assert precision_plan("INT8", weak_typing=True, fast_fp16=False, explicit_quantization=True).set_flags == ("INT8",)
    assert precision_plan("INT8", weak_typing=False, fast_fp16=True, explicit_quantization=True).set_flags == ()
    with pytest.raises(BackendLoadError, match="unknown precision"):
        precision_plan("FP64", weak_typing=True, fast_fp16=True, explicit_quantization=False)


def test_batch_capacity():
    assert [batch_capacity(b, 32) for b in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert batch_capacity(20, 24) == 24
    assert batch_capacity(30, 24) == 30  # never below the batch itself


# --- orchestration against CPU fakes ---------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch, fresh_probe):
    """TensorRT 10-like fake + one fake sm_90 device; yields (fake tensorrt, fake cudart)."""
    fake_trt = tensorrt_fakes.make_tensorrt()
    fake_rt = tensorrt_fakes.FakeCudaRuntime()
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(trt_backend, "_logger_instance", None)
    monkeypatch.setattr(cuda, "_import_runtime", lambda: fake_rt)
    yield fake_trt, fake_rt
    assert not fake_rt.allocations and not fake_rt.streams, "device memory or streams leaked"


def _reference(x: np.ndarray, model: bytes | None = None) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model or mlp_bytes(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _inputs(batch: int, width: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, width)).astype(np.float32)


def test_fake_detection(fake_gpu):
    assert TensorRTBackend.probe() is None
    gpus = cuda.detect_gpus()
    assert gpus == [cuda.GpuInfo(0, "Fake H100 80GB HBM3", "sm_90", 80 << 30, (9, 0))]
    assert cuda.gpu_unavailable_reason() is None
    assert cuda.memory_info(0) == (80 << 30, 80 << 30)


def test_device_buffer_roundtrip_and_errors(fake_gpu):
    _, fake_rt = fake_gpu
    stream = cuda.Stream()
    buffer = cuda.DeviceBuffer(64)
    data = np.arange(16, dtype=np.float32)
    buffer.copy_from_host(data, stream)
    out = np.empty_like(data)
    buffer.copy_to_host(out, stream)
    stream.synchronize()
    np.testing.assert_array_equal(out, data)
    with pytest.raises(ValueError, match="do not fit"):
        buffer.copy_from_host(np.zeros(17, np.float32), stream)
    buffer.free()
    buffer.free()  # idempotent
    stream.destroy()
    stream.destroy()
    with pytest.raises(cuda.CudaError, match="cudaErrorMemoryAllocation"):
        cuda.DeviceBuffer(fake_rt.max_alloc + 1)
    with pytest.raises(cuda.CudaError, match=r"cudaSetDevice\(3\) failed: cudaErrorInvalidValue"):
        cuda.set_device(3)


def test_build_load_and_infer_matches_onnxruntime(fake_gpu, tmp_path):
    fake_trt, _ = fake_gpu
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(mlp_bytes())
    backend = TensorRTBackend()
    backend.load(artifact, LoadOptions(max_batch_size=8))
    build = fake_trt.state.builds[-1]
    assert build["profile"] == {"x": [[1, 4], [4, 4], [8, 4]]}
    assert "TF32" not in build["flags"] and "FP16" not in build["flags"]
    assert build["pools"] == {"WORKSPACE": trt_backend.DEFAULT_WORKSPACE_BYTES}
    assert build["net_flags"] == 0
    assert backend.inputs == [TensorInfo("x", "FP32", (-1, 4))]
    assert backend.outputs == [TensorInfo("y", "FP32", (-1, 3))]
    assert backend.batch_dimension and backend.max_batch_size == 8
    for batch in (1, 3, 8):
        x = _inputs(batch, seed=batch)
        out = backend.infer({"x": x}, ["y"])
        assert out["y"].shape == (batch, 3) and out["y"].dtype == np.float32
        np.testing.assert_allclose(out["y"], _reference(x), rtol=1e-6)
    backend.unload()


def test_larger_batches_run_in_profile_sized_chunks(fake_gpu):
    fake_trt, _ = fake_gpu
    backend = trt_backend.load_plan(trt_backend.build_engine(mlp_bytes(), LoadOptions(max_batch_size=4)))
    x = _inputs(10)
    fake_trt.state.executions.clear()
    np.testing.assert_allclose(backend.infer({"x": x}, ["y"])["y"], _reference(x), rtol=1e-6)
    assert [e["x"][0] for e in fake_trt.state.executions] == [4, 4, 2]
    backend.unload()


def test_buffers_grow_only_for_larger_batches(fake_gpu):
    backend = trt_backend.load_plan(trt_backend.build_engine(mlp_bytes(), LoadOptions(max_batch_size=32)))
    assert backend.memory_bytes() > 0
    backend.infer({"x": _inputs(1)}, ["y"])
    first = dict(backend._buffers)
    backend.infer({"x": _inputs(1)}, ["y"])
    assert backend._buffers == first
    backend.infer({"x": _inputs(3)}, ["y"])
    grown = dict(backend._buffers)
    assert grown["x"] is not first["x"] and grown["x"].nbytes == 4 * 4 * 4  # 3 rows → capacity 4
    before = backend.memory_bytes()
    backend.infer({"x": _inputs(2)}, ["y"])
    backend.infer({"x": _inputs(4)}, ["y"])
    assert backend._buffers == grown and backend.memory_bytes() == before
    backend.unload()


def test_memory_and_idempotent_unload(fake_gpu):
    _, fake_rt = fake_gpu
    plan = trt_backend.build_engine(mlp_bytes(), LoadOptions())
    backend = trt_backend.load_plan(plan)
    backend.infer({"x": _inputs(2)}, [])
    assert backend.memory_bytes() >= len(plan) + 4096 + 2 * 4 * 4 + 2 * 3 * 4
    backend.unload()
    backend.unload()
    assert backend.memory_bytes() == 0 and backend.inputs == [] and not fake_rt.allocations
    with pytest.raises(RuntimeError, match="no TensorRT engine is loaded"):
        backend.infer({"x": _inputs(1)}, ["y"])


def test_use_gpu_false_is_unavailable(fake_gpu, tmp_path):
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(mlp_bytes())
    with pytest.raises(BackendUnavailable, match="use_gpu=False"):
        TensorRTBackend().load(artifact, LoadOptions(use_gpu=False))


def test_parser_error_text():
    class ParserError:  # a binding without a readable __str__
        def __str__(self):
            return "<tensorrt.tensorrt.ParserError object at 0x1>"

        def node(self):
            return 3

        def code(self):
            return "UNSUPPORTED_NODE"

        def desc(self):
            return "No importer registered for op: Foo"

    assert trt_backend._parser_error_text(ParserError()) == "node 3 (UNSUPPORTED_NODE): No importer registered for op: Foo"
    assert trt_backend._parser_error_text("In node 0: bad") == "In node 0: bad"


def test_infer_rejects_bad_requests(fake_gpu):
    backend = trt_backend.load_plan(trt_backend.build_engine(mlp_bytes(), LoadOptions(max_batch_size=4)))
    with pytest.raises(ValueError, match="unknown output"):
        backend.infer({"x": _inputs(1)}, ["nope"])
    with pytest.raises(ValueError, match="missing input"):
        backend.infer({}, ["y"])
    with pytest.raises(ValueError, match="outside what the engine accepts"):
        backend.infer({"x": _inputs(1, width=5)}, ["y"])
    backend.unload()


def test_plan_roundtrip_and_format_option(fake_gpu, tmp_path):
    plan = trt_backend.build_engine(mlp_bytes(), LoadOptions(max_batch_size=4))
    assert is_plan(plan)
    path = tmp_path / "model.plan"
    path.write_bytes(plan)
    backend = TensorRTBackend()
    backend.load(path, LoadOptions(extra={"format": "tensorrt_plan"}))
    x = _inputs(3)
    np.testing.assert_allclose(backend.infer({"x": x}, ["y"])["y"], _reference(x), rtol=1e-6)
    with pytest.raises(BackendLoadError, match="already holds a model"):
        backend.load_plan(plan)
    backend.unload()


def test_corrupt_plan_and_bad_onnx_fail_with_reasons(fake_gpu, tmp_path):
    with pytest.raises(BackendLoadError, match="could not deserialize the plan on sm_90.*Serialization"):
        trt_backend.load_plan(b"ptrt" + b"\0" * 32)
    with pytest.raises(BackendLoadError, match="not a TensorRT plan"):
        trt_backend.load_plan(mlp_bytes())
    with pytest.raises(BackendLoadError, match="could not parse the ONNX model: .*INVALID_GRAPH"):
        trt_backend.build_engine(b"\x08\x07garbage", LoadOptions())
    missing = tmp_path / "missing.onnx"
    with pytest.raises(BackendLoadError, match="cannot read artifact"):
        TensorRTBackend().load(missing, LoadOptions())


def test_precision_flags_reach_the_builder(fake_gpu):
    fake_trt, _ = fake_gpu
    trt_backend.build_engine(mlp_bytes(), LoadOptions(precision="FP16"))
    assert "FP16" in fake_trt.state.builds[-1]["flags"]
    with pytest.raises(BackendLoadError, match="INT8 needs calibration"):
        trt_backend.build_engine(mlp_bytes(), LoadOptions(precision="INT8"))
    trt_backend.build_engine(qdq_mlp_bytes(), LoadOptions(precision="INT8"))
    assert {"INT8", "FP16"} <= set(fake_trt.state.builds[-1]["flags"])


def test_strongly_typed_tensorrt_builds_without_precision_flags(monkeypatch, fake_gpu):
    fake11 = tensorrt_fakes.make_tensorrt("11.0.0.1", strongly_typed_only=True)
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: fake11)
    trt_backend.reset_probe_cache()
    plan = trt_backend.build_engine(mlp_bytes(), LoadOptions(precision="FP16"))
    assert "FP16" not in fake11.state.builds[-1]["flags"]
    trt_backend.load_plan(plan).unload()
    with pytest.raises(BackendLoadError, match="INT8 needs calibration"):
        trt_backend.build_engine(mlp_bytes(), LoadOptions(precision="INT8"))


def test_dynamic_non_batch_dimensions_are_rejected(fake_gpu):
    model = mlp_model()
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "features"
    with pytest.raises(BackendLoadError, match="static non-batch dimensions"):
        trt_backend.build_engine(model.SerializeToString(), LoadOptions())


def test_static_model_has_no_profile_and_checks_shapes(fake_gpu):
    fake_trt, _ = fake_gpu
    model = mlp_model()
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 2
    backend = trt_backend.load_plan(trt_backend.build_engine(model.SerializeToString(), LoadOptions()))
    assert fake_trt.state.builds[-1]["profile"] == {}
    assert backend.inputs == [TensorInfo("x", "FP32", (2, 4))] and not backend.batch_dimension
    assert backend.max_batch_size == 0
    x = _inputs(2)
    np.testing.assert_allclose(backend.infer({"x": x}, ["y"])["y"], _reference(x, model.SerializeToString()), rtol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        backend.infer({"x": _inputs(3)}, ["y"])
    backend.unload()


def test_fp16_model_io_datatypes(fake_gpu):
    backend = trt_backend.load_plan(trt_backend.build_engine(fp16_mlp_bytes(), LoadOptions(precision="FP16")))
    assert backend.inputs == [TensorInfo("x", "FP16", (-1, 4))]
    x = _inputs(3)
    out = backend.infer({"x": x}, ["y"])["y"]  # FP32 input is converted to the engine's FP16
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), _reference(x), rtol=2e-2, atol=2e-2)
    backend.unload()


def test_local_engine_cache_key(fake_gpu):
    key = trt_backend.local_engine_cache_key(DIGEST, "FP16")
    assert key == f"engines/{DIGEST}/sm_90/10.8.0.43-FP16.plan"
    with pytest.raises(BackendUnavailable, match="CUDA device 1 does not exist"):
        trt_backend.local_engine_cache_key(DIGEST, "FP16", LoadOptions(extra={"device": "1"}))


async def test_engine_cache_flow_builds_once_then_reuses(fake_gpu, tmp_path):
    from services.common.objectstore import LocalObjectStore

    fake_trt, _ = fake_gpu
    store = LocalObjectStore(ObjectStoreSettings(kind=ObjectStoreKind.LOCAL, path=tmp_path / "objects"))
    await store.ensure_ready()
    onnx_bytes = mlp_bytes()
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(onnx_bytes)
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    options = LoadOptions(precision="FP32", max_batch_size=8)

    first = TensorRTBackend()
    assert await trt_backend.load_with_engine_cache(first, store, digest, artifact, options) == "built"
    key = engine_cache_key(digest, "sm_90", "10.8.0.43", "FP32")
    assert await store.exists(key)
    second = TensorRTBackend()
    builds = len(fake_trt.state.builds)
    assert await trt_backend.load_with_engine_cache(second, store, digest, artifact, options) == "cache"
    assert len(fake_trt.state.builds) == builds
    x = _inputs(5)
    np.testing.assert_allclose(second.infer({"x": x}, ["y"])["y"], first.infer({"x": x}, ["y"])["y"])
    second.unload()

    # A corrupt cached engine is rebuilt and replaced.
    await store.put_bytes(key, b"ftrt" + b"\xff" * 16)
    third = TensorRTBackend()
    assert await trt_backend.load_with_engine_cache(third, store, digest, artifact, options) == "built"
    assert is_plan(await store.get_bytes(key)) and len(await store.get_bytes(key)) > 100
    first.unload()
    third.unload()
    await store.close()
