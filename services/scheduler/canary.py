"""SLO-gated canary: the pure step/decision rules, and where the candidate's live metrics come from.

A deployment's `canary` names a candidate (version or alias) and weight steps. The planner
(planner.py) runs it on top of the rollout machinery, with its progress in `DeploymentStatus.canary`
(so a new leader resumes it):

1. The candidate gets the first step's weight and the stable split (`traffic`) the rest,
   proportionally (`canary_split`). Its replicas are brought READY first (rollout rule: weights
   change only when the new split's replicas are READY); the step starts when they switch
   (`step_started`). Stable versions keep their full replica count for the whole canary (even at a
   100% step), so a rollback never waits for capacity.
2. While a step holds, the leader measures the candidate over the step (`CanaryMetricsSource`;
   `Reconciler._canary_loop`). A measurement with enough requests that exceeds a bound rolls back at
   once (fail fast); once the step has held `step_seconds`, a measurement taken after that moment,
   with enough requests and within both bounds, advances to the next step; after the last step the
   candidate is promoted (100%, stable replicas removed).
3. Insufficient traffic (fewer than `min_requests` in the window, or no metrics at all) is neither a
   pass nor a fail: the step is held, for at most `max_hold_seconds` beyond `step_seconds`; then the
   canary is rolled back (reason InsufficientTraffic), since an unverified version is not promoted.
4. Rolled back: the stable split is restored, the candidate's replicas are removed, and the Canary
   condition records why (measured value vs bound). A candidate that fails to load is rolled back
   the same way (reason LoadFailed).

`evaluate` and `canary_split` are pure; `MonitorCanaryMetrics` reads the monitor's QueryMetrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from services.common.monitor_client import monitor_channel

COND_CANARY = "Canary"

PROGRESSING = spb.CANARY_PHASE_PROGRESSING
PROMOTED = spb.CANARY_PHASE_PROMOTED
ROLLED_BACK = spb.CANARY_PHASE_ROLLED_BACK


@dataclass(frozen=True, slots=True)
class CanaryMeasurement:
    """The candidate's live metrics over a window ending at `at` (wall-clock seconds)."""

    request_count: int
    error_rate: float
    p99_latency_ms: float
    at: float


@dataclass(frozen=True, slots=True)
class Verdict:
    # "pass", "fail" or "unknown" (not enough requests, or no measurement)
    outcome: str
    reason: str = ""
    message: str = ""


def has_canary(spec: spb.DeploymentSpec) -> bool:
    return spec.HasField("canary") and (bool(spec.canary.steps) or spec.canary.HasField("candidate"))


def canary_split(stable: Mapping[int, int], candidate: int, weight: int) -> dict[int, int]:
    """The candidate at `weight`, the rest split over the stable versions by their weights (largest
    remainder, ties to the older version). Versions left at 0 are omitted."""
    rest = 100 - weight
    total = sum(stable.values()) or 1
    exact = {v: rest * w / total for v, w in stable.items()}
    shares = {v: math.floor(x) for v, x in exact.items()}
    for v in sorted(stable, key=lambda v: (-(exact[v] - shares[v]), v))[: rest - sum(shares.values())]:
        shares[v] += 1
    split = {v: w for v, w in shares.items() if w > 0}
    if weight > 0:
        split[candidate] = weight
    return split


def evaluate(policy: spb.CanaryPolicy, measurement: CanaryMeasurement | None, min_requests: int) -> Verdict:
    """A bound of 0 is not checked (validation requires at least one)."""
    if measurement is None:
        return Verdict("unknown", "InsufficientTraffic", "no metrics for the candidate from the monitor")
    if measurement.request_count < max(min_requests, 1):
        return Verdict(
            "unknown",
            "InsufficientTraffic",
            f"{measurement.request_count} request(s) measured, at least {max(min_requests, 1)} needed for a verdict",
        )
    if policy.max_error_rate > 0 and measurement.error_rate > policy.max_error_rate:
        return Verdict(
            "fail",
            "ErrorRateExceeded",
            f"error rate {measurement.error_rate:.4f} > max {policy.max_error_rate:g} "
            f"over {measurement.request_count} requests",
        )
    if policy.max_p99_latency_ms > 0 and measurement.p99_latency_ms > policy.max_p99_latency_ms:
        return Verdict(
            "fail",
            "LatencyExceeded",
            f"p99 latency {measurement.p99_latency_ms:.1f} ms > max {policy.max_p99_latency_ms:g} ms "
            f"over {measurement.request_count} requests",
        )
    return Verdict(
        "pass",
        "WithinBounds",
        f"error rate {measurement.error_rate:.4f}, p99 {measurement.p99_latency_ms:.1f} ms "
        f"over {measurement.request_count} requests",
    )


def same_run(status: spb.CanaryStatus, candidate: int, stable: Mapping[int, int], policy: spb.CanaryPolicy) -> bool:
    """Whether a recorded canary is the run this spec asks for (else a fresh one starts)."""
    return (
        status.phase != spb.CANARY_PHASE_UNSPECIFIED
        and status.version == candidate
        and dict(status.stable) == dict(stable)
        and status.policy == policy
    )


def next_step(policy: spb.CanaryPolicy, weight: int) -> int | None:
    """The weight after `weight`, or None after the last step (promotion)."""
    return next((int(step) for step in policy.steps if step > weight), None)


# -- where the metrics come from ------------------------------------------------------------------


class CanaryMetricsSource(Protocol):
    async def measure(self, model: str, version: int, window_seconds: float) -> CanaryMeasurement | None:
        """The version's metrics over (at least) the last `window_seconds`; None when unknown."""

    async def close(self) -> None: ...


class MonitorCanaryMetrics:
    """QueryMetrics(model, version) from the monitor, over its smallest window covering the step.

    The monitor's windows are 1m/5m/1h: with shorter steps the verdict also counts the candidate's
    traffic of earlier steps within the window, which only makes it stricter (a failure seen at one
    step still counts at the next)."""

    def __init__(self, address: str, *, timeout_seconds: float = 1.0, clock=time.time) -> None:
        self._channel = monitor_channel(address)  # any replica answers the same: fail over between them
        self._stub = monitor_pb2_grpc.MonitorServiceStub(self._channel)
        self._timeout = timeout_seconds
        self._clock = clock

    @staticmethod
    def window(seconds: float) -> int:
        if seconds <= 60:
            return mpb.WINDOW_1M
        return mpb.WINDOW_5M if seconds <= 300 else mpb.WINDOW_1H

    async def measure(self, model: str, version: int, window_seconds: float) -> CanaryMeasurement | None:
        try:
            response = await self._stub.QueryMetrics(
                mpb.QueryMetricsRequest(model=model, version=version, window=self.window(window_seconds)),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError:
            return None
        samples = [s for s in response.samples if s.model in ("", model) and s.version in (0, version)]
        aggregate = [s for s in samples if not s.node_id]
        if aggregate:
            samples = aggregate[:1]
        if not samples:
            return None
        requests = sum(s.request_count for s in samples)
        failures = sum(s.failure_count for s in samples)
        # Per-node samples only: the worst node's p99 bounds the merged p99 from above.
        p99 = max((s.p99_latency_ms for s in samples if s.request_count), default=0.0)
        return CanaryMeasurement(
            request_count=requests,
            error_rate=failures / requests if requests else 0.0,
            p99_latency_ms=p99,
            at=self._clock(),
        )

    async def close(self) -> None:
        await self._channel.close()
