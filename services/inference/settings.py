"""Settings of an inference node (`AIMAAS_INFERENCE__*` plus the shared blocks)."""

from __future__ import annotations

import pathlib
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from services.common.settings import CommonSettings, ServerSettings, check_address_list


class BatchingDefaults(BaseModel):
    """Dynamic batching used when a model (config or deployment) does not say otherwise."""

    enabled: bool = True
    max_batch_size: Annotated[int, Field(ge=1, le=65536)] = 32
    # How long the oldest request may wait for more rows while the model is idle. 0 (Triton's default)
    # never waits: batches form from what queues up while the model is busy, which costs a lone
    # request no latency. The event loop's timers have about 1 ms resolution.
    max_queue_delay_us: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    # Waiting requests beyond this are rejected with RESOURCE_EXHAUSTED.
    max_queue_size: Annotated[int, Field(ge=1)] = 1024
    # A request that waited this long in the queue fails with DEADLINE_EXCEEDED (0: only the caller's deadline).
    default_timeout_ms: Annotated[int, Field(ge=0)] = 0


class InferenceServerSettings(ServerSettings):
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = 8301
    metrics_port: Annotated[int, Field(ge=-1, le=65535)] = 8302
    # Who speaks gRPC on grpc_port: "h2" (services.common.h2grpc: HTTP/2 parsed in the event loop,
    # ~2x the sequential calls per second of grpcio's server here) or "grpcio" (grpc.aio's server).
    grpc_frontend: Literal["h2", "grpcio"] = "h2"
    # Standalone mode: serve <dir>/<model>/<version>/model.onnx without etcd. Empty: mesh mode.
    model_repository: pathlib.Path | None = None
    # Mesh mode: stable identity of this node (default: hostname-port).
    node_id: str = ""
    # Address other processes use to reach this node (default: host:grpc_port).
    advertise_address: str = ""
    # Local content-addressed artifact cache.
    cache_dir: pathlib.Path = pathlib.Path(".aimaas/cache")
    cache_max_bytes: Annotated[int, Field(ge=0)] = 20 * 1024**3
    # Memory this node offers to models (0: measured total memory).
    memory_capacity_bytes: Annotated[int, Field(ge=0)] = 0
    # Object-store download retries for a load: exponential backoff between these bounds.
    load_retry_initial_seconds: Annotated[float, Field(gt=0)] = 0.5
    load_retry_max_seconds: Annotated[float, Field(gt=0)] = 30.0
    load_max_attempts: Annotated[int, Field(ge=1)] = 8
    # ONNX Runtime threads per model (0: ONNX Runtime decides). One by default: a node serves many
    # requests and models at once, and per-op thread pools fight the gRPC threads for the cores.
    intra_op_threads: Annotated[int, Field(ge=0)] = 1
    inter_op_threads: Annotated[int, Field(ge=0)] = 0
    # Batches measured to execute faster than this run on the event loop instead of the model's thread
    # (the two thread hand-offs cost ~0.1 ms on a busy host, more than a small model computes); 0: never.
    inline_execution_below_us: Annotated[int, Field(ge=0, le=10_000)] = 100
    # Threads decoding the images of task-model requests before batching (0: one per core).
    preprocess_threads: Annotated[int, Field(ge=0, le=256)] = 0
    # Backends to try, in order of preference, when the artifact allows several.
    backends: list[str] = ["tensorrt", "onnxruntime"]
    batching: BatchingDefaults = BatchingDefaults()
    # Unload waits at most this long for in-flight requests of the model.
    unload_drain_seconds: Annotated[float, Field(ge=0)] = 30.0
    # Monitor replicas (host:port, comma-separated) to stream statistics to, each gets every report;
    # empty disables streaming.
    monitor_address: str = ""
    # One report (a delta per loaded model version, plus host resources) per interval.
    stats_interval_seconds: Annotated[float, Field(gt=0)] = 5.0
    # Reports waiting while the monitor is unreachable; beyond this the oldest are dropped.
    monitor_buffer_max_reports: Annotated[int, Field(ge=1)] = 120
    # Reconnecting to an unreachable monitor: exponential backoff between these bounds.
    monitor_retry_initial_seconds: Annotated[float, Field(gt=0)] = 0.5
    monitor_retry_max_seconds: Annotated[float, Field(gt=0)] = 10.0
    # At shutdown, how long the last reports may take to reach the monitor.
    monitor_flush_timeout_seconds: Annotated[float, Field(ge=0)] = 2.0

    @field_validator("monitor_address")
    @classmethod
    def _check_monitor_address(cls, value: str) -> str:
        return check_address_list(value, "monitor address")


class InferenceSettings(CommonSettings):
    inference: InferenceServerSettings = InferenceServerSettings()
