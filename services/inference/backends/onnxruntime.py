"""ONNX Runtime backend: the CPU default, and the CUDA execution provider when a GPU is usable.

Memory is measured as the growth of this process's resident set while the session is created
(weights, optimized graph, arena pre-allocations), floored at the artifact size. Loads running at the
same time inflate each other's figure; the data plane loads one model at a time per node when it
can, and the figure is an estimate for placement, not an accounting.
"""

from __future__ import annotations

import ctypes
import pathlib
from typing import Any, ClassVar

import numpy as np
import psutil

from services.inference.backends.base import Backend, BackendLoadError, BackendUnavailable, LoadOptions, TensorInfo
from services.inference.tensors import DATATYPES

# ONNX element type names (as ONNX Runtime reports them) → protocol datatypes.
_ONNX_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}
# onnx.TensorProto.BFLOAT16, without importing onnx on the hot path.
_ONNX_BFLOAT16 = 16
_BF16 = DATATYPES["BF16"].dtype


def _tensor_info(arg: Any, kind: str) -> TensorInfo:
    datatype = _ONNX_TYPES.get(arg.type)
    if datatype is None:
        raise BackendLoadError(
            f"{kind} '{arg.name}' has type {arg.type}, which the Open Inference Protocol cannot carry"
        )
    # Symbolic ("batch") and unknown (None) dimensions are dynamic.
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or ()))
    return TensorInfo(name=arg.name, datatype=datatype, shape=shape)


def _direct_run_requirements(session: Any) -> frozenset[str] | None:
    """The inputs a run needs for the binding to be called directly (InferenceSession.run checks
    these first and raises its own error when one is missing); None: always use
    InferenceSession.run, because this session needs what only it does (WebGPU graph capture
    rejects plain runs) or this onnxruntime lacks the expected internals."""
    binding = getattr(session, "_sess", None)
    if binding is None or not hasattr(binding, "run"):
        return None
    capture = getattr(binding, "is_webgpu_graph_capture_enabled", None)
    if capture is not None and capture():
        return None
    return frozenset(arg.name for arg in session.get_inputs() if not arg.type.startswith("optional"))


class OnnxRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    platform: ClassVar[str] = "onnxruntime_onnx"
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})
    bytes_as_text: ClassVar[bool] = True

    def __init__(self) -> None:
        self.inputs: list[TensorInfo] = []
        self.outputs: list[TensorInfo] = []
        self.providers: list[str] = []
        self._session: Any = None
        self._memory = 0
        # BF16 has no numpy type ONNX Runtime knows: such models run through OrtValues.
        self._needs_ort_values = False
        # Inputs the model cannot run without; None: always go through InferenceSession.run.
        self._required: frozenset[str] | None = None
        # onnxruntime's execution provider failure, which InferenceSession.run answers with a fallback.
        self._ep_fail: type[Exception] = Exception

    @classmethod
    def probe(cls) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"onnxruntime is not installed ({exc}); install aimaas[cpu]"
        return None

    def load(self, artifact: pathlib.Path, options: LoadOptions) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime is not installed ({exc}); install aimaas[cpu]") from exc
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        if options.inter_op_threads > 1:
            # Inter-op threads only run independent graph branches in parallel mode.
            session_options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        session_options.log_severity_level = 3
        # Spinning worker threads would burn the cores the event loop and other models need between
        # requests; "1" trades that for a little latency on a dedicated box.
        spinning = options.extra.get("intra_op_spinning", "0")
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session_options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        providers = ["CPUExecutionProvider"]
        if options.use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")

        process = psutil.Process()
        before = process.memory_info().rss
        try:
            session = ort.InferenceSession(str(artifact), sess_options=session_options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several unrelated types
            raise BackendLoadError(f"ONNX Runtime cannot load {artifact.name}: {exc}") from exc
        grown = process.memory_info().rss - before
        inputs = [_tensor_info(arg, "input") for arg in session.get_inputs()]
        outputs = [_tensor_info(arg, "output") for arg in session.get_outputs()]
        self._session = session
        self.inputs, self.outputs = inputs, outputs
        self.providers = list(session.get_providers())
        self._needs_ort_values = any(t.datatype == "BF16" for t in (*inputs, *outputs))
        self._memory = max(grown, artifact.stat().st_size)
        self._required = _direct_run_requirements(session)
        ep_fail = getattr(ort.capi.onnxruntime_pybind11_state, "EPFail", None)
        if ep_fail is None:
            self._required = None
        else:
            self._ep_fail = ep_fail

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise RuntimeError("the model is not loaded")
        if self._needs_ort_values:
            return self._infer_ort_values(inputs, output_names)
        required = self._required
        if required is None or not output_names or not inputs.keys() >= required:
            return dict(zip(output_names, session.run(output_names, inputs)))
        # Fast path, for speed: the binding directly. InferenceSession.run's Python checks cost about
        # a third of a small model's run; the ones that can matter here are settled at load (graph
        # capture, see _direct_run_requirements) or just above (a missing required input or an empty
        # output list takes the wrapper, so its errors and defaults stay exactly as they were). The
        # inputs are numpy arrays, never OrtValues of another session. An execution provider failure
        # goes back through the wrapper for its provider fallback.
        try:
            results = session._sess.run(output_names, inputs, None)
        except self._ep_fail:
            if not getattr(session, "_enable_fallback", True):
                raise
            results = session.run(output_names, inputs)  # retries, then falls back to other providers
        return dict(zip(output_names, results))

    def _infer_ort_values(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        feeds = {}
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            if array.dtype == _BF16:
                feeds[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), _ONNX_BFLOAT16)
            else:
                feeds[name] = ort.OrtValue.ortvalue_from_numpy(array)
        results = {}
        for name, value in zip(output_names, self._session.run_with_ort_values(output_names, feeds)):
            if value.data_type() == "tensor(bfloat16)":
                shape = tuple(value.shape())
                count = int(np.prod(shape, dtype=np.int64))
                buffer = (ctypes.c_uint16 * count).from_address(value.data_ptr()) if count else b""
                # Copy out of the OrtValue before it is freed.
                results[name] = np.frombuffer(buffer, dtype=np.uint16).copy().view(_BF16).reshape(shape)
            else:
                results[name] = value.numpy()
        return results

    def unload(self) -> None:
        self._session = None

    def memory_bytes(self) -> int:
        return self._memory
