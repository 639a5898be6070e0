"""How services reach the monitor replicas (services/monitor/README.md, "High availability").

A `monitor_address` setting names one replica or several ("mon-0:8401,mon-1:8401"). Every replica
aggregates independently, so:

* reports go to every replica (`ReportFanOut`: one buffer, client stream and backoff per replica, so
  a slow or dead replica delays nothing and every live one holds the full statistics);
* queries go to one replica that answers (`FailoverChannel`: a unary call moves on to the next
  replica on UNAVAILABLE), since any replica gives the same answer.

Delivery of reports avoids duplicates (the monitor sums deltas, so a duplicate would be worse than a
gap): a report leaves a replica's buffer once its write succeeds and only reports whose write failed
are retried. A client stream has no per-message acknowledgement, so reports written just before a
connection breaks (at most the transport's window) can be lost. While a replica is unreachable its
reports wait in a bounded buffer (the oldest dropped beyond it) and the stream is reopened with
exponential backoff; one WARNING is logged per outage, not one per attempt.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from services.common.aio import Backoff
from services.common.settings import check_address_list

# A write that cannot complete in this long means a stuck connection (a dead peer filling the window).
MIN_WRITE_TIMEOUT_SECONDS = 10.0
# Waiting for the monitor's response after half-closing the stream at shutdown (within the flush timeout).
_CLOSE_TIMEOUT_SECONDS = 1.0


class _StreamBroken(Exception):
    """The stream ended or a write failed; the message says how. `clean`: the monitor ended it with OK."""

    def __init__(self, reason: str, *, clean: bool = False) -> None:
        super().__init__(reason)
        self.clean = clean


def monitor_addresses(value: str) -> list[str]:
    """The replicas named by a `monitor_address` setting: one host:port, or several separated by commas
    (duplicates dropped); ValueError names an entry that is not host:port."""
    normalized = check_address_list(value, "monitor address")
    return normalized.split(",") if normalized else []


class MonitorStream:
    """One monitor address: its own buffer, channel and client stream, so a slow or dead monitor never
    holds back the others."""

    def __init__(self, address: str, *, buffer_max: int, retry: tuple[float, float], write_timeout: float,
                 flush_timeout: float, logger: Any) -> None:
        self.address = address
        self._buffer_max = buffer_max
        self._retry_initial, self._retry_max = retry
        self._write_timeout = write_timeout
        self._flush_timeout = flush_timeout
        self._log = logger.bind(monitor=address)
        self.buffer: deque[mpb.ReportStatsRequest] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._channel: grpc.aio.Channel | None = None
        self._stub: mpb_grpc.MonitorServiceStub | None = None
        self.task: asyncio.Task[None] | None = None
        self.connected = False
        self._outage_logged = False
        self._drop_logged = False
        self.reports_sent = 0
        self.reports_dropped = 0
        self.connections = 0
        self.outages = 0

    def start(self) -> None:
        backoff_ms = int(self._retry_initial * 1000)
        options = [
            # The channel's own reconnection follows our backoff, so a returning monitor is found soon.
            ("grpc.initial_reconnect_backoff_ms", max(100, backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", max(100, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", max(100, int(self._retry_max * 1000))),
            # Notice a vanished monitor host; 5 minutes is the ping rate servers accept by default.
            ("grpc.keepalive_time_ms", 300_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.enable_retries", 0),
        ]
        self._channel = grpc.aio.insecure_channel(self.address, options=options)
        self._stub = mpb_grpc.MonitorServiceStub(self._channel)
        self.task = asyncio.get_running_loop().create_task(self._send_loop(), name=f"stats-reporter-send-{self.address}")

    def close_soon(self) -> None:
        self._closing = True
        self._wake.set()

    async def close_channel(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def enqueue(self, request: mpb.ReportStatsRequest) -> None:
        if len(self.buffer) >= self._buffer_max:
            self.buffer.popleft()
            self.reports_dropped += 1
            if not self._drop_logged:
                self._drop_logged = True
                self._log.warning(
                    "monitor unreachable and the report buffer is full; dropping the oldest reports",
                    max_reports=self._buffer_max,
                )
        self.buffer.append(request)
        self._wake.set()

    async def _send_loop(self) -> None:
        backoff = Backoff(self._retry_initial, self._retry_max)
        while True:
            if self._closing and not self.buffer:
                return
            if not self.buffer:
                self._wake.clear()
                await self._wake.wait()
                continue
            assert self._stub is not None
            call = self._stub.ReportStats(wait_for_ready=False)
            try:
                await self._stream(call, backoff)
                return  # closing, everything written
            except _StreamBroken as exc:
                if exc.clean:
                    # The monitor finished the stream on purpose (e.g. rebalancing): reopen at once.
                    self.connected = False
                    self._log.info("the monitor closed the statistics stream; reopening")
                    await asyncio.sleep(self._retry_initial)
                    continue
                self._disconnected(str(exc))
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - whatever broke the stream, reconnect
                self._disconnected(f"{type(exc).__name__}: {exc}")
            call.cancel()
            if self._closing and self._flush_timeout <= 0:
                return
            await asyncio.sleep(backoff.next())

    async def _stream(self, call: Any, backoff: Backoff) -> None:
        """Write queued reports to `call` until closing with an empty buffer; _StreamBroken when it fails."""
        while True:
            while not self.buffer:
                if self._closing:
                    await self._close(call)
                    return
                self._wake.clear()
                await self._wake.wait()
            if call.done():
                raise await self._ended(call)
            request = self.buffer.popleft()
            try:
                await asyncio.wait_for(call.write(request), self._write_timeout)
            except BaseException as exc:
                self._requeue(request)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if isinstance(exc, TimeoutError):
                    raise _StreamBroken(f"a write took longer than {self._write_timeout:.0f}s") from None
                if isinstance(exc, grpc.aio.AioRpcError):
                    raise _StreamBroken(f"{exc.code().name}: {exc.details()}") from None
                if isinstance(exc, asyncio.InvalidStateError):
                    raise await self._ended(call) from None
                raise
            self.reports_sent += 1
            if not self.connected:
                self._reconnected()
                backoff.reset()

    def _requeue(self, request: mpb.ReportStatsRequest) -> None:
        """Put a report that was not written back in front (unless newer ones filled the buffer)."""
        if len(self.buffer) < self._buffer_max:
            self.buffer.appendleft(request)
        else:
            self.reports_dropped += 1

    @staticmethod
    async def _ended(call: Any) -> _StreamBroken:
        code = await call.code()
        details = await call.details()
        return _StreamBroken(
            f"the stream ended: {code.name}{f': {details}' if details else ''}", clean=code is grpc.StatusCode.OK
        )

    async def _close(self, call: Any) -> None:
        """Half-close and wait briefly for the monitor's summary."""
        try:
            await asyncio.wait_for(call.done_writing(), _CLOSE_TIMEOUT_SECONDS)
            response = await asyncio.wait_for(call, _CLOSE_TIMEOUT_SECONDS)
        except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self._log.debug("closing the monitor stream did not complete", error=str(exc) or type(exc).__name__)
            call.cancel()
            return
        self._log.debug("monitor stream closed", accepted_deltas=response.accepted_deltas)

    def _reconnected(self) -> None:
        self.connected = True
        self.connections += 1
        if self._outage_logged:
            self._log.info(
                "monitor reachable again; statistics stream re-established",
                pending=len(self.buffer),
                reports_dropped=self.reports_dropped,
            )
        elif self.connections == 1:
            self._log.info("statistics stream to the monitor established")
        self._outage_logged = False
        self._drop_logged = False

    def _disconnected(self, reason: str) -> None:
        was_connected, self.connected = self.connected, False
        if not self._outage_logged:
            self._outage_logged = True
            self.outages += 1
            self._log.warning(
                "monitor unreachable; buffering statistics and reconnecting in the background",
                reason=reason,
                was_connected=was_connected,
                pending=len(self.buffer),
            )
        else:
            self._log.debug("monitor still unreachable", reason=reason, pending=len(self.buffer))


@dataclass(frozen=True)
class DeliverySettings:
    """How reports travel to each replica: buffer bound, reconnect backoff, write and flush bounds."""

    buffer_max_reports: int = 120
    retry_initial_seconds: float = 0.5
    retry_max_seconds: float = 10.0
    write_timeout_seconds: float = MIN_WRITE_TIMEOUT_SECONDS
    flush_timeout_seconds: float = 2.0


class ReportFanOut:
    """Sends every `ReportStatsRequest` to every monitor replica, each through its own `MonitorStream`.
    The counters are sums over the replicas."""

    def __init__(self, addresses: Sequence[str], delivery: DeliverySettings, *, logger: Any) -> None:
        if not addresses:
            raise ValueError("reporting to the monitor needs at least one monitor address")
        self.addresses = list(addresses)
        self.address = ",".join(self.addresses)
        self._flush_timeout = delivery.flush_timeout_seconds
        self._log = logger
        self.destinations = [
            MonitorStream(
                address,
                buffer_max=delivery.buffer_max_reports,
                retry=(delivery.retry_initial_seconds, delivery.retry_max_seconds),
                write_timeout=delivery.write_timeout_seconds,
                flush_timeout=delivery.flush_timeout_seconds,
                logger=logger,
            )
            for address in self.addresses
        ]

    @property
    def reports_sent(self) -> int:
        return sum(d.reports_sent for d in self.destinations)

    @property
    def reports_dropped(self) -> int:
        return sum(d.reports_dropped for d in self.destinations)

    @property
    def connections(self) -> int:
        return sum(d.connections for d in self.destinations)

    @property
    def outages(self) -> int:
        return sum(d.outages for d in self.destinations)

    @property
    def pending(self) -> int:
        """Reports waiting to be written (to the replica furthest behind)."""
        return max(len(d.buffer) for d in self.destinations)

    @property
    def connected(self) -> bool:
        """Whether every replica's stream is up."""
        return all(d.connected for d in self.destinations)

    def start(self) -> None:
        for destination in self.destinations:
            destination.start()

    def enqueue(self, request: mpb.ReportStatsRequest) -> None:
        for destination in self.destinations:
            destination.enqueue(request)

    async def close(self) -> None:
        """Flush what is queued (bounded by the flush timeout), half-close the streams, close the channels."""
        for destination in self.destinations:
            destination.close_soon()
        sends = [d.task for d in self.destinations if d.task is not None]
        if sends:
            _, pending = await asyncio.wait(sends, timeout=self._flush_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for destination in self.destinations:
            if destination.buffer:
                self._log.warning(
                    "statistics not delivered to the monitor at shutdown",
                    monitor=destination.address,
                    reports=len(destination.buffer),
                )
            await destination.close_channel()


class FailoverChannel:
    """A stand-in for `grpc.aio.Channel` over several monitor replicas, for stubs and raw forwarding.

    Unary-unary calls go to the replica that answered last and move on to the next one on
    UNAVAILABLE (the call did not reach a working replica, so trying another is safe); the error of
    the last replica tried is raised. Streaming calls cannot be replayed: they go to the replica that
    answered last. One address: exactly that channel's behaviour.
    """

    def __init__(self, addresses: Sequence[str], channel_factory: Callable[[str], grpc.aio.Channel]) -> None:
        if not addresses:
            raise ValueError("a monitor channel needs at least one address")
        self.addresses = list(addresses)
        self.channels = [channel_factory(address) for address in self.addresses]
        self._preferred = 0

    def _order(self) -> list[int]:
        count = len(self.channels)
        return [(self._preferred + step) % count for step in range(count)]

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        callables = [channel.unary_unary(method, *args, **kwargs) for channel in self.channels]
        if len(callables) == 1:
            return callables[0]

        async def call(request: Any, **call_kwargs: Any) -> Any:
            failure: grpc.aio.AioRpcError | None = None
            for index in self._order():
                try:
                    response = await callables[index](request, **call_kwargs)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                        raise
                    failure = exc
                    continue
                self._preferred = index
                return response
            assert failure is not None
            raise failure

        return call

    def _streaming(self, kind: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Any]:
        callables = [getattr(channel, kind)(method, *args, **kwargs) for channel in self.channels]
        return lambda *call_args, **call_kwargs: callables[self._preferred](*call_args, **call_kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return self._streaming("unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return self._streaming("stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return self._streaming("stream_stream", method, args, kwargs)

    async def close(self, grace: float | None = None) -> None:
        for channel in self.channels:
            await channel.close(grace)


def monitor_channel(monitor_address: str, **channel_options: Any) -> FailoverChannel:
    """A `FailoverChannel` over the replicas of a `monitor_address` setting; `channel_options` go to
    `grpc.aio.insecure_channel` (options, interceptors)."""
    return FailoverChannel(
        monitor_addresses(monitor_address), lambda address: grpc.aio.insecure_channel(address, **channel_options)
    )
