"""A small synchronous client of the registry for the CLI and scripts.

Every call carries a deadline; failures surface as `grpc.RpcError` (the caller decides how to report).
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Callable, Iterator
from types import TracebackType

import grpc

from aimaas.registry.v1 import registry_pb2 as pb
from aimaas.registry.v1 import registry_pb2_grpc
from aimaas.types.v1 import types_pb2

CHUNK_BYTES = 1024 * 1024
# Deadline of an upload: a fixed allowance plus time for the bytes at a pessimistic rate.
_UPLOAD_MIN_RATE_BYTES_PER_S = 2 * 1024 * 1024

ProgressCallback = Callable[[int], None]


def file_digest(path: pathlib.Path, on_progress: ProgressCallback | None = None) -> tuple[str, int]:
    """(lower-case hex sha256, size in bytes) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            if on_progress is not None:
                on_progress(len(chunk))
    return digest.hexdigest(), size


def upload_deadline(size_bytes: int, base_timeout: float) -> float:
    return base_timeout + size_bytes / _UPLOAD_MIN_RATE_BYTES_PER_S


class RegistryClient:
    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def upload_version(
        self,
        path: pathlib.Path,
        metadata: pb.UploadVersionMetadata,
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> pb.UploadVersionResponse:
        """Stream a file as a new version: the metadata message first, then CHUNK_BYTES chunks."""

        def requests() -> Iterator[pb.UploadVersionRequest]:
            yield pb.UploadVersionRequest(metadata=metadata)
            with path.open("rb") as stream:
                while chunk := stream.read(CHUNK_BYTES):
                    yield pb.UploadVersionRequest(chunk=chunk)
                    if on_progress is not None:
                        on_progress(len(chunk))

        deadline = timeout if timeout is not None else upload_deadline(metadata.expected_size_bytes, self.timeout)
        return self._stub.UploadVersion(requests(), timeout=deadline)

    def list_models(self) -> list[pb.Model]:
        models: list[pb.Model] = []
        token = ""
        while True:
            response = self._stub.ListModels(
                pb.ListModelsRequest(page=types_pb2.PageRequest(page_token=token)), timeout=self.timeout
            )
            models.extend(response.models)
            token = response.page.next_page_token
            if not token:
                return models

    def get_model(self, name: str) -> pb.GetModelResponse:
        return self._stub.GetModel(pb.GetModelRequest(name=name), timeout=self.timeout)

    def list_versions(self, model: str, include_archived: bool = True) -> list[pb.ModelVersion]:
        versions: list[pb.ModelVersion] = []
        token = ""
        while True:
            response = self._stub.ListVersions(
                pb.ListVersionsRequest(
                    model=model, page=types_pb2.PageRequest(page_token=token), include_archived=include_archived
                ),
                timeout=self.timeout,
            )
            versions.extend(response.versions)
            token = response.page.next_page_token
            if not token:
                return versions
