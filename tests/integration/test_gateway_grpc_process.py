"""`python -m services.gateway` as a real process: configuration from AIMAAS_* variables, TLS on the
gRPC and HTTP ports, Prometheus /metrics, graceful exit on SIGTERM, and a precise exit on bad config."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.support.scheduler import REPO, eventually
from tests.support.servers import free_port


def _env(etcd_settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMAAS_")}
    env.update(
        {
            "AIMAAS_ETCD__ENDPOINTS": etcd_settings.endpoints,
            "AIMAAS_ETCD__NAMESPACE": etcd_settings.namespace,
            "AIMAAS_GATEWAY__HOST": "127.0.0.1",
            "AIMAAS_GATEWAY__REGISTRY_ADDRESS": "127.0.0.1:1",
            "AIMAAS_GATEWAY__SCHEDULER_ADDRESS": "127.0.0.1:1",
            "AIMAAS_GATEWAY__SHUTDOWN_GRACE_SECONDS": "1",
            "AIMAAS_LOG__LEVEL": "WARNING",
            "PYTHONPATH": str(REPO),
            **extra,
        }
    )
    return env


@pytest.fixture
def certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_process_with_tls_metrics_and_graceful_sigterm(etcd_settings, certificate, tmp_path):
    cert, key = certificate
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = _env(
        etcd_settings,
        AIMAAS_GATEWAY__GRPC_PORT=str(grpc_port),
        AIMAAS_GATEWAY__HTTP_PORT=str(http_port),
        AIMAAS_GATEWAY__METRICS_PORT=str(metrics_port),
        AIMAAS_GATEWAY__AUTH__ENABLED="false",
        AIMAAS_GATEWAY__TLS_CERT_FILE=str(cert),
        AIMAAS_GATEWAY__TLS_KEY_FILE=str(key),
    )
    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{grpc_port}", credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                assert process.poll() is None, (tmp_path / "gateway.log").read_text()
                try:
                    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.aio.AioRpcError:
                    return False
                return response.status == health_pb2.HealthCheckResponse.SERVING

            await eventually(serving, 30, "the gateway SERVING over TLS", interval=0.2)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="nothing"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

        async with httpx.AsyncClient(verify=str(cert)) as client:
            live = await client.get(f"https://127.0.0.1:{http_port}/v2/health/live", timeout=10)
            assert live.status_code == 200
            metrics = await client.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            assert 'aimaas_grpc_server_handled_total{code="NOT_FOUND",method="/inference.GRPCInferenceService/ModelMetadata"} 1.0' in metrics.text
        # Plain text to a TLS port is refused.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.GRPCInferenceServiceStub(plain).ServerLive(pb.ServerLiveRequest(), timeout=2)

        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.to_thread(process.wait, 20)
        assert code == 0, (tmp_path / "gateway.log").read_text()
        print(f"\ngateway exited {code} {time.monotonic() - started:.2f}s after SIGTERM")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_bad_configuration_exits_with_a_precise_message(etcd_settings):
    # Every other rule is checked in tests/unit/test_gateway_routing_settings.py, without a process.
    result = subprocess.run(
        [sys.executable, "-m", "services.gateway"],
        env=_env(etcd_settings, AIMAAS_GATEWAY__SCHEDULER_ADDRESS="nope"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "AIMAAS_GATEWAY__SCHEDULER_ADDRESS: Value error, address 'nope' must be host:port" in result.stderr
