"""Pure routing logic: the table built from etcd records, version and replica choice, ejection."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.common.errors import NotFound, Unavailable
from services.common.etcd import KeyBuilder, to_json
from services.gateway.routing import Replica, Route, RoutingState, VersionRoute, choose_replica, choose_version
from services.gateway.upstream import Upstream, split_host_port

KEYS = KeyBuilder("/t/aimaas/v1")
READY, LOADING = tpb.REPLICA_STATE_READY, tpb.REPLICA_STATE_LOADING


def spec(name: str, model: str | None = None, traffic=((1, 100),), min_replicas: int = 1) -> bytes:
    return to_json(
        spb.DeploymentSpec(
            name=name,
            model=model or name,
            min_replicas=min_replicas,
            max_replicas=max(min_replicas, 1),
            traffic=[spb.TrafficTarget(version=v, weight=w) for v, w in traffic],
        )
    )


def status(weights: dict[int, int]) -> bytes:
    return to_json(spb.DeploymentStatus(versions=[spb.VersionStatus(version=v, weight=w) for v, w in weights.items()]))


def replica(node: str, model: str, version: int, state=READY, address: str | None = None) -> tuple[str, bytes]:
    record = spb.ReplicaStatus(node_id=node, model=model, version=version, state=state, address=address if address is not None else f"{node}:1")
    return KEYS.status(node, model, version), to_json(record)


def state_with(*puts: tuple[str, bytes]) -> RoutingState:
    state = RoutingState(KEYS)
    for key, value in puts:
        state.apply("put", key, value)
    return state


def test_table_uses_effective_weights_and_only_ready_replicas():
    state = state_with(
        (KEYS.deployment("m"), spec("m", traffic=((2, 100),))),
        (KEYS.deployment_status("m"), status({1: 100, 2: 0})),  # rollout not switched yet
        replica("a", "m", 1),
        replica("b", "m", 1),
        replica("a", "m", 2, state=LOADING),
    )
    route = state.table().lookup("m")
    assert [(v.version, v.weight, [r.node_id for r in v.replicas]) for v in route.versions] == [
        (1, 100, ["a", "b"]),
        (2, 0, []),
    ]
    assert route.ready and [v.version for v in route.split()] == [1]

    # The switch: the scheduler moves the effective weight once version 2 is READY.
    state.apply("put", *replica("a", "m", 2))
    state.apply("put", KEYS.deployment_status("m"), status({2: 100}))
    route = state.table().lookup("m")
    assert [v.version for v in route.split()] == [2]
    assert route.version(1).weight == 0 and len(route.version(1).replicas) == 2


def test_spec_weights_until_the_scheduler_writes_a_status_and_deletes_apply():
    state = state_with((KEYS.deployment("m"), spec("m", traffic=((1, 90), (2, 10)))), replica("a", "m", 1))
    route = state.table().lookup("m")
    assert {v.version: v.weight for v in route.versions} == {1: 90, 2: 10}
    # Version 2 has no READY replica: its share goes to version 1 rather than failing requests.
    assert [(v.version, v.weight) for v in route.split()] == [(1, 90)]

    assert state.apply("delete", KEYS.status("a", "m", 1), b"")
    assert not state.table().lookup("m").ready
    # A LOADING update of a replica that was never routable changes nothing.
    assert not state.apply("put", *replica("b", "m", 1, state=LOADING))
    assert state.apply("delete", KEYS.deployment("m"), b"")
    with pytest.raises(NotFound, match="unknown model 'm'"):
        state.table().lookup("m")


def test_address_falls_back_to_the_node_record_and_replicas_without_address_are_skipped():
    state = state_with(
        (KEYS.deployment("m"), spec("m")),
        replica("a", "m", 1, address=""),
        replica("b", "m", 1, address=""),
        (KEYS.node("a"), to_json(spb.Node(id="a", address="10.0.0.1:8301"))),
    )
    (version,) = state.table().lookup("m").versions
    assert [(r.node_id, r.address) for r in version.replicas] == [("a", "10.0.0.1:8301")]


def test_deployment_name_differing_from_model_and_bad_records():
    state = state_with((KEYS.deployment("front"), spec("front", model="resnet")), replica("a", "resnet", 1))
    table = state.table()
    assert table.lookup("front").model == "resnet"
    assert table.lookup("resnet").name == "front"  # the registry model name finds its deployment
    assert not state.apply("put", KEYS.deployment("broken"), b"{not json")
    assert not state.apply("put", KEYS.model("m"), b"{}")  # not a routing key
    assert "broken" not in state.table().routes
    assert table.addresses() == {"a:1"}


def test_reset_replaces_everything():
    state = state_with((KEYS.deployment("old"), spec("old")), replica("a", "old", 1))
    from services.common.etcd import KeyValue

    state.reset([KeyValue(KEYS.deployment("new"), spec("new"), 1, 1, 1, 0)])
    assert set(state.table().routes) == {"new"}
    assert not state.replicas


def _route(weights: dict[int, int], replicas_per_version: int = 2) -> Route:
    return Route(
        "m",
        "m",
        1,
        tuple(
            VersionRoute(v, w, tuple(Replica(f"n{v}{i}", f"n{v}{i}:1", "m", v) for i in range(replicas_per_version)))
            for v, w in weights.items()
        ),
    )


def test_choose_version_follows_the_weights():
    route = _route({1: 90, 2: 10})
    rng = random.Random(7)
    counts = Counter(choose_version(route, rng=rng).version for _ in range(20_000))
    assert abs(counts[1] / 20_000 - 0.9) < 0.01


def test_choose_version_pinned_errors():
    route = Route("m", "m", 1, (VersionRoute(1, 100, (Replica("a", "a:1", "m", 1),)), VersionRoute(2, 0, ())))
    assert choose_version(route, pinned=1).version == 1
    with pytest.raises(NotFound, match="no deployed version 3 .deployed: 1, 2"):
        choose_version(route, pinned=3)
    with pytest.raises(Unavailable, match="version 2 has no READY replica"):
        choose_version(route, pinned=2)
    with pytest.raises(Unavailable, match="no READY replica"):
        choose_version(Route("m", "m", 0, (VersionRoute(1, 100, ()),)))


def test_sticky_key_keeps_version_and_spreads_keys_by_weight():
    route = _route({1: 50, 2: 50})
    for key in ("alice", "bob", "carol"):
        first = choose_version(route, sticky_key=key).version
        assert all(choose_version(route, sticky_key=key).version == first for _ in range(20))
    counts = Counter(choose_version(route, sticky_key=f"user-{i}").version for i in range(4000))
    assert 0.45 < counts[1] / 4000 < 0.55


def test_least_outstanding_replica_with_exclusions_and_ejection():
    replicas = [Replica(n, f"{n}:1", "m", 1) for n in ("a", "b", "c")]
    loads = {"a:1": 3, "b:1": 1, "c:1": 2}
    assert choose_replica(replicas, load=loads.__getitem__).node_id == "b"
    assert choose_replica(replicas, load=loads.__getitem__, exclude={"b:1"}).node_id == "c"
    # An ejected replica is avoided while another one is left, used when it is the only one.
    assert choose_replica(replicas, load=loads.__getitem__, ejected=lambda a: a == "b:1").node_id == "c"
    assert choose_replica(replicas[1:2], load=loads.__getitem__, ejected=lambda a: True).node_id == "b"
    assert choose_replica(replicas, load=loads.__getitem__, exclude={"a:1", "b:1", "c:1"}) is None
    # Ties are broken at random, so equal replicas share the load.
    rng = random.Random(1)
    picks = Counter(choose_replica(replicas, load=lambda a: 0, rng=rng).node_id for _ in range(3000))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 800


def test_sticky_replica_is_stable_and_only_a_leaving_replicas_keys_move():
    replicas = [Replica(n, f"{n}:1", "m", 1) for n in ("a", "b", "c")]
    before = {k: choose_replica(replicas, load=lambda a: 0, sticky_key=k).node_id for k in map(str, range(300))}
    assert set(before.values()) == {"a", "b", "c"}
    after = {k: choose_replica(replicas[:2], load=lambda a: 0, sticky_key=k).node_id for k in before}
    moved = {k for k in before if before[k] != after[k]}
    assert moved == {k for k, node in before.items() if node == "c"}


def test_upstream_ejection_expires_and_load_counts():
    now = [100.0]
    upstream = Upstream(eject_seconds=5, max_message_bytes=1 << 20, clock=lambda: now[0])
    upstream.eject("a:1")
    assert upstream.ejected("a:1") and not upstream.ejected("b:1")
    now[0] += 5.1
    assert not upstream.ejected("a:1")
    upstream.eject("a:1")
    upstream.forgive("a:1")
    assert not upstream.ejected("a:1")
    with upstream.track("a:1"), upstream.track("a:1"):
        assert upstream.load("a:1") == 2
    assert upstream.load("a:1") == 0


def test_statistics_of_replicas_are_summed_under_the_deployment_name():
    from inference import grpc_predict_v2_pb2 as pb
    from services.gateway.dataplane import _merge, parse_version

    def node_stats(success: int, ns: int, last: int) -> pb.ModelStatistics:
        stats = pb.ModelStatistics(name="resnet", version="1", last_inference=last, inference_count=success, execution_count=1)
        stats.inference_stats.success.count = success
        stats.inference_stats.success.ns = ns
        stats.batch_stats.add(batch_size=success).compute_infer.count = 1
        return stats

    merged: dict = {}
    _merge(merged, "front", node_stats(2, 100, 5))
    _merge(merged, "front", node_stats(3, 50, 9))
    (total,) = merged.values()
    assert (total.name, total.version, total.last_inference, total.inference_count) == ("front", "1", 9, 5)
    assert (total.inference_stats.success.count, total.inference_stats.success.ns) == (5, 150)
    assert sorted(b.batch_size for b in total.batch_stats) == [2, 3]
    assert parse_version("m", "") is None and parse_version("m", "12") == 12
    for bad in ("0", "-1", "v1", "١"):
        with pytest.raises(Exception, match="positive integer"):
            parse_version("m", bad)


def test_node_addresses_split_into_host_and_port():
    assert split_host_port("10.0.0.7:8001") == ("10.0.0.7", 8001)
    assert split_host_port("node-a.mesh:9000") == ("node-a.mesh", 9000)
    assert split_host_port("[::1]:8001") == ("::1", 8001)
    for bad in ("10.0.0.7", ":8001", "host:", "host:port"):
        with pytest.raises(ValueError, match="host:port"):
            split_host_port(bad)
