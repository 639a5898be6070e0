"""The data plane of an inference node: the loaded models and the request path, shared by transports.

`DataPlane` owns every loaded model version (name → version → instance: backend, batcher, stats,
state). Transports (the gRPC servicer; a REST edge could reuse it) translate protocol calls into its
methods; the node agent (mesh mode) and the directory repository (standalone mode) drive loading.

Request path: resolve the version (NotFound / Unavailable) → decode the tensors (services.inference.
tensors) → validate them against the model's signature, precomputed at load → the model's batcher →
its executor thread → response. Every caller error is a precise InvalidArgument naming the tensor.

Versions are strings; when a request names none, the highest READY version serves it (numeric
versions compare as numbers, others as text after all numeric ones).

Mesh mode passes the object store (`engine_store`) and each spec's verified `sha256`: a backend that
builds a device-specific form of the artifact (TensorRT engines) then loads through the shared cache
in the store (`Backend.load_shared`), so one node of a GPU kind builds and the others fetch.

With a monitor configured (`monitor_address`), every model's statistics keep per-interval windows
that the stats reporter collects with `close_stats_windows()`; the last window of an unloaded or
replaced instance is kept for it, so no request goes unreported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import pathlib
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
from opentelemetry import context as otel_context
from prometheus_client import CollectorRegistry

from aimaas.tasks import CONFIG_PARAMETER, InvalidTaskManifest, TaskManifest, public_json
from inference import grpc_predict_v2_pb2 as pb
from services.common.errors import AimaasError, InvalidArgument, NotFound, Unavailable
from services.common.tracing import Telemetry
from services.inference.backends import probe_backends
from services.inference.backends.base import Backend, LoadOptions, TensorInfo
from services.inference.backends.task import TaskBackend, read_task
from services.inference.batcher import Batcher, BatchPolicy, ExecutionFailed
from services.inference.settings import BatchingDefaults, InferenceServerSettings
from services.inference.stats import ClosedWindow, InferenceCollector, ModelStats
from services.inference.tensors import DATATYPES, add_output, datatype_of, decode_inputs, format_shape

if TYPE_CHECKING:
    from services.common.objectstore import ObjectStore

FORMATS = ("onnx", "tensorrt_plan")
# Statistics of retired instances kept until the stats reporter takes their last window.
_RETIRED_STATS = 4096

__all__ = [
    "DataPlane",
    "ExecutionFailed",
    "IndexEntry",
    "LoadedModelInfo",
    "ModelLoadFailed",
    "ModelSpec",
    "ModelState",
]


class ModelState(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelSpec:
    name: str
    version: str
    artifact: pathlib.Path
    # "onnx" | "tensorrt_plan"
    format: str = "onnx"
    # None: the first available backend in settings.backends order that accepts the format.
    backend: str | None = None
    options: LoadOptions = field(default_factory=LoadOptions)
    # None: the node's settings.batching.
    batching: BatchingDefaults | None = None
    labels: dict[str, str] = field(default_factory=dict)
    # Verified sha256 of the artifact (mesh mode): enables the shared engine cache in the object store.
    sha256: str = ""


@dataclass
class LoadedModelInfo:
    backend: str
    memory_bytes: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


class ModelLoadFailed(Exception):
    """A load failed; `reason` is what RepositoryIndex and the node's status say."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: ModelState
    reason: str = ""


def version_key(version: str) -> tuple[int, int, str]:
    """Sort key: numeric versions by value, then the others as text."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def _label(name: str, version: str) -> str:
    return f"model '{name}' version {version}"


# ------------------------------------------------------------------------------------ one instance


class _Signature:
    """What a request must look like, computed once at load so validation does no rebuilding."""

    def __init__(self, label: str, backend: Backend, batch_dimension: bool) -> None:
        self.label = label
        self.names = tuple(t.name for t in backend.inputs)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.datatypes = tuple(t.datatype for t in backend.inputs)
        self.dtypes = tuple(DATATYPES[t.datatype].dtype for t in backend.inputs)
        self.shapes = tuple(t.shape for t in backend.inputs)
        self.ranks = tuple(len(t.shape) for t in backend.inputs)
        # (axis, size) of every fixed dimension; the batch axis is dynamic by construction.
        self.fixed = tuple(tuple((a, d) for a, d in enumerate(t.shape) if d >= 0) for t in backend.inputs)
        self.text = tuple(backend.bytes_as_text and t.datatype == "BYTES" for t in backend.inputs)
        self.any_text = any(self.text)
        self.batch_dimension = batch_dimension
        # Merge keys are needed only when some non-batch dimension is dynamic.
        self.variable = batch_dimension and any(-1 in t.shape[1:] for t in backend.inputs)
        self.outputs = tuple(t.name for t in backend.outputs)
        self.output_set = frozenset(self.outputs)
        self.inputs_text = ", ".join(self.names) or "none"
        # Names are unique (checked at load), so "the request has exactly these inputs" is one
        # set comparison.
        self.name_set = frozenset(self.names)
        # Per input, what prepare() checks: (index, name, dtype, rank, fixed dimensions).
        self.checks = tuple(zip(range(len(self.names)), self.names, self.dtypes, self.ranks, self.fixed))
        self.outputs_text = ", ".join(self.outputs) or "none"

    def prepare(self, request: pb.ModelInferRequest) -> tuple[list[np.ndarray], int, Any, tuple[str, ...]]:
        """Decoded inputs in model order, their row count, merge key, and the outputs to return."""
        arrays = decode_inputs(request)
        names = self.names
        if arrays.keys() != self.name_set:
            for name in arrays:
                if name not in self.index:
                    raise InvalidArgument(f"unknown input '{name}' for {self.label} (its inputs: {self.inputs_text})")
            for name in names:
                if name not in arrays:
                    raise InvalidArgument(f"missing input '{name}' for {self.label} (its inputs: {self.inputs_text})")
        ordered: list[np.ndarray] = []
        rows = 1
        for i, name, dtype, rank, fixed in self.checks:
            array = arrays[name]
            if array.dtype != dtype:
                raise InvalidArgument(
                    f"input '{name}' has datatype {datatype_of(array.dtype).name} but {self.label} "
                    f"expects {self.datatypes[i]}"
                )
            shape = array.shape
            # A plain loop rather than any(<generator>): this runs for every input of every request.
            mismatch = len(shape) != rank
            if not mismatch:
                for axis, size in fixed:
                    if shape[axis] != size:
                        mismatch = True
                        break
            if mismatch:
                raise InvalidArgument(
                    f"input '{name}' has shape {format_shape(shape)} but {self.label} expects "
                    f"{format_shape(self.shapes[i])} (-1: any size)"
                )
            if self.batch_dimension:
                if i == 0:
                    rows = shape[0]
                    if rows == 0:
                        raise InvalidArgument(f"input '{name}' has an empty batch dimension (0 rows)")
                elif shape[0] != rows:
                    raise InvalidArgument(
                        f"inputs disagree on the batch size: '{names[0]}' has {rows} rows but '{name}' has {shape[0]}"
                    )
            if self.any_text and self.text[i]:
                array = _as_text(name, array)
            ordered.append(array)
        key = tuple(a.shape[1:] for a in ordered) if self.variable else None
        if not request.outputs:
            return ordered, rows, key, self.outputs
        wanted = tuple(o.name for o in request.outputs)
        for name in wanted:
            if name not in self.output_set:
                raise InvalidArgument(
                    f"unknown requested output '{name}' for {self.label} (its outputs: {self.outputs_text})"
                )
        if len(set(wanted)) != len(wanted):
            duplicate = next(n for n in wanted if wanted.count(n) > 1)
            raise InvalidArgument(f"output '{duplicate}' is requested more than once")
        return ordered, rows, key, wanted


def _as_text(name: str, array: np.ndarray) -> np.ndarray:
    flat = array.ravel()
    text = np.empty(flat.shape, dtype=object)
    try:
        text[:] = [item.decode("utf-8") for item in flat.tolist()]
    except UnicodeDecodeError:
        index = next(i for i, item in enumerate(flat.tolist()) if not _is_utf8(item))
        raise InvalidArgument(
            f"input '{name}': BYTES element {index} is not valid UTF-8, and this model's backend takes text"
        ) from None
    return text.reshape(array.shape)


def _is_utf8(item: bytes) -> bool:
    try:
        item.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Instance:
    """One loaded model version: backend, executor thread, batcher, statistics, static metadata."""

    def __init__(
        self,
        spec: ModelSpec,
        fingerprint: tuple[str, int, int],
        backend: Backend,
        executor: ThreadPoolExecutor,
        batching: BatchingDefaults,
        tracer: Any,
        logger: structlog.stdlib.BoundLogger,
        windowed: bool = False,
        inline_below_us: int = 0,
    ) -> None:
        self.spec = spec
        self.fingerprint = fingerprint
        self.name = spec.name
        self.version = spec.version
        self.label = _label(spec.name, spec.version)
        self.backend = backend
        self.executor = executor
        self.inflight = 0
        self.retiring = False
        self.idle = asyncio.Event()
        batch_dimension = backend.batch_dimension
        merge = batching.enabled and batch_dimension
        self.signature = _Signature(self.label, backend, batch_dimension)
        memory = backend.memory_bytes()
        gpu = backend.name == "tensorrt" or "CUDAExecutionProvider" in getattr(backend, "providers", ())
        self.stats = ModelStats(
            spec.name, spec.version, backend=backend.name, memory_bytes=memory,
            memory_type="GPU" if gpu else "CPU", windowed=windowed,
        )
        self.stats.in_flight = lambda: self.inflight
        self.policy = BatchPolicy(
            merge=merge,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_us / 1e6,
            max_queue_size=batching.max_queue_size,
            queue_timeout_s=batching.default_timeout_ms / 1000 if batching.default_timeout_ms else None,
            max_rows=backend.max_rows(),
            inline_below_s=inline_below_us / 1e6,
        )
        self.batcher = Batcher(
            label=self.label,
            backend=backend,
            input_names=self.signature.names,
            output_names=self.signature.outputs,
            policy=self.policy,
            executor=executor,
            stats=self.stats,
            tracer=tracer,
            logger=logger,
        )
        self.stats.queued = lambda: self.batcher.queued
        self.info = LoadedModelInfo(
            backend=backend.name, memory_bytes=memory, inputs=list(backend.inputs), outputs=list(backend.outputs)
        )
        self.input_metadata = [
            pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in backend.inputs
        ]
        self.output_metadata = [
            pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in backend.outputs
        ]
        # Task models: the per-request step before batching (aimaas.tasks; None for tensor models).
        self.prepare = backend.prepare_request
        self.prepare_off_loop = backend.prepare_off_loop
        self.task: TaskManifest | None = getattr(backend, "manifest", None)
        self.config = self._config(gpu)
        # How a shared built form was obtained ("cache" | "built"), "" when loaded with load().
        self.shared = ""

    def _config(self, gpu: bool) -> pb.ModelConfig:
        merge = self.policy.merge

        def dims(t: TensorInfo) -> tuple[int, ...]:
            return t.shape[1:] if merge else t.shape

        config = pb.ModelConfig(
            name=self.name,
            platform=self.backend.platform,
            backend=self.backend.name,
            max_batch_size=self.policy.max_batch_size if merge else 0,
            input=[pb.ModelInput(name=t.name, data_type=DATATYPES[t.datatype].config_type, dims=dims(t)) for t in self.backend.inputs],
            output=[pb.ModelOutput(name=t.name, data_type=DATATYPES[t.datatype].config_type, dims=dims(t)) for t in self.backend.outputs],
            instance_group=[
                pb.ModelInstanceGroup(
                    name=self.name, count=1,
                    kind=pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU,
                )
            ],
            parameters={key: pb.ModelParameter(string_value=value) for key, value in self.spec.labels.items()},
        )
        if self.task is not None:
            # What the gateway shapes task answers with (labels, limits): aimaas.tasks' public fields.
            config.parameters[CONFIG_PARAMETER].string_value = public_json(self.task)
        if merge:
            config.dynamic_batching.max_queue_delay_microseconds = round(self.policy.max_queue_delay_s * 1e6)
        return config

    def respond(self, request_id: str, outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
        """Runs on the model thread (compute_output): encode one caller's outputs."""
        response = pb.ModelInferResponse(model_name=self.name, model_version=self.version, id=request_id)
        for name, array in outputs.items():
            add_output(response, name, array)
        return response

    def finisher(self, request_id: str):
        # A partial rather than a lambda: one Python frame less per request.
        return functools.partial(self.respond, request_id)


@dataclass
class _Slot:
    """A (name, version) the data plane knows: its state, and its instance once loaded."""

    state: ModelState
    reason: str = ""
    instance: _Instance | None = None


# ------------------------------------------------------------------------------------ the data plane


class DataPlane:
    """Loaded models and the request path; see the module docstring."""

    def __init__(
        self,
        settings: InferenceServerSettings,
        *,
        registry: CollectorRegistry,
        telemetry: Telemetry,
        logger: structlog.stdlib.BoundLogger,
        backends: Mapping[str, type[Backend] | str] | None = None,
        engine_store: ObjectStore | None = None,
    ) -> None:
        """`backends`: name → class, or the reason it is unavailable (default: probe this node).
        `engine_store`: the object store holding built engines (mesh mode; None: build locally)."""
        self._settings = settings
        self._engine_store = engine_store
        # Keep reporting windows (a monitor is configured), and the statistics of retired instances
        # until their last window is taken.
        self._windowed = bool(settings.monitor_address)
        self._retired_stats: deque[ModelStats] = deque(maxlen=_RETIRED_STATS)
        self._backends: dict[str, type[Backend] | str] = dict(backends) if backends is not None else probe_backends()
        registry.register(InferenceCollector(self._loaded_stats))
        self._tracer = telemetry.tracer("aimaas.inference")
        self._log = logger.bind(component="data-plane")
        self._models: dict[str, dict[str, _Slot]] = {}
        # Highest READY version of each model: the hot path's answer to an empty model_version.
        self._latest: dict[str, _Instance] = {}
        # Per-(name, version) operation locks with a user count, dropped when unused.
        self._locks: dict[tuple[str, str], list[Any]] = {}
        # One backend load at a time: memory is measured as the process's growth during a load.
        self._load_gate = asyncio.Lock()
        self._closing = False
        # Per-request preprocessing of task models (image decoding), created on first use.
        self._preprocess_pool: ThreadPoolExecutor | None = None

    def _preprocessing(self) -> ThreadPoolExecutor:
        if self._preprocess_pool is None:
            self._preprocess_pool = ThreadPoolExecutor(
                max_workers=self._settings.preprocess_threads or None, thread_name_prefix="preprocess"
            )
        return self._preprocess_pool

    # ---------------------------------------------------------------------------- introspection

    def available_backends(self) -> list[str]:
        """Backends this node can run: settings.backends order first, then any other."""
        preferred = [n for n in self._settings.backends if not isinstance(self._backends.get(n, ""), str)]
        return preferred + [n for n, c in self._backends.items() if not isinstance(c, str) and n not in preferred]

    def unavailable_backends(self) -> dict[str, str]:
        """name → the reason this node cannot run it."""
        return {name: found for name, found in self._backends.items() if isinstance(found, str)}

    def state(self, name: str, version: str) -> tuple[ModelState, str]:
        slot = self._models.get(name, {}).get(version)
        if slot is None:
            return ModelState.UNAVAILABLE, ""
        return slot.state, slot.reason

    def loaded(self) -> list[tuple[str, str]]:
        """(name, version) of every READY model version."""
        return [
            (name, version)
            for name in sorted(self._models)
            for version, slot in sorted(self._models[name].items(), key=lambda kv: version_key(kv[0]))
            if slot.state is ModelState.READY
        ]

    def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        entries = []
        for name in sorted(self._models):
            for version in sorted(self._models[name], key=version_key):
                slot = self._models[name][version]
                if not ready_only or slot.state is ModelState.READY:
                    entries.append(IndexEntry(name, version, slot.state, slot.reason))
        return entries

    def ready(self, name: str, version: str = "") -> bool:
        if version:
            slot = self._models.get(name, {}).get(version)
            return slot is not None and slot.state is ModelState.READY
        return name in self._latest

    def metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        instance = self._resolve(name, version)
        versions = sorted(
            (v for v, slot in self._models[name].items() if slot.state is ModelState.READY), key=version_key
        )
        return pb.ModelMetadataResponse(
            name=name,
            versions=versions,
            platform=instance.backend.platform,
            inputs=instance.input_metadata,
            outputs=instance.output_metadata,
        )

    def config(self, name: str, version: str = "") -> pb.ModelConfig:
        return self._resolve(name, version).config

    def statistics(self, name: str = "", version: str = "") -> list[pb.ModelStatistics]:
        """Statistics of loaded versions; NotFound for an unknown model or version."""
        if not name:
            if version:
                raise InvalidArgument("a version filter needs a model name")
            names = sorted(self._models)
        elif name not in self._models:
            raise NotFound(f"unknown model '{name}'")
        else:
            names = [name]
        result = []
        for model in names:
            slots = self._models[model]
            if version:
                if version not in slots:
                    raise NotFound(f"model '{model}' has no version {version}")
                chosen = [version]
            else:
                chosen = sorted(slots, key=version_key)
            for v in chosen:
                instance = slots[v].instance
                if instance is not None:
                    result.append(instance.stats.to_proto())
        return result

    def queued(self, name: str, version: str = "") -> int:
        """Requests waiting in the batcher of a loaded version (default: the highest READY one)."""
        return self._resolve(name, version).batcher.queued

    def close_stats_windows(self) -> list[ClosedWindow]:
        """Close the reporting window of every instance (loaded, or retired since the last call) and
        return them; empty without a monitor. Event loop thread only."""
        if not self._windowed:
            return []
        now_ns = time.time_ns()
        # Retired instances first: requests failed by an unload's drain timeout may have been
        # recorded after the retirement, so their window is only closed now, and for the last time.
        sources = list(self._retired_stats)
        self._retired_stats.clear()
        seen = {id(stats) for stats in sources}
        for slots in self._models.values():
            for slot in slots.values():
                if slot.instance is not None and id(slot.instance.stats) not in seen:
                    seen.add(id(slot.instance.stats))
                    sources.append(slot.instance.stats)
        closed = []
        for stats in sources:
            window = stats.close_window(now_ns)
            if window is not None:
                closed.append(window)
        return closed

    def _loaded_stats(self) -> list[ModelStats]:
        # Runs on the metrics scrape thread: list() snapshots are atomic under the GIL.
        return [
            slot.instance.stats
            for slots in list(self._models.values())
            for slot in list(slots.values())
            if slot.instance is not None
        ]

    # ---------------------------------------------------------------------------- request path

    def _resolve(self, name: str, version: str) -> _Instance:
        slots = self._models.get(name)
        if slots is None:
            if not name:
                raise InvalidArgument("the request names no model")
            raise NotFound(f"unknown model '{name}'")
        if version:
            slot = slots.get(version)
            if slot is None:
                known = ", ".join(sorted(slots, key=version_key))
                raise NotFound(f"model '{name}' has no version {version} (versions: {known})")
            if slot.state is ModelState.READY:
                return slot.instance  # type: ignore[return-value]
            raise self._not_ready(name, version, slot)
        instance = self._latest.get(name)
        if instance is not None:
            return instance
        newest = max(slots, key=version_key)
        raise self._not_ready(name, newest, slots[newest])

    @staticmethod
    def _not_ready(name: str, version: str, slot: _Slot) -> AimaasError:
        label = _label(name, version)
        if slot.state is ModelState.LOADING:
            return Unavailable(f"{label} is still loading")
        if slot.state is ModelState.UNLOADING:
            return Unavailable(f"{label} is unloading")
        if slot.state is ModelState.FAILED:
            return Unavailable(f"{label} failed to load: {slot.reason}")
        return Unavailable(f"{label} is not available")

    async def infer(
        self,
        request: pb.ModelInferRequest,
        *,
        deadline: float | None = None,
        parent: otel_context.Context | None = None,
    ) -> pb.ModelInferResponse:
        """Run one request through its model's batcher.

        `deadline`: absolute, on the event loop's clock (`loop.time()`); None: no deadline.
        `parent`: trace context of the request (default: the current one).
        """
        started = time.perf_counter_ns()
        if self._closing:
            raise Unavailable("the server is shutting down")
        instance = self._resolve(request.model_name, request.model_version)
        instance.inflight += 1
        try:
            inputs, rows, key, outputs = instance.signature.prepare(request)
            if instance.prepare is not None:
                if instance.prepare_off_loop(inputs, request.parameters):
                    inputs = await asyncio.get_running_loop().run_in_executor(
                        self._preprocessing(), instance.prepare, inputs, request.parameters
                    )
                else:
                    inputs = instance.prepare(inputs, request.parameters)
            response = await instance.batcher.submit(
                inputs, rows, key, outputs, instance.finisher(request.id), deadline=deadline, parent=parent
            )
        except AimaasError as exc:
            instance.stats.record_failure(time.perf_counter_ns() - started, exc.code.name.lower())
            raise
        except asyncio.CancelledError:
            instance.stats.record_failure(time.perf_counter_ns() - started, "cancelled")
            raise
        except Exception:
            instance.stats.record_failure(time.perf_counter_ns() - started, "internal")
            raise
        finally:
            instance.inflight -= 1
            if instance.retiring and instance.inflight == 0:
                instance.idle.set()
        instance.stats.record_success(time.perf_counter_ns() - started)
        return response

    # ---------------------------------------------------------------------------- lifecycle

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str, version: str) -> AsyncIterator[None]:
        key = (name, version)
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]

    def _set_slot(self, name: str, version: str, slot: _Slot) -> None:
        self._models.setdefault(name, {})[version] = slot
        self._refresh_latest(name)

    def _drop_slot(self, name: str, version: str) -> None:
        slots = self._models.get(name)
        if slots is not None:
            slots.pop(version, None)
            if not slots:
                del self._models[name]
        self._refresh_latest(name)

    def _refresh_latest(self, name: str) -> None:
        ready = [v for v, slot in self._models.get(name, {}).items() if slot.state is ModelState.READY]
        if ready:
            self._latest[name] = self._models[name][max(ready, key=version_key)].instance  # type: ignore[assignment]
        else:
            self._latest.pop(name, None)

    def mark_loading(self, name: str, version: str) -> None:
        """Show (name, version) as LOADING before its artifact is even here (e.g. while downloading)."""
        slot = self._models.get(name, {}).get(version)
        if slot is None:
            self._set_slot(name, version, _Slot(ModelState.LOADING))
        elif slot.state in (ModelState.FAILED, ModelState.UNAVAILABLE):
            slot.state, slot.reason = ModelState.LOADING, ""

    async def load(self, spec: ModelSpec) -> LoadedModelInfo:
        """Load, warm up and mark READY; ModelLoadFailed (state FAILED with the reason) on any error.

        Loading a READY version again with the same spec and an unchanged artifact is a no-op; with a
        different one, the new instance replaces the old one once READY (the old one is drained), and
        a failed reload leaves the old one serving.
        """
        if not spec.name or not spec.version:
            raise ModelLoadFailed("a model spec needs a name and a version")
        async with self._exclusive(spec.name, spec.version):
            slot = self._models.get(spec.name, {}).get(spec.version)
            current = slot.instance if slot is not None else None
            if slot is None:
                slot = _Slot(ModelState.LOADING)
                self._set_slot(spec.name, spec.version, slot)
            try:
                if self._closing:
                    raise ModelLoadFailed("the server is shutting down")
                fingerprint = _fingerprint(spec.artifact)
                if (
                    current is not None
                    and slot.state is ModelState.READY
                    and current.spec == spec
                    and current.fingerprint == fingerprint
                ):
                    return current.info
                if current is None:
                    slot.state, slot.reason = ModelState.LOADING, ""
                instance = await self._build(spec, fingerprint)
            except BaseException as exc:
                reason = exc.reason if isinstance(exc, ModelLoadFailed) else (
                    "the load was cancelled" if isinstance(exc, asyncio.CancelledError) else f"load failed: {exc}"
                )
                if current is None:
                    slot.state, slot.reason = ModelState.FAILED, reason
                    self._log.warning("model load failed", model=spec.name, version=spec.version, reason=reason)
                else:
                    self._log.warning(
                        "model reload failed; the loaded instance keeps serving",
                        model=spec.name, version=spec.version, reason=reason,
                    )
                if isinstance(exc, ModelLoadFailed | asyncio.CancelledError):
                    raise
                raise ModelLoadFailed(reason) from exc
            slot.instance, slot.state, slot.reason = instance, ModelState.READY, ""
            self._set_slot(spec.name, spec.version, slot)
            self._log.info(
                "model ready",
                model=spec.name, version=spec.version, backend=instance.backend.name,
                memory_bytes=instance.info.memory_bytes, batching=instance.policy.merge,
                shared=instance.shared or None,
            )
            if current is not None:
                await self._retire(current, self._settings.unload_drain_seconds)
            return instance.info

    def _choose_backend(self, spec: ModelSpec) -> type[Backend]:
        if spec.format not in FORMATS:
            raise ModelLoadFailed(f"unknown model format '{spec.format}' (known: {', '.join(FORMATS)})")
        if spec.backend:
            found = self._backends.get(spec.backend)
            if found is None:
                raise ModelLoadFailed(f"unknown backend '{spec.backend}' (known: {', '.join(self._backends)})")
            if isinstance(found, str):
                raise ModelLoadFailed(f"backend '{spec.backend}' is not available on this node: {found}")
            if spec.format not in found.formats:
                raise ModelLoadFailed(f"backend '{spec.backend}' cannot load format '{spec.format}'")
            return found
        reasons = []
        for name in self._settings.backends:
            found = self._backends.get(name)
            if found is None:
                reasons.append(f"{name}: unknown")
            elif isinstance(found, str):
                reasons.append(f"{name}: {found}")
            elif spec.format not in found.formats:
                reasons.append(f"{name}: does not load {spec.format}")
            else:
                return found
        raise ModelLoadFailed(f"no available backend loads format '{spec.format}' ({'; '.join(reasons)})")

    def _options(self, spec: ModelSpec, batching: BatchingDefaults) -> LoadOptions:
        options = spec.options
        changes: dict[str, Any] = {}
        if not options.intra_op_threads and self._settings.intra_op_threads:
            changes["intra_op_threads"] = self._settings.intra_op_threads
        if not options.inter_op_threads and self._settings.inter_op_threads:
            changes["inter_op_threads"] = self._settings.inter_op_threads
        if batching.enabled:
            changes["max_batch_size"] = batching.max_batch_size
        return dataclasses.replace(options, **changes) if changes else options

    async def _build(self, spec: ModelSpec, fingerprint: tuple[str, int, int]) -> _Instance:
        backend_class = self._choose_backend(spec)
        batching = spec.batching or self._settings.batching
        options = self._options(spec, batching)
        backend: Backend = backend_class()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{spec.name}-{spec.version}")
        loop = asyncio.get_running_loop()
        shared: str | None = None
        async with self._load_gate:
            try:
                if spec.format == "onnx":
                    task = await loop.run_in_executor(executor, _read_task, spec.artifact)
                    if task is not None:
                        backend = TaskBackend(backend, *task)
                if self._engine_store is not None and spec.sha256:
                    shared = await self._load_shared(backend, spec, options, executor)
                if shared is None:
                    await loop.run_in_executor(executor, _load_and_warm_up, backend, spec.artifact, options)
                else:
                    await loop.run_in_executor(executor, _check_and_warm_up, backend)
            except asyncio.CancelledError:
                # The thread cannot be interrupted: release what it loads once it is done.
                executor.submit(_quiet_unload, backend)
                executor.shutdown(wait=False)
                raise
            except ModelLoadFailed:
                await loop.run_in_executor(executor, _quiet_unload, backend)
                executor.shutdown(wait=False)
                raise
        try:
            instance = _Instance(
                spec, fingerprint, backend, executor, batching, self._tracer, self._log, windowed=self._windowed,
                inline_below_us=self._settings.inline_execution_below_us,
            )
            instance.shared = shared or ""
        except Exception as exc:
            await loop.run_in_executor(executor, _quiet_unload, backend)
            executor.shutdown(wait=False)
            raise ModelLoadFailed(f"cannot serve the loaded model: {exc}") from exc
        instance.batcher.start()
        return instance

    async def _load_shared(
        self, backend: Backend, spec: ModelSpec, options: LoadOptions, executor: ThreadPoolExecutor
    ) -> str | None:
        """`backend.load_shared` through the engine store on the model's thread; None: use load()."""
        assert self._engine_store is not None
        run = functools.partial(asyncio.get_running_loop().run_in_executor, executor)
        try:
            return await backend.load_shared(
                spec.artifact, options, store=self._engine_store, sha256=spec.sha256, run=run
            )
        except (asyncio.CancelledError, ModelLoadFailed):
            raise
        except Exception as exc:  # noqa: BLE001 - BackendLoadError, BackendUnavailable, anything else
            raise ModelLoadFailed(str(exc) or type(exc).__name__) from exc

    async def unload(self, name: str, version: str, drain_seconds: float | None = None) -> None:
        """New requests get UNAVAILABLE; in-flight ones finish (at most `drain_seconds`, default
        settings.unload_drain_seconds; queued ones still waiting then fail); then the backend unloads.
        Unknown versions are ignored."""
        async with self._exclusive(name, version):
            slot = self._models.get(name, {}).get(version)
            if slot is None:
                return
            instance = slot.instance
            if instance is not None:
                slot.state = ModelState.UNLOADING
                self._refresh_latest(name)
                await self._retire(instance, self._settings.unload_drain_seconds if drain_seconds is None else drain_seconds)
            if self._models.get(name, {}).get(version) is slot:
                self._drop_slot(name, version)
            if instance is not None:
                self._log.info("model unloaded", model=name, version=version)

    async def _retire(self, instance: _Instance, drain_seconds: float) -> None:
        instance.retiring = True
        if instance.inflight:
            try:
                await asyncio.wait_for(instance.idle.wait(), drain_seconds)
            except TimeoutError:
                self._log.warning(
                    "unload drain timed out; failing requests still queued",
                    model=instance.name, version=instance.version, inflight=instance.inflight,
                )
                instance.batcher.abort(Unavailable(f"{instance.label} was unloaded before the request ran"))
        await instance.batcher.close()
        if self._windowed:
            # Out of every slot now: the stats reporter takes its last window from here.
            self._retired_stats.append(instance.stats)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(instance.executor, instance.backend.unload)
        except Exception:  # noqa: BLE001 - the instance is gone from serving either way
            self._log.exception("backend unload failed", model=instance.name, version=instance.version)
        instance.executor.shutdown(wait=False)

    async def close(self) -> None:
        """Stop accepting, drain and unload every model."""
        self._closing = True
        targets = [(name, version) for name, slots in self._models.items() for version in slots]
        results = await asyncio.gather(*(self.unload(n, v) for n, v in targets), return_exceptions=True)
        for (name, version), result in zip(targets, results):
            if isinstance(result, BaseException):
                self._log.error("unload at close failed", model=name, version=version, error=repr(result))
        if self._preprocess_pool is not None:
            self._preprocess_pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------ model thread


def _fingerprint(artifact: pathlib.Path) -> tuple[str, int, int]:
    try:
        stat = artifact.stat()
    except FileNotFoundError:
        raise ModelLoadFailed(f"artifact {artifact} does not exist") from None
    except OSError as exc:
        raise ModelLoadFailed(f"artifact {artifact} cannot be read: {exc.strerror}") from None
    return str(artifact.resolve()), stat.st_size, stat.st_mtime_ns


def _read_task(artifact: pathlib.Path) -> tuple[TaskManifest, str | None] | None:
    """Runs on the model's thread: the task manifest (and tokenizer) of a task model, if it is one."""
    try:
        return read_task(artifact)
    except InvalidTaskManifest as exc:
        raise ModelLoadFailed(str(exc)) from None
    except OSError as exc:
        raise ModelLoadFailed(f"artifact {artifact} cannot be read: {exc.strerror or exc}") from None


def _load_and_warm_up(backend: Backend, artifact: pathlib.Path, options: LoadOptions) -> None:
    """Runs on the model's own thread (so thread-bound GPU contexts stay on it)."""
    try:
        backend.load(artifact, options)
    except Exception as exc:  # noqa: BLE001 - BackendLoadError, BackendUnavailable, anything else
        raise ModelLoadFailed(str(exc) or type(exc).__name__) from exc
    _check_and_warm_up(backend)


def _check_and_warm_up(backend: Backend) -> None:
    """Runs on the model's own thread after a load: protocol checks, then one inference on zeros."""
    for tensor in (*backend.inputs, *backend.outputs):
        if tensor.datatype not in DATATYPES:
            raise ModelLoadFailed(f"tensor '{tensor.name}' has datatype {tensor.datatype}, not a protocol datatype")
    names = [t.name for t in backend.inputs]
    if len(set(names)) != len(names):
        raise ModelLoadFailed("the model has two inputs with the same name")
    try:
        backend.infer(backend.sample_inputs(), [t.name for t in backend.outputs])
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadFailed(
            f"warm-up inference (zeros, dynamic dimensions 1) failed: {exc}"
        ) from exc


def _quiet_unload(backend: Backend) -> None:
    with contextlib.suppress(Exception):
        backend.unload()
