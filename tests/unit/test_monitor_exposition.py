"""Prometheus exposition of the aggregates, and the Grafana dashboard built on those names."""

from __future__ import annotations

import json
import pathlib
import re

import structlog
from prometheus_client import CollectorRegistry, generate_latest

from aimaas.monitor.v1 import monitor_pb2 as mpb
from services.common.sketch import LatencySketch
from services.monitor.aggregation import MetricsStore
from services.monitor.alerts import AlertView
from services.monitor.exposition import AggregateCollector

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "deploy/grafana/dashboards/aimaas.json"


def exposition(gpu: bool) -> str:
    store = MetricsStore()
    latency = LatencySketch()
    latency.add_many([3000, 3000, 3000])
    usage = mpb.ResourceUsage(cpu_percent=50, memory_used_bytes=1, memory_total_bytes=2)
    if gpu:
        usage.gpu_memory_total_bytes, usage.gpu_memory_used_bytes, usage.gpu_utilization_percent = 80, 40, 75
    store.ingest(mpb.ReportStatsRequest(reporter_id="n1", resources=usage, deltas=[mpb.StatsDelta(
        model="m", version=2, success_count=3, failure_counts={"INTERNAL": 1}, latency=latency.to_proto())]))
    view = AlertView(None, logger=structlog.get_logger())  # type: ignore[arg-type]
    view.alerts[("r", "s")] = mpb.Alert(rule_id="r", subject="s", state=mpb.ALERT_STATE_FIRING)
    collector = AggregateCollector(store, view, window_seconds={mpb.WINDOW_1M: 60, mpb.WINDOW_5M: 300},
                                   is_leader=lambda: True)
    registry = CollectorRegistry()
    registry.register(collector)
    assert generate_latest(registry) == b""  # nothing before the first refresh on the loop
    collector.refresh()
    return generate_latest(registry).decode()


def test_exposition_families_and_values():
    text = exposition(gpu=True)
    assert 'aimaas_monitor_model_success_ratio{model="m",version="2",window="1m"} 0.75' in text
    assert 'aimaas_monitor_model_requests{model="m",version="2",window="5m"} 4.0' in text
    assert 'aimaas_monitor_model_failures{model="m",reason="INTERNAL",version="2",window="1m"} 1.0' in text
    p99 = re.search(r'aimaas_monitor_model_latency_ms\{model="m",quantile="0.99",version="2",window="1m"} (\S+)', text)
    assert p99 is not None and abs(float(p99.group(1)) - 3.0) <= 0.03  # the sketch's 1 % accuracy
    assert 'aimaas_monitor_node_gpu_utilization_percent{node="n1"} 75.0' in text
    assert 'aimaas_monitor_alerts{state="firing"} 1.0' in text and "aimaas_monitor_leader 1.0" in text
    assert "aimaas_monitor_node_gpu" not in exposition(gpu=False)  # no GPU: absent, not zero


def test_grafana_dashboard_uses_only_exposed_metric_names():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = {name for expr in exprs for name in re.findall(r"aimaas_monitor_\w+", expr)}
    exposed = set(re.findall(r"^(aimaas_monitor_\w+?)(?:\{| )", exposition(gpu=True), re.M))
    assert used and used <= exposed, used - exposed
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {"prometheus"}
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"model", "version", "window", "node"}
