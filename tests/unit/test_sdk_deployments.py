"""The status word of a deployment (SDK, CLI, REST): READY, DEGRADED, PENDING, FAILED, with the
reason; a partly schedulable deployment that serves is DEGRADED, not FAILED (issue 21)."""

from __future__ import annotations

from aimaas.cli.cluster import deployment_entry, deployments_table
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.sdk.deployments import progress_line, status_reason, status_word
from aimaas.sdk.service import AsyncDeployment
from services.gateway.rest.mgmt_schemas import Deployment as RestDeployment
from services.scheduler.planner import FAILED, READY
from tests.unit.test_scheduler_planner import NOW, assigned, cluster, deploy, ready_all, report, run


def _deployment(snapshot, name: str = "d") -> spb.Deployment:
    return spb.Deployment(spec=snapshot.deployments[name].value, status=snapshot.statuses[name].value)


class _Service:
    http_url = "http://gw:8000"
    endpoint = "gw:8001"


def _shown(deployment: spb.Deployment) -> tuple[str, str, str, str]:
    """(SDK, CLI entry, CLI table cell, REST) status words."""
    entry = deployment_entry(AsyncDeployment(_Service(), deployment), via_gateway=True)  # type: ignore[arg-type]
    cell = str(deployments_table([entry]).columns[2]._cells[0])
    rest = RestDeployment.of(deployment, endpoint="e", docs_url="d").status
    assert entry["status_reason"] == rest.state_reason == status_reason(deployment)
    return AsyncDeployment(_Service(), deployment).status, entry["status"], cell, rest.state  # type: ignore[arg-type]


def test_a_partly_schedulable_deployment_that_serves_is_degraded_with_the_reason():
    # Three replicas of one version need three nodes; there are two.
    snapshot = cluster("a", "b")
    deploy(snapshot, min_replicas=3, max_replicas=3)
    run(snapshot)
    assert len(assigned(snapshot)) == 2
    ready_all(snapshot, 1)
    run(snapshot)
    deployment = _deployment(snapshot)
    word, entry, cell, rest = _shown(deployment)
    assert word == entry == rest == "DEGRADED" and cell.startswith("[dark_orange]DEGRADED[/]")
    reason = status_reason(deployment)
    assert reason.startswith("Unschedulable: NotEnoughNodes (version 1: 1 replica(s) not placed")
    assert reason in cell and reason in progress_line(deployment)


def test_an_unschedulable_deployment_that_serves_nothing_is_failed():
    snapshot = cluster("a", "b")
    deploy(snapshot, min_replicas=3, max_replicas=3)
    run(snapshot)  # two placed, none READY yet: nothing serves
    assert _shown(_deployment(snapshot))[0] == "FAILED"
    assert _shown(_deployment(snapshot))[2].startswith("[red]FAILED[/]")


def test_ready_pending_and_a_failed_replica():
    snapshot = cluster("a", "b")
    deploy(snapshot, min_replicas=2, max_replicas=2)
    run(snapshot)
    deployment = _deployment(snapshot)
    assert status_word(deployment) == "PENDING"
    assert status_reason(deployment).startswith("Ready: ReplicasNotReady")
    ready_all(snapshot, 1)
    run(snapshot)
    deployment = _deployment(snapshot)
    # Progressing=False/Complete and Unschedulable=False are no problems.
    assert status_word(deployment) == "READY" and status_reason(deployment) == ""
    assert progress_line(deployment) == "v1 (100%): 2/2 ready"
    # One replica of the serving version fails on its node while the other serves.
    report(snapshot, "b", 1, FAILED, reason="out of memory", at=NOW)
    run(snapshot)
    deployment = _deployment(snapshot)
    assert status_word(deployment) == "DEGRADED"
    assert status_reason(deployment) == "Ready: ReplicaFailed (version 1 failed on node b: out of memory)"
    report(snapshot, "a", 1, FAILED, reason="out of memory", at=NOW)
    run(snapshot)
    assert status_word(_deployment(snapshot)) == "FAILED"


def test_a_spec_the_scheduler_has_not_seen_is_pending():
    snapshot = cluster("a")
    deploy(snapshot, min_replicas=1, max_replicas=1)
    run(snapshot)
    ready_all(snapshot, 1)
    run(snapshot)
    deployment = _deployment(snapshot)
    deployment.spec.generation += 1
    assert status_word(deployment) == "PENDING"
    assert status_reason(deployment) == "the scheduler has not acted on the latest spec yet"
    assert snapshot.replicas[("a", "m", 1)].state == READY
