"""Typed process settings, read once from `AIMAAS_*` environment variables.

Each process builds exactly one settings object at start (its composition root) and passes the
blocks it needs down explicitly. Nested blocks use `__` in variable names, e.g.
`AIMAAS_ETCD__ENDPOINTS=127.0.0.1:2379`, `AIMAAS_OBJECT_STORE__KIND=s3`,
`AIMAAS_REGISTRY__GRPC_PORT=8101`.
"""

from __future__ import annotations

import pathlib
from enum import StrEnum
from typing import Annotated, TypeVar

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "AIMAAS_"

SettingsT = TypeVar("SettingsT", bound="CommonSettings")


def check_address(value: str, what: str) -> str:
    """`value` stripped, or ValueError unless it is host:port with a port in 1..65535."""
    value = value.strip()
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{what} {value!r} must be host:port")
    return value


def check_address_list(value: str, what: str) -> str:
    """A comma-separated list of host:port (e.g. every monitor replica), normalized; empty allowed."""
    addresses: list[str] = []
    for part in value.split(","):
        if part.strip():
            address = check_address(part, what)
            if address not in addresses:
                addresses.append(address)
    return ",".join(addresses)


class EtcdSettings(BaseModel):
    # Comma-separated host:port list; the first reachable one is used.
    endpoints: str = "127.0.0.1:2379"
    # Root of every key this deployment writes (see services.common.etcd.keys).
    namespace: str = "/aimaas/v1"
    # Lease TTL of sessions: how fast a dead process is noticed.
    session_ttl_seconds: Annotated[int, Field(ge=2, le=3600)] = 10
    # Deadline of one etcd call.
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0
    username: str | None = None
    password: SecretStr | None = None

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, value: str) -> str:
        for endpoint in value.split(","):
            host, sep, port = endpoint.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"etcd endpoint {endpoint!r} must be host:port")
        return value

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if not value.startswith("/") or value.endswith("/"):
            raise ValueError("etcd namespace must start with '/' and not end with '/'")
        return value

    def endpoint_list(self) -> list[tuple[str, int]]:
        result = []
        for endpoint in self.endpoints.split(","):
            host, _, port = endpoint.strip().rpartition(":")
            result.append((host, int(port)))
        return result


class ObjectStoreKind(StrEnum):
    LOCAL = "local"
    S3 = "s3"


class ObjectStoreSettings(BaseModel):
    kind: ObjectStoreKind = ObjectStoreKind.LOCAL
    # Local directory store root (kind=local).
    path: pathlib.Path = pathlib.Path(".aimaas/objects")
    # S3 endpoint host:port (kind=s3), e.g. MinIO.
    endpoint: str = ""
    bucket: str = "aimaas"
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    region: str = "us-east-1"
    secure: bool = False
    # Size of each multipart part; bounds memory per upload.
    part_size_bytes: Annotated[int, Field(ge=5 * 1024 * 1024)] = 8 * 1024 * 1024
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _check_s3(self) -> ObjectStoreSettings:
        if self.kind is ObjectStoreKind.S3 and not self.endpoint:
            raise ValueError("object_store.endpoint (AIMAAS_OBJECT_STORE__ENDPOINT) is required for kind=s3")
        return self


class TelemetrySettings(BaseModel):
    # OTLP/gRPC collector endpoint, e.g. http://127.0.0.1:4317; empty disables export.
    otlp_endpoint: str = ""
    service_name_prefix: str = "aimaas"
    # Fraction of traces sampled at the root.
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0


class LogSettings(BaseModel):
    level: str = "INFO"
    # json for machines (default), console for people at a terminal.
    format: str = "json"

    @field_validator("level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return value

    @field_validator("format")
    @classmethod
    def _check_format(cls, value: str) -> str:
        if value not in {"json", "console"}:
            raise ValueError("log format must be 'json' or 'console'")
        return value


class ServerSettings(BaseModel):
    """Listening addresses of one gRPC service process."""

    host: str = "127.0.0.1"
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = 0
    # 0 picks a free port; -1 disables the /metrics endpoint.
    metrics_port: Annotated[int, Field(ge=-1, le=65535)] = -1
    # How long in-flight calls may finish after SIGTERM.
    shutdown_grace_seconds: Annotated[float, Field(ge=0)] = 10.0
    max_message_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024

    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"


class CommonSettings(BaseSettings):
    """Blocks every service process shares; services subclass it and add their own block."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    etcd: EtcdSettings = EtcdSettings()
    object_store: ObjectStoreSettings = ObjectStoreSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    log: LogSettings = LogSettings()


def load_settings(settings_type: type[SettingsT]) -> SettingsT:
    """Build a process's settings from the environment, or exit with a message naming each bad variable."""
    import sys

    from pydantic import ValidationError

    try:
        return settings_type()
    except ValidationError as exc:
        lines = [f"invalid configuration ({len(exc.errors())} problem(s)):"]
        for error in exc.errors():
            variable = ENV_PREFIX + "__".join(str(part) for part in error["loc"]).upper()
            lines.append(f"  {variable}: {error['msg']}")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
