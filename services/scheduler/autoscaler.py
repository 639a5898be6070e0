"""Autoscaling: how many replicas a deployment runs, between min and max, from a load signal.

`decide` is the pure rule (unit-tested); `Autoscaler` keeps its per-deployment state on the leader
and samples a pluggable `SignalSource` every interval:

- `MonitorSignalSource`: the monitor's GetLoadSignal (the design's source of the load signal);
- `NodeStatsSignalSource`: the fallback, node-reported load from each READY replica's own
  ModelStatistics (Open Inference Protocol): average in-flight requests over the interval by
  Little's law (request time accumulated / wall time), mean queue time, request rate;
- `FallbackSignalSource(primary, fallback)`: the first one that has a fresh sample.

Rules (`decide`): the recommendation is ceil(total in-flight / target per replica), one more when
the mean queue time exceeds its target; scale up to the lowest recommendation seen over the up
stabilization window, down to the highest over the down window (so a brief dip or spike does not
flap). With min 0, a deployment idle (signal shows no traffic) for `scale_to_zero_after` goes to
zero; traffic in the signal or EnsureReplicas brings it back to max(min, 1). Without any signal
nothing is known to be idle, so nothing scales to zero and nothing scales on load.

A deployment autoscales when its policy sets a target (in-flight or queue time) or min is 0
(scale to zero needs the idle detection); otherwise it runs exactly min replicas. A new leader
starts each deployment from the replica count in its stored status, so a takeover keeps the scale.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import structlog

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.scheduler.planner import clamp_total, default_total


@dataclass(frozen=True, slots=True)
class LoadSample:
    """Load of a deployment's serving versions over the last interval."""

    # Average requests in flight, summed over replicas.
    in_flight: float = 0.0
    qps: float = 0.0
    mean_queue_time_ms: float = 0.0
    # Replicas that reported.
    replicas: int = 0

    @property
    def active(self) -> bool:
        return self.qps > 0 or self.in_flight > 0


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    min_replicas: int
    max_replicas: int
    target_in_flight_per_replica: float = 0.0
    target_queue_time_ms: float = 0.0
    up_window_seconds: float = 0.0
    down_window_seconds: float = 300.0
    # With min 0: idle this long → zero. None: never.
    scale_to_zero_after_seconds: float | None = None


@dataclass
class ScaleState:
    current: int
    # (time, recommendation) within the longer stabilization window.
    history: list[tuple[float, int]] = field(default_factory=list)
    # Since when the signal shows no traffic (None: traffic seen, or unknown).
    idle_since: float | None = None


def policy_of(
    spec: spb.DeploymentSpec,
    *,
    up_window_seconds: float = 0.0,
    down_window_seconds: float = 300.0,
    scale_to_zero_after_seconds: float = 900.0,
) -> ScalePolicy:
    """The deployment's policy, with the scheduler's defaults for fields left 0."""
    policy = spec.autoscaling
    return ScalePolicy(
        min_replicas=spec.min_replicas,
        max_replicas=max(spec.max_replicas, spec.min_replicas),
        target_in_flight_per_replica=policy.target_in_flight_per_replica,
        target_queue_time_ms=float(policy.target_queue_time_ms),
        up_window_seconds=float(policy.scale_up_stabilization_seconds or up_window_seconds),
        down_window_seconds=float(policy.scale_down_stabilization_seconds or down_window_seconds),
        scale_to_zero_after_seconds=(
            float(policy.scale_to_zero_after_seconds or scale_to_zero_after_seconds) if spec.min_replicas == 0 else None
        ),
    )


def autoscaled(spec: spb.DeploymentSpec) -> bool:
    policy = spec.autoscaling
    return policy.target_in_flight_per_replica > 0 or policy.target_queue_time_ms > 0 or spec.min_replicas == 0


def recommend(policy: ScalePolicy, current: int, sample: LoadSample | None) -> int:
    """Replicas the load asks for right now (before stabilization and bounds)."""
    if sample is None:
        return current
    want = current
    if policy.target_in_flight_per_replica > 0:
        want = max(1, math.ceil(sample.in_flight / policy.target_in_flight_per_replica - 1e-9))
    if policy.target_queue_time_ms > 0 and sample.mean_queue_time_ms > policy.target_queue_time_ms:
        want = max(want, current + 1)
    return want


def _bounded(policy: ScalePolicy, replicas: int) -> int:
    return max(max(policy.min_replicas, 1), min(replicas, policy.max_replicas))


def decide(
    policy: ScalePolicy, state: ScaleState, sample: LoadSample | None, now: float, *, activated: bool = False
) -> int:
    """The new replica count (also stored in `state.current`)."""
    if sample is not None and sample.active or activated:
        state.idle_since = None
    elif sample is not None:
        state.idle_since = now if state.idle_since is None else state.idle_since
    else:
        state.idle_since = None  # unknown is not idle

    if state.current == 0:
        if activated or (sample is not None and sample.active) or policy.min_replicas > 0:
            state.current = _bounded(policy, max(recommend(policy, 1, sample), 1))
            state.history.clear()
        return state.current

    raw = recommend(policy, state.current, sample)
    state.history.append((now, raw))
    horizon = now - max(policy.up_window_seconds, policy.down_window_seconds)
    state.history = [(t, r) for t, r in state.history if t >= horizon]
    new = state.current
    if raw > state.current:
        window = [r for t, r in state.history if t >= now - policy.up_window_seconds] or [raw]
        new = max(state.current, min(window))
    elif raw < state.current:
        window = [r for t, r in state.history if t >= now - policy.down_window_seconds] or [raw]
        new = min(state.current, max(window))
    new = _bounded(policy, new)
    if (
        policy.scale_to_zero_after_seconds is not None
        and policy.min_replicas == 0
        and state.idle_since is not None
        and now - state.idle_since >= policy.scale_to_zero_after_seconds
        and not activated
    ):
        new = 0
        state.history.clear()
    state.current = new
    return new


# -- signal sources ------------------------------------------------------------------------------


class SignalSource(Protocol):
    async def sample(self, model: str, version: int, replicas: list[spb.ReplicaStatus]) -> LoadSample | None:
        """Load of one version over the last interval; None when unknown."""

    async def close(self) -> None: ...


def combine(samples: Iterable[LoadSample | None]) -> LoadSample | None:
    known = [s for s in samples if s is not None]
    if not known:
        return None
    qps = sum(s.qps for s in known)
    queue = (
        sum(s.mean_queue_time_ms * s.qps for s in known) / qps
        if qps > 0
        else max((s.mean_queue_time_ms for s in known), default=0.0)
    )
    return LoadSample(
        in_flight=sum(s.in_flight for s in known),
        qps=qps,
        mean_queue_time_ms=queue,
        replicas=sum(s.replicas for s in known),
    )


class MonitorSignalSource:
    """GetLoadSignal from the monitor service (aimaas.monitor.v1)."""

    def __init__(self, address: str, *, max_age_seconds: float = 30.0, timeout_seconds: float = 1.0) -> None:
        from aimaas.monitor.v1 import monitor_pb2_grpc

        from services.common.monitor_client import monitor_channel

        # Any replica answers the same (each gets every report): fail over between them.
        self._channel = monitor_channel(address)
        self._stub = monitor_pb2_grpc.MonitorServiceStub(self._channel)
        self._max_age = max_age_seconds
        self._timeout = timeout_seconds

    async def sample(self, model: str, version: int, replicas: list[spb.ReplicaStatus]) -> LoadSample | None:
        from aimaas.monitor.v1 import monitor_pb2

        try:
            signal = await self._stub.GetLoadSignal(
                monitor_pb2.GetLoadSignalRequest(model=model, version=version), timeout=self._timeout
            )
        except grpc.aio.AioRpcError:
            return None
        if signal.reporting_replicas == 0 or signal.age_seconds > self._max_age:
            return None
        return LoadSample(
            in_flight=signal.in_flight_per_replica * signal.reporting_replicas,
            qps=signal.qps,
            mean_queue_time_ms=signal.mean_queue_time_ms,
            replicas=signal.reporting_replicas,
        )

    async def close(self) -> None:
        await self._channel.close()


@dataclass(slots=True)
class _Counters:
    at: float
    request_ns: int
    requests: int
    queue_ns: int
    queued: int


class NodeStatsSignalSource:
    """Node-reported load: each READY replica's cumulative ModelStatistics, differenced per interval."""

    def __init__(self, *, timeout_seconds: float = 1.0, clock=time.monotonic) -> None:
        self._timeout = timeout_seconds
        self._clock = clock
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._previous: dict[tuple[str, str, int], _Counters] = {}

    def _stub(self, address: str):
        from inference import grpc_predict_v2_pb2_grpc

        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def _one(self, model: str, version: int, replica: spb.ReplicaStatus) -> LoadSample | None:
        from inference import grpc_predict_v2_pb2 as ipb

        try:
            response = await self._stub(replica.address).ModelStatistics(
                ipb.ModelStatisticsRequest(name=model, version=str(version)), timeout=self._timeout
            )
        except grpc.aio.AioRpcError:
            return None
        stats = next((s for s in response.model_stats if s.name == model and s.version == str(version)), None)
        if stats is None:
            return None
        inference = stats.inference_stats
        now = self._clock()
        counters = _Counters(
            at=now,
            request_ns=inference.success.ns + inference.fail.ns,
            requests=inference.success.count + inference.fail.count,
            queue_ns=inference.queue.ns,
            queued=inference.queue.count,
        )
        key = (replica.node_id, model, version)
        before, self._previous[key] = self._previous.get(key), counters
        if before is None or counters.requests < before.requests or now <= before.at:
            return None  # first look, or the replica was reloaded (counters reset)
        elapsed = now - before.at
        requests = counters.requests - before.requests
        queued = counters.queued - before.queued
        return LoadSample(
            in_flight=(counters.request_ns - before.request_ns) / (elapsed * 1e9),
            qps=requests / elapsed,
            mean_queue_time_ms=(counters.queue_ns - before.queue_ns) / queued / 1e6 if queued > 0 else 0.0,
            replicas=1,
        )

    async def sample(self, model: str, version: int, replicas: list[spb.ReplicaStatus]) -> LoadSample | None:
        ready = [r for r in replicas if r.state == tpb.REPLICA_STATE_READY and r.address]
        if not ready:
            return None
        return combine(await asyncio.gather(*(self._one(model, version, r) for r in ready)))

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


class FallbackSignalSource:
    def __init__(self, primary: SignalSource, fallback: SignalSource) -> None:
        self._primary = primary
        self._fallback = fallback

    async def sample(self, model: str, version: int, replicas: list[spb.ReplicaStatus]) -> LoadSample | None:
        sample = await self._primary.sample(model, version, replicas)
        # The fallback is sampled anyway so its counters stay current for when it is needed.
        fallback = await self._fallback.sample(model, version, replicas)
        return sample if sample is not None else fallback

    async def close(self) -> None:
        await self._primary.close()
        await self._fallback.close()


# -- the leader's autoscaler ---------------------------------------------------------------------


class Autoscaler:
    """Per-deployment replica totals on the leader. `total()` is what the planner uses."""

    def __init__(
        self,
        source: SignalSource | None,
        *,
        up_window_seconds: float = 0.0,
        down_window_seconds: float = 300.0,
        scale_to_zero_after_seconds: float = 900.0,
        clock=time.monotonic,
        logger=None,
    ) -> None:
        self._source = source
        self._defaults = dict(
            up_window_seconds=up_window_seconds,
            down_window_seconds=down_window_seconds,
            scale_to_zero_after_seconds=scale_to_zero_after_seconds,
        )
        self._clock = clock
        self._states: dict[str, ScaleState] = {}
        self._activations: set[str] = set()
        self._log = logger or structlog.get_logger("scheduler.autoscaler")

    def reset(self) -> None:
        """Forget everything (a new term of leadership starts from the stored statuses)."""
        self._states.clear()
        self._activations.clear()

    def _state(self, name: str, spec: spb.DeploymentSpec, status: spb.DeploymentStatus | None) -> ScaleState:
        state = self._states.get(name)
        if state is None:
            current = default_total(spec)
            if status is not None and status.versions:
                serving = [vs for vs in status.versions if vs.weight > 0]
                if status.canary.phase == spb.CANARY_PHASE_PROGRESSING:
                    # The candidate's replicas come on top of the stable ones, which keep the scale.
                    serving = [vs for vs in status.versions if vs.version in status.canary.stable]
                if serving:
                    current = sum(vs.desired_replicas for vs in serving)
            state = self._states[name] = ScaleState(current=clamp_total(spec, current) if current else 0)
        return state

    def total(self, name: str, spec: spb.DeploymentSpec, status: spb.DeploymentStatus | None) -> int:
        if not autoscaled(spec):
            self._states.pop(name, None)
            return default_total(spec)
        state = self._state(name, spec, status)
        if name in self._activations and state.current == 0:
            state.current = max(spec.min_replicas, 1)
            state.idle_since = None
        self._activations.discard(name)
        if state.current == 0 and spec.min_replicas == 0:
            return 0
        state.current = clamp_total(spec, max(state.current, 1))
        return state.current

    def totals(
        self, specs: Mapping[str, spb.DeploymentSpec], statuses: Mapping[str, spb.DeploymentStatus]
    ) -> dict[str, int]:
        for name in list(self._states):
            if name not in specs:
                del self._states[name]
        return {name: self.total(name, spec, statuses.get(name)) for name, spec in specs.items()}

    def idle_since(self) -> dict[str, float]:
        """Per deployment, since when (this autoscaler's clock) its signal shows no traffic. Absent:
        traffic seen, no signal, or never sampled (unknown is not idle)."""
        return {name: state.idle_since for name, state in self._states.items() if state.idle_since is not None}

    def evicted(self, name: str, count: int, spec: spb.DeploymentSpec) -> None:
        """`count` idle replicas were evicted for room: run as many fewer (not below min; 0 with min 0
        is scaled to zero, brought back by traffic or EnsureReplicas)."""
        state = self._states.get(name)
        if state is None or count <= 0:
            return
        state.current = max(spec.min_replicas, state.current - count)
        state.history.clear()

    def activate(self, name: str) -> None:
        """EnsureReplicas: bring a deployment scaled to zero back (and reset its idle clock)."""
        self._activations.add(name)
        state = self._states.get(name)
        if state is not None:
            state.idle_since = None

    async def tick(
        self,
        specs: Mapping[str, spb.DeploymentSpec],
        statuses: Mapping[str, spb.DeploymentStatus],
        replicas: Mapping[tuple[str, int], list[spb.ReplicaStatus]],
    ) -> bool:
        """Sample and decide for every autoscaled deployment; True when a total changed, or a
        deployment became idle or active (eviction candidates for the planner)."""
        changed = False
        now = self._clock()
        for name, spec in specs.items():
            if not autoscaled(spec):
                continue
            status = statuses.get(name)
            state = self._state(name, spec, status)
            serving = [vs.version for vs in (status.versions if status is not None else ()) if vs.weight > 0]
            sample = None
            if self._source is not None and serving:
                try:
                    sample = combine(
                        [await self._source.sample(spec.model, v, replicas.get((spec.model, v), [])) for v in serving]
                    )
                except Exception:  # noqa: BLE001 - a broken signal means "unknown", never a crash
                    self._log.exception("load signal failed", deployment=name)
            before, was_idle = state.current, state.idle_since is not None
            activated = name in self._activations
            self._activations.discard(name)
            after = decide(policy_of(spec, **self._defaults), state, sample, now, activated=activated)
            if after != before:
                changed = True
                self._log.info("autoscaling", deployment=name, replicas_from=before, replicas_to=after,
                               in_flight=sample.in_flight if sample else None, qps=sample.qps if sample else None)
            elif was_idle != (state.idle_since is not None):
                changed = True  # became idle or active: eviction candidates changed (a pass re-plans)
        return changed

    async def close(self) -> None:
        if self._source is not None:
            await self._source.close()
