"""The backend interface: the small surface every execution engine implements.

Batching, statistics, tracing and request validation live outside backends (in the data plane),
so a backend only loads an artifact, runs one (possibly merged) batch, and reports its memory.
"""

from __future__ import annotations

import abc
import pathlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from services.common.objectstore.base import ObjectStore

# `run(fn, *args)`: run blocking `fn(*args)` on the model's own thread and await its result.
Runner = Callable[..., Awaitable[Any]]


class BackendUnavailable(RuntimeError):
    """This node cannot run the backend (library or device missing); the message says which."""


class BackendLoadError(RuntimeError):
    """The artifact could not be loaded (corrupt, unsupported operator, incompatible plan, ...)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    # Open Inference Protocol datatype: BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BF16, BYTES.
    datatype: str
    # Full model shape including any batch dimension; -1 is dynamic.
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LoadOptions:
    # "FP32" | "FP16" | "INT8": what TensorRT builds; ONNX Runtime runs the graph as written.
    precision: str = "FP32"
    # Largest batch the batcher will send; TensorRT sizes its optimization profile from it.
    max_batch_size: int = 32
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # Use a GPU when the backend supports one and one is present.
    use_gpu: bool = True
    extra: dict[str, str] = field(default_factory=dict)


class Backend(abc.ABC):
    """One loaded model version. Methods are blocking; the data plane runs them off the event loop."""

    # Short name used in node records and settings: "onnxruntime", "tensorrt".
    name: ClassVar[str]
    # Open Inference Protocol platform string: "onnxruntime_onnx", "tensorrt_plan".
    platform: ClassVar[str]
    # Artifact formats load() accepts ("onnx", "tensorrt_plan"); the data plane picks a backend by it.
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})
    # BYTES tensors travel as Python str (UTF-8 text) instead of bytes: ONNX Runtime's string tensors
    # are text. The data plane converts per request, so a non-UTF-8 element fails only its request.
    bytes_as_text: ClassVar[bool] = False

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> str | None:
        """None when this node can run the backend, else the reason it cannot (for logs and FAILED)."""

    @abc.abstractmethod
    def load(self, artifact: pathlib.Path, options: LoadOptions) -> None:
        """Load the artifact; fills `inputs`/`outputs`. Raises BackendLoadError or BackendUnavailable."""

    async def load_shared(
        self,
        artifact: pathlib.Path,
        options: LoadOptions,
        *,
        store: ObjectStore,
        sha256: str,
        run: Runner,
    ) -> str | None:
        """Optional: load through a form of the artifact built once and shared by every node in the
        object store (TensorRT engines per GPU architecture). The data plane calls it in mesh mode, where
        `sha256` is the verified digest of `artifact`, before falling back to `load()`.

        Returns how the shared form was obtained ("cache" or "built"), or None when this backend shares
        nothing for this artifact (the default) and `load()` should be used. Blocking work goes through
        `run` (the model's own thread). Object-store failures must not fail the load; load errors raise
        like `load()`.
        """
        return None

    @property
    def batch_dimension(self) -> bool:
        """True when every input and output has a dynamic first dimension that rows can be merged on."""
        tensors = [*self.inputs, *self.outputs]
        return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)

    def max_rows(self) -> int | None:
        """Largest batch one execution accepts (e.g. a TensorRT optimization profile); None: any.

        A request with more rows than this is rejected; one with more rows than the batcher's
        max_batch_size but within this limit runs alone.
        """
        return None

    @abc.abstractmethod
    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run one batch. Inputs are validated and of the declared dtypes (after `prepare_request`,
        if the backend has one); returns the named outputs."""

    # Optional per-request step before batching (task models: check texts, decode images):
    # `prepare_request(inputs in signature order, request parameters) -> inputs for infer()`, raising
    # InvalidArgument for that request alone. None: requests go to the batcher as decoded.
    prepare_request: Callable[[list[np.ndarray], Mapping[str, Any]], list[np.ndarray]] | None = None

    def prepare_off_loop(self, inputs: list[np.ndarray], parameters: Mapping[str, Any]) -> bool:
        """True: this request's prepare_request is heavy (images to decode, a long text to count) and
        runs on the data plane's preprocessing threads instead of the event loop."""
        return False

    def sample_inputs(self) -> dict[str, np.ndarray]:
        """What the warm-up inference after a load runs (in infer()'s form): zeros, empty texts,
        every dynamic dimension 1."""
        feeds = {}
        for tensor in self.inputs:
            shape = tuple(1 if dim < 0 else dim for dim in tensor.shape)
            if tensor.datatype == "BYTES":
                feeds[tensor.name] = np.full(shape, "" if self.bytes_as_text else b"", dtype=object)
            else:
                feeds[tensor.name] = np.zeros(shape, dtype=_numpy_dtype(tensor.datatype))
        return feeds

    @abc.abstractmethod
    def unload(self) -> None:
        """Release every resource (sessions, device memory). Idempotent."""

    @abc.abstractmethod
    def memory_bytes(self) -> int:
        """Host (and device, for GPU backends) memory this model holds, measured after load."""


def _numpy_dtype(datatype: str) -> np.dtype:
    from services.inference.tensors import DATATYPES

    return DATATYPES[datatype].dtype
