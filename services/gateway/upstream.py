"""Calls to inference replicas: one reused channel per node, a multiplexed inference stream per node,
outstanding-request counts (for the least-outstanding choice), ejection of replicas that just
failed, and the scale-from-zero hold."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import grpc
import structlog

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common import oip_stream
from services.common.aio import poll_while_pending
from services.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.common.h2grpc.client import H2GrpcConnection
from services.gateway.routing import Route, RoutingWatcher

# A successful EnsureReplicas call covers requests arriving this long after it (the scheduler is
# already bringing the replica back); later requests of a still-empty deployment ask again.
_ENSURE_REPEAT_SECONDS = 5.0
_STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An error shaped like a failed unary call's, so retries and status mapping treat both alike."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class NodeStream:
    """One long-lived `ModelStreamInfer` call to a node, carrying many callers' requests at once.

    A unary call costs the gateway and the node a whole call setup and teardown (on a 2-core host
    a sequential unary round trip takes ~1.8x a message round trip on an open stream). Each request
    gets a stream-unique id (the caller's own is put back on the response); its deadline and trace
    context travel as request parameters and an error's status code comes back in-band
    (services.common.oip_stream). The extra fields are appended to the serialized request, which
    protobuf merges over the caller's values, so the caller's message is never touched.

    The stream runs on its own HTTP/2 connection (services.common.h2grpc.client): a request is
    written from the caller's own step and its answer resolves the caller's future from the loop's
    protocol callback, with no task or thread in between. A caller that gives up never disturbs the
    stream; its request, if still waiting for flow-control window, is not sent at all. When the
    stream ends for any reason, every request still waiting on it fails with UNAVAILABLE (so it is
    retried on another replica) and the stream is `closed`; the owner opens a new one for the next
    request. A node that is shutting down (GOAWAY) gets no new requests on the stream; it is
    half-closed once its last answer arrives, so the node's drain ends without failing anyone.
    """

    def __init__(self, address: str, *, max_message_bytes: int, connect_timeout: float = 5.0,
                 keepalive_seconds: float = 10.0, keepalive_timeout_seconds: float = 5.0,
                 poll_seconds: float = 0.0) -> None:
        """`poll_seconds`: how long the loop polls instead of sleeping while a lone request waits for
        its answer (services.common.aio.poll_while_pending; 0: never)."""
        self._address = address
        self._poll_seconds = poll_seconds
        self._pending: dict[str, asyncio.Future[pb.ModelInferResponse]] = {}
        self._ids = itertools.count()
        self._closed = False
        self._conn = H2GrpcConnection(address, max_message_bytes=max_message_bytes,
                                      keepalive_seconds=keepalive_seconds,
                                      keepalive_timeout_seconds=keepalive_timeout_seconds)
        self._stream = self._conn.open_stream(_STREAM_METHOD, on_message=self._on_message, on_close=self._on_close)
        self._conn.on_going_away = self._end_if_idle  # a stream idle at GOAWAY must not hold the node's drain
        host, port = split_host_port(address)
        self._connecting = asyncio.get_running_loop().create_task(self._connect(host, port, connect_timeout))

    async def _connect(self, host: str, port: int, timeout: float) -> None:
        with contextlib.suppress(ConnectionError):  # the stream's on_close reports it to the callers
            await self._conn.connect(host, port, timeout=timeout)

    @property
    def closed(self) -> bool:
        return self._closed or self._conn.going_away

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def infer(
        self, request: pb.ModelInferRequest, timeout: float, trace: Mapping[str, str] | None = None
    ) -> pb.ModelInferResponse:
        if self.closed:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"the stream to node {self._address} is closed")
        key = str(next(self._ids))
        timeout_us = max(1, int(timeout * 1e6))
        own = request.parameters.get(oip_stream.TIMEOUT_PARAMETER)
        if own is not None and own.WhichOneof("parameter_choice") == "int64_param" and 0 < own.int64_param < timeout_us:
            timeout_us = own.int64_param
        extra = pb.ModelInferRequest(id=key)
        extra.parameters[oip_stream.TIMEOUT_PARAMETER].int64_param = timeout_us
        if trace:
            oip_stream.set_trace_parameters(extra, trace)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.ModelInferResponse] = loop.create_future()
        pending = self._pending
        pending[key] = future
        try:
            # A request still waiting for window when its caller has gone is never sent.
            self._stream.write(request.SerializeToString() + extra.SerializeToString(), lambda: key in pending)
        except ValueError as exc:  # over the message size limit (the data plane keeps such requests off)
            del pending[key]
            raise rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        timer = loop.call_later(timeout, self._expire, key)
        if self._poll_seconds and len(pending) == 1:
            # Alone on the stream: nothing else would wake the loop before this answer. With other
            # requests in flight their answers keep it busy, and polling would only take CPU.
            poll_while_pending(future, self._poll_seconds)
        try:
            response = await future
        finally:
            timer.cancel()
            pending.pop(key, None)  # already gone if it expired: the stream may be idle now all the same
            if self._conn.going_away:
                self._end_if_idle()
        response.id = request.id
        return response

    def _expire(self, key: str) -> None:
        future = self._pending.pop(key, None)
        if future is not None and not future.done():
            future.set_exception(
                rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"node {self._address} did not answer within the deadline")
            )

    def _on_message(self, payload: bytes) -> None:
        try:
            response = pb.ModelStreamInferResponse.FromString(payload)
        except Exception as exc:  # noqa: BLE001 - a node we cannot understand is a failed stream
            self._stream.cancel(f"unreadable answer: {exc!r}")
            return
        future = self._pending.pop(response.infer_response.id, None)
        if future is not None and not future.done():  # else: expired, or its caller went away
            if response.error_message:
                future.set_exception(rpc_error(oip_stream.error_status(response), response.error_message))
            else:
                future.set_result(response.infer_response)
        if self._conn.going_away:
            self._end_if_idle()

    def _end_if_idle(self) -> None:
        """The node is going away: half-close once nothing is pending, so its handler finishes."""
        if not self._pending:
            self._stream.end()

    def _on_close(self, code: grpc.StatusCode, details: str, trailing: tuple) -> None:
        self._close(f"{code.name}: {details}" if details else f"the node ended the stream ({code.name})")

    def _close(self, reason: str) -> None:
        self._closed = True
        pending = list(self._pending.values())
        self._pending.clear()
        for future in pending:
            if not future.done():
                future.set_exception(
                    rpc_error(grpc.StatusCode.UNAVAILABLE, f"lost the stream to node {self._address}: {reason}")
                )

    async def close(self) -> None:
        self._conn.close("the gateway closed the stream")
        self._close("the gateway closed the stream")
        self._connecting.cancel()
        await asyncio.gather(self._connecting, return_exceptions=True)


def split_host_port(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" as (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)


class _Node:
    """The gateway's connection to one node: its channel, stub and current inference stream."""

    __slots__ = ("address", "channel", "stub", "stream")

    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self.address = address
        self.channel = channel
        self.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.stream: NodeStream | None = None

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.close()
        await self.channel.close()


class Upstream:
    """Channels to inference nodes, keyed by address, plus per-address load and health hints."""

    def __init__(
        self,
        *,
        eject_seconds: float,
        max_message_bytes: int,
        interceptors: list | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_seconds: float = 0.0,
    ) -> None:
        """`poll_seconds`: see NodeStream."""
        self._eject_seconds = eject_seconds
        self._poll_seconds = poll_seconds
        self._max_message_bytes = max_message_bytes
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
        self._nodes: dict[str, _Node] = {}
        self._outstanding: dict[str, int] = {}
        self._ejected_until: dict[str, float] = {}

    def _node(self, address: str) -> _Node:
        node = self._nodes.get(address)
        if node is None:
            channel = grpc.aio.insecure_channel(address, options=self._options, interceptors=self._interceptors or None)
            node = self._nodes[address] = _Node(address, channel)
        return node

    def stub(self, address: str) -> pb_grpc.GRPCInferenceServiceStub:
        return self._node(address).stub

    def stream(self, address: str) -> NodeStream:
        """The node's open multiplexed inference stream (a new one when the last one ended)."""
        node = self._node(address)
        if node.stream is None or node.stream.closed:
            node.stream = NodeStream(address, max_message_bytes=self._max_message_bytes,
                                     poll_seconds=self._poll_seconds)
        return node.stream

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

    async def probe(self, address: str, replicas: Sequence[tuple[str, int]], timeout: float) -> set[tuple[str, int]]:
        """Which of `replicas` (model, version) the node at `address` serves READY now, as it says
        itself (ServerReady, then ModelReady each): nothing when it does not answer in `timeout`,
        is shutting down (not ready), or failed a request lately (ejected). Routing holds a replica
        whose lease-bound status vanished only while this says so (routing.RoutingWatcher)."""
        if self.ejected(address):
            return set()
        stub = self.stub(address)
        try:
            if not (await stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout)).ready:
                return set()
            answers = await asyncio.gather(
                *(stub.ModelReady(pb.ModelReadyRequest(name=m, version=str(v)), timeout=timeout) for m, v in replicas)
            )
        except grpc.aio.AioRpcError:
            return set()
        return {replica for replica, answer in zip(replicas, answers) if answer.ready}

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
        for address in [a for a in self._nodes if a not in addresses and not self._outstanding.get(a)]:
            node = self._nodes.pop(address)
            self._ejected_until.pop(address, None)
            asyncio.get_running_loop().create_task(node.close())

    async def close(self) -> None:
        nodes = list(self._nodes.values())
        self._nodes.clear()
        for node in nodes:
            await node.close()


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
