"""The async core of the SDK: `AsyncModelService`, one gRPC client of the gateway.

Management calls use the aimaas.*.v1 stubs (the gateway passes those services through unchanged),
inference uses the Open Inference Protocol stub. Every call carries a deadline and, when an API key
is set, `authorization: Bearer <key>` metadata. Every failure surfaces as `AimaasError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from aimaas.auth.v1 import auth_pb2, auth_pb2_grpc
from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.registry.v1 import registry_pb2_grpc
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from aimaas.sdk import deployments as views
from aimaas.sdk.errors import AimaasError, invalid
from aimaas.sdk.settings import ClientSettings, default_http_url
from aimaas.sdk.tensors import Inputs, ModelSignature, build_request, parse_response, prepare_inputs
from aimaas.types.v1 import types_pb2
from inference import grpc_predict_v2_pb2 as oip
from inference import grpc_predict_v2_pb2_grpc as oip_grpc

T = TypeVar("T")
CHUNK_BYTES = 1024 * 1024
# Upload deadline: the base timeout plus time for the bytes at a pessimistic rate.
_UPLOAD_MIN_RATE_BYTES_PER_S = 2 * 1024 * 1024
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_POLL_S = 0.2
# Model metadata is cached this long per (model, version): validation costs no extra round trip.
_METADATA_TTL_S = 10.0
_ACCELERATORS = {None: types_pb2.ACCELERATOR_UNSPECIFIED, "cpu": types_pb2.ACCELERATOR_CPU,
                 "gpu": types_pb2.ACCELERATOR_GPU}  # fmt: skip
ROLES = {"admin": auth_pb2.ROLE_ADMIN, "developer": auth_pb2.ROLE_DEVELOPER,
         "invoker": auth_pb2.ROLE_INVOKER, "viewer": auth_pb2.ROLE_VIEWER}  # fmt: skip
# Services the SDK calls; a gateway serves all of them on one address.
SERVICES = ("registry", "scheduler", "auth", "inference")

PushProgress = Callable[[int, int], None]  # (bytes sent, total bytes)
BatchProgress = Callable[[int, int], None]  # (requests done, total requests)


@dataclass(frozen=True)
class Traffic:
    """One entry of a traffic split: a version or an alias and its percent of requests."""

    weight: int
    version: int | None = None
    alias: str | None = None

    def to_proto(self) -> spb.TrafficTarget:
        if (self.version is None) == (self.alias is None):
            raise invalid(f"a traffic entry needs exactly one of version and alias: {self}")
        if self.version is not None:
            return spb.TrafficTarget(weight=self.weight, version=self.version)
        return spb.TrafficTarget(weight=self.weight, alias=self.alias)

    @classmethod
    def of(cls, value: Traffic | Mapping[str, Any]) -> Traffic:
        if isinstance(value, Traffic):
            return value
        unknown = set(value) - {"weight", "version", "alias"}
        if unknown or "weight" not in value:
            raise invalid(f"traffic entry {dict(value)!r} must be {{'weight': N, 'version': V | 'alias': A}}")
        return cls(int(value["weight"]), value.get("version"), value.get("alias"))


@dataclass(frozen=True)
class PushedVersion:
    model: str
    version: int
    sha256: str
    size_bytes: int
    # The bytes were already stored (content-addressed); no new blob was written.
    deduplicated: bool
    raw: rpb.ModelVersion = field(repr=False)


@dataclass(frozen=True)
class InferResult:
    """One inference response: outputs as numpy arrays by name, plus who served it."""

    model_name: str
    model_version: str
    id: str
    outputs: dict[str, np.ndarray]
    # Open Inference Protocol datatype of each output (FP32, BYTES, ...).
    datatypes: dict[str, str]


class AsyncDeployment:
    """A deployment as last read from the scheduler, with the gateway URLs clients call."""

    def __init__(self, service: AsyncModelService, deployment: spb.Deployment, task: str | None = None) -> None:
        self._service = service
        self.raw = deployment
        # The task of the deployed version (text-classification, ...) when it is a task model and
        # the SDK knows it (it deployed the version); None otherwise.
        self.task = task

    @property
    def name(self) -> str:
        return self.raw.spec.name

    @property
    def model(self) -> str:
        return self.raw.spec.model

    @property
    def endpoint(self) -> str:
        """REST URL on the gateway: for a task model its predict endpoint (POST JSON such as
        {"text": ...}), else the Open Inference Protocol base (POST {endpoint}/infer). gRPC clients use
        the gateway address with this deployment's name as the model name."""
        return self.predict_url if self.task else f"{self._service.http_url}/v2/models/{self.name}"

    @property
    def predict_url(self) -> str:
        """Task endpoint (task models): POST {"text": ...}, {"inputs": [...]} or an image."""
        return f"{self._service.http_url}/v1/models/{self.name}/predict"

    @property
    def grpc_endpoint(self) -> str:
        return self._service.endpoint

    @property
    def docs_url(self) -> str:
        """This deployment's API docs page (its operations, and a task model's schema with an example)."""
        return f"{self._service.http_url}/docs/deployments/{self.name}"

    @property
    def status(self) -> str:
        """READY, DEGRADED, PENDING or FAILED (see `aimaas.sdk.deployments.status_word`), as of the last read."""
        return views.status_word(self.raw)

    @property
    def progress(self) -> str:
        return views.progress_line(self.raw)

    async def refresh(self) -> AsyncDeployment:
        self.raw = (await self._service.get_deployment(self.name)).raw
        return self

    async def wait_ready(self, timeout: float = 120.0, min_replicas: int | None = None) -> AsyncDeployment:
        """Poll until every version with traffic has min_replicas (default: the spec's) READY replicas
        and the gateway routes to the deployment (its routing table follows etcd a moment later)."""
        deadline = time.monotonic() + timeout
        while True:
            if views.is_ready(self.raw, min_replicas) and await self._service._routable(self.name):
                return self
            if time.monotonic() >= deadline:
                raise AimaasError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deployment {self.name} not ready after {timeout:g}s: {self.progress}",
                )
            await asyncio.sleep(_POLL_S)
            await self.refresh()

    def __repr__(self) -> str:
        task = f", task={self.task!r}" if self.task else ""
        return (
            f"Deployment(name={self.name!r}, model={self.model!r}{task}, status={self.status!r}, "
            f"endpoint={self.endpoint!r})"
        )


class AsyncModelService:
    """Push, deploy and call models through the gateway's gRPC port.

    `endpoint` is the gateway's gRPC host:port (default $AIMAAS_ENDPOINT, else 127.0.0.1:8001);
    `api_key` the bearer token (default $AIMAAS_API_KEY; none when the gateway runs without auth).
    """

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
        overrides: dict[str, Any] = {}
        if endpoint is not None:
            overrides["endpoint"] = endpoint
        if api_key is not None:
            overrides["api_key"] = api_key
        if timeout is not None:
            overrides["timeout_seconds"] = timeout
        if http_url is not None:
            overrides["http_url"] = http_url
        base = settings or ClientSettings()
        try:
            self.settings = base.model_validate(base.model_dump() | overrides) if overrides else base
        except ValueError as exc:
            raise invalid(str(exc)) from None
        self.endpoint = self.settings.endpoint
        self.http_url = (self.settings.http_url or default_http_url(self.endpoint, credentials is not None)).rstrip("/")
        self.timeout = self.settings.timeout_seconds
        self._credentials = credentials
        # Internal (the CLI on a mesh without a gateway): an address per service; with _gateway=False
        # `endpoint` is no gateway and only the services given have a real address.
        self._addresses = {name: self.endpoint for name in SERVICES} | dict(_service_endpoints or {})
        self._routes = frozenset(SERVICES) if _gateway else frozenset(_service_endpoints or ())
        token = self.settings.api_key.get_secret_value() if self.settings.api_key else ""
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._signatures: dict[tuple[str, str], tuple[float, ModelSignature]] = {}

    # --- plumbing ---------------------------------------------------------------------------

    def _channel(self, service: str) -> grpc.aio.Channel:
        # Created lazily, inside the running loop that will use it.
        address = self._addresses[service]
        channel = self._channels.get(address)
        if channel is None:
            options = [
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ]
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(address, options=options)
            self._channels[address] = channel
        return channel

    def _registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return registry_pb2_grpc.RegistryServiceStub(self._channel("registry"))

    def _scheduler(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        return scheduler_pb2_grpc.SchedulerServiceStub(self._channel("scheduler"))

    def _auth(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self._channel("auth"))

    def _inference(self) -> oip_grpc.GRPCInferenceServiceStub:
        return oip_grpc.GRPCInferenceServiceStub(self._channel("inference"))

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None = None) -> T:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise AimaasError.from_rpc_error(exc) from None

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> AsyncModelService:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- models -----------------------------------------------------------------------------

    async def push(
        self,
        path: str | pathlib.Path,
        name: str | None = None,
        *,
        provider: str | None = None,
        task: str | None = None,
        aliases: Iterable[str] = (),
        description: str = "",
        labels: Mapping[str, str] | None = None,
        format: str | None = None,
        create_model: bool = True,
        progress: PushProgress | None = None,
        timeout: float | None = None,
    ) -> PushedVersion:
        """Upload the file at `path` as a new version of model `name` (streamed in 1 MiB chunks).

        The sha256 and size are computed first and sent with the metadata, so the registry rejects
        bytes damaged on the way. `format` is "onnx", "tensorrt-plan" or None (detected from the bytes).
        With `provider="huggingface"`, `path` is a Hugging Face model directory or hub id, imported as
        a task model (`import_huggingface`; `name` defaults to one derived from it).
        """
        if provider is not None:
            _check_provider(provider)
            return await self.import_huggingface(
                str(path), name, task=task, aliases=aliases, description=description, labels=labels,
                progress=progress, timeout=timeout,
            )  # fmt: skip
        if name is None:
            raise invalid("push needs the model name")
        if task is not None:
            raise invalid("task applies to provider='huggingface' imports only")
        path = pathlib.Path(path)
        formats = {None: types_pb2.MODEL_FORMAT_UNSPECIFIED, "onnx": types_pb2.MODEL_FORMAT_ONNX,
                   "tensorrt-plan": types_pb2.MODEL_FORMAT_TENSORRT_PLAN}  # fmt: skip
        if format not in formats:
            raise invalid(f"format {format!r} is not one of onnx, tensorrt-plan (or None to detect)")
        try:
            digest, size = await asyncio.to_thread(_file_digest, path)
        except OSError as exc:
            raise invalid(f"cannot read {path}: {exc.strerror or exc}") from None
        metadata = rpb.UploadVersionMetadata(
            model=name, create_model=create_model, expected_sha256=digest, expected_size_bytes=size,
            format=formats[format], description=description, labels=dict(labels or {}), aliases=list(aliases),
        )  # fmt: skip

        async def requests() -> AsyncIterator[rpb.UploadVersionRequest]:
            yield rpb.UploadVersionRequest(metadata=metadata)
            sent = 0
            if progress is not None:
                progress(0, size)
            with path.open("rb") as stream:
                while chunk := await asyncio.to_thread(stream.read, CHUNK_BYTES):
                    yield rpb.UploadVersionRequest(chunk=chunk)
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, size)

        deadline = timeout or self.timeout + size / _UPLOAD_MIN_RATE_BYTES_PER_S
        try:
            response = await self._registry().UploadVersion(requests(), timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise AimaasError.from_rpc_error(exc) from None
        version = response.version
        return PushedVersion(version.model, version.version, version.sha256, version.size_bytes, response.deduplicated, version)

    async def import_huggingface(
        self,
        source: str,
        name: str | None = None,
        *,
        task: str | None = None,
        revision: str | None = None,
        aliases: Iterable[str] = (),
        description: str = "",
        labels: Mapping[str, str] | None = None,
        progress: PushProgress | None = None,
        steps: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> PushedVersion:
        """Import a Hugging Face model directory or hub id (through the local cache) as a task model.

        It is exported to ONNX here (aimaas.huggingface; needs the `hf` extra) with its task, labels
        and tokenizer, then pushed as one version of `name` (default: derived from the source). The
        same source (same files, task and exporter) imported again returns the version it made
        before (`deduplicated=True`) without exporting. `steps` hears each export step, `progress`
        the upload's bytes.
        """
        from aimaas import huggingface as hf

        try:
            resolved = await asyncio.to_thread(hf.resolve_source, source, revision=revision)
            chosen = await asyncio.to_thread(hf.detect_task, resolved.directory, task)
            digest = await asyncio.to_thread(hf.source_digest, resolved.directory, chosen)
        except hf.ImportFailed as exc:
            raise _import_error(exc) from None
        name = name or hf.model_name_for(resolved.name)
        existing = await self._version_with_label(name, hf.SOURCE_DIGEST_LABEL, digest)
        if existing is not None:
            for alias in aliases:
                await self._call(self._registry().SetAlias, rpb.SetAliasRequest(
                    model=name, alias=alias, version=existing.version, force=True))  # fmt: skip
            return PushedVersion(existing.model, existing.version, existing.sha256, existing.size_bytes, True, existing)
        try:
            exported = await asyncio.to_thread(hf.export_model, resolved, task=chosen, progress=steps)
        except hf.ImportFailed as exc:
            raise _import_error(exc) from None
        try:
            return await self.push(
                exported.path, name, aliases=aliases,
                description=description or f"{chosen} model imported from {resolved.name}",
                labels={**(labels or {}), hf.SOURCE_DIGEST_LABEL: digest}, format="onnx", progress=progress,
                timeout=timeout,
            )  # fmt: skip
        finally:
            exported.path.unlink(missing_ok=True)

    async def _version_with_label(self, model: str, key: str, value: str) -> rpb.ModelVersion | None:
        try:
            versions = await self.list_versions(model, include_archived=False)
        except AimaasError as exc:
            if exc.code is grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return next((v for v in reversed(versions) if v.labels.get(key) == value), None)

    async def list_models(self) -> list[rpb.Model]:
        found: list[rpb.Model] = []
        token = ""
        while True:
            page = types_pb2.PageRequest(page_token=token)
            response = await self._call(self._registry().ListModels, rpb.ListModelsRequest(page=page))
            found.extend(response.models)
            token = response.page.next_page_token
            if not token:
                return found

    async def get_model(self, name: str) -> rpb.GetModelResponse:
        return await self._call(self._registry().GetModel, rpb.GetModelRequest(name=name))

    async def list_versions(self, model: str, include_archived: bool = True) -> list[rpb.ModelVersion]:
        found: list[rpb.ModelVersion] = []
        token = ""
        while True:
            request = rpb.ListVersionsRequest(
                model=model, page=types_pb2.PageRequest(page_token=token), include_archived=include_archived
            )
            response = await self._call(self._registry().ListVersions, request)
            found.extend(response.versions)
            token = response.page.next_page_token
            if not token:
                return found

    async def resolve_version(self, model: str, reference: str = "latest") -> int:
        """Version number of a reference: a number, an alias, or "latest"."""
        return (await self._resolve(model, reference)).version

    async def _resolve(self, model: str, reference: str) -> rpb.ModelVersion:
        request = rpb.ResolveVersionRequest(model=model, reference=reference)
        return (await self._call(self._registry().ResolveVersion, request)).version

    # --- deployments ------------------------------------------------------------------------

    async def deploy(
        self,
        model_id: str,
        version: int | None = None,
        *,
        alias: str | None = None,
        name: str | None = None,
        min_instances: int = 1,
        max_instances: int | None = None,
        accelerator: str | None = None,
        instance_type: str | None = None,
        traffic: Sequence[Traffic | Mapping[str, Any]] | None = None,
        labels: Mapping[str, str] | None = None,
        provider: str | None = None,
        task: str | None = None,
    ) -> AsyncDeployment:
        """Create or update deployment `name` (default: the model name) of `model_id`.

        Serve `version`, or the version `alias` points at (followed when the alias moves), or a
        `traffic` split such as [{"version": 1, "weight": 90}, {"alias": "canary", "weight": 10}];
        with none of them, the latest version. Returns at once; `wait_ready()` waits for replicas.

        With `provider="huggingface"`, `model_id` is a Hugging Face model id or directory: it is
        imported first (`import_huggingface`, optionally as `task`) and its version deployed.
        `instance_type` ("cpu.small", "gpu.medium", ...; the scheduler lists them) sets the
        accelerator and the memory each replica reserves.
        """
        task_of_version: str | None = None
        if provider is not None:
            _check_provider(provider)
            if version is not None or alias is not None or traffic is not None:
                raise invalid("a Hugging Face deploy imports and serves the new version: no version, alias or traffic")
            pushed = await self.import_huggingface(model_id, task=task)
            model_id, version, task_of_version = pushed.model, pushed.version, pushed.raw.task.task or None
        elif task is not None:
            raise invalid("task applies to provider='huggingface' deploys only")
        if sum(x is not None for x in (version, alias, traffic)) > 1:
            raise invalid("give at most one of version, alias and traffic")
        if instance_type is not None and accelerator is not None:
            raise invalid("give accelerator or instance_type (which sets the accelerator), not both")
        if max_instances is None:
            max_instances = max(min_instances, 1)
        if min_instances < 0 or max_instances < min_instances:
            raise invalid(f"need 0 <= min_instances <= max_instances, got {min_instances} and {max_instances}")
        if accelerator not in _ACCELERATORS:
            raise invalid(f"accelerator {accelerator!r} is not one of cpu, gpu (or None: any)")
        if traffic is not None:
            targets = [Traffic.of(entry).to_proto() for entry in traffic]
            if not targets:
                raise invalid("traffic must have at least one entry")
        elif alias is not None:
            targets = [spb.TrafficTarget(weight=100, alias=alias)]
        else:
            if version is None:
                record = await self._resolve(model_id, "latest")
                version, task_of_version = record.version, record.task.task or None
            targets = [spb.TrafficTarget(weight=100, version=version)]
        spec = spb.DeploymentSpec(
            name=name or model_id, model=model_id, traffic=targets, min_replicas=min_instances,
            max_replicas=max_instances, accelerator=_ACCELERATORS[accelerator], labels=dict(labels or {}),
            instance_type=instance_type or "",
        )  # fmt: skip
        response = await self._call(self._scheduler().ApplyDeployment, spb.ApplyDeploymentRequest(spec=spec))
        if task_of_version is None and version is not None:
            # Looked up after the apply, so the scheduler's verdict (permission, unknown model) comes first.
            with contextlib.suppress(AimaasError):
                task_of_version = (await self._resolve(model_id, str(version))).task.task or None
        return AsyncDeployment(self, response.deployment, task=task_of_version)

    async def get_deployment(self, name: str) -> AsyncDeployment:
        response = await self._call(self._scheduler().GetDeployment, spb.GetDeploymentRequest(name=name))
        return AsyncDeployment(self, response.deployment)

    async def list_deployments(self, model: str = "") -> list[AsyncDeployment]:
        found: list[AsyncDeployment] = []
        token = ""
        while True:
            request = spb.ListDeploymentsRequest(page=types_pb2.PageRequest(page_token=token), model=model)
            response = await self._call(self._scheduler().ListDeployments, request)
            found.extend(AsyncDeployment(self, d) for d in response.deployments)
            token = response.page.next_page_token
            if not token:
                return found

    async def delete_deployment(self, name: str) -> None:
        await self._call(self._scheduler().DeleteDeployment, spb.DeleteDeploymentRequest(name=name))

    async def list_nodes(self) -> list[spb.NodeInfo]:
        return list((await self._call(self._scheduler().ListNodes, spb.ListNodesRequest())).nodes)

    # --- API keys (admin) -------------------------------------------------------------------

    async def create_api_key(
        self, name: str, role: str, model_scope: Iterable[str] = (), ttl_seconds: int = 0
    ) -> tuple[auth_pb2.ApiKey, str]:
        """(key record, bearer token); the token is shown only here."""
        if role not in ROLES:
            raise invalid(f"role {role!r} is not one of {', '.join(ROLES)}")
        request = auth_pb2.CreateApiKeyRequest(
            name=name, role=ROLES[role], model_scope=list(model_scope), ttl_seconds=ttl_seconds
        )
        response = await self._call(self._auth().CreateApiKey, request)
        return response.key, response.token

    async def list_api_keys(self) -> list[auth_pb2.ApiKey]:
        return list((await self._call(self._auth().ListApiKeys, auth_pb2.ListApiKeysRequest())).keys)

    async def revoke_api_key(self, key_id: str) -> None:
        await self._call(self._auth().RevokeApiKey, auth_pb2.RevokeApiKeyRequest(id=key_id))

    # --- inference --------------------------------------------------------------------------

    async def model_metadata(self, model: str, version: str = "", *, refresh: bool = False) -> ModelSignature:
        key = (model, version)
        cached = self._signatures.get(key)
        if cached is not None and not refresh and time.monotonic() - cached[0] < _METADATA_TTL_S:
            return cached[1]
        response = await self._call(self._inference().ModelMetadata, oip.ModelMetadataRequest(name=model, version=version))
        signature = ModelSignature.from_metadata(response)
        self._signatures[key] = (time.monotonic(), signature)
        return signature

    async def _routable(self, name: str) -> bool:
        """True when the inference endpoint serves `name`; without one (service-by-service mode) the
        scheduler's word is all there is."""
        if "inference" not in self._routes:
            return True
        try:
            return await self.model_ready(name)
        except AimaasError as exc:
            if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                return False
            raise

    async def model_ready(self, model: str, version: str = "") -> bool:
        response = await self._call(self._inference().ModelReady, oip.ModelReadyRequest(name=model, version=version))
        return response.ready

    async def predict(
        self, model: str, inputs: Inputs, *, version: int | str = "", timeout: float | None = None, request_id: str = ""
    ) -> dict[str, np.ndarray]:
        """Run one inference: `inputs` by input name (or one array for a single-input model), numpy
        arrays or plain lists; returns the outputs as numpy arrays by name."""
        return (await self.infer(model, inputs, version=version, timeout=timeout, request_id=request_id)).outputs

    async def infer(
        self, model: str, inputs: Inputs, *, version: int | str = "", timeout: float | None = None, request_id: str = ""
    ) -> InferResult:
        """`predict` with the response's model version, id and output datatypes."""
        version = str(version)
        signature = await self.model_metadata(model, version)
        arrays = prepare_inputs(signature, inputs)
        request = build_request(signature, arrays, model, version, request_id)
        response = await self._call(self._inference().ModelInfer, request, timeout)
        return InferResult(
            response.model_name, response.model_version, response.id, parse_response(response),
            {tensor.name: tensor.datatype for tensor in response.outputs},
        )  # fmt: skip

    async def batch_predict(
        self,
        model: str,
        inputs: Iterable[Inputs],
        *,
        concurrency: int = 8,
        version: int | str = "",
        progress: BatchProgress | None = None,
        timeout: float | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Predict every input set with at most `concurrency` requests in flight; results keep the
        order of `inputs`. Every input set is validated before the first request is sent; the first
        failure cancels the rest and is raised."""
        if concurrency < 1:
            raise invalid(f"concurrency must be >= 1, got {concurrency}")
        version = str(version)
        signature = await self.model_metadata(model, version)
        prepared = [prepare_inputs(signature, item) for item in inputs]
        results: list[dict[str, np.ndarray] | None] = [None] * len(prepared)
        pending = iter(range(len(prepared)))
        done = 0
        if progress is not None:
            progress(0, len(prepared))

        async def worker() -> None:
            nonlocal done
            for index in pending:
                request = build_request(signature, prepared[index], model, version)
                response = await self._call(self._inference().ModelInfer, request, timeout)
                results[index] = parse_response(response)
                done += 1
                if progress is not None:
                    progress(done, len(prepared))

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(concurrency, len(prepared))):
                    group.create_task(worker())
        except* AimaasError as failed:
            # One exception type for callers, not a group: the first failure.
            raise failed.exceptions[0] from None
        return results  # type: ignore[return-value]


PROVIDERS = ("huggingface",)
_IMPORT_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "missing_dependency": grpc.StatusCode.FAILED_PRECONDITION,
}


def _check_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        raise invalid(f"provider {provider!r} is not one of {', '.join(PROVIDERS)} (or None for a model file)")


def _import_error(exc: Any) -> AimaasError:
    return AimaasError(_IMPORT_CODES.get(exc.kind, grpc.StatusCode.INVALID_ARGUMENT), str(exc))


def _file_digest(path: pathlib.Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
