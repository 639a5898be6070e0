"""A node whose record vanished keeps its assignments through its grace period (issue 21): an etcd
frozen past the lease TTL expires every node at once, moments before they register again, and
re-placing their replicas would reload every model."""

from __future__ import annotations

from aimaas.types.v1 import types_pb2 as tpb
from services.scheduler.reconciler import NodeGrace
from services.scheduler.settings import SchedulerSettings
from tests.unit.test_scheduler_planner import assigned, cluster, cond, deploy, node, ready_all, run


def test_node_grace_keeps_a_vanished_node_until_it_is_back_lost_or_out_of_time():
    grace = NodeGrace(30)
    assert not grace.seen("a", "a:1")  # first registration
    grace.seen("b", "b:1")
    assert grace.vanished("a", now=100) and grace.vanished("b", now=100)
    assert grace.vanished("a", now=105)  # a repeated report keeps the first time
    assert grace.missing() == {"a", "b"} and grace.next_expiry() == 130
    assert grace.addresses() == {"a": "a:1", "b": "b:1"}  # where to probe them
    assert grace.seen("a", "a:1")  # back within its grace
    assert grace.lost("b")  # its probe failed
    assert not grace.lost("b") and grace.missing() == frozenset()
    grace.vanished("a", now=200)
    assert grace.expire(now=229.9) == [] and grace.expire(now=230) == ["a"]
    assert not grace.seen("a", "a:1")  # back after being lost: a plain registration
    assert not NodeGrace(0).vanished("a", now=0)  # no grace: lost at once


def _serving(*nodes: str, replicas: int = 2):
    snapshot = cluster(*nodes)
    deploy(snapshot, min_replicas=replicas, max_replicas=replicas)
    run(snapshot)
    ready_all(snapshot, 1)
    run(snapshot)
    assert cond(snapshot, "Ready").status
    return snapshot


def _expire(snapshot, *node_ids: str) -> None:
    """What a lease expiry does: the node record and its replica statuses vanish."""
    for node_id in node_ids:
        del snapshot.nodes[node_id]
        for key in [k for k in snapshot.replicas if k[0] == node_id]:
            del snapshot.replicas[key]


def test_every_node_expiring_at_once_moves_nothing_while_they_are_missing_and_after():
    snapshot = _serving("a", "b")
    before = dict(snapshot.assignments)
    _expire(snapshot, "a", "b")
    result = run(snapshot, missing_nodes={"a", "b"})
    assert not result.assignment_puts and not result.assignment_deletes
    assert snapshot.assignments == before
    # They register again and publish their statuses: nothing to do but the status.
    snapshot.nodes.update(a=node("a"), b=node("b"))
    ready_all(snapshot, 1)
    result = run(snapshot)
    assert not result.assignment_puts and not result.assignment_deletes
    assert cond(snapshot, "Ready").status


def test_without_the_grace_a_mass_expiry_drops_every_assignment():
    snapshot = _serving("a", "b")
    _expire(snapshot, "a", "b")
    result = run(snapshot)
    assert len(result.assignment_deletes) == 2 and not snapshot.assignments


def test_a_missing_nodes_replica_is_not_replaced_until_its_grace_ends():
    snapshot = _serving("a", "b", "c")
    gone, kept = assigned(snapshot)
    (spare,) = {"a", "b", "c"} - {gone, kept}
    _expire(snapshot, gone)
    result = run(snapshot, missing_nodes={gone})
    assert not result.assignment_puts and not result.assignment_deletes
    assert assigned(snapshot) == sorted([gone, kept])
    # Grace over (or its probe failed): placed on the spare node, the old assignment deleted.
    result = run(snapshot)
    assert [key[0] for key, _, expected in result.assignment_puts if expected == 0] == [spare]
    assert [key[0] for key, _ in result.assignment_deletes] == [gone]


def test_scaling_down_while_a_node_is_missing_removes_its_replica_first():
    snapshot = _serving("a", "b", "c", replicas=3)
    _expire(snapshot, "b")
    deploy(snapshot, min_replicas=2, max_replicas=2)
    result = run(snapshot, missing_nodes={"b"})
    assert [key[0] for key, _ in result.assignment_deletes] == ["b"]
    assert assigned(snapshot) == ["a", "c"]


def test_a_spec_change_while_a_node_is_missing_is_written_to_its_assignment():
    snapshot = _serving("a", "b")
    _expire(snapshot, "b")
    deploy(snapshot, min_replicas=2, max_replicas=2, batching=tpb.BatchingConfig(enabled=True, max_batch_size=8))
    result = run(snapshot, missing_nodes={"b"})
    assert {key[0] for key, _, _ in result.assignment_puts} == {"a", "b"}  # rewritten in place, none placed
    assert not result.assignment_deletes
    assert all(stored.value.batching.max_batch_size == 8 for stored in snapshot.assignments.values())


def test_node_grace_settings(monkeypatch):
    scheduler = SchedulerSettings().scheduler
    assert (scheduler.node_grace_seconds, scheduler.node_grace_probe_seconds) == (30.0, 1.0)
    monkeypatch.setenv("AIMAAS_SCHEDULER__NODE_GRACE_SECONDS", "0")
    monkeypatch.setenv("AIMAAS_SCHEDULER__NODE_GRACE_PROBE_SECONDS", "0.5")
    scheduler = SchedulerSettings().scheduler
    assert (scheduler.node_grace_seconds, scheduler.node_grace_probe_seconds) == (0.0, 0.5)
