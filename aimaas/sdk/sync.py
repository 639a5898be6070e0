"""The synchronous SDK: thin wrappers that run the async core on a private event loop thread.

A private loop (rather than asyncio.run per call) keeps gRPC channels alive between calls and
works inside programs that already run a loop (notebooks).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from aimaas.auth.v1 import auth_pb2
from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.sdk.service import (
    AsyncDeployment,
    AsyncModelService,
    BatchProgress,
    InferResult,
    PushedVersion,
    PushProgress,
    Traffic,
)
from aimaas.sdk.settings import ClientSettings
from aimaas.sdk.tensors import Inputs, ModelSignature

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="aimaas-sdk", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coroutine.close()
            raise RuntimeError("this ModelService is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


class Deployment:
    """Synchronous view of an `AsyncDeployment` (same properties)."""

    def __init__(self, runner: _LoopThread, inner: AsyncDeployment) -> None:
        self._runner = runner
        self._inner = inner

    name = property(lambda self: self._inner.name)
    model = property(lambda self: self._inner.model)
    endpoint = property(lambda self: self._inner.endpoint)
    grpc_endpoint = property(lambda self: self._inner.grpc_endpoint)
    docs_url = property(lambda self: self._inner.docs_url)
    predict_url = property(lambda self: self._inner.predict_url)
    task = property(lambda self: self._inner.task)
    status = property(lambda self: self._inner.status)
    progress = property(lambda self: self._inner.progress)
    raw = property(lambda self: self._inner.raw)

    def refresh(self) -> Deployment:
        self._runner.run(self._inner.refresh())
        return self

    def wait_ready(self, timeout: float = 120.0, min_replicas: int | None = None) -> Deployment:
        self._runner.run(self._inner.wait_ready(timeout, min_replicas))
        return self

    def __repr__(self) -> str:
        return repr(self._inner)


class ModelService:
    """Push, deploy and call models through the gateway (synchronous; see `AsyncModelService`)."""

    def __init__(
        self,
        endpoint: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | None = None,
        http_url: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        settings: ClientSettings | None = None,
        _service_endpoints: Mapping[str, str] | None = None,
        _gateway: bool = True,
    ) -> None:
        self._core = AsyncModelService(
            endpoint, api_key, timeout=timeout, http_url=http_url, credentials=credentials, settings=settings,
            _service_endpoints=_service_endpoints, _gateway=_gateway,
        )  # fmt: skip
        self._runner = _LoopThread()

    endpoint = property(lambda self: self._core.endpoint)
    http_url = property(lambda self: self._core.http_url)

    def close(self) -> None:
        try:
            self._runner.run(self._core.close())
        except RuntimeError:
            return
        self._runner.stop()

    def __enter__(self) -> ModelService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _deployment(self, inner: AsyncDeployment) -> Deployment:
        return Deployment(self._runner, inner)

    # models
    def push(
        self, path: Any, name: str | None = None, *, provider: str | None = None, task: str | None = None,
        aliases: Iterable[str] = (), description: str = "", labels: Mapping[str, str] | None = None,
        format: str | None = None, create_model: bool = True, progress: PushProgress | None = None,
        timeout: float | None = None,
    ) -> PushedVersion:  # fmt: skip
        return self._runner.run(self._core.push(
            path, name, provider=provider, task=task, aliases=aliases, description=description, labels=labels,
            format=format, create_model=create_model, progress=progress, timeout=timeout,
        ))  # fmt: skip

    def import_huggingface(
        self, source: str, name: str | None = None, *, task: str | None = None, revision: str | None = None,
        aliases: Iterable[str] = (), description: str = "", labels: Mapping[str, str] | None = None,
        progress: PushProgress | None = None, steps: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> PushedVersion:  # fmt: skip
        return self._runner.run(self._core.import_huggingface(
            source, name, task=task, revision=revision, aliases=aliases, description=description, labels=labels,
            progress=progress, steps=steps, timeout=timeout,
        ))  # fmt: skip

    def list_models(self) -> list[rpb.Model]:
        return self._runner.run(self._core.list_models())

    def get_model(self, name: str) -> rpb.GetModelResponse:
        return self._runner.run(self._core.get_model(name))

    def list_versions(self, model: str, include_archived: bool = True) -> list[rpb.ModelVersion]:
        return self._runner.run(self._core.list_versions(model, include_archived))

    def resolve_version(self, model: str, reference: str = "latest") -> int:
        return self._runner.run(self._core.resolve_version(model, reference))

    # deployments
    def deploy(
        self, model_id: str, version: int | None = None, *, alias: str | None = None, name: str | None = None,
        min_instances: int = 1, max_instances: int | None = None, accelerator: str | None = None,
        instance_type: str | None = None, traffic: Sequence[Traffic | Mapping[str, Any]] | None = None,
        labels: Mapping[str, str] | None = None, provider: str | None = None, task: str | None = None,
    ) -> Deployment:  # fmt: skip
        return self._deployment(self._runner.run(self._core.deploy(
            model_id, version, alias=alias, name=name, min_instances=min_instances, max_instances=max_instances,
            accelerator=accelerator, instance_type=instance_type, traffic=traffic, labels=labels,
            provider=provider, task=task,
        )))  # fmt: skip

    def get_deployment(self, name: str) -> Deployment:
        return self._deployment(self._runner.run(self._core.get_deployment(name)))

    def list_deployments(self, model: str = "") -> list[Deployment]:
        return [self._deployment(d) for d in self._runner.run(self._core.list_deployments(model))]

    def delete_deployment(self, name: str) -> None:
        self._runner.run(self._core.delete_deployment(name))

    def list_nodes(self) -> list[spb.NodeInfo]:
        return self._runner.run(self._core.list_nodes())

    # API keys
    def create_api_key(
        self, name: str, role: str, model_scope: Iterable[str] = (), ttl_seconds: int = 0
    ) -> tuple[auth_pb2.ApiKey, str]:
        return self._runner.run(self._core.create_api_key(name, role, model_scope, ttl_seconds))

    def list_api_keys(self) -> list[auth_pb2.ApiKey]:
        return self._runner.run(self._core.list_api_keys())

    def revoke_api_key(self, key_id: str) -> None:
        self._runner.run(self._core.revoke_api_key(key_id))

    # inference
    def model_metadata(self, model: str, version: str = "", *, refresh: bool = False) -> ModelSignature:
        return self._runner.run(self._core.model_metadata(model, version, refresh=refresh))

    def model_ready(self, model: str, version: str = "") -> bool:
        return self._runner.run(self._core.model_ready(model, version))

    def predict(
        self, model: str, inputs: Inputs, *, version: int | str = "", timeout: float | None = None, request_id: str = ""
    ) -> dict[str, np.ndarray]:
        return self._runner.run(self._core.predict(model, inputs, version=version, timeout=timeout, request_id=request_id))

    def infer(
        self, model: str, inputs: Inputs, *, version: int | str = "", timeout: float | None = None, request_id: str = ""
    ) -> InferResult:
        return self._runner.run(self._core.infer(model, inputs, version=version, timeout=timeout, request_id=request_id))

    def batch_predict(
        self, model: str, inputs: Iterable[Inputs], *, concurrency: int = 8, version: int | str = "",
        progress: BatchProgress | None = None, timeout: float | None = None,
    ) -> list[dict[str, np.ndarray]]:  # fmt: skip
        return self._runner.run(self._core.batch_predict(
            model, inputs, concurrency=concurrency, version=version, progress=progress, timeout=timeout
        ))  # fmt: skip
