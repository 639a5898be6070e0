"""Alert rule validation, evaluation and the alert state machine (pure logic)."""

from __future__ import annotations

import pytest
import structlog

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from services.common.errors import InvalidArgument
from services.monitor.aggregation import MetricsStore
from services.monitor.alerts import AlertEngine, Cluster, Evaluator, Notifier, Observation, subject_of
from services.monitor.rules import validate_rule


def rule(**fields) -> mpb.AlertRule:
    base = {"name": "r", "metric": mpb.ALERT_METRIC_ERROR_RATE, "threshold": 0.1, "enabled": True}
    base.update(fields)
    return mpb.AlertRule(**base)


def test_defaults_are_filled_in():
    checked = validate_rule(rule())
    assert checked.window == mpb.WINDOW_1M and checked.comparison == mpb.COMPARISON_GREATER_THAN
    no_traffic = validate_rule(rule(metric=mpb.ALERT_METRIC_NO_TRAFFIC, threshold=0, model="m"))
    assert no_traffic.comparison == mpb.COMPARISON_LESS_THAN
    assert validate_rule(rule(metric=mpb.ALERT_METRIC_NODE_DOWN, threshold=0)).metric == mpb.ALERT_METRIC_NODE_DOWN


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": " "}, "rule.name is required"),
        ({"name": "x" * 201}, "longer than 200"),
        ({"id": "Bad Id"}, "rule.id 'Bad Id' must match"),
        ({"metric": mpb.ALERT_METRIC_UNSPECIFIED}, "rule.metric must be one of"),
        ({"metric": 99}, "rule.metric must be one of"),
        ({"window": 42}, "rule.window 42 is not a Window"),
        ({"comparison": 7}, "rule.comparison 7 is not a Comparison"),
        ({"threshold": 1.5}, "fraction in [0, 1]"),
        ({"threshold": float("nan")}, "finite"),
        ({"metric": mpb.ALERT_METRIC_P99_LATENCY_MS, "threshold": 0}, "milliseconds > 0"),
        ({"metric": mpb.ALERT_METRIC_NO_TRAFFIC, "threshold": -1}, "rate >= 0"),
        ({"metric": mpb.ALERT_METRIC_NO_TRAFFIC, "threshold": 0, "comparison": mpb.COMPARISON_GREATER_THAN},
         "compares LESS_THAN"),
        ({"metric": mpb.ALERT_METRIC_NODE_DOWN, "threshold": 1}, "takes no threshold"),
        ({"metric": mpb.ALERT_METRIC_NODE_DOWN, "threshold": 0, "model": "m"}, "scoped by node_id only"),
        ({"metric": mpb.ALERT_METRIC_REPLICAS_BELOW_MIN, "threshold": 0, "node_id": "n"}, "scoped by model only"),
        ({"version": 3}, "rule.version needs rule.model"),
        ({"model": "a/b"}, "must not contain '/'"),
        ({"for_seconds": 10**7}, "for_seconds must be at most"),
        ({"webhook_urls": ["ftp://x"]}, "absolute http(s) URL"),
        ({"webhook_urls": ["http://"]}, "absolute http(s) URL"),
        ({"webhook_urls": [f"http://h/{i}" for i in range(11)]}, "at most 10 webhook_urls"),
        ({"labels": {str(i): "v" for i in range(33)}}, "at most 32 labels"),
    ],
)
def test_bad_rules_get_precise_errors(fields, message):
    with pytest.raises(InvalidArgument) as caught:
        validate_rule(rule(**fields))
    assert message in caught.value.message


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def engine(clock: Clock) -> AlertEngine:
    notifier = Notifier(logger=structlog.get_logger())
    return AlertEngine(None, None, None, None, notifier, logger=structlog.get_logger(), clock=clock,  # type: ignore[arg-type]
                       resolved_retention_seconds=100, max_resolved_per_rule=2)


def test_pending_firing_resolved_with_for_and_dedup():
    clock = Clock()
    alerts_engine = engine(clock)
    r = validate_rule(rule(id="r1", for_seconds=10))
    alerts: dict[str, mpb.Alert] = {}
    hot = [Observation("model=m,version=1", 0.5, True, "hot")]
    changed, notify = alerts_engine._advance(r, alerts, hot, clock.now)
    assert changed and not notify and alerts["model=m,version=1"].state == mpb.ALERT_STATE_PENDING
    clock.now += 5
    changed, notify = alerts_engine._advance(r, alerts, hot, clock.now)
    assert not changed and not notify  # still pending, no duplicate alert
    clock.now += 5
    changed, notify = alerts_engine._advance(r, alerts, hot, clock.now)
    assert changed and [a.state for a in notify] == [mpb.ALERT_STATE_FIRING] and not notify[0].notified
    notify[0].notified = True
    clock.now += 5
    assert alerts_engine._advance(r, alerts, hot, clock.now) == (False, [])  # firing stays firing, once
    cold = [Observation("model=m,version=1", 0.0, False, "cold")]
    changed, notify = alerts_engine._advance(r, alerts, cold, clock.now)
    assert changed and [a.state for a in notify] == [mpb.ALERT_STATE_RESOLVED]
    assert len(alerts) == 1 and alerts["model=m,version=1"].resolved_at.seconds == int(clock.now)
    notify[0].notified = True
    assert alerts_engine._advance(r, alerts, cold, clock.now) == (False, [])
    # A pending alert whose condition ends is dropped without a notification.
    other = [Observation("model=n,version=1", 1.0, True, "x")]
    alerts_engine._advance(r, alerts, other, clock.now)
    changed, notify = alerts_engine._advance(r, alerts, [], clock.now)
    assert changed and not notify and "model=n,version=1" not in alerts
    # Resolved history expires.
    clock.now += 101
    changed, _ = alerts_engine._advance(r, alerts, [], clock.now)
    assert changed and alerts == {}


def test_subject_that_vanishes_resolves():
    clock = Clock()
    alerts_engine = engine(clock)
    r = validate_rule(rule(id="r1"))
    alerts: dict[str, mpb.Alert] = {}
    _, notify = alerts_engine._advance(r, alerts, [Observation("s", 1, True, "x")], clock.now)
    assert [a.state for a in notify] == [mpb.ALERT_STATE_FIRING]  # for_seconds 0: fires at once
    _, notify = alerts_engine._advance(r, alerts, [], clock.now)
    assert [a.state for a in notify] == [mpb.ALERT_STATE_RESOLVED]


def test_evaluator_node_down_and_replicas_below_min():
    clock = Clock()
    store = MetricsStore(clock=clock)
    store.ingest(mpb.ReportStatsRequest(reporter_id="standalone", resources=mpb.ResourceUsage(cpu_percent=1)))
    store.ingest(mpb.ReportStatsRequest(reporter_id="mesh-1", resources=mpb.ResourceUsage(cpu_percent=1)))
    evaluator = Evaluator(store, window_seconds={mpb.WINDOW_1M: 60.0}, node_stale_seconds=10)
    cluster = Cluster(nodes={"mesh-1": spb.Node(id="mesh-1"), "mesh-2": spb.Node(id="mesh-2")})
    down_rule = validate_rule(rule(metric=mpb.ALERT_METRIC_NODE_DOWN, threshold=0))
    states = {o.subject: o.active for o in evaluator.evaluate(down_rule, cluster, clock.now)}
    assert states == {"node=mesh-1": False, "node=mesh-2": False, "node=standalone": False}
    clock.now += 11
    cluster.nodes.pop("mesh-1")
    states = {o.subject: o.active for o in evaluator.evaluate(down_rule, cluster, clock.now)}
    assert states == {"node=mesh-1": True, "node=mesh-2": False, "node=standalone": True}

    cluster.deployments = {"d": spb.DeploymentSpec(name="d", model="m", min_replicas=2)}
    cluster.statuses = {"d": spb.DeploymentStatus(versions=[spb.VersionStatus(version=1, ready_replicas=1)])}
    below = validate_rule(rule(metric=mpb.ALERT_METRIC_REPLICAS_BELOW_MIN, threshold=0))
    (obs,) = evaluator.evaluate(below, cluster, clock.now)
    assert obs.active and obs.subject == subject_of(deployment="d") and obs.value == 1
    cluster.statuses["d"].versions[0].ready_replicas = 2
    assert not evaluator.evaluate(below, cluster, clock.now)[0].active
    assert evaluator.evaluate(validate_rule(rule(metric=mpb.ALERT_METRIC_REPLICAS_BELOW_MIN, threshold=0,
                                                 model="other")), cluster, clock.now) == []


def test_evaluator_no_traffic_only_for_reported_versions():
    clock = Clock()
    store = MetricsStore(clock=clock)
    store.ingest(mpb.ReportStatsRequest(reporter_id="a", deltas=[mpb.StatsDelta(model="m", version=1)]))
    evaluator = Evaluator(store, window_seconds={mpb.WINDOW_1M: 60.0}, node_stale_seconds=10)
    r = validate_rule(rule(metric=mpb.ALERT_METRIC_NO_TRAFFIC, threshold=0))
    (obs,) = evaluator.evaluate(r, Cluster(), clock.now)
    assert obs.active and obs.subject == "model=m,version=1"
    clock.now += 11  # no longer reported: unloaded, not idle
    assert evaluator.evaluate(r, Cluster(), clock.now) == []
    scoped = validate_rule(rule(metric=mpb.ALERT_METRIC_NO_TRAFFIC, threshold=0, model="ghost"))
    (obs,) = evaluator.evaluate(scoped, Cluster(), clock.now)
    assert obs.active and obs.subject == "model=ghost"
