"""Readiness of an inference node as it says itself (Open Inference Protocol ServerReady): how the
leader tells a node whose lease-bound record vanished but that still serves (kept through its grace
period) from one that is gone (its replicas are placed elsewhere at once). See reconciler.NodeGrace."""

from __future__ import annotations

import grpc

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc


class NodeProbe:
    def __init__(self, *, timeout_seconds: float = 1.0) -> None:
        self._timeout = timeout_seconds

    async def __call__(self, address: str) -> bool:
        """True when the node at `address` answers ServerReady with ready within the timeout."""
        # A channel per probe: a cached one to a dead address would sit in reconnect backoff, and
        # probes run only while a node is missing.
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                response = await pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                    pb.ServerReadyRequest(), timeout=self._timeout
                )
            except grpc.aio.AioRpcError:
                return False
        return response.ready
