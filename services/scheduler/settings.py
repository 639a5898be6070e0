"""Settings of the scheduler process (`AIMAAS_SCHEDULER__*` plus the shared blocks)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common.settings import CommonSettings, ServerSettings, check_address_list


class InstanceType(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    accelerator: Literal["cpu", "gpu"]
    # Reserved per replica in the pool the replica uses (host memory; GPU memory for TensorRT).
    memory_bytes: Annotated[int, Field(ge=1)]

    def describe(self) -> str:
        return f"{self.accelerator.upper()}, {self.memory_bytes / 1024**3:g} GiB per replica"


_GIB = 1024**3
DEFAULT_INSTANCE_TYPES = {
    "cpu.small": InstanceType(accelerator="cpu", memory_bytes=1 * _GIB),
    "cpu.medium": InstanceType(accelerator="cpu", memory_bytes=4 * _GIB),
    "cpu.large": InstanceType(accelerator="cpu", memory_bytes=16 * _GIB),
    "gpu.small": InstanceType(accelerator="gpu", memory_bytes=8 * _GIB),
    "gpu.medium": InstanceType(accelerator="gpu", memory_bytes=24 * _GIB),
    "gpu.large": InstanceType(accelerator="gpu", memory_bytes=80 * _GIB),
}


class SchedulerServerSettings(ServerSettings):
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = 8201
    metrics_port: Annotated[int, Field(ge=-1, le=65535)] = 8202
    # Address other schedulers use to reach this one (EnsureReplicas is forwarded to the leader);
    # default: host:grpc_port.
    advertise_address: str = ""

    # -- reconciler -------------------------------------------------------------------------------
    # Changes arriving within this window are reconciled in one pass.
    reconcile_debounce_seconds: Annotated[float, Field(ge=0, le=10)] = 0.05
    # A full pass also runs this often without any change (safety net; passes are watch-driven).
    reconcile_resync_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Memory of a replica whose load has not been measured yet: artifact size x factor, at least min.
    memory_estimate_factor: Annotated[float, Field(ge=1)] = 2.0
    memory_estimate_min_bytes: Annotated[int, Field(ge=0)] = 16 * 1024 * 1024
    # A replica that FAILED on a node of a serving version is moved elsewhere after this long; the
    # node is avoided for that version for as long again.
    failed_replica_retry_seconds: Annotated[float, Field(ge=0)] = 30.0

    # -- failover: lost nodes --------------------------------------------------------------------
    # A node whose record vanishes (its lease expired) keeps its assignments this long in case it
    # registers again: an etcd frozen past the lease TTL expires every node at once, moments before
    # they all re-register, and re-placing their replicas would reload every model. A node that
    # stops answering its readiness probe is lost at once. 0: its replicas are re-placed at once.
    node_grace_seconds: Annotated[float, Field(ge=0)] = 30.0
    # How often such a node is probed (OIP ServerReady at its last known address).
    node_grace_probe_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0

    # -- failover: flapping nodes ----------------------------------------------------------------
    # A node that re-registers within this window after its record vanished is flapping...
    node_flap_window_seconds: Annotated[float, Field(ge=0)] = 60.0
    # ...and gets no new placements for this long (doubled per further flap, up to the maximum).
    node_probation_seconds: Annotated[float, Field(ge=0)] = 10.0
    node_probation_max_seconds: Annotated[float, Field(ge=0)] = 300.0

    # -- autoscaling -----------------------------------------------------------------------------
    autoscale_interval_seconds: Annotated[float, Field(gt=0)] = 5.0
    # Monitor replicas (host:port, comma-separated; any one that answers serves GetLoadSignal and
    # QueryMetrics); empty: node-reported statistics only.
    monitor_address: str = ""
    # Fall back to the nodes' own ModelStatistics when the monitor has no (fresh) signal.
    node_stats_fallback: bool = True
    # A signal older than this is not acted on.
    signal_max_age_seconds: Annotated[float, Field(gt=0)] = 30.0
    # Defaults when a deployment's AutoscalingPolicy leaves them 0.
    scale_up_stabilization_seconds: Annotated[float, Field(ge=0)] = 0.0
    scale_down_stabilization_seconds: Annotated[float, Field(ge=0)] = 300.0
    scale_to_zero_after_seconds: Annotated[float, Field(ge=0)] = 900.0
    # Density: a deployment whose load signal shows no traffic for this long may lose replicas above
    # its min_replicas (least recently used first) when a placement needs the memory.
    evict_idle_after_seconds: Annotated[float, Field(ge=0)] = 300.0
    # Largest max_replicas a deployment may ask for.
    max_replicas_limit: Annotated[int, Field(ge=1)] = 1000
    # Named replica sizes a deployment may ask for (DeploymentSpec.instance_type): the accelerator
    # and the memory each replica reserves on its node. JSON to replace, e.g.
    # {"cpu.small": {"accelerator": "cpu", "memory_bytes": 1073741824}}.
    instance_types: dict[str, InstanceType] = Field(default_factory=lambda: dict(DEFAULT_INSTANCE_TYPES))

    # -- canary (metrics from the monitor at monitor_address: QueryMetrics) ------------------------
    # How often the leader measures a running canary's candidate.
    canary_check_interval_seconds: Annotated[float, Field(gt=0)] = 1.0
    # Requests a measurement needs for a verdict; fewer is "insufficient traffic" (the step holds)...
    canary_min_requests: Annotated[int, Field(ge=1)] = 20
    # ...for at most this long beyond step_seconds, then the canary is rolled back.
    canary_max_hold_seconds: Annotated[float, Field(ge=0)] = 300.0

    @field_validator("monitor_address")
    @classmethod
    def _check_monitor_address(cls, value: str) -> str:
        return check_address_list(value, "monitor address")


class SchedulerSettings(CommonSettings):
    scheduler: SchedulerServerSettings = SchedulerServerSettings()
