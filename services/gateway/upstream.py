"""Calls to inference replicas: one reused channel per node, outstanding-request counts (for the
least-outstanding choice), ejection of replicas that just failed, and the scale-from-zero hold."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

import grpc
import structlog

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.gateway.routing import Route, RoutingWatcher

# A successful EnsureReplicas call covers requests arriving this long after it (the scheduler is
# already bringing the replica back); later requests of a still-empty deployment ask again.
_ENSURE_REPEAT_SECONDS = 5.0


class Upstream:
    """Channels to inference nodes, keyed by address, plus per-address load and health hints."""

    def __init__(
        self,
        *,
        eject_seconds: float,
        max_message_bytes: int,
        interceptors: list | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._eject_seconds = eject_seconds
        self._interceptors = interceptors or []
        self._clock = clock
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A restarted node must be reachable again quickly (gRPC's default backoff grows to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ]
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]] = {}
        self._outstanding: dict[str, int] = {}
        self._ejected_until: dict[str, float] = {}

    def stub(self, address: str) -> pb_grpc.GRPCInferenceServiceStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = grpc.aio.insecure_channel(address, options=self._options, interceptors=self._interceptors or None)
            entry = self._channels[address] = (channel, pb_grpc.GRPCInferenceServiceStub(channel))
        return entry[1]

    def load(self, address: str) -> int:
        return self._outstanding.get(address, 0)

    def ejected(self, address: str) -> bool:
        until = self._ejected_until.get(address)
        if until is None:
            return False
        if self._clock() >= until:
            del self._ejected_until[address]
            return False
        return True

    def eject(self, address: str) -> None:
        if self._eject_seconds > 0:
            self._ejected_until[address] = self._clock() + self._eject_seconds

    def forgive(self, address: str) -> None:
        self._ejected_until.pop(address, None)

    @contextlib.contextmanager
    def track(self, address: str) -> Iterator[None]:
        self._outstanding[address] = self._outstanding.get(address, 0) + 1
        try:
            yield
        finally:
            left = self._outstanding[address] - 1
            if left:
                self._outstanding[address] = left
            else:
                del self._outstanding[address]

    def retain(self, addresses: set[str]) -> None:
        """Close idle channels of nodes that left the routing table (busy ones on a later call)."""
        for address in [a for a in self._channels if a not in addresses and not self._outstanding.get(a)]:
            channel, _ = self._channels.pop(address)
            self._ejected_until.pop(address, None)
            asyncio.get_running_loop().create_task(channel.close())

    async def close(self) -> None:
        channels = [channel for channel, _ in self._channels.values()]
        self._channels.clear()
        for channel in channels:
            await channel.close()


class ZeroScaler:
    """Holds requests for a deployment with no READY replica while the scheduler brings one back.

    One EnsureReplicas call per deployment at a time; at most `queue_size` requests wait at once
    (more get RESOURCE_EXHAUSTED), each at most `hold_seconds` and never past its own deadline.
    """

    def __init__(
        self,
        scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
        routing: RoutingWatcher,
        *,
        hold_seconds: float,
        queue_size: int,
        logger: structlog.stdlib.BoundLogger,
    ) -> None:
        self._scheduler = scheduler
        self._routing = routing
        self._hold = hold_seconds
        self._queue_size = queue_size
        self._log = logger
        self._waiting = 0
        # EnsureReplicas calls made (observability and tests).
        self.ensure_calls = 0
        self._ensuring: dict[str, tuple[asyncio.Task[None], float]] = {}

    @property
    def waiting(self) -> int:
        return self._waiting

    def _ensure(self, deployment: str) -> asyncio.Task[None]:
        """The running (or recently successful) EnsureReplicas call for `deployment`, else a new one:
        a burst of held requests costs the scheduler one call, not one per request."""
        now = asyncio.get_running_loop().time()
        entry = self._ensuring.get(deployment)
        if entry is not None:
            task, started = entry
            if not task.done():
                return task
            if not task.cancelled() and task.exception() is None and now - started < _ENSURE_REPEAT_SECONDS:
                return task
        task = asyncio.get_running_loop().create_task(self._call_ensure(deployment))
        self._ensuring[deployment] = (task, now)
        return task

    async def _call_ensure(self, deployment: str) -> None:
        self._log.info("scaling deployment from zero", deployment=deployment)
        self.ensure_calls += 1
        await self._scheduler.EnsureReplicas(
            spb.EnsureReplicasRequest(deployment=deployment, wait_seconds=0), timeout=10.0
        )

    async def wait_ready(self, route: Route, deadline: float, ready: Callable[[Route], bool]) -> Route:
        """Wait until `ready(route)` holds for the deployment's current route; the route then."""
        if self._hold <= 0:
            raise Unavailable(f"model '{route.name}' is scaled to zero (holding requests is disabled)")
        if self._waiting >= self._queue_size:
            raise ResourceExhausted(
                f"model '{route.name}' is scaling from zero and {self._waiting} requests already wait; retry later"
            )
        loop = asyncio.get_running_loop()
        hold_until = min(deadline, loop.time() + self._hold)
        self._waiting += 1
        try:
            task = self._ensure(route.name)
            while True:
                current = self._routing.table.find(route.name)
                if current is None:
                    raise Unavailable(f"model '{route.name}' was removed while scaling from zero")
                if ready(current):
                    return current
                if task.done() and not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                    raise Unavailable(f"cannot scale model '{route.name}' from zero: scheduler: {detail}")
                left = hold_until - loop.time()
                if left <= 0:
                    if hold_until >= deadline:
                        raise DeadlineExceeded(f"deadline exceeded while model '{route.name}' scales from zero")
                    raise Unavailable(
                        f"model '{route.name}' is scaled to zero and no replica became READY within {self._hold:g}s"
                    )
                waiter = loop.create_task(self._routing.wait_changed(left))
                # A finished EnsureReplicas call leaves only the table to wait for.
                await asyncio.wait({waiter} if task.done() else {waiter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
        finally:
            self._waiting -= 1

    async def close(self) -> None:
        for task, _ in self._ensuring.values():
            task.cancel()
        self._ensuring.clear()
