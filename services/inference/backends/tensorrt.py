"""TensorRT backend: ONNX → engine (FP32/FP16/INT8) or a serialized plan, executed on a CUDA stream.

TensorRT is optional (the `[gpu]` extra plus NVIDIA's TensorRT wheel). Importing this module never
imports TensorRT or touches CUDA; `TensorRTBackend.probe()` says whether this node can run it and, if
not, exactly why, so a node without TensorRT or a GPU never advertises the backend.

Engine cache (mesh mode: the data plane calls `TensorRTBackend.load_shared`, which runs
`load_with_engine_cache`; standalone nodes have no object store and build with `load()`)
------------------------------------------------------------------------------------------
Building an engine takes seconds to minutes, and an engine only runs on the GPU architecture and
TensorRT version it was built with, so built engines live in the object store under

    engines/<artifact-sha256>/<gpu-arch>/<trt-version>-<precision>.plan

(`engine_cache_key`, formatted by `services.common.objectstore.keys.engine_key`). To load an ONNX
artifact with TensorRT a node:

1. computes `local_engine_cache_key(sha256, precision)` (this node's GPU arch and TensorRT version);
2. fetches that key; on a hit, `backend.load_plan(plan, options)`; if the stored plan does not
   deserialize (corrupt, or built by an incompatible TensorRT), it is treated as a miss;
3. on a miss, `build_engine(onnx_bytes, options)` (blocking: on the model's thread), uploads the plan to
   the key (best effort: a store outage must not fail the load), then `backend.load_plan(plan, ...)`.

Every later node with the same GPU architecture and TensorRT version reuses the engine. The engine's
optimization profile is sized from `LoadOptions.max_batch_size` at build time and is not part of the
key; `TensorRTBackend.max_batch_size` reports the profile's real maximum after load, and `infer`
splits a larger batch into runs of at most that size, so a cached engine is always correct.

Precision
---------
- FP32: TF32 math is switched off so results match ONNX Runtime at FP32 tolerance.
- FP16: on TensorRT < 11, `BuilderFlag.FP16` when the GPU has fast FP16 (else FP32, with a
  warning). TensorRT >= 11 only builds strongly typed networks: precision then comes from the
  model's own tensor types (convert it to FP16 beforehand, e.g. with NVIDIA ModelOpt AutoCast).
- INT8: there is no calibration data here, so INT8 is built only for networks with explicit
  quantization (QuantizeLinear/DequantizeLinear nodes); anything else fails with BackendLoadError.

Datatypes: TensorRT FLOAT/HALF/BF16/INT8/INT32/INT64/BOOL/UINT8 map to the protocol's
FP32/FP16/BF16/INT8/INT32/INT64/BOOL/UINT8. BF16 has no numpy type: it travels as raw 16-bit
patterns in `np.uint16` arrays.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import pathlib
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import structlog

from services.common.objectstore import keys
from services.inference.backends import cuda
from services.inference.backends.base import (
    Backend,
    BackendLoadError,
    BackendUnavailable,
    LoadOptions,
    Runner,
    TensorInfo,
)

if TYPE_CHECKING:
    from services.common.objectstore.base import ObjectStore

_log = structlog.get_logger("tensorrt")

INSTALL_HINT = "pip install aimaas[gpu] and NVIDIA's TensorRT"
MIN_TENSORRT = (8, 6)
TENSORRT_PLAN_FORMAT = "tensorrt_plan"
ONNX_FORMAT = "onnx"
# Serialized engines start with one of these 4-byte tags (the registry detects plans the same way).
TENSORRT_MAGIC_TAGS = (b"ftrt", b"ptrt")
PRECISIONS = ("FP32", "FP16", "INT8")
DEFAULT_WORKSPACE_BYTES = 2 << 30

# TensorRT DataType member name → Open Inference Protocol datatype.
TRT_TO_PROTOCOL: dict[str, str] = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "BF16": "BF16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
    "UINT8": "UINT8",
}
# Protocol datatype → numpy dtype of the host arrays `infer` takes and returns.
PROTOCOL_TO_NUMPY: dict[str, np.dtype] = {
    "FP32": np.dtype(np.float32),
    "FP16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),  # raw bfloat16 bit patterns
    "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
}
# Bytes per element of each TensorRT I/O datatype (DataType.itemsize).
TRT_ITEMSIZE: dict[str, int] = {
    "FLOAT": 4,
    "HALF": 2,
    "BF16": 2,
    "INT8": 1,
    "INT32": 4,
    "INT64": 8,
    "BOOL": 1,
    "UINT8": 1,
}
# Layer types (TensorRT LayerType names, ONNX op types) that mark explicit quantization.
_QDQ_TYPES = frozenset({"QUANTIZE", "DEQUANTIZE", "QuantizeLinear", "DequantizeLinear"})


# --- pure helpers (no TensorRT needed; unit-tested everywhere) ----------------------------------------


def normalize_precision(precision: str) -> str:
    value = str(precision).strip().upper()
    if value not in PRECISIONS:
        raise BackendLoadError(f"unknown precision {precision!r}: want one of {', '.join(PRECISIONS)}")
    return value


def engine_cache_key(sha256: str, gpu_arch: str, trt_version: str, precision: str) -> str:
    """Object-store key of a built engine: engines/<sha256>/<gpu-arch>/<trt-version>-<precision>.plan."""
    return keys.engine_key(sha256, gpu_arch, trt_version, normalize_precision(precision))


def is_plan(data: bytes | memoryview) -> bool:
    """Whether `data` starts like a serialized TensorRT engine."""
    return bytes(data[:4]) in TENSORRT_MAGIC_TAGS


def artifact_format(data: bytes | memoryview, options: LoadOptions) -> str:
    """TENSORRT_PLAN_FORMAT or ONNX_FORMAT: `options.extra["format"]` when given, else the magic bytes."""
    declared = options.extra.get("format", "").strip().lower()
    if declared in ("tensorrt_plan", "tensorrt", "plan", "trt"):
        return TENSORRT_PLAN_FORMAT
    if declared in ("onnx", "onnxruntime_onnx"):
        return ONNX_FORMAT
    if declared:
        raise BackendLoadError(f"unsupported artifact format {declared!r} for TensorRT: want onnx or tensorrt_plan")
    return TENSORRT_PLAN_FORMAT if is_plan(data) else ONNX_FORMAT


def profile_batch_sizes(max_batch_size: int) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimization profile: 1, max(1, max//2), max."""
    if max_batch_size < 1:
        raise BackendLoadError(f"max_batch_size must be >= 1, got {max_batch_size}")
    return 1, max(1, max_batch_size // 2), max_batch_size


def optimization_profile_shapes(
    inputs: Sequence[tuple[str, Sequence[int]]], max_batch_size: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Profile shapes for each input with a dynamic batch (first) dimension; {} when all are static.

    Any other dynamic dimension raises BackendLoadError: the profile only covers the batch dimension.
    """
    low, opt, high = profile_batch_sizes(max_batch_size)
    shapes = {}
    for name, shape in inputs:
        shape = tuple(int(d) for d in shape)
        others = [i for i, d in enumerate(shape) if d < 0 and i != 0]
        if others:
            raise BackendLoadError(
                f"input {name!r} has shape {list(shape)} with dynamic non-batch dimension(s) {others}: TensorRT "
                "engines here get an optimization profile for the batch dimension only; export the model with "
                "static non-batch dimensions"
            )
        if shape and shape[0] < 0:
            rest = shape[1:]
            shapes[name] = ((low, *rest), (opt, *rest), (high, *rest))
    return shapes


def has_explicit_quantization(layer_types: Iterable[str]) -> bool:
    """Whether the network has Q/DQ layers (TensorRT QUANTIZE/DEQUANTIZE, ONNX Quantize/DequantizeLinear)."""
    return any(t in _QDQ_TYPES for t in layer_types)


@dataclass(frozen=True)
class PrecisionPlan:
    set_flags: tuple[str, ...] = ()
    clear_flags: tuple[str, ...] = ()
    # Why the engine will not use the requested precision as asked (logged as a warning).
    note: str | None = None


def precision_plan(
    precision: str, *, weak_typing: bool, fast_fp16: bool, explicit_quantization: bool
) -> PrecisionPlan:
    """The BuilderFlag names to set and clear for `precision`.

    weak_typing: TensorRT still has precision builder flags (< 11); fast_fp16: the GPU runs FP16
    fast; explicit_quantization: the network has Q/DQ layers.
    """
    precision = normalize_precision(precision)
    if precision == "FP32":
        return PrecisionPlan(clear_flags=("TF32",))
    if precision == "FP16":
        if not weak_typing:
            return PrecisionPlan(
                note="this TensorRT builds strongly typed networks only: layers run in the model's own types; "
                "convert the ONNX model to FP16 (e.g. NVIDIA ModelOpt AutoCast) for FP16 execution"
            )
        if not fast_fp16:
            return PrecisionPlan(note="this GPU has no fast FP16: building FP32")
        return PrecisionPlan(set_flags=("FP16",))
    # INT8
    if not explicit_quantization:
        raise BackendLoadError(
            "INT8 needs calibration data, and none is available: INT8 engines are built only from models with "
            "explicit quantization (QuantizeLinear/DequantizeLinear nodes, e.g. from NVIDIA ModelOpt); deploy this "
            "model with precision FP16 or FP32, or quantize it first"
        )
    if not weak_typing:
        return PrecisionPlan()
    return PrecisionPlan(set_flags=("INT8", "FP16") if fast_fp16 else ("INT8",))


def batch_capacity(batch: int, max_batch: int) -> int:
    """Rows to size a dynamic-batch buffer for: the next power of two, capped at the profile maximum."""
    if batch <= 0:
        return max(1, batch)
    capacity = 1 << (batch - 1).bit_length()
    return max(batch, min(capacity, max_batch))


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


# --- TensorRT import, logger ----------------------------------------------------------------------------

_trt_lock = threading.Lock()
_trt_cache: tuple[ModuleType | None, str | None] | None = None
_logger_instance: Any = None


def _import_tensorrt() -> ModuleType:
    return importlib.import_module("tensorrt")


def _tensorrt_module() -> tuple[ModuleType | None, str | None]:
    global _trt_cache
    with _trt_lock:
        if _trt_cache is None:
            try:
                trt = _import_tensorrt()
            except ImportError as exc:
                missing = getattr(exc, "name", None)
                if missing in (None, "tensorrt"):
                    _trt_cache = (None, f"tensorrt is not installed ({INSTALL_HINT})")
                else:
                    _trt_cache = (None, f"tensorrt failed to import ({exc}); reinstall it ({INSTALL_HINT})")
            except Exception as exc:  # e.g. OSError: libnvinfer missing
                _trt_cache = (None, f"tensorrt failed to import: {type(exc).__name__}: {exc}")
            else:
                _trt_cache = (trt, _tensorrt_problem(trt))
        return _trt_cache


def _tensorrt_problem(trt: ModuleType) -> str | None:
    version = str(getattr(trt, "__version__", "0"))
    if _version_tuple(version) < MIN_TENSORRT:
        return f"tensorrt {version} is too old: need >= {'.'.join(map(str, MIN_TENSORRT))}"
    missing = [name for name in ("Builder", "OnnxParser", "Runtime") if not hasattr(trt, name)]
    if missing:
        return f"tensorrt {version} lacks {', '.join(missing)} (a lean/dispatch runtime?): install the full TensorRT"
    return None


def tensorrt_version() -> str | None:
    """The importable TensorRT's version ("10.3.0.26"), or None."""
    trt, _ = _tensorrt_module()
    return str(trt.__version__) if trt is not None else None


def reset_probe_cache() -> None:
    """Forget cached import/detection results (tests, or after installing TensorRT)."""
    global _trt_cache
    with _trt_lock:
        _trt_cache = None
    cuda.reset_detection_cache()


def _unavailable_reason() -> str | None:
    _, trt_reason = _tensorrt_module()
    gpu_reason = None
    if not cuda.detect_gpus():
        gpu_reason = f"no CUDA GPU: {cuda.gpu_unavailable_reason() or 'none detected'}"
    reasons = [r for r in (trt_reason, gpu_reason) if r]
    return "; ".join(reasons) if reasons else None


def _require_tensorrt() -> ModuleType:
    reason = _unavailable_reason()
    if reason:
        raise BackendUnavailable(reason)
    trt, _ = _tensorrt_module()
    assert trt is not None
    return trt


def _select_gpu(options: LoadOptions | None) -> cuda.GpuInfo:
    gpus = cuda.detect_gpus()
    raw = (options.extra.get("device", "0") if options else "0") or "0"
    try:
        index = int(raw)
    except ValueError:
        raise BackendLoadError(f"invalid device index {raw!r} in load options") from None
    for gpu in gpus:
        if gpu.index == index:
            cuda.set_device(index)
            return gpu
    raise BackendUnavailable(f"CUDA device {index} does not exist (this node has {len(gpus)})")


class _LogBridge:
    """Routes TensorRT's log to structlog and keeps recent errors for exception messages."""

    def __init__(self) -> None:
        self._errors: deque[tuple[int, str]] = deque(maxlen=64)
        self._counter = itertools.count(1)
        self._last = 0
        self._lock = threading.Lock()

    def record(self, severity: str, message: str) -> None:
        if severity in ("INTERNAL_ERROR", "ERROR"):
            with self._lock:
                self._last = next(self._counter)
                self._errors.append((self._last, message))
            _log.error("tensorrt", severity=severity, message=message)
        elif severity == "WARNING":
            _log.warning("tensorrt", message=message)
        elif severity == "INFO":
            _log.debug("tensorrt", message=message)

    def mark(self) -> int:
        with self._lock:
            return self._last

    def errors_since(self, mark: int) -> str:
        with self._lock:
            messages = [m for n, m in self._errors if n > mark]
        return "; ".join(messages[-5:])


_bridge = _LogBridge()


def _logger(trt: ModuleType) -> Any:
    """The process-wide TensorRT logger (TensorRT wants one logger for every builder and runtime)."""
    global _logger_instance
    with _trt_lock:
        if _logger_instance is None:

            class _Logger(trt.ILogger):  # type: ignore[name-defined,misc]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    _bridge.record(getattr(severity, "name", str(severity)).rsplit(".", 1)[-1], msg)

            _logger_instance = _Logger()
        return _logger_instance


def _with_errors(message: str, mark: int) -> str:
    details = _bridge.errors_since(mark)
    return f"{message}: {details}" if details else message


# --- engine building and caching -------------------------------------------------------------------------


def local_engine_cache_key(sha256: str, precision: str, options: LoadOptions | None = None) -> str:
    """The engine key for this node: its GPU's architecture (options.extra["device"], default 0) and TensorRT."""
    reason = _unavailable_reason()
    if reason:
        raise BackendUnavailable(reason)
    gpu = _select_gpu(options)
    version = tensorrt_version()
    assert version is not None
    return engine_cache_key(sha256, gpu.arch, version, precision)


def _workspace_bytes(options: LoadOptions) -> int:
    raw = options.extra.get("workspace_bytes")
    if raw is None:
        return DEFAULT_WORKSPACE_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise BackendLoadError(f"invalid workspace_bytes {raw!r}") from None
    if value <= 0:
        raise BackendLoadError(f"workspace_bytes must be > 0, got {value}")
    return value


def build_engine(onnx_bytes: bytes, options: LoadOptions) -> bytes:
    """Build a serialized TensorRT engine (plan) from ONNX bytes. Blocking; seconds to minutes.

    Uses options.precision, options.max_batch_size (optimization profile of the batch dimension),
    options.extra["workspace_bytes"] and options.extra["device"]. Raises BackendUnavailable without
    TensorRT or a GPU, BackendLoadError when the model cannot be built (the message says why).
    """
    trt = _require_tensorrt()
    precision = normalize_precision(options.precision)
    gpu = _select_gpu(options)
    logger = _logger(trt)
    mark = _bridge.mark()
    try:
        builder = trt.Builder(logger)
    except Exception as exc:
        raise BackendUnavailable(_with_errors(f"TensorRT builder could not start on {gpu.name}: {exc}", mark)) from exc
    if builder is None:
        raise BackendUnavailable(_with_errors(f"TensorRT builder could not start on {gpu.name}", mark))
    flags = 0
    explicit_batch = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit_batch is not None and _version_tuple(trt.__version__) < (10,):
        flags |= 1 << int(explicit_batch)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(bytes(onnx_bytes)):
        errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendLoadError(
            _with_errors("TensorRT could not parse the ONNX model: " + ("; ".join(errors) or "unknown error"), mark)
        )

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for tensor in inputs:
        if getattr(tensor, "is_shape_tensor", False):
            raise BackendLoadError(f"input {tensor.name!r} is a shape tensor: not supported by this backend")
    profile_shapes = optimization_profile_shapes(
        [(t.name, tuple(t.shape)) for t in inputs], options.max_batch_size
    )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _workspace_bytes(options))
    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)

    layer_types = [network.get_layer(i).type.name for i in range(network.num_layers)]
    plan = precision_plan(
        precision,
        weak_typing=hasattr(trt.BuilderFlag, "FP16"),
        fast_fp16=cuda.has_fast_fp16(*gpu.compute_capability),
        explicit_quantization=has_explicit_quantization(layer_types),
    )
    if plan.note:
        _log.warning("tensorrt precision", requested=precision, note=plan.note)
    for name in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear_flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is not None:
            config.clear_flag(flag)

    _log.info(
        "building tensorrt engine",
        precision=precision,
        gpu=gpu.arch,
        tensorrt=trt.__version__,
        profile={k: [list(s) for s in v] for k, v in profile_shapes.items()},
    )
    try:
        serialized = builder.build_serialized_network(network, config)
    except Exception as exc:
        raise BackendLoadError(_with_errors(f"TensorRT engine build failed: {exc}", mark)) from exc
    if serialized is None:
        raise BackendLoadError(_with_errors("TensorRT engine build failed", mark))
    return bytes(serialized)


def _parser_error_text(error: Any) -> str:
    text = str(error)
    if text.startswith("<") and hasattr(error, "desc"):  # no readable __str__: assemble it
        try:
            return f"node {error.node()} ({error.code()}): {error.desc()}"
        except Exception:
            return str(error.desc())
    return text


def load_plan(plan: bytes, options: LoadOptions | None = None) -> TensorRTBackend:
    """A TensorRTBackend with `plan` (a serialized engine) loaded."""
    backend = TensorRTBackend()
    backend.load_plan(plan, options)
    return backend


async def load_with_engine_cache(
    backend: TensorRTBackend,
    store: ObjectStore,
    sha256: str,
    onnx_path: pathlib.Path,
    options: LoadOptions,
    *,
    run: Runner | None = None,
) -> str:
    """Load the ONNX artifact `onnx_path` (digest `sha256`, already verified) through the engine cache.

    Returns "cache" when a stored engine was used, "built" when it was built here (and uploaded).
    Blocking TensorRT work goes through `run(fn, *args)` (default: a worker thread; the data plane
    passes the model's own thread). Object-store failures never fail the load: a failed get builds
    locally, a failed put only logs.
    """
    from services.common.objectstore.base import ObjectNotFound, ObjectStoreError

    run = run or asyncio.to_thread
    key = await run(local_engine_cache_key, sha256, options.precision, options)
    log = _log.bind(key=key)
    try:
        plan = await store.get_bytes(key)
    except ObjectNotFound:
        plan = None
    except ObjectStoreError as exc:
        log.warning("engine cache unavailable, building locally", error=str(exc))
        plan = None
    if plan is not None:
        try:
            await run(backend.load_plan, plan, options)
            log.info("tensorrt engine loaded from cache", size=len(plan))
            return "cache"
        except BackendLoadError as exc:
            log.warning("cached engine unusable, rebuilding", error=str(exc))
    try:
        onnx_bytes = await run(pathlib.Path(onnx_path).read_bytes)
    except OSError as exc:
        raise BackendLoadError(f"cannot read artifact {onnx_path}: {exc}") from exc
    plan = await run(build_engine, onnx_bytes, options)
    try:
        await store.put_bytes(key, plan)
    except ObjectStoreError as exc:
        log.warning("could not upload the built engine", error=str(exc))
    await run(backend.load_plan, plan, options)
    log.info("tensorrt engine built and loaded", size=len(plan))
    return "built"


def _read_head(path: pathlib.Path, size: int = 4) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError as exc:
        raise BackendLoadError(f"cannot read artifact {path}: {exc}") from exc


# --- the backend -----------------------------------------------------------------------------------------


@dataclass
class _Tensor:
    name: str
    trt_dtype: str
    dtype: np.dtype
    shape: tuple[int, ...]
    batched: bool  # first dimension is dynamic


def _host_array(tensor: _Tensor, value: np.ndarray) -> np.ndarray:
    """`value` as a C-contiguous array of the tensor's host dtype (BF16: raw bits, never converted)."""
    array = np.asarray(value)
    if tensor.trt_dtype == "BF16" and array.dtype != tensor.dtype:
        if array.dtype.itemsize != 2:
            raise ValueError(f"input {tensor.name!r}: BF16 wants 2-byte raw values, got {array.dtype}")
        array = np.ascontiguousarray(array).view(np.uint16)
    return np.ascontiguousarray(array, dtype=tensor.dtype)


class TensorRTBackend(Backend):
    name: ClassVar[str] = "tensorrt"
    platform: ClassVar[str] = "tensorrt_plan"
    formats: ClassVar[frozenset[str]] = frozenset({ONNX_FORMAT, TENSORRT_PLAN_FORMAT})

    def __init__(self) -> None:
        self.inputs: list[TensorInfo] = []
        self.outputs: list[TensorInfo] = []
        # Largest batch one execution takes (the optimization profile's maximum); 0 when not batched.
        self.max_batch_size = 0
        self.gpu: cuda.GpuInfo | None = None
        self._lock = threading.Lock()
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: cuda.Stream | None = None
        self._buffers: dict[str, cuda.DeviceBuffer] = {}
        self._in: list[_Tensor] = []
        self._out: list[_Tensor] = []
        self._plan_bytes = 0
        self._engine_device_bytes = 0

    @classmethod
    def probe(cls) -> str | None:
        return _unavailable_reason()

    # -- load ---------------------------------------------------------------------------------------------

    def load(self, artifact: pathlib.Path, options: LoadOptions) -> None:
        if not options.use_gpu:
            raise BackendUnavailable("TensorRT runs only on a GPU, and this load asked for use_gpu=False")
        _require_tensorrt()
        try:
            data = pathlib.Path(artifact).read_bytes()
        except OSError as exc:
            raise BackendLoadError(f"cannot read artifact {artifact}: {exc}") from exc
        if artifact_format(data, options) == ONNX_FORMAT:
            data = build_engine(data, options)
        self.load_plan(data, options)

    async def load_shared(
        self,
        artifact: pathlib.Path,
        options: LoadOptions,
        *,
        store: ObjectStore,
        sha256: str,
        run: Runner,
    ) -> str | None:
        """ONNX artifacts go through the engine cache (`load_with_engine_cache`); plans load directly."""
        if not options.use_gpu:
            raise BackendUnavailable("TensorRT runs only on a GPU, and this load asked for use_gpu=False")
        await run(_require_tensorrt)
        head = await run(_read_head, pathlib.Path(artifact))
        if artifact_format(head, options) != ONNX_FORMAT:
            return None
        return await load_with_engine_cache(self, store, sha256, pathlib.Path(artifact), options, run=run)

    def load_plan(self, plan: bytes, options: LoadOptions | None = None) -> None:
        """Deserialize a plan (from build_engine or the engine cache) and prepare execution."""
        trt = _require_tensorrt()
        if not is_plan(plan):
            raise BackendLoadError("not a TensorRT plan (missing the engine's magic bytes)")
        with self._lock:
            if self._engine is not None:
                raise BackendLoadError("this backend instance already holds a model; unload it first")
            gpu = _select_gpu(options)
            logger = _logger(trt)
            mark = _bridge.mark()
            try:
                self._runtime = trt.Runtime(logger)
                engine = self._runtime.deserialize_cuda_engine(bytes(plan))
                if engine is None:
                    raise BackendLoadError(
                        _with_errors(
                            f"TensorRT {trt.__version__} could not deserialize the plan on {gpu.arch} (built by "
                            "another TensorRT version or for another GPU architecture?)",
                            mark,
                        )
                    )
                self._engine = engine
                self._context = engine.create_execution_context()
                if self._context is None:
                    raise BackendLoadError(_with_errors("TensorRT could not create an execution context", mark))
                self._describe(trt)
                self._stream = cuda.Stream()
                self.gpu = gpu
                self._plan_bytes = len(plan)
                size = getattr(engine, "device_memory_size_v2", None)
                if size is None:
                    size = getattr(engine, "device_memory_size", 0)
                self._engine_device_bytes = int(size or 0)
            except BackendLoadError:
                self._release()
                raise
            except cuda.CudaError as exc:
                self._release()
                raise BackendLoadError(f"CUDA error while loading the engine: {exc}") from exc
            except Exception as exc:
                self._release()
                raise BackendLoadError(_with_errors(f"TensorRT engine load failed: {exc}", mark)) from exc
        _log.info(
            "tensorrt engine loaded",
            gpu=gpu.arch,
            inputs=[(t.name, t.datatype, list(t.shape)) for t in self.inputs],
            outputs=[(t.name, t.datatype, list(t.shape)) for t in self.outputs],
            max_batch_size=self.max_batch_size,
        )

    def _describe(self, trt: ModuleType) -> None:
        engine = self._engine
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype_name = engine.get_tensor_dtype(name).name
            if dtype_name not in TRT_TO_PROTOCOL:
                raise BackendLoadError(f"tensor {name!r} has TensorRT type {dtype_name}, which this backend cannot exchange")
            location = getattr(engine, "get_tensor_location", None)
            if location is not None and location(name) == trt.TensorLocation.HOST:
                raise BackendLoadError(f"tensor {name!r} is a host (shape) tensor: not supported by this backend")
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            tensor = _Tensor(
                name=name,
                trt_dtype=dtype_name,
                dtype=PROTOCOL_TO_NUMPY[TRT_TO_PROTOCOL[dtype_name]],
                shape=shape,
                batched=bool(shape) and shape[0] < 0,
            )
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(tensor)
        if not inputs or not outputs:
            raise BackendLoadError("the engine has no inputs or no outputs")

        # The profile's maximum batch, and a check that outputs have shapes known from the inputs alone.
        max_batch = 0
        for tensor in inputs:
            if any(d < 0 for d in tensor.shape):
                low, _opt, high = (tuple(s) for s in engine.get_tensor_profile_shape(tensor.name, 0))
                if tensor.batched:
                    max_batch = high[0] if max_batch == 0 else min(max_batch, high[0])
                if not self._context.set_input_shape(tensor.name, high):
                    raise BackendLoadError(f"input {tensor.name!r} rejects its own profile shape {list(high)}")
        for tensor in outputs:
            resolved = tuple(int(d) for d in self._context.get_tensor_shape(tensor.name))
            if any(d < 0 for d in resolved):
                raise BackendLoadError(
                    f"output {tensor.name!r} has a data-dependent shape {list(resolved)}: not supported by this backend"
                )
        self._in, self._out = inputs, outputs
        self.max_batch_size = max_batch
        self.inputs = [TensorInfo(t.name, TRT_TO_PROTOCOL[t.trt_dtype], t.shape) for t in inputs]
        self.outputs = [TensorInfo(t.name, TRT_TO_PROTOCOL[t.trt_dtype], t.shape) for t in outputs]

    # -- infer --------------------------------------------------------------------------------------------

    def max_rows(self) -> int | None:
        """None: any batch works, since batches beyond the profile's maximum run in profile-sized parts."""
        return None

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            if self._context is None or self._stream is None or self.gpu is None:
                raise RuntimeError("no TensorRT engine is loaded")
            known = {t.name for t in self._out}
            unknown = [n for n in output_names if n not in known]
            if unknown:
                raise ValueError(f"unknown output(s) {unknown}: the model has {sorted(known)}")
            missing = [t.name for t in self._in if t.name not in inputs]
            if missing:
                raise ValueError(f"missing input(s) {missing}")
            arrays = {t.name: _host_array(t, inputs[t.name]) for t in self._in}
            wanted = list(output_names) or [t.name for t in self._out]
            cuda.set_device(self.gpu.index)

            batched = [t for t in self._in if t.batched]
            batch = arrays[batched[0].name].shape[0] if batched and arrays[batched[0].name].ndim else 0
            if batched and self.max_batch_size and batch > self.max_batch_size:
                parts = [
                    self._execute({n: (a[i : i + self.max_batch_size] if self._is_batched(n) else a)
                                   for n, a in arrays.items()}, wanted)
                    for i in range(0, batch, self.max_batch_size)
                ]
                return {name: np.concatenate([p[name] for p in parts], axis=0) for name in wanted}
            return self._execute(arrays, wanted)

    def _is_batched(self, name: str) -> bool:
        return any(t.name == name and t.batched for t in self._in)

    def _execute(self, arrays: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        context, stream = self._context, self._stream
        assert context is not None and stream is not None
        try:
            for tensor in self._in:
                array = arrays[tensor.name]
                if not any(d < 0 for d in tensor.shape):
                    if array.shape != tensor.shape:
                        raise ValueError(
                            f"input {tensor.name!r}: shape {list(array.shape)} does not match the engine's "
                            f"{list(tensor.shape)}"
                        )
                elif not context.set_input_shape(tensor.name, array.shape):
                    raise ValueError(
                        f"input {tensor.name!r}: shape {list(array.shape)} is outside what the engine accepts "
                        f"({list(tensor.shape)}, batch <= {self.max_batch_size})"
                    )
                buffer = self._buffer(tensor, array.nbytes, array.shape[0] if array.ndim else 0)
                buffer.copy_from_host(array, stream)
                context.set_tensor_address(tensor.name, buffer.ptr)
            results: dict[str, np.ndarray] = {}
            for tensor in self._out:
                shape = tuple(int(d) for d in context.get_tensor_shape(tensor.name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"output {tensor.name!r} shape unresolved: {list(shape)}")
                host = np.empty(shape, dtype=tensor.dtype)
                buffer = self._buffer(tensor, host.nbytes, shape[0] if shape else 0)
                context.set_tensor_address(tensor.name, buffer.ptr)
                if tensor.name in wanted:
                    results[tensor.name] = host
            mark = _bridge.mark()
            if not context.execute_async_v3(stream.handle):
                raise RuntimeError(_with_errors("TensorRT execution failed", mark))
            for name, host in results.items():
                self._buffers[name].copy_to_host(host, stream)
            stream.synchronize()
        except cuda.CudaError as exc:
            raise RuntimeError(f"CUDA error during inference: {exc}") from exc
        return {name: results[name] for name in wanted}

    def _buffer(self, tensor: _Tensor, nbytes: int, batch: int) -> cuda.DeviceBuffer:
        """The tensor's device buffer, re-allocated only when it is too small for `nbytes`."""
        buffer = self._buffers.get(tensor.name)
        if buffer is not None and buffer.nbytes >= nbytes:
            return buffer
        capacity = nbytes
        if tensor.batched and batch > 0 and self.max_batch_size:
            capacity = max(nbytes, nbytes // batch * batch_capacity(batch, self.max_batch_size))
        if buffer is not None:
            del self._buffers[tensor.name]
            buffer.free()
        self._buffers[tensor.name] = buffer = cuda.DeviceBuffer(capacity)
        return buffer

    # -- unload, memory -----------------------------------------------------------------------------------

    def unload(self) -> None:
        with self._lock:
            self._release()

    def _release(self) -> None:
        """Free buffers, stream, context, engine and runtime (in that order). Idempotent."""
        if self.gpu is not None and cuda.detect_gpus():
            try:
                cuda.set_device(self.gpu.index)
            except cuda.CudaError:
                pass
        buffers, self._buffers = self._buffers, {}
        for buffer in buffers.values():
            try:
                buffer.free()
            except cuda.CudaError as exc:
                _log.warning("could not free a device buffer", error=str(exc))
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.destroy()
            except cuda.CudaError as exc:
                _log.warning("could not destroy a CUDA stream", error=str(exc))
        self._context = None
        self._engine = None
        self._runtime = None
        self._in, self._out = [], []
        self.inputs, self.outputs = [], []
        self.max_batch_size = 0
        self.gpu = None
        self._plan_bytes = 0
        self._engine_device_bytes = 0

    def memory_bytes(self) -> int:
        """Device memory held: engine weights (≈ plan size) + execution memory + I/O buffers."""
        with self._lock:
            if self._engine is None:
                return 0
            return self._plan_bytes + self._engine_device_bytes + sum(b.nbytes for b in self._buffers.values())
