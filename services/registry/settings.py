"""Settings of the registry process (`AIMAAS_REGISTRY__*` plus the shared blocks)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from services.common.settings import CommonSettings, ServerSettings


class RegistryServerSettings(ServerSettings):
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = 8101
    metrics_port: Annotated[int, Field(ge=-1, le=65535)] = 8102
    # Largest artifact accepted by UploadVersion.
    max_artifact_bytes: Annotated[int, Field(ge=1)] = 8 * 1024**3
    # Size of each DownloadVersion message.
    download_chunk_bytes: Annotated[int, Field(ge=4096, le=16 * 1024 * 1024)] = 1024 * 1024


class RegistrySettings(CommonSettings):
    registry: RegistryServerSettings = RegistryServerSettings()
