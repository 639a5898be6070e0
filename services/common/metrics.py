"""Prometheus metrics on an explicit registry, served on a /metrics port."""

from __future__ import annotations

from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server


@dataclass
class Metrics:
    """The registry of one process plus the RPC metrics every server records."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        self.rpc_total = Counter(
            "aimaas_grpc_server_handled_total", "RPCs completed, by method and status code",
            ["method", "code"], registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "aimaas_grpc_server_handling_seconds", "RPC handling time, by method",
            ["method"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )


class MetricsEndpoint:
    """An HTTP server exposing one registry at /metrics."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._requested_port = port
        self._server: WSGIServer | None = None
        self.port: int | None = None

    def start(self) -> int:
        server, _thread = start_http_server(self._requested_port, addr=self._host, registry=self._registry)
        self._server = server
        self.port = server.server_port
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
