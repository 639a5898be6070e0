"""gRPC transport of the Open Inference Protocol: translation only; the logic lives in the data plane.

Errors are raised as domain errors (services.common.errors); the server interceptor maps them to
status codes. ModelStreamInfer is the exception: its errors travel in-band (error_message) and the
stream stays open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import structlog
from opentelemetry.trace import SpanKind, Tracer

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc
from services.common import oip_stream
from services.common.aio import answer_concurrently
from services.common.errors import FailedPrecondition, InvalidArgument
from services.inference.dataplane import DataPlane, ModelState
from services.inference.repository import ModelRepository

SERVER_NAME = "aimaas"
# The span of one request on a stream that carried its own trace context (services.common.oip_stream).
STREAM_REQUEST_SPAN = "/inference.GRPCInferenceService/ModelStreamInfer request"
EXTENSIONS = ("binary_tensor_data", "model_configuration", "model_repository", "statistics")
MESH_PLACEMENT = "models on a mesh node are placed by the scheduler"
# The protocol's repository states; FAILED is reported as UNAVAILABLE with its reason.
_INDEX_STATE = {
    ModelState.LOADING: "LOADING",
    ModelState.READY: "READY",
    ModelState.UNLOADING: "UNLOADING",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNAVAILABLE: "UNAVAILABLE",
}


class InferenceServicer(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        data_plane: DataPlane,
        repository: ModelRepository | None,
        *,
        version: str,
        is_ready: Callable[[], bool],
        logger: structlog.stdlib.BoundLogger,
        tracer: Tracer | None = None,
    ) -> None:
        """`tracer`: set when this node exports traces; a stream request that carries its own trace
        context then gets a server span under it (unary calls get theirs from the interceptor)."""
        self._data_plane = data_plane
        self._tracer = tracer
        self._repository = repository
        self._is_ready = is_ready
        self._log = logger
        self._metadata = pb.ServerMetadataResponse(name=SERVER_NAME, version=version, extensions=EXTENSIONS)

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else asyncio.get_running_loop().time() + remaining

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._data_plane.ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return self._metadata

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        return self._data_plane.metadata(request.name, request.version)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        deadline = oip_stream.request_deadline(request, asyncio.get_running_loop().time(), self._deadline(context))
        return await self._data_plane.infer(request, deadline=deadline)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest], context) -> None:
        # Requests of one stream run concurrently (so they can share batches); each response goes
        # out when ready, matched to its request by id, as in Triton. A request's own deadline and
        # trace parent may come in its parameters (services.common.oip_stream: a gateway multiplexes
        # many callers' requests over one stream), its error's status code goes back in-band.
        deadline = self._deadline(context)
        loop = asyncio.get_running_loop()

        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                own_deadline = oip_stream.request_deadline(request, loop.time(), deadline)
                parent = oip_stream.trace_parent(request) if self._tracer is not None else None
                if parent is None:
                    response = await self._data_plane.infer(request, deadline=own_deadline)
                else:
                    with self._tracer.start_as_current_span(STREAM_REQUEST_SPAN, context=parent, kind=SpanKind.SERVER):
                        response = await self._data_plane.infer(request, deadline=own_deadline)
                return pb.ModelStreamInferResponse(infer_response=response)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - in-band error, the stream stays open
                return oip_stream.error_response(request, exc, self._log)

        await answer_concurrently(request_iterator, answer, context.write)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self._data_plane.config(request.name, request.version))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        return pb.ModelStatisticsResponse(model_stats=self._data_plane.statistics(request.name, request.version))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        if self._repository is None:
            entries = self._data_plane.index(ready_only=request.ready)
        else:
            entries = await self._repository.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=_INDEX_STATE[e.state], reason=e.reason
                )
                for e in entries
            ]
        )

    def _repository_for(self, request) -> ModelRepository:
        if self._repository is None:
            raise FailedPrecondition(MESH_PLACEMENT)
        if not request.model_name:
            raise InvalidArgument("model_name is required")
        # unload_dependents (sent by every tritonclient unload) has nothing to act on: no ensembles.
        unsupported = sorted(set(request.parameters) - {"unload_dependents"})
        if unsupported:
            raise InvalidArgument(
                f"repository parameters ({', '.join(unsupported)}) are not supported; "
                "edit the model's directory and config.json instead"
            )
        return self._repository

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context
    ) -> pb.RepositoryModelLoadResponse:
        await self._repository_for(request).load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context
    ) -> pb.RepositoryModelUnloadResponse:
        await self._repository_for(request).unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def register(servicer: InferenceServicer):
    def _add(server: grpc.aio.Server) -> None:
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)

    return _add
