"""Pure routing-grace logic (issue 21): a READY replica whose lease-bound status vanishes is held,
still routed, until its status is written again, its node fails a probe, or the grace ends."""

from __future__ import annotations

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.common.etcd import KeyBuilder, KeyValue, to_json
from services.gateway.routing import RoutingState

KEYS = KeyBuilder("/t/aimaas/v1")
READY, UNLOADING, LOADING = tpb.REPLICA_STATE_READY, tpb.REPLICA_STATE_UNLOADING, tpb.REPLICA_STATE_LOADING
GRACE = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _spec() -> tuple[str, bytes]:
    spec = spb.DeploymentSpec(name="m", model="m", min_replicas=2, max_replicas=2, traffic=[spb.TrafficTarget(version=1, weight=100)])
    return KEYS.deployment("m"), to_json(spec)


def _status(node: str, state: int = READY, address: str | None = None) -> tuple[str, bytes]:
    record = spb.ReplicaStatus(node_id=node, model="m", version=1, state=state, address=f"{node}:1" if address is None else address)
    return KEYS.status(node, "m", 1), to_json(record)


def _node(node: str) -> tuple[str, bytes]:
    return KEYS.node(node), to_json(spb.Node(id=node, address=f"{node}:9"))


def _state(grace: float = GRACE) -> tuple[RoutingState, Clock]:
    clock = Clock()
    state = RoutingState(KEYS, grace_seconds=grace, clock=clock)
    for key, value in (_spec(), _node("a"), _node("b"), _status("a"), _status("b")):
        state.apply("put", key, value)
    return state, clock


def _routed(state: RoutingState) -> list[tuple[str, str]]:
    return [(r.node_id, r.address) for r in state.table().lookup("m").versions[0].replicas]


def test_every_record_of_a_mass_expiry_vanishing_keeps_every_replica_routed_for_the_grace():
    state, clock = _state()
    # Lease expiry deletes the node records and the statuses, in any order.
    for key in (KEYS.node("a"), KEYS.status("a", "m", 1), KEYS.status("b", "m", 1), KEYS.node("b")):
        assert state.apply("delete", key, b"")
    assert _routed(state) == [("a", "a:1"), ("b", "b:1")]
    assert set(state.held) == {("a", "m", 1), ("b", "m", 1)}
    clock.now += GRACE - 0.1
    assert not state.expire() and len(_routed(state)) == 2
    clock.now += 0.2
    assert _routed(state) == []  # the snapshot leaves out a hold past its grace...
    assert sorted(state.expire()) == [("a", "m", 1), ("b", "m", 1)]  # ...and expire() ends it
    assert not state.held and state.next_expiry() is None


def test_re_registration_ends_the_hold_with_the_record_written_again():
    state, clock = _state()
    state.apply("delete", KEYS.status("a", "m", 1), b"")
    assert ("a", "m", 1) in state.held and state.next_expiry() == clock.now + GRACE
    state.apply("put", *_status("a"))  # the node registered again
    assert not state.held
    clock.now += GRACE + 1
    assert _routed(state) == [("a", "a:1"), ("b", "b:1")]  # a plain READY replica again: no grace


def test_a_status_changing_state_is_a_real_change_not_held():
    state, _ = _state()
    assert state.apply("put", *_status("a", UNLOADING))
    assert _routed(state) == [("b", "b:1")] and not state.held
    # A held replica whose node writes another state is dropped at once too.
    state.apply("delete", KEYS.status("b", "m", 1), b"")
    assert ("b", "m", 1) in state.held
    assert state.apply("put", *_status("b", LOADING))
    assert _routed(state) == [] and not state.held
    # A delete after a non-READY state (an unloaded replica's status going away) holds nothing.
    assert not state.apply("delete", KEYS.status("b", "m", 1), b"")
    assert not state.held


def test_a_re_listing_holds_the_ready_replicas_it_no_longer_lists():
    state, clock = _state()
    spec_key, spec_value = _spec()
    # etcd back after an outage: the listing has a's status in another state and no status of b.
    state.reset([
        KeyValue(spec_key, spec_value, 1, 1, 1, 0),
        KeyValue(*_status("a", LOADING), 2, 2, 1, 7),
    ])  # fmt: skip
    assert _routed(state) == [("b", "b:1")] and set(state.held) == {("b", "m", 1)}
    until = state.next_expiry()
    # A later re-listing keeps the hold (and its deadline) while the status is still missing...
    clock.now += 5
    state.reset([KeyValue(spec_key, spec_value, 1, 1, 1, 0)])
    assert state.next_expiry() == until and _routed(state) == [("b", "b:1")]
    # ...and ends it once the status is listed again.
    state.reset([KeyValue(spec_key, spec_value, 1, 1, 1, 0), KeyValue(*_status("b"), 3, 3, 1, 8)])
    assert not state.held and _routed(state) == [("b", "b:1")]


def test_a_status_without_address_is_held_at_its_node_records_address():
    state, _ = _state()
    state.apply("put", *_status("a", address=""))
    state.apply("delete", KEYS.status("a", "m", 1), b"")
    state.apply("delete", KEYS.node("a"), b"")
    assert ("a", "a:9") in _routed(state)


def test_drop_ends_only_the_hold_that_was_probed():
    state, _ = _state()
    state.apply("delete", KEYS.status("a", "m", 1), b"")
    probed = state.held[("a", "m", 1)]
    state.apply("put", *_status("a"))
    state.apply("delete", KEYS.status("a", "m", 1), b"")  # vanished again: a new hold
    assert not state.drop(("a", "m", 1), probed)  # a probe of the earlier hold does not end this one
    assert state.drop(("a", "m", 1), state.held[("a", "m", 1)])
    assert _routed(state) == [("b", "b:1")]


def test_no_grace_drops_at_once():
    state, _ = _state(grace=0)
    state.apply("delete", KEYS.status("a", "m", 1), b"")
    assert _routed(state) == [("b", "b:1")] and not state.held
