"""The SLO-gated canary's pure rules (canary.py) and its walk through the planner, driven by
measurements the test supplies (the reconciler's metrics source is faked here, nowhere else)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from services.scheduler.canary import (
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    CanaryMeasurement,
    canary_split,
    evaluate,
    next_step,
)
from services.scheduler.planner import FAILED, PlannerConfig
from tests.unit.test_scheduler_planner import NOW, assigned, cluster, cond, deploy, ready_all, report, run, status, weights

CONFIG = PlannerConfig(canary_min_requests=10, canary_max_hold_seconds=5.0)


def policy(candidate=2, steps=(25, 50, 100), step_seconds=2, max_error_rate=0.05, max_p99=0.0) -> spb.CanaryPolicy:
    target = spb.TrafficTarget(alias=candidate) if isinstance(candidate, str) else spb.TrafficTarget(version=candidate)
    return spb.CanaryPolicy(
        candidate=target, steps=list(steps), step_seconds=step_seconds, max_error_rate=max_error_rate,
        max_p99_latency_ms=max_p99,
    )  # fmt: skip


def healthy(at: float, requests: int = 100) -> CanaryMeasurement:
    return CanaryMeasurement(request_count=requests, error_rate=0.01, p99_latency_ms=5.0, at=at)


def step(snapshot, now, measurement=None, **kwargs):
    return run(snapshot, now=now, config=CONFIG, canary_metrics={"d": measurement} if measurement else {}, **kwargs)


def canary(snapshot) -> spb.CanaryStatus:
    return status(snapshot).canary


def serving_on_v1(min_replicas=2):
    """Deployment d serving version 1 (READY on two nodes), before a canary is declared."""
    snapshot = cluster("a", "b", "c", "e")
    deploy(snapshot, min_replicas=min_replicas)
    run(snapshot)
    ready_all(snapshot, 1)
    run(snapshot)
    assert weights(snapshot) == {1: 100}
    return snapshot


def start_canary(snapshot, **policy_fields):
    deploy(snapshot, min_replicas=2, canary=policy(**policy_fields))
    step(snapshot, NOW)
    ready_all(snapshot, 2)
    step(snapshot, NOW)


# -------------------------------------------------------------------------------- pure rules


def test_split_gives_the_rest_to_the_stable_versions_proportionally():
    assert canary_split({1: 100}, 2, 10) == {1: 90, 2: 10}
    assert canary_split({1: 60, 3: 40}, 2, 10) == {1: 54, 3: 36, 2: 10}
    assert canary_split({1: 50, 3: 50}, 2, 25) == {1: 38, 3: 37, 2: 25}  # remainder to the older version
    assert canary_split({1: 100}, 2, 100) == {2: 100}  # stable versions at 0 are left out


@given(
    st.dictionaries(st.integers(1, 50), st.integers(1, 100), min_size=1, max_size=5),
    st.integers(1, 100),
)
def test_split_always_sums_to_100(stable, weight):
    split = canary_split(stable, 99, weight)
    assert sum(split.values()) == 100
    assert split[99] == weight
    assert all(w > 0 for w in split.values())


def test_verdicts():
    bounds = policy(max_error_rate=0.05, max_p99=50.0)
    assert evaluate(bounds, None, 10).outcome == "unknown"
    few = evaluate(bounds, CanaryMeasurement(9, 1.0, 999.0, NOW), 10)
    assert (few.outcome, few.reason) == ("unknown", "InsufficientTraffic")
    assert "9 request(s) measured, at least 10" in few.message
    errors = evaluate(bounds, CanaryMeasurement(40, 0.25, 10.0, NOW), 10)
    assert (errors.outcome, errors.reason) == ("fail", "ErrorRateExceeded")
    assert "error rate 0.2500 > max 0.05 over 40 requests" in errors.message
    slow = evaluate(bounds, CanaryMeasurement(40, 0.0, 80.0, NOW), 10)
    assert (slow.outcome, slow.reason) == ("fail", "LatencyExceeded")
    assert "p99 latency 80.0 ms > max 50 ms" in slow.message
    assert evaluate(bounds, CanaryMeasurement(40, 0.05, 50.0, NOW), 10).outcome == "pass"  # bounds inclusive
    # A bound of 0 is not checked.
    assert evaluate(policy(max_error_rate=0.0, max_p99=50.0), CanaryMeasurement(40, 0.9, 1.0, NOW), 10).outcome == "pass"


def test_next_step():
    p = policy(steps=(5, 25, 100))
    assert [next_step(p, w) for w in (5, 25, 100)] == [25, 100, None]


# ---------------------------------------------------------------------------- through the planner


def test_healthy_canary_walks_every_step_and_is_promoted():
    snapshot = serving_on_v1()
    deploy(snapshot, min_replicas=2, canary=policy(steps=(25, 50, 100), step_seconds=2))
    step(snapshot, NOW)
    # Candidate replicas first; traffic stays on the stable version until they are READY.
    assert weights(snapshot) == {1: 100, 2: 0}
    assert assigned(snapshot, 2) and len(assigned(snapshot, 1)) == 2
    assert canary(snapshot).phase == PROGRESSING and canary(snapshot).weight == 25
    assert not canary(snapshot).HasField("step_started")
    assert cond(snapshot, "Canary").reason == "WaitingForReplicas"

    ready_all(snapshot, 2)
    result = step(snapshot, NOW + 0.1)
    assert weights(snapshot) == {1: 75, 2: 25}
    assert canary(snapshot).step_started.ToNanoseconds() == int((NOW + 0.1) * 1e9)
    assert result.wake_at == pytest.approx(NOW + 2.1)
    assert cond(snapshot, "Canary").status and cond(snapshot, "Canary").reason == "Progressing"
    assert "step 1/3: version 2 at 25%" in cond(snapshot, "Canary").message

    # Within the step: a good measurement does not advance it early.
    step(snapshot, NOW + 1, healthy(NOW + 1))
    assert weights(snapshot) == {1: 75, 2: 25}
    # After the step, a measurement taken before its end does not count either.
    step(snapshot, NOW + 2.5, healthy(NOW + 1.5))
    assert weights(snapshot) == {1: 75, 2: 25}

    t = NOW + 2.5
    for expected in ({1: 50, 2: 50}, {2: 100}):
        step(snapshot, t, healthy(t))
        ready_all(snapshot, 2)
        step(snapshot, t)
        assert {v: w for v, w in weights(snapshot).items() if w} == expected
        # Stable capacity stays complete during the canary, even at 100%.
        assert len(assigned(snapshot, 1)) == 2
        t += 2.5

    step(snapshot, t, healthy(t, requests=321))
    assert weights(snapshot) == {2: 100}
    assert assigned(snapshot, 1) == []  # stable replicas removed on promotion
    state = canary(snapshot)
    assert state.phase == PROMOTED and state.weight == 100 and state.request_count == 321
    promoted = cond(snapshot, "Canary")
    assert (promoted.status, promoted.reason) == (False, "Promoted")
    assert "version 2 promoted to 100%" in promoted.message and "over 321 requests" in promoted.message

    # Settled: the same spec plans nothing more (a new leader reads the same status).
    assert step(snapshot, t + 100).empty()


def test_error_rate_above_the_bound_rolls_back_at_once_with_the_reason():
    snapshot = serving_on_v1()
    start_canary(snapshot, steps=(10, 50, 100), step_seconds=60, max_error_rate=0.05)
    assert weights(snapshot) == {1: 90, 2: 10}
    bad = CanaryMeasurement(request_count=40, error_rate=0.5, p99_latency_ms=3.0, at=NOW + 1)
    step(snapshot, NOW + 1, bad)  # long before the step's end: fail fast
    assert weights(snapshot) == {1: 100}
    assert assigned(snapshot, 2) == []
    assert len(assigned(snapshot, 1)) == 2
    state = canary(snapshot)
    assert state.phase == ROLLED_BACK and state.error_rate == 0.5 and state.request_count == 40
    rolled = cond(snapshot, "Canary")
    assert (rolled.status, rolled.reason) == (False, "RolledBack")
    assert "ErrorRateExceeded at step 10%: error rate 0.5000 > max 0.05 over 40 requests" in rolled.message
    assert "traffic on 1 (100%)" in rolled.message
    # Stays rolled back for the same canary (a new leader does not retry it).
    assert step(snapshot, NOW + 500, healthy(NOW + 500)).empty()
    assert weights(snapshot) == {1: 100}


def test_p99_above_the_bound_rolls_back():
    snapshot = serving_on_v1()
    start_canary(snapshot, max_error_rate=0.0, max_p99=20.0)
    step(snapshot, NOW + 0.5, CanaryMeasurement(100, 0.0, 75.0, NOW + 0.5))
    assert weights(snapshot) == {1: 100}
    assert "LatencyExceeded at step 25%: p99 latency 75.0 ms > max 20 ms" in cond(snapshot, "Canary").message


def test_insufficient_traffic_holds_the_step_then_rolls_back_after_the_bound():
    snapshot = serving_on_v1()
    start_canary(snapshot, step_seconds=2)  # CONFIG: 10 requests needed, held 5 s more at most
    few = CanaryMeasurement(request_count=3, error_rate=1.0, p99_latency_ms=900.0, at=NOW + 3)
    result = step(snapshot, NOW + 3, few)  # neither a pass nor a fail (even at 100% errors)
    assert weights(snapshot) == {1: 75, 2: 25}
    assert canary(snapshot).phase == PROGRESSING
    assert result.wake_at == pytest.approx(NOW + 2 + 5)
    step(snapshot, NOW + 6.9, CanaryMeasurement(9, 0.0, 1.0, NOW + 6.9))
    assert weights(snapshot) == {1: 75, 2: 25}
    step(snapshot, NOW + 7.1, CanaryMeasurement(9, 0.0, 1.0, NOW + 7.1))
    assert weights(snapshot) == {1: 100} and assigned(snapshot, 2) == []
    message = cond(snapshot, "Canary").message
    assert "InsufficientTraffic at step 25%" in message and "9 request(s) measured, at least 10 needed" in message


def test_no_metrics_at_all_is_insufficient_traffic_too():
    snapshot = serving_on_v1()
    start_canary(snapshot, step_seconds=2)
    step(snapshot, NOW + 4)
    assert weights(snapshot) == {1: 75, 2: 25}
    step(snapshot, NOW + 7.5)
    assert canary(snapshot).phase == ROLLED_BACK
    assert "no metrics for the candidate from the monitor" in cond(snapshot, "Canary").message


def test_a_candidate_that_fails_to_load_rolls_the_canary_back():
    snapshot = serving_on_v1()
    deploy(snapshot, min_replicas=2, canary=policy())
    step(snapshot, NOW)
    (node,) = assigned(snapshot, 2)
    report(snapshot, node, 2, FAILED, reason="bad graph")
    step(snapshot, NOW + 1)
    assert weights(snapshot)[1] == 100 and assigned(snapshot, 2) == []
    assert canary(snapshot).phase == ROLLED_BACK
    assert f"LoadFailed: version 2 failed to load on node {node}: bad graph" in cond(snapshot, "Canary").message


def test_a_changed_policy_starts_a_fresh_canary_and_dropping_the_canary_returns_to_the_traffic():
    snapshot = serving_on_v1()
    start_canary(snapshot, max_error_rate=0.05)
    step(snapshot, NOW + 1, CanaryMeasurement(50, 0.5, 1.0, NOW + 1))
    assert canary(snapshot).phase == ROLLED_BACK
    deploy(snapshot, min_replicas=2, canary=policy(max_error_rate=0.6))  # looser bound: a new run
    step(snapshot, NOW + 2)
    assert canary(snapshot).phase == PROGRESSING and canary(snapshot).weight == 25
    ready_all(snapshot, 2)
    step(snapshot, NOW + 2)
    assert weights(snapshot) == {1: 75, 2: 25}
    deploy(snapshot, min_replicas=2)  # canary removed: the spec's traffic is all there is
    step(snapshot, NOW + 3)
    assert weights(snapshot) == {1: 100} and assigned(snapshot, 2) == []
    assert not status(snapshot).HasField("canary")


def test_a_candidate_alias_that_moves_restarts_the_canary_for_the_new_version():
    snapshot = serving_on_v1()
    snapshot.aliases[("m", "next")] = 2
    start_canary(snapshot, candidate="next")
    assert weights(snapshot) == {1: 75, 2: 25}
    snapshot.aliases[("m", "next")] = 3
    step(snapshot, NOW + 1)
    assert canary(snapshot).version == 3 and not canary(snapshot).HasField("step_started")
    ready_all(snapshot, 3)
    step(snapshot, NOW + 1)
    assert {v: w for v, w in weights(snapshot).items() if w} == {1: 75, 3: 25}
    assert assigned(snapshot, 2) == []


def test_a_candidate_that_joins_the_stable_traffic_is_not_canaried():
    snapshot = serving_on_v1()
    snapshot.aliases[("m", "next")] = 1
    deploy(snapshot, min_replicas=2, canary=policy(candidate="next"))
    step(snapshot, NOW)
    assert weights(snapshot) == {1: 100}
    assert cond(snapshot, "Canary").reason == "CandidateServing"


def test_last_step_below_100_promotes_through_a_rollout_to_all_traffic():
    snapshot = serving_on_v1()
    start_canary(snapshot, steps=(50,), step_seconds=1)
    assert weights(snapshot) == {1: 50, 2: 50}
    step(snapshot, NOW + 2, healthy(NOW + 2))
    assert canary(snapshot).phase == PROMOTED
    assert weights(snapshot)[1] == 50  # the candidate gets its full count READY first
    ready_all(snapshot, 2)
    step(snapshot, NOW + 2)
    assert weights(snapshot) == {2: 100} and assigned(snapshot, 1) == []


def test_a_new_leaders_autoscaler_starts_from_the_stable_scale_during_a_canary():
    from services.scheduler.autoscaler import Autoscaler

    spec = spb.DeploymentSpec(
        name="d", model="m", traffic=[spb.TrafficTarget(version=1, weight=100)], min_replicas=1, max_replicas=10,
        autoscaling=spb.AutoscalingPolicy(target_in_flight_per_replica=2), canary=policy(),
    )  # fmt: skip
    status = spb.DeploymentStatus(
        versions=[
            spb.VersionStatus(version=1, weight=75, desired_replicas=4),
            spb.VersionStatus(version=2, weight=25, desired_replicas=1),
        ],
        canary=spb.CanaryStatus(version=2, stable={1: 100}, phase=PROGRESSING, weight=25),
    )
    assert Autoscaler(None).total("d", spec, status) == 4
    status.canary.phase = PROMOTED
    assert Autoscaler(None).total("d", spec, status) == 5


def test_a_new_deployment_with_a_canary_starts_both_versions_and_the_step_once_the_candidate_is_ready():
    snapshot = cluster("a", "b", "c")
    deploy(snapshot, min_replicas=2, canary=policy())
    step(snapshot, NOW)
    assert len(assigned(snapshot, 1)) == 2 and len(assigned(snapshot, 2)) == 1
    assert not canary(snapshot).HasField("step_started")
    ready_all(snapshot, 1)
    step(snapshot, NOW + 1)
    assert not canary(snapshot).HasField("step_started")  # the candidate is not READY yet
    ready_all(snapshot, 2)
    step(snapshot, NOW + 2)
    assert weights(snapshot) == {1: 75, 2: 25}
    assert canary(snapshot).step_started.ToNanoseconds() == int((NOW + 2) * 1e9)


def test_a_spec_change_outside_the_canary_keeps_its_progress():
    snapshot = serving_on_v1()
    start_canary(snapshot)
    started = canary(snapshot).step_started
    deploy(snapshot, min_replicas=3, max_replicas=6, canary=policy())  # new generation, same run
    step(snapshot, NOW + 1)
    assert canary(snapshot).step_started == started and canary(snapshot).weight == 25
    assert len(assigned(snapshot, 1)) == 3  # the stable scale follows the spec
