"""Settings of the gateway process: `AIMAAS_GATEWAY__*` (with the nested blocks
`AIMAAS_GATEWAY__LIMITS__*` and `AIMAAS_GATEWAY__AUTH__*`) plus the shared blocks."""

from __future__ import annotations

import pathlib
from typing import Annotated

from pydantic import BaseModel, Field, field_validator, model_validator

from services.common.auth.settings import AuthSettings
from services.common.settings import CommonSettings, ServerSettings, check_address, check_address_list


class LimitSettings(BaseModel):
    """Per-request limits of the public edge (both transports)."""

    # Larger request bodies get 413 (REST) / RESOURCE_EXHAUSTED (gRPC message size).
    max_body_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    # Requests without a (shorter) deadline of their own end after this long with 504 / DEADLINE_EXCEEDED.
    request_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Requests in flight at once over the whole gateway (0: unlimited); beyond: 429 + Retry-After.
    max_concurrency: Annotated[int, Field(ge=0)] = 0
    # Requests in flight at once per API key (0: unlimited).
    max_concurrency_per_key: Annotated[int, Field(ge=0)] = 0
    # Retry-After (seconds) sent with 429.
    retry_after_seconds: Annotated[int, Field(ge=1)] = 1


class GatewayServerSettings(ServerSettings):
    """Listening ports, upstream services, routing behaviour and TLS."""

    grpc_port: Annotated[int, Field(ge=0, le=65535)] = 8001
    metrics_port: Annotated[int, Field(ge=-1, le=65535)] = 8002
    # REST (Open Inference Protocol, /v1 management API, /docs); -1 disables the HTTP server.
    http_port: Annotated[int, Field(ge=-1, le=65535)] = 8000
    # Base URL clients use to reach the REST port (deployment docs_url); default http(s)://host:http_port.
    public_http_url: str = ""

    # Upstream control-plane services (their gRPC APIs are passed through unchanged).
    registry_address: str = "127.0.0.1:8101"
    scheduler_address: str = "127.0.0.1:8201"
    # Monitor replicas (host:port, comma-separated): statistics go to each, queries to one that
    # answers. Empty: no monitor (metrics endpoints answer UNAVAILABLE, no stats are reported).
    monitor_address: str = ""

    # -- routing ---------------------------------------------------------------------------------
    # Attempts of one inference call (the first included) on distinct replicas while they answer
    # UNAVAILABLE, all within the caller's deadline.
    retry_max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    # A replica that failed with UNAVAILABLE is avoided for this long (or until its status changes).
    replica_eject_seconds: Annotated[float, Field(ge=0)] = 5.0
    # A READY replica whose lease-bound status vanishes (its node's etcd lease expired: an etcd
    # frozen past the lease TTL expires every lease at once when it resumes) stays routed while its
    # node answers probes, until its status is written again, for at most this long; 0: dropped at once.
    replica_grace_seconds: Annotated[float, Field(ge=0)] = 30.0
    # The nodes of such replicas are probed (ServerReady, ModelReady) this often; one failed probe ends it.
    replica_grace_probe_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    # Requests for a deployment scaled to zero wait this long for a READY replica...
    scale_from_zero_hold_seconds: Annotated[float, Field(ge=0)] = 30.0
    # ...and at most this many wait at once (more get RESOURCE_EXHAUSTED).
    scale_from_zero_queue_size: Annotated[int, Field(ge=0)] = 1000
    # Inference requests with up to 1 MiB of tensor data go to a node as messages on one long-lived
    # stream per node instead of a call each (far less work per request on both sides); larger
    # ones, and every request while traces are exported, go as unary calls.
    multiplex_upstream: bool = True
    # While the only request on a node's stream waits for its answer, poll for it this long before
    # sleeping: an answer read by a running process skips the kernel's wake-up (~40 µs of a small
    # model's latency on a VM). Costs up to this much CPU per request while the gateway is
    # otherwise idle; 0 turns it off (e.g. under a tight CPU quota).
    upstream_poll_microseconds: Annotated[int, Field(ge=0, le=10_000)] = 300
    # Simple REST inference requests (whole in one read, Content-Length framed) are answered
    # straight from the connection's bytes instead of through uvicorn's ASGI cycle
    # (services.gateway.rest.lane); same behaviour, ~100 µs less per request. False: all through ASGI.
    rest_infer_lane: bool = True
    # Requests carrying this header (gRPC metadata key) stick to one version and replica.
    sticky_header: str = "x-aimaas-session"

    # At start, wait this long for the first routing table before serving (health says NOT_SERVING
    # until it is in, e.g. while etcd is down).
    start_wait_seconds: Annotated[float, Field(ge=0)] = 5.0

    # -- statistics to the monitor ---------------------------------------------------------------
    stats_interval_seconds: Annotated[float, Field(gt=0)] = 5.0

    limits: LimitSettings = LimitSettings()
    auth: AuthSettings = AuthSettings()

    # -- TLS (both ports); both files or neither --------------------------------------------------
    tls_cert_file: pathlib.Path | None = None
    tls_key_file: pathlib.Path | None = None

    @field_validator("registry_address", "scheduler_address")
    @classmethod
    def _check_required(cls, value: str) -> str:
        return check_address(value, "address")

    @field_validator("monitor_address")
    @classmethod
    def _check_optional(cls, value: str) -> str:
        return check_address_list(value, "monitor address")

    @field_validator("sticky_header")
    @classmethod
    def _check_header(cls, value: str) -> str:
        value = value.strip().lower()
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError(f"sticky header {value!r} must be a non-empty header name")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> GatewayServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {str(path)!r} does not exist")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    def http_url(self, port: int | None = None) -> str:
        if self.public_http_url:
            return self.public_http_url.rstrip("/")
        scheme = "https" if self.tls_enabled else "http"
        return f"{scheme}://{self.host}:{self.http_port if port is None else port}"


class GatewaySettings(CommonSettings):
    gateway: GatewayServerSettings = GatewayServerSettings()
