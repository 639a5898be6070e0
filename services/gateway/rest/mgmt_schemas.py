"""JSON shapes of the /v1 management API and their conversion from/to the aimaas.*.v1 messages.

Explicit pydantic models (rather than raw protobuf JSON) keep the OpenAPI document precise: bounded
integers, enums as lower-case names, timestamps as RFC 3339 strings. Bounds mirror the proto field
types so a value the schema accepts never overflows a protobuf field (which would be a 500).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from aimaas.auth.v1 import auth_pb2 as apb
from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.sdk.deployments import status_reason, status_word
from aimaas.types.v1 import types_pb2 as tpb
from services.common.etcd.keys import VERSION_DIGITS
from services.common.names import LABEL_KEY_RE, MAX_LABEL_VALUE, MAX_LABELS, NAME_RE

U32_MAX = 2**32 - 1
# Version numbers are stored in fixed-width etcd keys (services.common.etcd.keys).
MAX_VERSION = 10**VERSION_DIGITS - 1


def _json_integer(value: Any) -> Any:
    # JSON Schema counts 3.0 as an integer but never true; request models are strict otherwise.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(ge: int, le: int) -> Any:
    """A bounded integer (the bounds land in the document as minimum/maximum)."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_json_integer)]


U32 = json_int(0, U32_MAX)
# Documented bounds stay exact as JSON numbers read as doubles (2**64 - 1 does not).
MAX_ARTIFACT_BYTES = 10**15
VersionNo = json_int(1, MAX_VERSION)
# The registry's rules (one place), stated in the document so clients and fuzzers see them.
NAME_PATTERN = NAME_RE.pattern
NAME_OR_EMPTY_PATTERN = f"^(|{NAME_PATTERN.strip('^$')})$"
LABEL_KEY_PATTERN = LABEL_KEY_RE.pattern
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._@:/-]{0,127}$"


# (pydantic rejects lone surrogates such as "\ud800" in strings, which protobuf could not encode.)
Text = Annotated[str, Field(max_length=4096)]
Name = Annotated[
    str, Field(pattern=NAME_PATTERN, description="1-63 chars of [a-z0-9-], starting with a letter, not ending with '-'.")
]
LabelKey = Annotated[str, Field(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Field(max_length=MAX_LABEL_VALUE)]
# additionalProperties: keys outside the pattern are invalid, not "anything goes".
Labels = Annotated[
    dict[LabelKey, LabelValue], Field(max_length=MAX_LABELS, json_schema_extra={"additionalProperties": False})
]

def _proto_enum(name: str, enum: Any, prefix: str) -> type[StrEnum]:
    """A StrEnum of the proto enum's value names without the prefix, lower-cased (MODEL_FORMAT_ONNX → onnx)."""
    members = {n[len(prefix) :].lower(): n[len(prefix) :].lower() for n in enum.keys()}
    cls = StrEnum(name, members)  # type: ignore[misc]
    cls.__doc__ = f"{name} (aimaas {enum.DESCRIPTOR.full_name})."
    return cls


ModelFormat = _proto_enum("ModelFormat", tpb.ModelFormat, "MODEL_FORMAT_")
Accelerator = _proto_enum("Accelerator", tpb.Accelerator, "ACCELERATOR_")
Precision = _proto_enum("Precision", tpb.Precision, "PRECISION_")
Backend = _proto_enum("Backend", tpb.Backend, "BACKEND_")
ReplicaState = _proto_enum("ReplicaState", tpb.ReplicaState, "REPLICA_STATE_")
VersionState = _proto_enum("VersionState", rpb.VersionState, "VERSION_STATE_")
Role = _proto_enum("Role", apb.Role, "ROLE_")
Window = _proto_enum("Window", mpb.Window, "WINDOW_")
# Roles a key can be given (not "unspecified").
_ROLES = tuple(r.value for r in Role if r.value != "unspecified")  # type: ignore[attr-defined]

_PREFIXES = {
    ModelFormat: (tpb.ModelFormat, "MODEL_FORMAT_"),
    Accelerator: (tpb.Accelerator, "ACCELERATOR_"),
    Precision: (tpb.Precision, "PRECISION_"),
    Backend: (tpb.Backend, "BACKEND_"),
    ReplicaState: (tpb.ReplicaState, "REPLICA_STATE_"),
    VersionState: (rpb.VersionState, "VERSION_STATE_"),
    Role: (apb.Role, "ROLE_"),
    Window: (mpb.Window, "WINDOW_"),
}


def enum_to_proto(value: StrEnum) -> int:
    enum, prefix = _PREFIXES[type(value)]
    return enum.Value(prefix + value.value.upper())


def enum_from_proto(cls: type[StrEnum], number: int) -> Any:
    enum, prefix = _PREFIXES[cls]
    try:
        return cls(enum.Name(number)[len(prefix) :].lower())
    except ValueError:  # a value added by a newer server
        return cls("unspecified")


def ts(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp: Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


class Strict(BaseModel):
    """Request bodies: unknown fields and coercions (true as a number, "1" as an integer) are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Error(BaseModel):
    """Every error response: a precise, caller-safe message."""

    error: str


# -- registry ---------------------------------------------------------------------------------------


class Model(BaseModel):
    name: str
    description: str
    labels: dict[str, str]
    created: datetime | None
    updated: datetime | None
    latest_version: int = Field(description="Highest version number allocated so far (0: none).")

    @classmethod
    def of(cls, m: rpb.Model) -> Model:
        return cls(
            name=m.name,
            description=m.description,
            labels=dict(m.labels),
            created=ts(m, "created"),
            updated=ts(m, "updated"),
            latest_version=m.latest_version,
        )


class Alias(BaseModel):
    model: str
    name: str
    version: int
    updated: datetime | None

    @classmethod
    def of(cls, a: rpb.Alias) -> Alias:
        return cls(model=a.model, name=a.name, version=a.version, updated=ts(a, "updated"))


class ModelDetail(Model):
    aliases: list[Alias]


class ModelCreate(Strict):
    name: Name
    description: Text = ""
    labels: Labels = Field(default_factory=dict)


class ModelUpdate(Strict):
    """Fields left out (or null) keep their value; `labels` replaces all labels."""

    description: Text | None = None
    labels: Labels | None = None


class OpenAIModel(BaseModel):
    id: str = Field(description="Deployment name: the `model` of POST /v1/embeddings.")
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "aimaas"


class ModelList(BaseModel):
    models: list[Model]
    next_page_token: str = Field(description="Pass as page_token for the next page; empty on the last page.")
    # OpenAI's list shape, so OpenAI clients (base_url=<gateway>/v1) list the embedding models.
    object: Literal["list"] = "list"
    data: list[OpenAIModel] = Field(
        default_factory=list,
        description="OpenAI-compatible: the feature-extraction deployments POST /v1/embeddings serves.",
    )


class TensorSpec(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a dynamic dimension.")


class Signature(BaseModel):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @classmethod
    def of(cls, s: tpb.Signature) -> Signature:
        def specs(items: Any) -> list[TensorSpec]:
            return [TensorSpec(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in items]

        return cls(inputs=specs(s.inputs), outputs=specs(s.outputs))


class Version(BaseModel):
    model: str
    version: int
    sha256: str
    size_bytes: int
    format: ModelFormat  # type: ignore[valid-type]
    signature: Signature
    created: datetime | None
    state: VersionState  # type: ignore[valid-type]
    description: str
    labels: dict[str, str]
    format_details: dict[str, str]

    @classmethod
    def of(cls, v: rpb.ModelVersion) -> Version:
        return cls(
            model=v.model,
            version=v.version,
            sha256=v.sha256,
            size_bytes=v.size_bytes,
            format=enum_from_proto(ModelFormat, v.format),
            signature=Signature.of(v.signature),
            created=ts(v, "created"),
            state=enum_from_proto(VersionState, v.state),
            description=v.description,
            labels=dict(v.labels),
            format_details=dict(v.format_details),
        )


class VersionList(BaseModel):
    versions: list[Version]
    next_page_token: str


class UploadResult(BaseModel):
    version: Version
    deduplicated: bool = Field(description="True when identical bytes were already stored.")


class AliasSet(Strict):
    version: VersionNo = Field(description="Version number the alias points to.")
    expected_version: json_int(0, MAX_VERSION) | None = Field(  # type: ignore[valid-type]
        default=None,
        description="Compare-and-swap: the alias must currently point here (0: must not exist yet). 409 otherwise.",
    )


class AliasList(BaseModel):
    aliases: list[Alias]


# -- scheduler --------------------------------------------------------------------------------------


class TrafficTarget(Strict):
    """Exactly one of `version` and `alias`, with a weight in percent (weights sum to 100)."""

    version: VersionNo | None = None
    alias: Name | None = None
    weight: json_int(1, 100) = 100  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _one_target(self) -> TrafficTarget:
        if (self.version is None) == (self.alias is None):
            raise ValueError("give exactly one of version and alias")
        return self

    def to_proto(self) -> spb.TrafficTarget:
        if self.version is not None:
            return spb.TrafficTarget(version=self.version, weight=self.weight)
        return spb.TrafficTarget(alias=self.alias, weight=self.weight)

    @classmethod
    def of(cls, t: spb.TrafficTarget) -> TrafficTarget:
        if t.WhichOneof("target") == "alias":
            return cls(alias=t.alias, weight=t.weight)
        return cls(version=t.version, weight=t.weight)


class Batching(Strict):
    enabled: bool = False
    max_batch_size: U32 = Field(default=0, description="0: the node default.")
    max_queue_delay_us: U32 = 0
    max_queue_size: U32 = Field(default=0, description="0: the node default.")


class Autoscaling(Strict):
    target_in_flight_per_replica: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)] = Field(
        default=0, description="0 disables autoscaling."
    )
    target_queue_time_ms: U32 = 0
    scale_up_stabilization_seconds: U32 = 0
    scale_down_stabilization_seconds: U32 = 0
    scale_to_zero_after_seconds: U32 = 0


class DeploymentApply(Strict):
    """Desired state of a deployment (declarative: PUT the same body twice and nothing changes)."""

    model: Name | None = Field(default=None, description="Registry model; defaults to the deployment name.")
    traffic: list[TrafficTarget] | None = Field(
        default=None, max_length=100, description="Traffic split; defaults to 100% on the model's latest version."
    )
    min_replicas: U32 = 1
    max_replicas: U32 = 1
    accelerator: Accelerator = Field(default=Accelerator("unspecified"), strict=False)  # type: ignore[valid-type]
    instance_type: str = Field(
        default="", max_length=63, examples=["cpu.small"],
        description="Named replica size (cpu.small, cpu.medium, cpu.large, gpu.small, ... as the scheduler "
        "configures them): sets the accelerator and the memory each replica reserves.",
    )  # fmt: skip
    precision: Precision = Field(default=Precision("unspecified"), strict=False)  # type: ignore[valid-type]
    batching: Batching = Field(default_factory=Batching)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    labels: Labels = Field(default_factory=dict)

    def to_proto(self, name: str, traffic: list[spb.TrafficTarget]) -> spb.DeploymentSpec:
        return spb.DeploymentSpec(
            name=name,
            model=self.model or name,
            traffic=traffic,
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            accelerator=enum_to_proto(self.accelerator),
            instance_type=self.instance_type,
            precision=enum_to_proto(self.precision),
            batching=tpb.BatchingConfig(**self.batching.model_dump()),
            autoscaling=spb.AutoscalingPolicy(**self.autoscaling.model_dump()),
            labels=self.labels,
        )


class Replica(BaseModel):
    node_id: str
    model: str
    version: int
    state: ReplicaState  # type: ignore[valid-type]
    reason: str
    memory_bytes: int
    gpu_memory_bytes: int
    address: str
    backend: Backend  # type: ignore[valid-type]
    updated: datetime | None

    @classmethod
    def of(cls, r: spb.ReplicaStatus) -> Replica:
        return cls(
            node_id=r.node_id,
            model=r.model,
            version=r.version,
            state=enum_from_proto(ReplicaState, r.state),
            reason=r.reason,
            memory_bytes=r.memory_bytes,
            gpu_memory_bytes=r.gpu_memory_bytes,
            address=r.address,
            backend=enum_from_proto(Backend, r.backend),
            updated=ts(r, "updated"),
        )


class VersionStatus(BaseModel):
    version: int
    weight: int = Field(description="Effective weight now (differs from the spec during a rollout).")
    desired_replicas: int
    ready_replicas: int
    replicas: list[Replica]


class Condition(BaseModel):
    type: str
    status: bool
    reason: str
    message: str
    last_transition: datetime | None


class DeploymentStatus(BaseModel):
    observed_generation: int
    versions: list[VersionStatus]
    conditions: list[Condition]
    ready: bool = Field(description="The Ready condition holds.")
    state: Literal["READY", "DEGRADED", "PENDING", "FAILED"] = Field(
        description="READY; DEGRADED: a problem (e.g. replicas that cannot be placed) while READY replicas serve the "
        "traffic; FAILED: a problem and nothing serves; PENDING: on the way (the SDK's and CLI's status word)."
    )
    state_reason: str = Field(description="Why the state is not READY (the problem conditions, or what it waits for).")

    @classmethod
    def of(cls, d: spb.Deployment) -> DeploymentStatus:
        s = d.status
        conditions = [
            Condition(
                type=c.type,
                status=c.status,
                reason=c.reason,
                message=c.message,
                last_transition=ts(c, "last_transition"),
            )
            for c in s.conditions
        ]
        return cls(
            observed_generation=s.observed_generation,
            versions=[
                VersionStatus(
                    version=v.version,
                    weight=v.weight,
                    desired_replicas=v.desired_replicas,
                    ready_replicas=v.ready_replicas,
                    replicas=[Replica.of(r) for r in v.replicas],
                )
                for v in s.versions
            ],
            conditions=conditions,
            ready=any(c.type == "Ready" and c.status for c in conditions),
            state=status_word(d),
            state_reason=status_reason(d),
        )


class Deployment(BaseModel):
    name: str
    model: str
    traffic: list[TrafficTarget]
    min_replicas: int
    max_replicas: int
    accelerator: Accelerator  # type: ignore[valid-type]
    instance_type: str
    memory_bytes: int = Field(description="Memory each replica reserves on its node (from instance_type); 0: none.")
    precision: Precision  # type: ignore[valid-type]
    batching: Batching
    autoscaling: Autoscaling
    labels: dict[str, str]
    generation: int
    created: datetime | None
    updated: datetime | None
    status: DeploymentStatus
    endpoint: str = Field(description="REST inference URL (Open Inference Protocol).")
    docs_url: str = Field(description="Interactive API docs of this deployment.")

    @classmethod
    def of(cls, d: spb.Deployment, *, endpoint: str, docs_url: str) -> Deployment:
        s = d.spec
        b, a = s.batching, s.autoscaling
        return cls(
            name=s.name,
            model=s.model,
            traffic=[TrafficTarget.of(t) for t in s.traffic],
            min_replicas=s.min_replicas,
            max_replicas=s.max_replicas,
            accelerator=enum_from_proto(Accelerator, s.accelerator),
            instance_type=s.instance_type,
            memory_bytes=s.memory_bytes,
            precision=enum_from_proto(Precision, s.precision),
            batching=Batching(
                enabled=b.enabled,
                max_batch_size=b.max_batch_size,
                max_queue_delay_us=b.max_queue_delay_us,
                max_queue_size=b.max_queue_size,
            ),
            autoscaling=Autoscaling(
                target_in_flight_per_replica=a.target_in_flight_per_replica,
                target_queue_time_ms=a.target_queue_time_ms,
                scale_up_stabilization_seconds=a.scale_up_stabilization_seconds,
                scale_down_stabilization_seconds=a.scale_down_stabilization_seconds,
                scale_to_zero_after_seconds=a.scale_to_zero_after_seconds,
            ),
            labels=dict(s.labels),
            generation=s.generation,
            created=ts(s, "created"),
            updated=ts(s, "updated"),
            status=DeploymentStatus.of(d),
            endpoint=endpoint,
            docs_url=docs_url,
        )


class DeploymentList(BaseModel):
    deployments: list[Deployment]
    next_page_token: str


class Node(BaseModel):
    id: str
    address: str
    accelerator: Accelerator  # type: ignore[valid-type]
    backends: list[Backend]  # type: ignore[valid-type]
    gpu_arch: str
    memory_capacity_bytes: int
    gpu_memory_capacity_bytes: int
    memory_used_bytes: int
    started: datetime | None
    labels: dict[str, str]
    replicas: list[Replica]

    @classmethod
    def of(cls, info: spb.NodeInfo) -> Node:
        n = info.node
        return cls(
            id=n.id,
            address=n.address,
            accelerator=enum_from_proto(Accelerator, n.accelerator),
            backends=[enum_from_proto(Backend, b) for b in n.backends],
            gpu_arch=n.gpu_arch,
            memory_capacity_bytes=n.memory_capacity_bytes,
            gpu_memory_capacity_bytes=n.gpu_memory_capacity_bytes,
            memory_used_bytes=info.memory_used_bytes,
            started=ts(n, "started"),
            labels=dict(n.labels),
            replicas=[Replica.of(r) for r in info.replicas],
        )


class NodeList(BaseModel):
    nodes: list[Node]


# -- monitor ----------------------------------------------------------------------------------------


class Resources(BaseModel):
    cpu_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    gpu_memory_used_bytes: int
    gpu_memory_total_bytes: int
    gpu_utilization_percent: float


class MetricsSample(BaseModel):
    model: str
    version: int
    node_id: str
    qps: float
    success_rate: float
    p50_latency_ms: float
    p95_latency_ms: float
    p99_latency_ms: float
    mean_queue_time_ms: float
    batch_sizes: dict[int, int] = Field(description="Batch size → executions.")
    request_count: int
    failure_count: int
    resources: Resources | None

    @classmethod
    def of(cls, s: mpb.MetricsSample) -> MetricsSample:
        r = s.resources
        return cls(
            model=s.model,
            version=s.version,
            node_id=s.node_id,
            qps=s.qps,
            success_rate=s.success_rate,
            p50_latency_ms=s.p50_latency_ms,
            p95_latency_ms=s.p95_latency_ms,
            p99_latency_ms=s.p99_latency_ms,
            mean_queue_time_ms=s.mean_queue_time_ms,
            batch_sizes=dict(s.batch_sizes),
            request_count=s.request_count,
            failure_count=s.failure_count,
            resources=Resources(
                cpu_percent=r.cpu_percent,
                memory_used_bytes=r.memory_used_bytes,
                memory_total_bytes=r.memory_total_bytes,
                gpu_memory_used_bytes=r.gpu_memory_used_bytes,
                gpu_memory_total_bytes=r.gpu_memory_total_bytes,
                gpu_utilization_percent=r.gpu_utilization_percent,
            )
            if s.HasField("resources")
            else None,
        )


class Metrics(BaseModel):
    window: Window  # type: ignore[valid-type]
    as_of: datetime | None
    samples: list[MetricsSample]


# -- API keys ---------------------------------------------------------------------------------------


class ApiKey(BaseModel):
    id: str
    name: str
    role: Role  # type: ignore[valid-type]
    model_scope: list[str] = Field(description="Models this key may touch (empty: all).")
    created: datetime | None
    expires: datetime | None
    revoked: datetime | None = Field(description="Set once the key is revoked (it no longer authenticates).")

    @classmethod
    def of(cls, k: apb.ApiKey) -> ApiKey:
        return cls(
            id=k.id,
            name=k.name,
            role=enum_from_proto(Role, k.role),
            model_scope=list(k.model_scope),
            created=ts(k, "created"),
            expires=ts(k, "expires"),
            revoked=ts(k, "revoked") if "revoked" in k.DESCRIPTOR.fields_by_name else None,
        )


class ApiKeyCreate(Strict):
    name: Annotated[str, Field(pattern=KEY_NAME_PATTERN)]
    role: Literal[_ROLES] = Field(description="admin, developer, invoker or viewer.")  # type: ignore[valid-type]
    model_scope: Annotated[list[Name], Field(max_length=256)] = Field(default_factory=list)
    ttl_seconds: U32 = Field(default=0, description="0: never expires.")


class ApiKeyCreated(BaseModel):
    key: ApiKey
    token: str = Field(description="The bearer token. Shown once: only its salted hash is stored.")


class ApiKeyList(BaseModel):
    keys: list[ApiKey]
