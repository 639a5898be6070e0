"""Model repositories: what the Repository* RPCs act on.

Standalone mode serves a local directory (`DirectoryRepository`); in mesh mode the node agent places
models and the app passes no repository (RepositoryModelLoad/Unload answer FAILED_PRECONDITION).

Directory layout (Triton-like):

    <root>/<model>/config.json            optional, see ModelDirectoryConfig
    <root>/<model>/<version>/model.onnx   ONNX model        (format "onnx")
    <root>/<model>/<version>/model.plan   TensorRT engine   (format "tensorrt_plan")

`<model>` is a name of letters, digits, '_', '.', '-' (not starting with '.'); `<version>` is a
positive integer; other entries are ignored. Every version directory is served side by side; a request
without a version gets the highest READY one.

config.json (every field optional; unknown fields are an error, so typos do not pass silently):

    {
      "backend": "onnxruntime",           // default: the node's preference order (settings.backends)
      "max_batch_size": 16,               // rows per merged batch; 0 disables dynamic batching
      "dynamic_batching": {"max_queue_delay_us": 200, "max_queue_size": 512, "default_timeout_ms": 0},
      "options": {"intra_op_threads": 1, "inter_op_threads": 1, "precision": "FP16", "use_gpu": false},
      "labels": {"team": "risk"}
    }

Omitted batching fields take the node's defaults (AIMAAS_INFERENCE__BATCHING__*).
"""

from __future__ import annotations

import asyncio
import pathlib
import re
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.inference.backends.base import LoadOptions
from services.inference.dataplane import DataPlane, IndexEntry, ModelLoadFailed, ModelSpec, ModelState, version_key
from services.inference.settings import BatchingDefaults, InferenceServerSettings

CONFIG_FILE = "config.json"
ARTIFACTS = {"model.onnx": "onnx", "model.plan": "tensorrt_plan"}
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ModelRepository(Protocol):
    """The Repository* RPCs of the protocol."""

    async def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version the repository knows, with its state (READY ones only if asked)."""

    async def load(self, name: str) -> None:
        """Load (or reload) every version of `name`; NotFound, or FailedPrecondition with the reasons."""

    async def unload(self, name: str) -> None:
        """Unload every version of `name`; NotFound when none is loaded."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DynamicBatchingConfig(_Strict):
    max_queue_delay_us: int | None = Field(default=None, ge=0, le=10_000_000)
    max_queue_size: int | None = Field(default=None, ge=1)
    default_timeout_ms: int | None = Field(default=None, ge=0)


class OptionsConfig(_Strict):
    precision: Literal["FP32", "FP16", "INT8"] | None = None
    intra_op_threads: int | None = Field(default=None, ge=0)
    inter_op_threads: int | None = Field(default=None, ge=0)
    use_gpu: bool | None = None


class ModelDirectoryConfig(_Strict):
    backend: str | None = None
    max_batch_size: int | None = Field(default=None, ge=0, le=65536)
    dynamic_batching: DynamicBatchingConfig = DynamicBatchingConfig()
    options: OptionsConfig = OptionsConfig()
    labels: dict[str, str] = {}

    def batching(self, defaults: BatchingDefaults) -> BatchingDefaults:
        update = self.dynamic_batching.model_dump(exclude_none=True)
        if self.max_batch_size == 0:
            update["enabled"] = False
        elif self.max_batch_size is not None:
            update["max_batch_size"] = self.max_batch_size
        return defaults.model_copy(update=update) if update else defaults

    def load_options(self, settings: InferenceServerSettings) -> LoadOptions:
        given = self.options.model_dump(exclude_none=True)
        return LoadOptions(
            precision=given.get("precision", "FP32"),
            intra_op_threads=given.get("intra_op_threads", settings.intra_op_threads),
            inter_op_threads=given.get("inter_op_threads", settings.inter_op_threads),
            use_gpu=given.get("use_gpu", True),
        )


@dataclass
class _VersionDir:
    version: str
    artifact: pathlib.Path | None
    format: str = "onnx"
    # Why this version cannot be loaded (no artifact, two artifacts, bad config.json).
    problem: str = ""


class DirectoryRepository:
    """A local model directory (layout in the module docstring), loaded into a DataPlane."""

    def __init__(
        self,
        root: pathlib.Path,
        data_plane: DataPlane,
        settings: InferenceServerSettings,
        logger: structlog.stdlib.BoundLogger,
    ) -> None:
        self.root = root
        self._data_plane = data_plane
        self._settings = settings
        self._log = logger.bind(component="repository", root=str(root))
        # Problems of versions that never reached the data plane, for the index.
        self._problems: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------------------------ scanning

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _MODEL_NAME.match(p.name))

    def _model_dir(self, name: str) -> pathlib.Path:
        if not _MODEL_NAME.match(name):
            raise InvalidArgument(
                f"invalid model name {name!r}: letters, digits, '_', '.', '-', not starting with '.'"
            )
        path = self.root / name
        if not path.is_dir():
            raise NotFound(f"model '{name}' is not in the model repository")
        return path

    def _read_config(self, model_dir: pathlib.Path) -> ModelDirectoryConfig:
        path = model_dir / CONFIG_FILE
        if not path.exists():
            return ModelDirectoryConfig()
        try:
            return ModelDirectoryConfig.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or '(root)'}: {error['msg']}" for error in exc.errors()
            )
            raise ValueError(f"{model_dir.name}/{CONFIG_FILE} is invalid: {problems}") from None
        except OSError as exc:
            raise ValueError(f"{model_dir.name}/{CONFIG_FILE} cannot be read: {exc.strerror}") from None

    @staticmethod
    def _versions(model_dir: pathlib.Path) -> list[_VersionDir]:
        found = []
        for entry in model_dir.iterdir():
            if not (entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0):
                continue
            artifacts = [(entry / file, fmt) for file, fmt in ARTIFACTS.items() if (entry / file).is_file()]
            if not artifacts:
                found.append(_VersionDir(entry.name, None, problem=f"no {' or '.join(ARTIFACTS)} in {model_dir.name}/{entry.name}"))
            elif len(artifacts) > 1:
                found.append(
                    _VersionDir(entry.name, None, problem=f"{model_dir.name}/{entry.name} holds both {' and '.join(ARTIFACTS)}; keep one")
                )
            else:
                found.append(_VersionDir(entry.name, artifacts[0][0], artifacts[0][1]))
        return sorted(found, key=lambda v: version_key(v.version))

    # ------------------------------------------------------------------------------------ loading

    async def load_all(self) -> None:
        """Initial load of every model; failures are logged and shown in the index, not fatal."""
        if not self.root.is_dir():
            self._log.warning("the model repository is not a directory; serving no models")
        for name in self.model_names():
            try:
                await self.load(name)
            except (FailedPrecondition, NotFound) as exc:
                self._log.warning("model not loaded", model=name, reason=exc.message)

    async def load(self, name: str) -> None:
        model_dir = self._model_dir(name)
        versions = await asyncio.to_thread(self._versions, model_dir)
        try:
            config = await asyncio.to_thread(self._read_config, model_dir)
        except ValueError as exc:
            config, config_problem = None, str(exc)
        else:
            config_problem = ""
        failures: list[str] = []
        on_disk = {v.version for v in versions}
        for stale in [k for k in self._problems if k[0] == name]:
            del self._problems[stale]
        for entry in versions:
            problem = entry.problem or config_problem
            if problem or config is None or entry.artifact is None:
                self._problems[(name, entry.version)] = problem
                failures.append(f"version {entry.version}: {problem}")
                continue
            spec = ModelSpec(
                name=name,
                version=entry.version,
                artifact=entry.artifact,
                format=entry.format,
                backend=config.backend,
                options=config.load_options(self._settings),
                batching=config.batching(self._settings.batching),
                labels=dict(config.labels),
            )
            try:
                await self._data_plane.load(spec)
            except ModelLoadFailed as exc:
                failures.append(f"version {entry.version}: {exc.reason}")
        # Versions whose directory is gone leave the data plane.
        for entry in self._data_plane.index():
            if entry.name == name and entry.version not in on_disk:
                await self._data_plane.unload(name, entry.version)
        if not versions:
            failures.append(f"no version directories (<version>/{' or '.join(ARTIFACTS)}) under {name}")
        if failures:
            raise FailedPrecondition(f"failed to load model '{name}': {'; '.join(failures)}")

    async def unload(self, name: str) -> None:
        versions = [e.version for e in self._data_plane.index() if e.name == name]
        if not versions:
            raise NotFound(f"model '{name}' is not loaded")
        await asyncio.gather(*(self._data_plane.unload(name, v) for v in versions))

    # ------------------------------------------------------------------------------------ index

    async def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        known = {(e.name, e.version): e for e in self._data_plane.index()}
        names = await asyncio.to_thread(self.model_names)
        for name in names:
            versions = await asyncio.to_thread(self._versions, self.root / name)
            for entry in versions:
                if (name, entry.version) not in known:
                    reason = self._problems.get((name, entry.version), entry.problem)
                    known[(name, entry.version)] = IndexEntry(name, entry.version, ModelState.UNAVAILABLE, reason)
        entries = sorted(known.values(), key=lambda e: (e.name, version_key(e.version)))
        if ready_only:
            entries = [e for e in entries if e.state is ModelState.READY]
        return entries
