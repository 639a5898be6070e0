"""Pure views of a scheduler Deployment: readiness, a one-line progress summary, a status word and its reason."""

from __future__ import annotations

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2

READY_STATE = types_pb2.REPLICA_STATE_READY
# Conditions that describe a problem while they hold...
PROBLEM_CONDITIONS = frozenset({"Unschedulable", "RolledBack"})
# ...and the one that describes health while it holds (the others, e.g. Progressing, Evicted and
# Canary, describe what is going on, good or bad, and are no problem either way).
HEALTH_CONDITION = "Ready"
# Why Ready is false that is a problem rather than a wait (loading, scaling, scaled to zero).
_PROBLEM_READY_REASONS = frozenset({"ReplicaFailed"})


def is_ready(deployment: spb.Deployment, min_replicas: int | None = None) -> bool:
    """The scheduler has seen the current spec and every version with traffic has enough READY replicas."""
    serving = [v for v in deployment.status.versions if v.weight > 0]
    if deployment.status.observed_generation < deployment.spec.generation or not serving:
        return False
    need = max(deployment.spec.min_replicas if min_replicas is None else min_replicas, 1)
    return all(v.ready_replicas >= need for v in serving)


def serves(deployment: spb.Deployment) -> bool:
    """Some version with traffic has a READY replica: requests are answered."""
    return any(v.weight > 0 and v.ready_replicas > 0 for v in deployment.status.versions)


def _problem(condition: spb.Condition) -> bool:
    if condition.type in PROBLEM_CONDITIONS:
        return condition.status
    return condition.type == HEALTH_CONDITION and not condition.status and condition.reason in _PROBLEM_READY_REASONS


def _describe(condition: spb.Condition) -> str:
    return f"{condition.type}: {condition.reason}" + (f" ({condition.message})" if condition.message else "")


def problems(deployment: spb.Deployment) -> list[str]:
    """`Type: reason (message)` of every condition that says something is wrong."""
    return [_describe(c) for c in deployment.status.conditions if c.reason and _problem(c)]


def status_word(deployment: spb.Deployment) -> str:
    """READY; DEGRADED (a problem holds, e.g. replicas that cannot be placed, while some READY
    replica serves the traffic); FAILED (a problem holds and nothing serves); else PENDING."""
    if is_ready(deployment):
        return "READY"
    if any(_problem(c) for c in deployment.status.conditions):
        return "DEGRADED" if serves(deployment) else "FAILED"
    return "PENDING"


def status_reason(deployment: spb.Deployment) -> str:
    """Why a deployment is not READY, in one line: its problems, else what it waits for ("" when READY)."""
    if is_ready(deployment):
        return ""
    found = problems(deployment)
    if found:
        return "; ".join(found)
    if deployment.status.observed_generation < deployment.spec.generation:
        return "the scheduler has not acted on the latest spec yet"
    ready = next((c for c in deployment.status.conditions if c.type == HEALTH_CONDITION and c.reason), None)
    return _describe(ready) if ready is not None else "no replicas yet"


def progress_line(deployment: spb.Deployment) -> str:
    parts = [
        f"v{v.version} ({v.weight}%): {v.ready_replicas}/{v.desired_replicas} ready" for v in deployment.status.versions
    ]
    reason = status_reason(deployment)
    return "; ".join(parts or ["no replicas yet"]) + (f" | {reason}" if reason and parts else "")


def ready_addresses(deployment: spb.Deployment, version: int | None = None) -> list[tuple[int, str]]:
    """(version, node address) of every READY replica, highest weight first."""
    found = []
    for status in sorted(deployment.status.versions, key=lambda v: -v.weight):
        if version is not None and status.version != version:
            continue
        for replica in status.replicas:
            if replica.state == READY_STATE and replica.address:
                found.append((status.version, replica.address))
    return found
