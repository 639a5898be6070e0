"""gRPC transport of the registry: request/response translation only; logic lives in core."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from aimaas.registry.v1 import registry_pb2 as pb
from aimaas.registry.v1 import registry_pb2_grpc
from services.common.errors import InvalidArgument
from services.registry.core import ModelRegistry

# Initial metadata of UploadVersion once the metadata passed its checks and the bytes are read.
UPLOAD_ACCEPTED = ("aimaas-upload", "accepted")


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: ModelRegistry, download_chunk_bytes: int) -> None:
        self._registry = registry
        self._download_chunk_bytes = download_chunk_bytes

    async def CreateModel(self, request: pb.CreateModelRequest, context) -> pb.CreateModelResponse:
        model = await self._registry.create_model(request.name, request.description, dict(request.labels))
        return pb.CreateModelResponse(model=model)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.GetModelResponse:
        model, aliases = await self._registry.get_model(request.name)
        return pb.GetModelResponse(model=model, aliases=aliases)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models, token = await self._registry.list_models(request.page, dict(request.label_selector))
        return pb.ListModelsResponse(models=models, page={"next_page_token": token})

    async def UpdateModel(self, request: pb.UpdateModelRequest, context) -> pb.UpdateModelResponse:
        if not (request.update_description or request.update_labels):
            raise InvalidArgument("nothing to update: set update_description and/or update_labels")
        model = await self._registry.update_model(
            request.name,
            description=request.description if request.update_description else None,
            labels=dict(request.labels) if request.update_labels else None,
        )
        return pb.UpdateModelResponse(model=model)

    async def DeleteModel(self, request: pb.DeleteModelRequest, context) -> pb.DeleteModelResponse:
        await self._registry.delete_model(request.name)
        return pb.DeleteModelResponse()

    async def UploadVersion(
        self, request_iterator: AsyncIterator[pb.UploadVersionRequest], context
    ) -> pb.UploadVersionResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidArgument("empty upload: the first message must carry the metadata")
        if first.WhichOneof("payload") != "metadata":
            raise InvalidArgument("the first upload message must carry metadata, not a chunk")

        async def chunks() -> AsyncIterator[bytes]:
            # Read only once the metadata passed its checks: this initial metadata tells a streaming
            # client (the gateway) to send the bytes. Without it a client racing an early rejection
            # loses the status (grpc-python aio reports INTERNAL instead, grpc/grpc#36066).
            await context.send_initial_metadata((UPLOAD_ACCEPTED,))
            async for message in request_iterator:
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("metadata may only be sent once, in the first message")
                if message.chunk:
                    yield message.chunk

        version, deduplicated = await self._registry.upload_version(first.metadata, chunks())
        return pb.UploadVersionResponse(version=version, deduplicated=deduplicated)

    async def GetVersion(self, request: pb.GetVersionRequest, context) -> pb.GetVersionResponse:
        return pb.GetVersionResponse(version=await self._registry.get_version(request.model, request.version))

    async def ListVersions(self, request: pb.ListVersionsRequest, context) -> pb.ListVersionsResponse:
        versions, token = await self._registry.list_versions(request.model, request.page, request.include_archived)
        return pb.ListVersionsResponse(versions=versions, page={"next_page_token": token})

    async def DownloadVersion(self, request: pb.DownloadVersionRequest, context):
        version, stream = await self._registry.download_version(
            request.model, request.version, request.offset, request.length, self._download_chunk_bytes
        )
        yield pb.DownloadVersionResponse(version=version)
        async for chunk in stream:
            yield pb.DownloadVersionResponse(chunk=chunk)

    async def ArchiveVersion(self, request: pb.ArchiveVersionRequest, context) -> pb.ArchiveVersionResponse:
        return pb.ArchiveVersionResponse(version=await self._registry.archive_version(request.model, request.version))

    async def SetAlias(self, request: pb.SetAliasRequest, context) -> pb.SetAliasResponse:
        alias = await self._registry.set_alias(
            request.model, request.alias, request.version,
            expected_version=request.expected_version, force=request.force,
        )
        return pb.SetAliasResponse(alias=alias)

    async def GetAlias(self, request: pb.GetAliasRequest, context) -> pb.GetAliasResponse:
        return pb.GetAliasResponse(alias=await self._registry.get_alias(request.model, request.alias))

    async def ListAliases(self, request: pb.ListAliasesRequest, context) -> pb.ListAliasesResponse:
        await self._registry.get_model(request.model)
        return pb.ListAliasesResponse(aliases=await self._registry.list_aliases(request.model))

    async def DeleteAlias(self, request: pb.DeleteAliasRequest, context) -> pb.DeleteAliasResponse:
        await self._registry.delete_alias(request.model, request.alias, request.expected_version)
        return pb.DeleteAliasResponse()

    async def ResolveVersion(self, request: pb.ResolveVersionRequest, context) -> pb.ResolveVersionResponse:
        return pb.ResolveVersionResponse(version=await self._registry.resolve(request.model, request.reference))

    async def ListOrphanBlobs(self, request: pb.ListOrphanBlobsRequest, context) -> pb.ListOrphanBlobsResponse:
        return pb.ListOrphanBlobsResponse(blobs=await self._registry.list_orphan_blobs())

    async def DeleteOrphanBlobs(self, request: pb.DeleteOrphanBlobsRequest, context) -> pb.DeleteOrphanBlobsResponse:
        deleted = await self._registry.delete_orphan_blobs(request.min_age_seconds, request.dry_run)
        return pb.DeleteOrphanBlobsResponse(deleted=deleted)


def register(servicer: RegistryServicer):
    def _add(server: grpc.aio.Server) -> None:
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)

    return _add
