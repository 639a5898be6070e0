"""Registry resilience: health follows its dependencies, recovery after an etcd restart without a
registry restart, and bounded memory while a large artifact streams through a separate process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimaas.registry.v1 import registry_pb2 as pb
from aimaas.registry.v1 import registry_pb2_grpc
from services.common.settings import EtcdSettings
from tests.support.models import large_model_bytes, mlp_bytes
from tests.support.registry import registry_settings, running_registry, sha256, upload, upload_requests
from tests.support.servers import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return response.status


async def wait_for_health(address: str, status: int, timeout: float = 20.0, service: str = "") -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = await health_status(address, service)
            if last == status:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"health of {address} stayed {last}, wanted {status}")


async def test_recovers_after_an_etcd_restart_without_restarting(restartable_etcd, local_store_settings):
    etcd = EtcdSettings(endpoints=restartable_etcd.endpoint, session_ttl_seconds=3, timeout_seconds=2)
    async with running_registry(registry_settings(etcd, local_store_settings)) as (app, stub):
        await wait_for_health(app.grpc.address, SERVING)
        await wait_for_health(app.grpc.address, SERVING, service="aimaas.registry.v1.RegistryService")
        await upload(stub, "m", mlp_bytes())

        restartable_etcd.stop()
        await wait_for_health(app.grpc.address, NOT_SERVING)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetModel(pb.GetModelRequest(name="m"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        restartable_etcd.start()
        await wait_for_health(app.grpc.address, SERVING)
        # Same process, same client: reads and writes work again, nothing was lost.
        got = await stub.GetModel(pb.GetModelRequest(name="m"), timeout=10)
        assert got.model.latest_version == 1
        second = await upload(stub, "m", mlp_bytes(seed=1))
        assert second.version.version == 2


async def test_health_reports_an_unreachable_object_store(etcd_settings, s3_settings):
    unreachable = s3_settings.model_copy(update={"endpoint": f"127.0.0.1:{free_port()}", "timeout_seconds": 1})
    async with running_registry(registry_settings(etcd_settings, unreachable)) as (app, stub):
        await wait_for_health(app.grpc.address, NOT_SERVING)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await upload(stub, "m", mlp_bytes(), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "object store" in info.value.details()


def _registry_process(etcd_settings, store_path, port: int) -> subprocess.Popen:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIMAAS_")},
        "AIMAAS_ETCD__ENDPOINTS": etcd_settings.endpoints,
        "AIMAAS_ETCD__NAMESPACE": etcd_settings.namespace,
        "AIMAAS_OBJECT_STORE__KIND": "local",
        "AIMAAS_OBJECT_STORE__PATH": str(store_path),
        "AIMAAS_REGISTRY__GRPC_PORT": str(port),
        "AIMAAS_REGISTRY__METRICS_PORT": "-1",
        "AIMAAS_LOG__LEVEL": "WARNING",
    }
    return subprocess.Popen([sys.executable, "-m", "services.registry"], env=env)


@pytest.mark.slow
async def test_large_upload_keeps_registry_memory_bounded(etcd_settings, tmp_path):
    data = large_model_bytes(200 * 1024 * 1024)
    port = free_port()
    process = _registry_process(etcd_settings, tmp_path / "objects", port)
    try:
        address = f"127.0.0.1:{port}"
        await wait_for_health(address, SERVING, timeout=30)
        registry = psutil.Process(process.pid)
        baseline = registry.memory_info().rss
        peak = baseline
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, registry.memory_info().rss)
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        async with grpc.aio.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            response = await stub.UploadVersion(
                upload_requests("big", data, chunk_size=1024 * 1024, create_model=True,
                                expected_sha256=sha256(data), expected_size_bytes=len(data)),
                timeout=300,
            )
        done.set()
        await sampler
        growth = peak - baseline
        print(f"registry RSS baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, growth {growth / 2**20:.1f} MiB for a {len(data) / 2**20:.0f} MiB upload")
        assert response.version.size_bytes == len(data)
        assert response.version.signature.inputs[0].name == "idx"
        assert growth < 64 * 1024 * 1024
    finally:
        process.terminate()
        process.wait(15)
