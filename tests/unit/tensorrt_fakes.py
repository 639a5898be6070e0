"""CPU stand-ins for `tensorrt` and the cuda-bindings runtime, for unit tests on machines without a GPU.

They mimic only the API surface the TensorRT backend uses, with real semantics where it matters:
"device" memory is real host memory behind integer addresses (so copies, buffer sizes and addresses
are exercised for real), and the "engine" executes the ONNX model with ONNX Runtime. They prove the
backend's orchestration (profiles, precision flags, buffers, chunking, caching, errors), not
TensorRT itself; tests/gpu runs the real thing.
"""

from __future__ import annotations

import ctypes
import enum
import json
import struct
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort

# --- cuda-bindings runtime ----------------------------------------------------------------------------


class cudaError_t(enum.Enum):  # noqa: N801 - mirrors the bindings' names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


class cudaMemcpyKind(enum.Enum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class FakeStream:
    _next = 0x1000

    def __init__(self) -> None:
        FakeStream._next += 16
        self.address = FakeStream._next

    def __int__(self) -> int:
        return self.address


class FakeCudaRuntime:
    """The subset of `cuda.bindings.runtime` the backend calls; every call returns (err, *outputs)."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamNonBlocking = 1

    def __init__(
        self,
        devices: list[tuple[bytes, int, int, int]] | None = None,
        *,
        count_error: cudaError_t | None = None,
        driver_version: int = 12040,
        runtime_version: int = 12090,
        max_alloc: int = 1 << 30,
    ) -> None:
        self.devices = [(b"Fake H100 80GB HBM3", 9, 0, 80 << 30)] if devices is None else devices
        self.count_error = count_error
        self.driver_version = driver_version
        self.runtime_version = runtime_version
        self.max_alloc = max_alloc
        self.allocations: dict[int, ctypes.Array] = {}
        self.streams: set[int] = set()
        self.current_device = 0
        self.copies: list[tuple[str, int]] = []

    ok = cudaError_t.cudaSuccess

    def cudaGetErrorName(self, err: cudaError_t):  # noqa: N802
        return self.ok, err.name.encode()

    def cudaGetErrorString(self, err: cudaError_t):  # noqa: N802
        return self.ok, f"fake error {err.value}".encode()

    def cudaDriverGetVersion(self):  # noqa: N802
        return self.ok, self.driver_version

    def cudaRuntimeGetVersion(self):  # noqa: N802
        return self.ok, self.runtime_version

    def cudaGetDeviceCount(self):  # noqa: N802
        if self.count_error is not None:
            return self.count_error, None
        return self.ok, len(self.devices)

    def cudaGetDeviceProperties(self, index: int):  # noqa: N802
        name, major, minor, total = self.devices[index]
        return self.ok, SimpleNamespace(name=name + b"\0" * 8, major=major, minor=minor, totalGlobalMem=total)

    def cudaSetDevice(self, index: int):  # noqa: N802
        if not 0 <= index < len(self.devices):
            return (cudaError_t.cudaErrorInvalidValue,)
        self.current_device = index
        return (self.ok,)

    def cudaMemGetInfo(self):  # noqa: N802
        total = self.devices[self.current_device][3]
        used = sum(len(b) for b in self.allocations.values())
        return self.ok, total - used, total

    def cudaMalloc(self, size: int):  # noqa: N802
        if size > self.max_alloc:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        buffer = ctypes.create_string_buffer(size)
        address = ctypes.addressof(buffer)
        self.allocations[address] = buffer
        return self.ok, address

    def cudaFree(self, ptr: int):  # noqa: N802
        if self.allocations.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (self.ok,)

    def cudaStreamCreateWithFlags(self, flags: int):  # noqa: N802
        stream = FakeStream()
        self.streams.add(int(stream))
        return self.ok, stream

    def cudaStreamSynchronize(self, stream: FakeStream):  # noqa: N802
        return (self.ok if int(stream) in self.streams else cudaError_t.cudaErrorInvalidValue,)

    def cudaStreamDestroy(self, stream: FakeStream):  # noqa: N802
        if int(stream) not in self.streams:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.streams.discard(int(stream))
        return (self.ok,)

    def _owned(self, address: int, count: int) -> bool:
        for base, buffer in self.allocations.items():
            if base <= address and address + count <= base + len(buffer):
                return True
        return False

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: FakeStream):  # noqa: N802
        device = dst if kind is cudaMemcpyKind.cudaMemcpyHostToDevice else src
        if int(stream) not in self.streams or not self._owned(int(device), count):
            return (cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(int(dst), int(src), count)
        self.copies.append((kind.name, count))
        return (self.ok,)


# --- tensorrt -------------------------------------------------------------------------------------------

_PLAN_MAGIC = b"ftrt"


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


_ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: DataType.FLOAT,
    onnx.TensorProto.FLOAT16: DataType.HALF,
    onnx.TensorProto.BFLOAT16: DataType.BF16,
    onnx.TensorProto.INT8: DataType.INT8,
    onnx.TensorProto.INT32: DataType.INT32,
    onnx.TensorProto.INT64: DataType.INT64,
    onnx.TensorProto.BOOL: DataType.BOOL,
    onnx.TensorProto.UINT8: DataType.UINT8,
}
_NUMPY = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT8: np.int8,
    DataType.INT32: np.int32,
    DataType.INT64: np.int64,
    DataType.BOOL: np.bool_,
    DataType.UINT8: np.uint8,
    DataType.BF16: np.uint16,
}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class TensorLocation(enum.Enum):
    DEVICE = 0
    HOST = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class Severity(enum.Enum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity

    def __init__(self) -> None:
        pass

    def log(self, severity: Severity, msg: str) -> None:  # pragma: no cover - overridden
        pass


def _io(model: onnx.ModelProto) -> tuple[list, list]:
    initializers = {i.name for i in model.graph.initializer}

    def describe(value: onnx.ValueInfoProto):
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        return value.name, _ONNX_TO_TRT[tensor_type.elem_type], shape

    inputs = [describe(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [describe(v) for v in model.graph.output]


def make_tensorrt(version: str = "10.8.0.43", *, strongly_typed_only: bool = False) -> SimpleNamespace:
    """A fake `tensorrt` module; strongly_typed_only mimics TensorRT 11 (no FP16/INT8 builder flags)."""
    flags = ["TF32", "REFIT"] if strongly_typed_only else ["FP16", "INT8", "TF32", "REFIT"]
    BuilderFlag = enum.Enum("BuilderFlag", flags)  # noqa: N806
    creation = ["STRONGLY_TYPED"] if strongly_typed_only else ["EXPLICIT_BATCH", "STRONGLY_TYPED"]
    NetworkDefinitionCreationFlag = enum.Enum("NetworkDefinitionCreationFlag", creation, start=0)  # noqa: N806
    state = SimpleNamespace(builds=[], executions=[])

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.model: onnx.ModelProto | None = None
            self._inputs: list = []
            self._layers: list = []

        @property
        def num_inputs(self) -> int:
            return len(self._inputs)

        def get_input(self, i: int):
            name, dtype, shape = self._inputs[i]
            return SimpleNamespace(name=name, dtype=dtype, shape=shape, is_shape_tensor=False)

        @property
        def num_layers(self) -> int:
            return len(self._layers)

        def get_layer(self, i: int):
            return SimpleNamespace(type=SimpleNamespace(name=self._layers[i]))

    class OnnxParser:
        def __init__(self, network: Network, logger: ILogger) -> None:
            self.network, self.errors = network, []

        def parse(self, data: bytes) -> bool:
            try:
                model = onnx.load_model_from_string(data)
                onnx.checker.check_model(model)
            except Exception as exc:
                self.errors = [f"In node -1 (parseGraph): INVALID_GRAPH: {type(exc).__name__}"]
                return False
            self.network.model = model
            self.network._inputs = _io(model)[0]
            names = {"QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE"}
            self.network._layers = [names.get(n.op_type, n.op_type.upper()) for n in model.graph.node]
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict = {}

        def set_shape(self, name, low, opt, high) -> None:
            self.shapes[name] = [list(low), list(opt), list(high)]

    class Config:
        def __init__(self) -> None:
            self.flags = {"TF32"}
            self.profiles: list[Profile] = []
            self.pools: dict = {}

        def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
            self.pools[pool.name] = size

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_flag(self, flag) -> None:
            assert isinstance(flag, BuilderFlag)
            self.flags.add(flag.name)

        def clear_flag(self, flag) -> None:
            self.flags.discard(flag.name)

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            assert isinstance(logger, ILogger)
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config):
            inputs, _ = _io(network.model)
            dynamic = [name for name, _, shape in inputs if any(d < 0 for d in shape)]
            profile = config.profiles[0].shapes if config.profiles else {}
            if any(name not in profile for name in dynamic):
                self.logger.log(Severity.ERROR, "Network has dynamic or shape inputs, but no optimization profile")
                return None
            header = {"flags": sorted(config.flags), "profile": profile, "pools": config.pools, "net_flags": network.flags}
            state.builds.append(header)
            raw = json.dumps(header).encode()
            return _PLAN_MAGIC + struct.pack("<I", len(raw)) + raw + network.model.SerializeToString()

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape) -> bool:
            shape = tuple(int(d) for d in shape)
            declared = self.engine.shapes[name]
            if len(shape) != len(declared):
                return False
            low, _, high = self.engine.profile.get(name, [declared, declared, declared])
            if any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
                self.engine.logger.log(Severity.ERROR, f"setInputShape: {name} {shape} out of profile")
                return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple:
            if name in self.shapes:
                return self.shapes[name]
            shape = self.engine.shapes[name]
            batch = next(iter(self.shapes.values()), (-1,))[0] if self.shapes else -1
            return tuple(batch if d < 0 else d for d in shape)

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            feeds = {}
            for name, dtype, _ in self.engine.inputs:
                shape = self.get_tensor_shape(name)
                count = int(np.prod(shape)) * np.dtype(_NUMPY[dtype]).itemsize
                raw = (ctypes.c_char * count).from_address(self.addresses[name])
                feeds[name] = np.frombuffer(bytes(raw), dtype=_NUMPY[dtype]).reshape(shape)
            results = self.engine.session.run(None, feeds)
            for (name, dtype, _), value in zip(self.engine.outputs, results):
                value = np.ascontiguousarray(value, dtype=_NUMPY[dtype])
                assert tuple(value.shape) == tuple(self.get_tensor_shape(name))
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            state.executions.append({n: f.shape for n, f in feeds.items()})
            return True

    class Engine:
        def __init__(self, header: dict, model_bytes: bytes, logger: ILogger) -> None:
            model = onnx.load_model_from_string(model_bytes)
            self.header, self.logger = header, logger
            self.profile = header["profile"]
            self.inputs, self.outputs = _io(model)
            self.shapes = {name: shape for name, _, shape in self.inputs + self.outputs}
            self.dtypes = {name: dtype for name, dtype, _ in self.inputs + self.outputs}
            self.session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
            self.device_memory_size_v2 = 4096

        @property
        def num_io_tensors(self) -> int:
            return len(self.inputs) + len(self.outputs)

        def get_tensor_name(self, i: int) -> str:
            return [name for name, _, _ in self.inputs + self.outputs][i]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if any(n == name for n, _, _ in self.inputs) else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return self.dtypes[name]

        def get_tensor_shape(self, name: str) -> tuple:
            return self.shapes[name]

        def get_tensor_location(self, name: str) -> TensorLocation:
            return TensorLocation.DEVICE

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
            return [tuple(s) for s in self.profile[name]]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes):
            try:
                assert plan[:4] == _PLAN_MAGIC
                (length,) = struct.unpack("<I", plan[4:8])
                header = json.loads(plan[8 : 8 + length])
                return Engine(header, plan[8 + length :], self.logger)
            except Exception:
                self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (magic tag mismatch)")
                return None

    return SimpleNamespace(
        __version__=version,
        ILogger=ILogger,
        Builder=Builder,
        OnnxParser=OnnxParser,
        Runtime=Runtime,
        BuilderFlag=BuilderFlag,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
        MemoryPoolType=MemoryPoolType,
        TensorIOMode=TensorIOMode,
        TensorLocation=TensorLocation,
        DataType=DataType,
        state=state,
    )


def install(monkeypatch, *, version: str = "10.8.0.43", devices: list | None = None) -> tuple[SimpleNamespace, FakeCudaRuntime]:
    """Make this process see a fake TensorRT and fake CUDA devices (default: one sm_90) through the
    backend's import seams; `monkeypatch` undoes it. Returns (fake tensorrt, fake cuda runtime)."""
    from services.inference.backends import cuda
    from services.inference.backends import tensorrt as trt_backend

    fake_trt = make_tensorrt(version)
    fake_rt = FakeCudaRuntime(devices)
    trt_backend.reset_probe_cache()
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(trt_backend, "_logger_instance", None)
    monkeypatch.setattr(cuda, "_import_runtime", lambda: fake_rt)
    return fake_trt, fake_rt
