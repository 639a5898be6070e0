"""Monitors for tests: a stand-in (a real gRPC server implementing only MonitorService.ReportStats that
keeps every report it receives) for reporter tests, and the real monitor service (`running_monitor`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from services.common.settings import EtcdSettings
    from services.monitor.app import MonitorApp
    from services.monitor.settings import MonitorSettings


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


# -- the real monitor service ----------------------------------------------------------------------------


def monitor_settings(etcd: EtcdSettings, **server: Any) -> MonitorSettings:
    """A real monitor on free ports (gRPC, dashboard; no /metrics unless asked), quiet logs, time shrunk
    tenfold ("1m" is 6 s) with 0.5 s buckets and a fast alert loop, auth off unless asked."""
    from services.common.auth import AuthSettings
    from services.common.settings import LogSettings
    from services.monitor.settings import MonitorServerSettings, MonitorSettings

    fields: dict[str, Any] = {
        "grpc_port": 0,
        "metrics_port": -1,
        "dashboard_port": 0,
        "shutdown_grace_seconds": 1,
        "window_scale": 0.1,
        "fine_bucket_seconds": 0.5,
        "coarse_bucket_seconds": 6.0,
        "evaluation_interval_seconds": 0.25,
        "replica_stale_seconds": 3.0,
        "webhook_retry_initial_seconds": 0.05,
        "webhook_retry_max_seconds": 0.2,
        "webhook_timeout_seconds": 2.0,
        "auth": AuthSettings(enabled=False),
    }
    fields.update(server)
    return MonitorSettings(etcd=etcd, log=LogSettings(level="WARNING"), monitor=MonitorServerSettings(**fields))


@contextlib.asynccontextmanager
async def running_monitor(settings: MonitorSettings) -> AsyncIterator[MonitorApp]:
    from services.monitor.app import MonitorApp

    app = MonitorApp(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def eventually(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll `condition` (sync or async) until it returns something truthy; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(interval)


class InferenceLoad:
    """Steady requests (~50/s) of a [1, 4] FP32 model to an inference node, in a background task;
    `burst` makes every request invalid (3 columns: INVALID_ARGUMENT)."""

    def __init__(self, address: str, model: str = "mlp") -> None:
        self.model = model
        self.address = address
        self.burst = False
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> InferenceLoad:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                columns = 3 if self.burst else 4
                request = pb.ModelInferRequest(
                    model_name=self.model,
                    inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, columns])],
                    raw_input_contents=[np.ones((1, columns), np.float32).tobytes()],
                )
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.ModelInfer(request, timeout=5)
                self.sent += 1
                await asyncio.sleep(0.02)


class WebhookReceiver:
    """A real HTTP/1.1 server on 127.0.0.1 collecting JSON POSTs (keep-alive aware). The first
    `fail_first` requests are answered 503, to exercise the sender's retries; `accepted` holds the
    bodies answered 200, `attempts` every body received."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.attempts: list[dict] = []
        self.accepted: list[dict] = []
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import json

        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = json.loads(await reader.readexactly(length)) if length else {}
                self.attempts.append(body)
                if len(self.attempts) <= self.fail_first:
                    status = b"503 Service Unavailable"
                else:
                    status = b"200 OK"
                    self.accepted.append(body)
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def statuses(self) -> list[tuple[str, str]]:
        """(status, subject) of every accepted notification, in arrival order."""
        return [(body["status"], body["alert"]["subject"]) for body in self.accepted]
