"""Pure views of a scheduler Deployment: readiness, a one-line progress summary, a status word."""

from __future__ import annotations

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2

READY_STATE = types_pb2.REPLICA_STATE_READY
# Conditions that describe a problem while they hold; the others describe health while they hold.
PROBLEM_CONDITIONS = frozenset({"Unschedulable", "RolledBack"})


def is_ready(deployment: spb.Deployment, min_replicas: int | None = None) -> bool:
    """The scheduler has seen the current spec and every version with traffic has enough READY replicas."""
    serving = [v for v in deployment.status.versions if v.weight > 0]
    if deployment.status.observed_generation < deployment.spec.generation or not serving:
        return False
    need = max(deployment.spec.min_replicas if min_replicas is None else min_replicas, 1)
    return all(v.ready_replicas >= need for v in serving)


def problems(deployment: spb.Deployment) -> list[str]:
    """`Type: reason (message)` of every condition that says something is wrong."""
    return [
        f"{c.type}: {c.reason}" + (f" ({c.message})" if c.message else "")
        for c in deployment.status.conditions
        if c.reason and (c.status if c.type in PROBLEM_CONDITIONS else not c.status)
    ]


def status_word(deployment: spb.Deployment) -> str:
    """READY, FAILED (a problem condition holds and nothing serves) or PENDING."""
    if is_ready(deployment):
        return "READY"
    if any(c.status and c.type in PROBLEM_CONDITIONS for c in deployment.status.conditions):
        return "FAILED"
    return "PENDING"


def progress_line(deployment: spb.Deployment) -> str:
    parts = [
        f"v{v.version} ({v.weight}%): {v.ready_replicas}/{v.desired_replicas} ready" for v in deployment.status.versions
    ]
    reasons = problems(deployment)
    return "; ".join(parts or ["no replicas yet"]) + (" | " + "; ".join(reasons) if reasons else "")


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
