"""Autoscaling decisions (pure), the leader's autoscaler state, and flap damping."""

from __future__ import annotations

import pytest

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from services.scheduler.autoscaler import (
    Autoscaler,
    LoadSample,
    ScalePolicy,
    ScaleState,
    autoscaled,
    combine,
    decide,
    policy_of,
    recommend,
)
from services.scheduler.reconciler import FlapTracker


def policy(**fields) -> ScalePolicy:
    values = dict(min_replicas=1, max_replicas=10, target_in_flight_per_replica=2.0, up_window_seconds=0.0,
                  down_window_seconds=60.0, scale_to_zero_after_seconds=None)  # fmt: skip
    values.update(fields)
    return ScalePolicy(**values)


def load(in_flight: float, qps: float = 10.0, queue_ms: float = 0.0, replicas: int = 1) -> LoadSample:
    return LoadSample(in_flight=in_flight, qps=qps, mean_queue_time_ms=queue_ms, replicas=replicas)


IDLE = LoadSample(in_flight=0.0, qps=0.0, replicas=1)


def test_recommendation_follows_in_flight_per_replica_and_queue_time():
    assert recommend(policy(), 1, load(7.0)) == 4  # ceil(7 / 2)
    assert recommend(policy(), 3, load(0.0)) == 1
    assert recommend(policy(), 3, None) == 3  # no signal: no opinion
    queue_only = policy(target_in_flight_per_replica=0.0, target_queue_time_ms=50.0)
    assert recommend(queue_only, 2, load(1.0, queue_ms=80.0)) == 3
    assert recommend(queue_only, 2, load(1.0, queue_ms=10.0)) == 2


def test_scale_up_is_immediate_by_default_and_bounded():
    state = ScaleState(current=1)
    assert decide(policy(), state, load(7.0), now=0) == 4
    assert decide(policy(max_replicas=5), state, load(100.0), now=1) == 5


def test_scale_up_stabilization_needs_the_load_to_hold():
    p = policy(up_window_seconds=10.0)
    state = ScaleState(current=1)
    assert decide(p, state, load(1.0), now=0) == 1
    # A spike: the lowest recommendation within the up window (1) wins.
    assert decide(p, state, load(8.0), now=5) == 1
    assert decide(p, state, load(8.0), now=12) == 4  # sustained for the whole window
    assert state.current == 4


def test_scale_down_stabilization_keeps_the_highest_recent_recommendation():
    p = policy(down_window_seconds=30.0)
    state = ScaleState(current=1)
    decide(p, state, load(8.0), now=0)
    assert state.current == 4
    assert decide(p, state, load(1.0), now=10) == 4  # the peak 10 s ago still counts
    assert decide(p, state, load(1.0), now=45) == 1


def test_scale_to_zero_after_idle_and_back_on_traffic_or_activation():
    p = policy(min_replicas=0, scale_to_zero_after_seconds=60.0, down_window_seconds=0.0)
    state = ScaleState(current=2)
    assert decide(p, state, IDLE, now=0) == 1
    assert decide(p, state, IDLE, now=30) == 1
    assert decide(p, state, IDLE, now=61) == 0
    assert decide(p, state, IDLE, now=100) == 0
    # Traffic seen (e.g. the gateway queued a request) brings it back.
    assert decide(p, state, load(0.5, qps=0.1), now=101) == 1
    assert decide(p, state, IDLE, now=102) == 1
    # Unknown (no signal) is not idle: the idle clock restarts.
    decide(p, state, None, now=150)
    assert decide(p, state, IDLE, now=200) == 1
    assert decide(p, state, IDLE, now=261) == 0
    assert decide(p, state, None, now=300, activated=True) == 1


def test_min_replicas_is_a_floor_and_zero_needs_min_zero():
    p = policy(min_replicas=2, scale_to_zero_after_seconds=1.0)
    state = ScaleState(current=3)
    assert decide(p, state, IDLE, now=0) == 2
    assert decide(p, state, IDLE, now=100) == 2


def test_policy_defaults_and_enablement():
    spec = spb.DeploymentSpec(min_replicas=0, max_replicas=3)
    assert autoscaled(spec)
    derived = policy_of(spec, down_window_seconds=120.0, scale_to_zero_after_seconds=600.0)
    assert derived.down_window_seconds == 120.0 and derived.scale_to_zero_after_seconds == 600.0
    spec.autoscaling.scale_to_zero_after_seconds = 30
    assert policy_of(spec).scale_to_zero_after_seconds == 30.0
    assert not autoscaled(spb.DeploymentSpec(min_replicas=2, max_replicas=3))
    fixed = spb.DeploymentSpec(min_replicas=2, max_replicas=3)
    assert policy_of(fixed).scale_to_zero_after_seconds is None


def test_combine_samples():
    merged = combine([load(2.0, qps=10.0, queue_ms=10.0), None, load(4.0, qps=30.0, queue_ms=20.0, replicas=2)])
    assert merged.in_flight == 6.0 and merged.qps == 40.0 and merged.replicas == 3
    assert merged.mean_queue_time_ms == pytest.approx(17.5)
    assert combine([None, None]) is None


class FakeSource:
    def __init__(self) -> None:
        self.samples: dict[tuple[str, int], LoadSample | None] = {}

    async def sample(self, model, version, replicas):
        return self.samples.get((model, version))

    async def close(self) -> None:
        pass


async def test_autoscaler_state_on_the_leader():
    clock = [0.0]
    source = FakeSource()
    scaler = Autoscaler(source, down_window_seconds=0.0, scale_to_zero_after_seconds=10.0, clock=lambda: clock[0])
    spec = spb.DeploymentSpec(name="d", model="m", min_replicas=0, max_replicas=4)
    spec.autoscaling.target_in_flight_per_replica = 1.0
    serving = spb.DeploymentStatus(versions=[spb.VersionStatus(version=1, weight=100, desired_replicas=1)])
    specs, statuses = {"d": spec}, {"d": serving}
    assert scaler.totals(specs, statuses) == {"d": 1}

    source.samples[("m", 1)] = load(3.0)
    assert await scaler.tick(specs, statuses, {})
    assert scaler.totals(specs, statuses) == {"d": 3}

    source.samples[("m", 1)] = IDLE
    clock[0] = 1.0
    await scaler.tick(specs, statuses, {})
    assert scaler.totals(specs, statuses) == {"d": 1}
    clock[0] = 12.0
    await scaler.tick(specs, statuses, {})
    assert scaler.totals(specs, statuses) == {"d": 0}

    # EnsureReplicas.
    scaler.activate("d")
    assert scaler.totals(specs, statuses) == {"d": 1}

    # A new term of leadership starts from the stored status (one replica desired there).
    scaler.reset()
    assert scaler.totals(specs, statuses) == {"d": 1}
    # Deployments that do not autoscale run min replicas.
    fixed = spb.DeploymentSpec(name="f", model="x", min_replicas=2, max_replicas=5)
    assert scaler.totals({"f": fixed}, {}) == {"f": 2}


def test_flap_tracker_damps_nodes_that_come_back_quickly():
    flaps = FlapTracker(window_seconds=60, probation_seconds=10, max_probation_seconds=25)
    assert flaps.joined("a", now=0) is None  # first registration
    flaps.lost("a", now=5)
    assert flaps.joined("a", now=8) == 18  # back within the window: probation
    assert flaps.on_probation(now=9) == ({"a"}, 18)
    assert flaps.on_probation(now=18) == (set(), None)
    flaps.lost("a", now=20)
    assert flaps.joined("a", now=21) == 41  # second flap: doubled
    flaps.lost("a", now=50)
    assert flaps.joined("a", now=51) == 76  # capped at the maximum
    flaps.lost("b", now=0)
    assert flaps.joined("b", now=100) is None  # came back after the window: trusted
