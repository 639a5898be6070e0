"""Readiness probes of mesh processes: etcd's /health endpoint and grpc.health.v1 for services."""

from __future__ import annotations

import json
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def etcd_healthy(endpoint: str, timeout: float = 2.0) -> bool:
    """True when etcd at host:port answers /health with health "true" (it has a leader)."""
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=timeout) as response:
            return json.loads(response.read()).get("health") == "true"
    except (OSError, ValueError):  # URLError and timeouts are OSErrors
        return False


def grpc_serving(address: str, timeout: float = 2.0, service: str = "") -> bool:
    """True when the gRPC server at host:port reports SERVING for `service` ("" = the whole server)."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING
