"""Settings of the monitor process (`AIMAAS_MONITOR__*` plus the shared blocks)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from services.common.auth import AuthSettings
from services.common.settings import CommonSettings, ServerSettings


class MonitorServerSettings(ServerSettings):
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = 8401
    metrics_port: Annotated[int, Field(ge=-1, le=65535)] = 8402
    # Dashboard (HTTP) port; -1 disables the dashboard.
    dashboard_port: Annotated[int, Field(ge=-1, le=65535)] = 8403
    # Identity in the alert election and in notifications; default: host:grpc_port.
    advertise_address: str = ""

    # -- aggregation -------------------------------------------------------------------------------
    # Fine buckets answer the 1m and 5m windows and the charts; coarse buckets answer 1h.
    fine_bucket_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0
    coarse_bucket_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # Multiplies the length of every named window (1m, 5m, 1h). 1 in production; tests and demos shrink
    # time (0.1: "1m" is 6 s) so that alerting can be exercised in seconds.
    window_scale: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Series bound: past it the least recently reported series is evicted.
    max_series: Annotated[int, Field(ge=1)] = 5000
    # A replica is counted in the load signal (and a standalone node is up) while it reported this recently.
    replica_stale_seconds: Annotated[float, Field(gt=0)] = 15.0

    # -- alerts ------------------------------------------------------------------------------------
    evaluation_interval_seconds: Annotated[float, Field(gt=0, le=300)] = 5.0
    resolved_retention_seconds: Annotated[float, Field(ge=0)] = 3600.0
    webhook_timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 5.0
    webhook_max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    webhook_retry_initial_seconds: Annotated[float, Field(gt=0)] = 0.5
    webhook_retry_max_seconds: Annotated[float, Field(gt=0)] = 10.0

    # -- dashboard ---------------------------------------------------------------------------------
    # API keys for the dashboard's data (READ permission), e.g. AIMAAS_MONITOR__AUTH__ENABLED=false.
    auth: AuthSettings = AuthSettings()

    @model_validator(mode="after")
    def _check_buckets(self) -> MonitorServerSettings:
        if self.coarse_bucket_seconds < self.fine_bucket_seconds:
            raise ValueError("coarse_bucket_seconds must be >= fine_bucket_seconds")
        if self.fine_bucket_seconds > 60 * self.window_scale:
            raise ValueError("fine_bucket_seconds must not exceed the (scaled) 1m window")
        return self

    def window_seconds(self) -> dict[int, float]:
        from aimaas.monitor.v1 import monitor_pb2 as mpb

        return {w: s * self.window_scale for w, s in ((mpb.WINDOW_1M, 60.0), (mpb.WINDOW_5M, 300.0), (mpb.WINDOW_1H, 3600.0))}


class MonitorSettings(CommonSettings):
    monitor: MonitorServerSettings = MonitorServerSettings()
