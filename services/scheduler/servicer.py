"""gRPC transport of the scheduler: request/response translation only; logic lives in core."""

from __future__ import annotations

import grpc

from aimaas.scheduler.v1 import scheduler_pb2 as pb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from services.common.errors import InvalidArgument
from services.scheduler.core import DeploymentService
from services.scheduler.leadership import FORWARDED


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, service: DeploymentService) -> None:
        self._service = service

    async def ApplyDeployment(self, request: pb.ApplyDeploymentRequest, context) -> pb.ApplyDeploymentResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("spec is required")
        deployment, changed = await self._service.apply(request.spec)
        return pb.ApplyDeploymentResponse(deployment=deployment, changed=changed)

    async def GetDeployment(self, request: pb.GetDeploymentRequest, context) -> pb.GetDeploymentResponse:
        return pb.GetDeploymentResponse(deployment=await self._service.get(request.name))

    async def ListDeployments(self, request: pb.ListDeploymentsRequest, context) -> pb.ListDeploymentsResponse:
        deployments, token = await self._service.list(request.page, request.model)
        return pb.ListDeploymentsResponse(deployments=deployments, page={"next_page_token": token})

    async def DeleteDeployment(self, request: pb.DeleteDeploymentRequest, context) -> pb.DeleteDeploymentResponse:
        await self._service.delete(request.name)
        return pb.DeleteDeploymentResponse()

    async def WatchDeployment(self, request: pb.WatchDeploymentRequest, context):
        async for deployment in self._service.watch(request.name):
            yield pb.WatchDeploymentResponse(deployment=deployment)

    async def ListNodes(self, request: pb.ListNodesRequest, context) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=await self._service.list_nodes())

    async def EnsureReplicas(self, request: pb.EnsureReplicasRequest, context) -> pb.EnsureReplicasResponse:
        forwarded = any(key == FORWARDED for key, _ in (context.invocation_metadata() or ()))
        deployment = await self._service.ensure_replicas(request.deployment, request.wait_seconds, forwarded=forwarded)
        return pb.EnsureReplicasResponse(deployment=deployment)


def register(servicer: SchedulerServicer):
    def _add(server: grpc.aio.Server) -> None:
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)

    return _add
