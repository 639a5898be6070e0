"""Guarded CUDA access through NVIDIA's `cuda-bindings` (CUDA Python) runtime API.

Importing this module never touches CUDA and never raises: `cuda-bindings` is imported lazily, and
every failure (package missing, no driver, driver too old, no device) becomes an empty
`detect_gpus()` plus a precise `gpu_unavailable_reason()`. A node uses that to decide which
backends it advertises.

The small device-memory helpers (`Stream`, `DeviceBuffer`) are what the TensorRT backend runs on:
allocate/free, host↔device copies on a stream, synchronize. Every CUDA error becomes a `CudaError`
naming the call and the CUDA error (`cudaErrorMemoryAllocation: out of memory`).

Calls follow the cuda-bindings convention: each runtime function returns a tuple whose first item is
a `cudaError_t`, followed by the outputs (`err, ptr = cudaMalloc(n)`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

INSTALL_HINT = "pip install aimaas[gpu]"

_lock = threading.Lock()
# (module or None, reason when None); filled on first use.
_runtime_cache: tuple[ModuleType | None, str | None] | None = None
# (gpus, reason when empty); filled by the first detect_gpus().
_detect_cache: tuple[tuple[GpuInfo, ...], str | None] | None = None


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and the CUDA error."""


class CudaUnavailable(CudaError):
    """cuda-bindings, the driver or a device is missing; the message says which."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    # "sm_<major><minor>", e.g. "sm_90" for an H100: the key TensorRT engines are cached under.
    arch: str
    total_memory_bytes: int
    compute_capability: tuple[int, int] = (0, 0)


def arch_string(major: int, minor: int) -> str:
    """Compute capability → the usual architecture name: (9, 0) → "sm_90", (12, 0) → "sm_120"."""
    if major < 0 or not 0 <= minor <= 9:
        raise ValueError(f"invalid compute capability {major}.{minor}")
    return f"sm_{major}{minor}"


def has_fast_fp16(major: int, minor: int) -> bool:
    """Whether the architecture runs FP16 arithmetic at least at FP32 rate.

    sm_53, sm_60 and sm_62 do; other Maxwell/Pascal parts (sm_50..52, sm_61) run FP16 slowly;
    every architecture from Volta (sm_70) on does.
    """
    return major >= 7 or (major, minor) in {(5, 3), (6, 0), (6, 2)}


def cuda_version_string(version: int) -> str:
    """CUDA's integer version (1000*major + 10*minor) as "major.minor": 12040 → "12.4"."""
    return f"{version // 1000}.{(version % 1000) // 10}"


# --- the cuda-bindings runtime module -------------------------------------------------------------


def _import_runtime() -> ModuleType:
    """The cuda-bindings runtime module: `cuda.bindings.runtime`, or the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime  # cuda-bindings >= 12.6

        return runtime
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6 layout

        return cudart


def _runtime_module() -> tuple[ModuleType | None, str | None]:
    global _runtime_cache
    with _lock:
        if _runtime_cache is None:
            try:
                _runtime_cache = (_import_runtime(), None)
            except ImportError:
                _runtime_cache = (None, f"cuda-bindings is not installed ({INSTALL_HINT})")
            except Exception as exc:  # a broken install must not take the node down
                _runtime_cache = (None, f"cuda-bindings failed to import: {type(exc).__name__}: {exc}")
        return _runtime_cache


def runtime() -> ModuleType:
    """The cuda-bindings runtime module, or CudaUnavailable with the reason."""
    module, reason = _runtime_module()
    if module is None:
        raise CudaUnavailable(reason or "cuda-bindings is unavailable")
    return module


def _error_text(rt: ModuleType, err: Any) -> str:
    try:
        name = rt.cudaGetErrorName(err)[1]
        text = rt.cudaGetErrorString(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        text = text.decode() if isinstance(text, bytes) else str(text)
        return f"{name}: {text}"
    except Exception:
        return str(err)


def _is_success(rt: ModuleType, err: Any) -> bool:
    return err == rt.cudaError_t.cudaSuccess


def call(what: str, fn: Any, *args: Any) -> Any:
    """Run a runtime call, raise CudaError on failure; return None, its one output, or a tuple."""
    rt = runtime()
    try:
        result = fn(*args)
    except CudaError:
        raise
    except Exception as exc:  # bindings raise for bad arguments or an unloadable driver
        raise CudaError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, tuple):
        result = (result,)
    err, outputs = result[0], result[1:]
    if not _is_success(rt, err):
        raise CudaError(f"{what} failed: {_error_text(rt, err)}")
    if not outputs:
        return None
    return outputs[0] if len(outputs) == 1 else outputs


# --- detection ------------------------------------------------------------------------------------


def _detect() -> tuple[tuple[GpuInfo, ...], str | None]:
    module, reason = _runtime_module()
    if module is None:
        return (), reason
    rt = module
    try:
        result = rt.cudaGetDeviceCount()
        err, count = result[0], result[1]
        if not _is_success(rt, err):
            return (), _device_count_reason(rt, err)
        if count == 0:
            return (), "no CUDA-capable device is detected"
        gpus = []
        for index in range(count):
            props = call(f"cudaGetDeviceProperties({index})", rt.cudaGetDeviceProperties, index)
            name = props.name
            if isinstance(name, bytes):
                name = name.split(b"\0", 1)[0].decode(errors="replace")
            major, minor = int(props.major), int(props.minor)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=str(name).strip(),
                    arch=arch_string(major, minor),
                    total_memory_bytes=int(props.totalGlobalMem),
                    compute_capability=(major, minor),
                )
            )
        return tuple(gpus), None
    except Exception as exc:
        return (), f"CUDA device query failed: {type(exc).__name__}: {exc}"


def _device_count_reason(rt: ModuleType, err: Any) -> str:
    text = _error_text(rt, err)
    names = rt.cudaError_t
    if err == getattr(names, "cudaErrorNoDevice", None):
        return "no CUDA-capable device is detected"
    if err == getattr(names, "cudaErrorInsufficientDriver", None):
        driver = _version(rt.cudaDriverGetVersion)
        bindings = _version(rt.cudaRuntimeGetVersion)
        if not driver:
            return f"no NVIDIA driver is installed (libcuda could not be loaded; {text})"
        needed = f" but cuda-bindings is built for CUDA {cuda_version_string(bindings)}" if bindings else ""
        return (
            f"the NVIDIA driver supports CUDA {cuda_version_string(driver)}{needed}: upgrade the driver "
            f"or install a cuda-bindings release matching it ({text})"
        )
    return f"CUDA initialization failed ({text})"


def _version(fn: Any) -> int:
    try:
        result = fn()
        return int(result[1]) if len(result) > 1 else 0
    except Exception:
        return 0


def detect_gpus(*, refresh: bool = False) -> list[GpuInfo]:
    """The CUDA devices this process can use; [] (never an exception) when there are none.

    The result is cached for the process (devices do not come and go under a running process);
    `refresh=True` queries again.
    """
    global _detect_cache
    if refresh or _detect_cache is None:
        detected = _detect()
        with _lock:
            _detect_cache = detected
    assert _detect_cache is not None
    return list(_detect_cache[0])


def gpu_unavailable_reason() -> str | None:
    """None when detect_gpus() found a device, else why not (package, driver or device)."""
    if _detect_cache is None:
        detect_gpus()
    assert _detect_cache is not None
    return _detect_cache[1]


def reset_detection_cache() -> None:
    """Forget the cached import and detection results (tests, or after installing cuda-bindings)."""
    global _runtime_cache, _detect_cache
    with _lock:
        _runtime_cache = None
        _detect_cache = None


# --- device state and memory ----------------------------------------------------------------------


def set_device(index: int) -> None:
    """Make `index` the current device of the calling thread (CUDA's current device is per thread)."""
    rt = runtime()
    call(f"cudaSetDevice({index})", rt.cudaSetDevice, int(index))


def memory_info(index: int | None = None) -> tuple[int, int]:
    """(free, total) bytes of device memory on `index` (default: the current device)."""
    rt = runtime()
    if index is not None:
        set_device(index)
    free, total = call("cudaMemGetInfo", rt.cudaMemGetInfo)
    return int(free), int(total)


class Stream:
    """A dedicated non-blocking CUDA stream (does not serialize with the legacy default stream)."""

    def __init__(self) -> None:
        rt = runtime()
        flags = getattr(rt, "cudaStreamNonBlocking", 1)
        self._stream: Any = call("cudaStreamCreateWithFlags", rt.cudaStreamCreateWithFlags, int(flags))

    @property
    def handle(self) -> int:
        """The raw cudaStream_t address, as TensorRT's execute_async_v3 takes it."""
        if self._stream is None:
            raise CudaError("stream is destroyed")
        return int(self._stream)

    @property
    def native(self) -> Any:
        if self._stream is None:
            raise CudaError("stream is destroyed")
        return self._stream

    def synchronize(self) -> None:
        rt = runtime()
        call("cudaStreamSynchronize", rt.cudaStreamSynchronize, self.native)

    def destroy(self) -> None:
        """Idempotent."""
        stream, self._stream = self._stream, None
        if stream is not None:
            call("cudaStreamDestroy", runtime().cudaStreamDestroy, stream)


class DeviceBuffer:
    """`nbytes` of linear device memory (cudaMalloc); `free()` is idempotent."""

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"buffer size must be >= 0, got {nbytes}")
        self.nbytes = int(nbytes)
        rt = runtime()
        # cudaMalloc(0) may return a null pointer, which TensorRT rejects as a tensor address.
        try:
            self._ptr: int | None = int(call(f"cudaMalloc({max(1, self.nbytes)})", rt.cudaMalloc, max(1, self.nbytes)))
        except CudaError as exc:
            raise CudaError(f"could not allocate {self.nbytes} bytes of device memory: {exc}") from exc

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise CudaError("device buffer is freed")
        return self._ptr

    def copy_from_host(self, array: np.ndarray, stream: Stream) -> None:
        """Queue a host→device copy of the C-contiguous `array` on `stream`."""
        rt = runtime()
        self._check_fits(array)
        if array.nbytes:
            call(
                "cudaMemcpyAsync(host→device)",
                rt.cudaMemcpyAsync,
                self.ptr,
                array.ctypes.data,
                array.nbytes,
                rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                stream.native,
            )

    def copy_to_host(self, array: np.ndarray, stream: Stream) -> None:
        """Queue a device→host copy into the C-contiguous `array`; valid after stream.synchronize()."""
        rt = runtime()
        self._check_fits(array)
        if not array.flags.writeable:
            raise ValueError("destination array is read-only")
        if array.nbytes:
            call(
                "cudaMemcpyAsync(device→host)",
                rt.cudaMemcpyAsync,
                array.ctypes.data,
                self.ptr,
                array.nbytes,
                rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                stream.native,
            )

    def _check_fits(self, array: np.ndarray) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("host array must be C-contiguous")
        if array.nbytes > self.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a {self.nbytes}-byte device buffer")

    def free(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            call("cudaFree", runtime().cudaFree, ptr)

    def __repr__(self) -> str:
        state = "freed" if self._ptr is None else hex(self._ptr)
        return f"DeviceBuffer({self.nbytes} bytes, {state})"
