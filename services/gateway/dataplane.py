"""The gateway's one data plane, shared by the REST and gRPC transports (see interfaces): routes
Open Inference Protocol calls to READY replicas by traffic split, sticky key and least outstanding
requests; retries a failed replica on another one within the caller's deadline; holds requests
for a deployment scaled to zero while the scheduler brings a replica back.

Errors are domain errors (services.common.errors) or a node's grpc.aio.AioRpcError passed through.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc
import structlog

from inference import grpc_predict_v2_pb2 as pb
from services.common import oip_stream
from services.common.auth.roles import Permission, Principal
from services.common.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable, grpc_status_for
from services.gateway.routing import (
    Replica,
    Route,
    RoutingTable,
    RoutingWatcher,
    VersionRoute,
    choose_replica,
    choose_version,
)
from services.gateway.settings import GatewayServerSettings
from services.gateway.upstream import Upstream, ZeroScaler

if TYPE_CHECKING:
    from services.common.auth import Authenticator
    from services.gateway.stats import GatewayStats

T = TypeVar("T")

# A replica answering these did not run the request (or is gone): another replica may.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND})
# Statistics calls fan out to every node; one slow node must not stall the answer.
_STATS_TIMEOUT_SECONDS = 5.0
# Requests with more tensor data than this go to a node as unary calls, not on the shared stream:
# a large message would hold up the small ones queued behind it on the stream.
_STREAM_MAX_BYTES = 1024 * 1024


def parse_version(model: str, version: str) -> int | None:
    if not version:
        return None
    if not version.isascii() or not version.isdigit() or int(version) < 1:
        raise InvalidArgument(f"model '{model}': version must be a positive integer, got {version!r}")
    return int(version)


class GatewayDataPlane:
    def __init__(
        self,
        routing: RoutingWatcher,
        upstream: Upstream,
        scaler: ZeroScaler,
        authenticator: Authenticator,
        settings: GatewayServerSettings,
        *,
        logger: structlog.stdlib.BoundLogger,
        stats: GatewayStats | None = None,
        inject_trace_context: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        """`inject_trace_context`: the node channels' client interceptors write `traceparent`
        themselves, so incoming trace headers are not forwarded twice."""
        self._routing = routing
        self._upstream = upstream
        self._scaler = scaler
        self._auth = authenticator
        self._settings = settings
        self._log = logger
        self._stats = stats
        # Trace context headers are forwarded as received unless our own client interceptors inject them.
        self._drop_headers = oip_stream.TRACE_PARAMETERS if inject_trace_context else frozenset()
        # Exported traces want a client span per upstream call (the channel's interceptors).
        self._multiplex = settings.multiplex_upstream and not inject_trace_context
        self._stream_max_bytes = min(_STREAM_MAX_BYTES, settings.limits.max_body_bytes // 2)
        self._rng = rng or random.Random()

    # -- health and discovery --------------------------------------------------------------------

    async def server_live(self) -> bool:
        return True

    async def server_ready(self) -> bool:
        # Ready once a routing table was loaded; an etcd outage later keeps the cached one serving.
        return self._routing.loaded.is_set()

    async def model_ready(self, model: str, version: str = "") -> bool:
        route = self._table().lookup(model)
        pinned = parse_version(model, version)
        if pinned is None:
            return bool(route.split())
        found = route.version(pinned)
        if found is None:
            raise NotFound(f"model '{route.name}' has no deployed version {pinned}")
        return bool(found.replicas)

    async def model_metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        route, target = await self._target(model, version, deadline=self._deadline(None))
        response: pb.ModelMetadataResponse = await self._call(
            route,
            target,
            lambda address, timeout: self._upstream.stub(address).ModelMetadata(
                pb.ModelMetadataRequest(name=route.model, version=str(target.version)), timeout=timeout
            ),
            deadline=self._deadline(None),
        )
        response.name = route.name
        del response.versions[:]
        response.versions.extend(str(v.version) for v in route.versions if v.replicas)
        return response

    async def model_config(self, model: str, version: str = "") -> pb.ModelConfigResponse:
        route, target = await self._target(model, version, deadline=self._deadline(None))
        response: pb.ModelConfigResponse = await self._call(
            route,
            target,
            lambda address, timeout: self._upstream.stub(address).ModelConfig(
                pb.ModelConfigRequest(name=route.model, version=str(target.version)), timeout=timeout
            ),
            deadline=self._deadline(None),
        )
        response.config.name = route.name
        return response

    async def repository_index(self) -> pb.RepositoryIndexResponse:
        models = []
        for route in sorted(self._table().routes.values(), key=lambda r: r.name):
            for v in route.versions:
                state, reason = ("READY", "") if v.replicas else ("UNAVAILABLE", "no READY replica")
                models.append(
                    pb.RepositoryIndexResponse.ModelIndex(name=route.name, version=str(v.version), state=state, reason=reason)
                )
        return pb.RepositoryIndexResponse(models=models)

    async def model_statistics(self, model: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        table = self._table()
        pinned = parse_version(model, version) if model else None
        if version and not model:
            raise InvalidArgument("a version needs a model name")
        routes = [table.lookup(model)] if model else sorted(table.routes.values(), key=lambda r: r.name)
        if pinned is not None and routes[0].version(pinned) is None:
            raise NotFound(f"model '{routes[0].name}' has no deployed version {pinned}")
        # One call per node and model: the node sums its own versions.
        calls: list[tuple[Route, str]] = []
        for route in routes:
            for address in sorted({r.address for v in route.versions for r in v.replicas}):
                calls.append((route, address))
        results = await asyncio.gather(
            *(
                self._upstream.stub(address).ModelStatistics(
                    pb.ModelStatisticsRequest(name=route.model, version=str(pinned or "")), timeout=_STATS_TIMEOUT_SECONDS
                )
                for route, address in calls
            ),
            return_exceptions=True,
        )
        merged: dict[tuple[str, str], pb.ModelStatistics] = {}
        for (route, _address), result in zip(calls, results):
            if isinstance(result, BaseException):
                continue  # an unreachable node contributes nothing; the others still answer
            for stats in result.model_stats:
                _merge(merged, route.name, stats)
        return pb.ModelStatisticsResponse(model_stats=[merged[k] for k in sorted(merged)])

    def resolve_version(self, model: str, version: str = "") -> tuple[str, int, bool]:
        """(registry model, version, has a READY replica) a call of deployment `model` names:
        `version`, or by default the version answering unversioned metadata calls (the heaviest
        READY one; without a READY replica the heaviest weighted one, which a metadata call then
        waits for when scaled to zero)."""
        route = self._table().lookup(model)
        pinned = parse_version(model, version)
        if pinned is not None:
            found = route.version(pinned)
            if found is None:
                raise NotFound(f"model '{route.name}' has no deployed version {pinned}")
            return route.model, pinned, bool(found.replicas)
        target = route.primary() or max(route.versions, key=lambda v: (v.weight, v.version), default=None)
        if target is None:
            raise Unavailable(f"model '{route.name}' has no deployed version yet; retry shortly")
        return route.model, target.version, bool(target.replicas)

    def deployments(self) -> list[str]:
        """Names of the deployments with a READY replica now."""
        routes = self._table().routes
        return [name for name in sorted(routes) if routes[name].ready]

    # -- inference -------------------------------------------------------------------------------

    async def model_infer(
        self,
        request: pb.ModelInferRequest,
        *,
        principal: Principal,
        timeout: float | None,
        sticky_key: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> pb.ModelInferResponse:
        """Route one inference request. `request.model_name`/`model_version` are rewritten in place to
        what the chosen node serves (copying would cost a copy of every tensor)."""
        name = request.model_name
        if not name:
            raise InvalidArgument("the request names no model")
        self._auth.authorize(principal, Permission.INFER, name)
        deadline = self._deadline(timeout)
        started = time.perf_counter()
        route, target = await self._target(name, request.model_version, deadline=deadline, sticky_key=sticky_key)
        request.model_name = route.model
        request.model_version = str(target.version)
        forwarded = [(k, v) for k, v in metadata if k not in self._drop_headers]
        upstream = self._upstream
        call: Callable[[str, float], Awaitable[pb.ModelInferResponse]]
        if (
            self._multiplex
            and _stream_size_ok(request, self._stream_max_bytes)
            and all(key in oip_stream.TRACE_PARAMETERS for key, _ in forwarded)
        ):
            trace = dict(forwarded)
            call = lambda address, remaining: upstream.stream(address).infer(request, remaining, trace)  # noqa: E731
        else:
            # Other metadata (gRPC edge callers' own headers) travels only on a call of its own.
            call = lambda address, remaining: upstream.stub(address).ModelInfer(  # noqa: E731
                request, timeout=remaining, metadata=forwarded or None
            )
        try:
            response: pb.ModelInferResponse = await self._call(
                route, target, call, deadline=deadline, sticky_key=sticky_key
            )
        except BaseException as exc:
            if self._stats is not None:
                self._stats.failure(route.name, target.version, _code_of(exc), time.perf_counter() - started)
            raise
        if self._stats is not None:
            self._stats.success(route.name, target.version, time.perf_counter() - started)
        response.model_name = route.name
        return response

    # -- routing helpers -------------------------------------------------------------------------

    def _table(self) -> RoutingTable:
        if not self._routing.loaded.is_set():
            # Never listed (etcd unreachable since start): "unknown model" would be a lie.
            raise Unavailable("the gateway has not loaded its routing table yet (metadata store unreachable)")
        return self._routing.table

    def _deadline(self, timeout: float | None) -> float:
        limit = self._settings.limits.request_timeout_seconds
        return asyncio.get_running_loop().time() + (limit if timeout is None else min(timeout, limit))

    async def _target(
        self, model: str, version: str, *, deadline: float, sticky_key: str | None = None
    ) -> tuple[Route, VersionRoute]:
        """The deployment and version a request goes to; for a deployment scaled to zero (no READY
        replica, min_replicas 0) after holding the request while a replica comes back."""
        route = self._table().lookup(model)
        pinned = parse_version(route.name, version)
        ready: Callable[[Route], bool]
        if pinned is not None:
            target = route.version(pinned)
            if target is None:
                deployed = ", ".join(str(v.version) for v in route.versions) or "none"
                raise NotFound(f"model '{route.name}' has no deployed version {pinned} (deployed: {deployed})")
            if target.replicas:
                return route, target
            if target.weight == 0 or route.min_replicas > 0:
                # Not a scale-from-zero case: nothing would bring this version back for us.
                raise Unavailable(f"model '{route.name}' version {pinned} has no READY replica; retry shortly")
            ready = lambda r: bool((v := r.version(pinned)) and v.replicas)  # noqa: E731
        else:
            if route.split():
                return route, choose_version(route, sticky_key=sticky_key, rng=self._rng)
            if route.min_replicas > 0:
                raise Unavailable(
                    f"model '{route.name}' has no READY replica ({route.min_replicas} wanted); retry shortly"
                )
            ready = lambda r: bool(r.split())  # noqa: E731
        route = await self._scaler.wait_ready(route, deadline, ready)
        return route, choose_version(route, pinned=pinned, sticky_key=sticky_key, rng=self._rng)

    async def _call(
        self,
        route: Route,
        target: VersionRoute,
        call: Callable[[str, float], Awaitable[T]],
        *,
        deadline: float,
        sticky_key: str | None = None,
    ) -> T:
        """`call(node_address, remaining_seconds)` on a replica of `target`; on UNAVAILABLE (or the
        model gone from the node) again on another replica, at most `retry_max_attempts` times in all."""
        loop = asyncio.get_running_loop()
        upstream = self._upstream
        attempts = self._settings.retry_max_attempts
        tried: set[str] = set()
        last: grpc.aio.AioRpcError | None = None
        for attempt in range(attempts):
            replica = self._replica(route.name, target.version, tried, sticky_key)
            if replica is None:
                # Every replica was tried: after a short pause any of them may be tried again.
                tried.clear()
                await asyncio.sleep(min(0.05 * attempt, max(0.0, deadline - loop.time())))
                replica = self._replica(route.name, target.version, tried, sticky_key)
                if replica is None:
                    break
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"deadline exceeded before model '{route.name}' answered")
            address = replica.address
            try:
                with upstream.track(address):
                    result = await call(address, remaining)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE:
                    raise
                last = exc
                tried.add(address)
                if exc.code() is grpc.StatusCode.UNAVAILABLE:
                    upstream.eject(address)
                if self._stats is not None and attempt + 1 < attempts:
                    self._stats.retry(route.name, exc.code().name)
                self._log.info(
                    "replica failed, retrying elsewhere",
                    model=route.name,
                    version=target.version,
                    node=replica.node_id,
                    code=exc.code().name,
                    error=exc.details(),
                    attempt=attempt + 1,
                )
                continue
            upstream.forgive(address)
            return result
        if last is not None:
            raise last
        raise Unavailable(f"model '{route.name}' version {target.version} has no READY replica")

    def _replica(self, name: str, version: int, tried: set[str], sticky_key: str | None) -> Replica | None:
        # Re-read the table on every attempt: a vanished replica is gone from it, a new one is in.
        route = self._routing.table.find(name)
        found = route.version(version) if route is not None else None
        if found is None:
            return None
        upstream = self._upstream
        return choose_replica(
            found.replicas,
            load=upstream.load,
            exclude=tried,
            ejected=upstream.ejected,
            sticky_key=sticky_key,
            rng=self._rng,
        )


def _stream_size_ok(request: pb.ModelInferRequest, limit: int) -> bool:
    raw = request.raw_input_contents
    if not raw:
        # Typed contents: their size is unknown without serializing; they go as unary calls.
        return not request.inputs
    return sum(map(len, raw)) <= limit


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return grpc_status_for(exc)[0].name


def _merge(merged: dict[tuple[str, str], pb.ModelStatistics], name: str, stats: pb.ModelStatistics) -> None:
    key = (name, stats.version)
    into = merged.get(key)
    if into is None:
        into = merged[key] = pb.ModelStatistics(name=name, version=stats.version)
    into.last_inference = max(into.last_inference, stats.last_inference)
    into.inference_count += stats.inference_count
    into.execution_count += stats.execution_count
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        source, target = getattr(stats.inference_stats, field), getattr(into.inference_stats, field)
        target.count += source.count
        target.ns += source.ns
    sizes = {b.batch_size: b for b in into.batch_stats}
    for batch in stats.batch_stats:
        target = sizes.get(batch.batch_size)
        if target is None:
            target = into.batch_stats.add(batch_size=batch.batch_size)
            sizes[batch.batch_size] = target
        for field in ("compute_input", "compute_infer", "compute_output"):
            getattr(target, field).count += getattr(batch, field).count
            getattr(target, field).ns += getattr(batch, field).ns
