"""A stand-in monitor for tests: a real gRPC server implementing MonitorService.ReportStats that keeps
every report it receives (the other RPCs answer UNIMPLEMENTED)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc


class CollectingMonitor(mpb_grpc.MonitorServiceServicer):
    def __init__(self) -> None:
        self.requests: list[mpb.ReportStatsRequest] = []
        # Streams opened, and streams the client half-closed (ended cleanly).
        self.streams = 0
        self.closed_streams = 0

    async def ReportStats(self, request_iterator, context):  # noqa: N802 - gRPC method name
        self.streams += 1
        accepted = 0
        async for request in request_iterator:
            self.requests.append(request)
            accepted += len(request.deltas)
        self.closed_streams += 1
        return mpb.ReportStatsResponse(accepted_deltas=accepted)

    def deltas(self) -> list[mpb.StatsDelta]:
        return [delta for request in self.requests for delta in request.deltas]


class MonitorServer:
    """`start()` binds 127.0.0.1 (the same port again after a `stop()`, to simulate an outage)."""

    def __init__(self, servicer: CollectingMonitor | None = None) -> None:
        self.servicer = servicer or CollectingMonitor()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server()
        mpb_grpc.add_MonitorServiceServicer_to_server(self.servicer, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if port == 0:
            raise RuntimeError(f"cannot bind the test monitor on port {self.port}")
        self.port = port
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def wait_for(self, condition: Callable[[CollectingMonitor], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.servicer):
            if time.monotonic() > deadline:
                raise AssertionError(f"the monitor did not see the expected reports within {timeout}s")
            await asyncio.sleep(0.02)
