"""Start a real registry (in-process gRPC server on port 0) for tests."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator

import grpc

from aimaas.registry.v1 import registry_pb2 as pb
from aimaas.registry.v1 import registry_pb2_grpc
from services.common.settings import EtcdSettings, LogSettings, ObjectStoreSettings
from services.registry.app import RegistryApp
from services.registry.settings import RegistryServerSettings, RegistrySettings


def registry_settings(etcd: EtcdSettings, store: ObjectStoreSettings, **server) -> RegistrySettings:
    return RegistrySettings(
        etcd=etcd,
        object_store=store,
        log=LogSettings(level="WARNING"),
        registry=RegistryServerSettings(grpc_port=0, metrics_port=-1, shutdown_grace_seconds=1, **server),
    )


@contextlib.asynccontextmanager
async def running_registry(settings: RegistrySettings) -> AsyncIterator[tuple[RegistryApp, registry_pb2_grpc.RegistryServiceStub]]:
    app = RegistryApp(settings)
    await app.start()
    channel = grpc.aio.insecure_channel(app.grpc.address)
    try:
        yield app, registry_pb2_grpc.RegistryServiceStub(channel)
    finally:
        await channel.close()
        await app.stop()


def upload_requests(model: str, data: bytes, *, chunk_size: int = 64 * 1024, **metadata):
    yield pb.UploadVersionRequest(metadata=pb.UploadVersionMetadata(model=model, **metadata))
    for start in range(0, len(data), chunk_size):
        yield pb.UploadVersionRequest(chunk=data[start : start + chunk_size])


async def upload(stub, model: str, data: bytes, *, create_model: bool = True, timeout: float = 60, **metadata):
    return await stub.UploadVersion(
        upload_requests(model, data, create_model=create_model, **metadata), timeout=timeout
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
