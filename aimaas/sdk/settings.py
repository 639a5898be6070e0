"""Client settings: the SDK's one read of the environment (AIMAAS_API_KEY, AIMAAS_ENDPOINT, ...)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """Defaults of `ModelService` for whatever the caller does not pass explicitly."""

    model_config = SettingsConfigDict(env_prefix="AIMAAS_", env_nested_delimiter="__", extra="ignore")

    # Gateway gRPC address (host:port).
    endpoint: str = "127.0.0.1:8001"
    # Bearer token sent in the `authorization` metadata; None when the gateway runs without auth.
    api_key: SecretStr | None = None
    # Deadline of each call that has no explicit timeout (uploads get extra time per byte).
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # Gateway HTTP base URL for `Deployment.endpoint` / `docs_url` (default: same host, gRPC port - 1,
    # the DESIGN.md port layout 8000/8001).
    http_url: str | None = None

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        value = value.strip()
        host, sep, port = value.rpartition(":")
        if "://" in value or not sep or not host or not port.isdigit():
            raise ValueError(f"endpoint {value!r} must be host:port (the gateway's gRPC port)")
        return value


def default_http_url(endpoint: str, secure: bool = False) -> str:
    """http(s)://host:(port-1): the gateway serves REST one port below gRPC (DESIGN.md ports, any offset)."""
    host, _, port = endpoint.rpartition(":")
    return f"{'https' if secure else 'http'}://{host}:{int(port) - 1}"
