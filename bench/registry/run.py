"""Upload throughput through the registry vs a direct object-store put of the same bytes.

Both run in the same process tree, on the same machine, in the same run: a real etcd, the registry
as its own process (as in production), and each object store backend (local directory; an
S3-protocol server). The figure that matters is the ratio registry/direct (target >= 0.7).

Usage: python -m bench.registry.run [--size-mib 256] [--repeats 3] [--out bench/results/registry.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimaas.registry.v1 import registry_pb2 as pb
from aimaas.registry.v1 import registry_pb2_grpc
from services.common.objectstore import create_object_store
from services.common.settings import ObjectStoreKind, ObjectStoreSettings
from tests.support.servers import EtcdProcess, S3Server, free_port

CHUNK = 1024 * 1024


class S3Process:
    """moto's S3 server as a separate process on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)


async def direct_put(settings: ObjectStoreSettings, data: bytes) -> float:
    store = create_object_store(settings)
    await store.ensure_ready()

    async def chunks():
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]

    key = f"bench/{uuid.uuid4().hex}"
    started = time.perf_counter()
    await store.put_stream(key, chunks())
    elapsed = time.perf_counter() - started
    await store.delete(key)
    await store.close()
    return elapsed


def registry_env(etcd: EtcdProcess, settings: ObjectStoreSettings, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMAAS_")}
    env.update({
        "AIMAAS_ETCD__ENDPOINTS": etcd.endpoint,
        "AIMAAS_ETCD__NAMESPACE": f"/bench-{uuid.uuid4().hex[:8]}/aimaas/v1",
        "AIMAAS_OBJECT_STORE__KIND": settings.kind.value,
        "AIMAAS_OBJECT_STORE__PATH": str(settings.path),
        "AIMAAS_OBJECT_STORE__ENDPOINT": settings.endpoint,
        "AIMAAS_OBJECT_STORE__BUCKET": settings.bucket,
        "AIMAAS_OBJECT_STORE__ACCESS_KEY": settings.access_key.get_secret_value(),
        "AIMAAS_OBJECT_STORE__SECRET_KEY": settings.secret_key.get_secret_value(),
        "AIMAAS_REGISTRY__GRPC_PORT": str(port),
        "AIMAAS_REGISTRY__METRICS_PORT": "-1",
        "AIMAAS_LOG__LEVEL": "WARNING",
    })
    return env


async def wait_serving(address: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        while time.monotonic() < deadline:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"registry at {address} did not become healthy")


async def registry_upload(address: str, model: str, data: bytes) -> float:
    """Upload as the CLI does: a synchronous gRPC stream (grpcio's fastest client path)."""
    digest = hashlib.sha256(data).hexdigest()

    def requests():
        yield pb.UploadVersionRequest(metadata=pb.UploadVersionMetadata(
            model=model, create_model=True, expected_sha256=digest, expected_size_bytes=len(data)))
        view = memoryview(data)
        for start in range(0, len(data), CHUNK):
            yield pb.UploadVersionRequest(chunk=bytes(view[start : start + CHUNK]))

    def upload() -> float:
        with grpc.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            started = time.perf_counter()
            stub.UploadVersion(requests(), timeout=600)
            return time.perf_counter() - started

    return await asyncio.to_thread(upload)


async def bench_backend(name: str, settings: ObjectStoreSettings, etcd: EtcdProcess, sizes: list[int], repeats: int) -> list[dict]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "services.registry"], env=registry_env(etcd, settings, port))
    results = []
    try:
        address = f"127.0.0.1:{port}"
        await wait_serving(address)
        for size in sizes:
            direct_times, registry_times = [], []
            for repeat in range(repeats):
                # Different bytes each time: no dedupe shortcut for the registry.
                data = _unique_model(size, repeat)
                # Flush dirty pages first so neither side pays for the other's writeback.
                os.sync()
                direct_times.append(await direct_put(settings, data))
                os.sync()
                registry_times.append(await registry_upload(address, f"bench-{repeat}-{size}", data))
            direct = statistics.median(direct_times)
            through = statistics.median(registry_times)
            mib = len(data) / 2**20
            results.append({
                "backend": name,
                "size_mib": round(mib, 1),
                "repeats": repeats,
                "direct_put_mib_s": round(mib / direct, 1),
                "registry_upload_mib_s": round(mib / through, 1),
                "ratio": round(direct / through, 3),
            })
            print(json.dumps(results[-1]), flush=True)
    finally:
        process.terminate()
        process.wait(20)
    return results


def _unique_model(size: int, salt: int) -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    columns = 256
    rows = max(1, size // (4 * columns))
    weight = np.random.default_rng(salt).standard_normal((rows, columns), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["W", "idx"], ["y"], axis=0)], "bench",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", columns])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/registry.json"))
    args = parser.parse_args()
    sizes = [s * 2**20 for s in args.size_mib]

    with tempfile.TemporaryDirectory() as tmp:
        etcd = EtcdProcess(pathlib.Path(tmp) / "etcd")
        etcd.start()
        # The S3 server runs in its own process, as MinIO would: neither path shares its CPU or GIL.
        s3 = S3Process()
        s3.start()
        try:
            results = []
            if "local" in args.backends:
                local = ObjectStoreSettings(kind=ObjectStoreKind.LOCAL, path=pathlib.Path(tmp) / "objects")
                results += await bench_backend("local", local, etcd, sizes, args.repeats)
            if "s3" in args.backends:
                s3_settings = ObjectStoreSettings(
                    kind=ObjectStoreKind.S3, endpoint=s3.endpoint, bucket="bench",
                    access_key=S3Server.access_key, secret_key=S3Server.secret_key,
                )
                results += await bench_backend("s3 (moto)", s3_settings, etcd, sizes, args.repeats)
        finally:
            s3.stop()
            etcd.stop()

    report = {
        "benchmark": "registry upload throughput vs direct object-store put",
        "target_ratio": 0.7,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
