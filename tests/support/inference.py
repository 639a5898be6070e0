"""Start a real inference node (in-process gRPC server on port 0) for tests, and build model repositories."""

from __future__ import annotations

import contextlib
import json
import pathlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import onnx

from services.common.settings import LogSettings
from services.common.tracing import Telemetry
from services.inference.app import InferenceApp
from services.inference.backends.base import Backend, BackendLoadError, LoadOptions, TensorInfo
from services.inference.settings import BatchingDefaults, InferenceServerSettings, InferenceSettings


def inference_settings(
    repository: pathlib.Path | None, *, batching: BatchingDefaults | None = None, **server: Any
) -> InferenceSettings:
    """Standalone settings (repository given) on a free port, no metrics port, quiet logs."""
    fields: dict[str, Any] = {
        "grpc_port": 0,
        "metrics_port": -1,
        "shutdown_grace_seconds": 1,
        "model_repository": repository,
        "backends": ["onnxruntime"],
        "intra_op_threads": 1,
        "inter_op_threads": 1,
        "batching": batching or BatchingDefaults(),
    }
    fields.update(server)
    return InferenceSettings(log=LogSettings(level="WARNING"), inference=InferenceServerSettings(**fields))


@contextlib.asynccontextmanager
async def running_inference(
    settings: InferenceSettings, *, telemetry: Telemetry | None = None, backends: dict | None = None
) -> AsyncIterator[InferenceApp]:
    app = InferenceApp(settings, telemetry=telemetry, backends=backends)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def write_model(
    repository: pathlib.Path,
    name: str,
    model: onnx.ModelProto | bytes,
    *,
    version: int | str = 1,
    config: dict | None = None,
    filename: str = "model.onnx",
) -> pathlib.Path:
    """Place `model` at <repository>/<name>/<version>/<filename> (and config.json when given)."""
    directory = repository / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    if config is not None:
        (repository / name / "config.json").write_text(json.dumps(config))
    return path


def url(app: InferenceApp) -> str:
    return app.grpc.address


class FakeBackend(Backend):
    """A pure-Python backend for data-plane logic tests: `y = x * 2` for every input `x*`.

    Class attributes configure it (see `fake_backend`); every execution's inputs are recorded.
    """

    name = "fake"
    platform = "fake_platform"
    formats = frozenset({"onnx"})
    input_specs: tuple[TensorInfo, ...] = (TensorInfo("x", "FP32", (-1, 4)),)
    delay_seconds = 0.0
    limit: int | None = None
    fail_load: str = ""
    fail_infer: str = ""
    # Every instance created, so tests can reach the one a data plane loaded.
    instances: list[FakeBackend] = []

    def __init__(self) -> None:
        type(self).instances.append(self)
        self.inputs: list[TensorInfo] = []
        self.outputs: list[TensorInfo] = []
        self.executions: list[dict[str, np.ndarray]] = []
        self.calls = 0
        self.unloaded = False
        self.release = threading.Event()
        self.release.set()

    @classmethod
    def probe(cls) -> str | None:
        return None

    def load(self, artifact: pathlib.Path, options: LoadOptions) -> None:
        if self.fail_load:
            raise BackendLoadError(self.fail_load)
        self.inputs = list(self.input_specs)
        self.outputs = [TensorInfo(t.name.replace("x", "y", 1), t.datatype, t.shape) for t in self.input_specs]

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        self.executions.append(inputs)
        self.calls += 1
        if self.fail_infer and self.calls > 1:  # the warm-up succeeds
            raise RuntimeError(self.fail_infer)
        self.release.wait(10)
        if self.delay_seconds:
            time.sleep(self.delay_seconds)
        results = {t.name.replace("x", "y", 1): inputs[t.name] * 2 for t in self.input_specs}
        return {name: results[name] for name in output_names}

    def max_rows(self) -> int | None:
        return self.limit

    def unload(self) -> None:
        self.unloaded = True

    def memory_bytes(self) -> int:
        return 1234


def fake_backend(**attributes: Any) -> type[FakeBackend]:
    """A FakeBackend subclass with the given class attributes (input_specs, delay_seconds, limit, ...)."""
    return type("ConfiguredFakeBackend", (FakeBackend,), {"instances": [], **attributes})
