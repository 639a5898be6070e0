"""Prometheus exposition of the aggregated metrics (the names deploy/grafana/dashboards/aimaas.json uses).

The /metrics endpoint runs in its own thread while the store changes on the event loop, so the
families are computed on the loop (`refresh`, every few seconds) and the collector only hands out
the last snapshot.

Families (window label: 1m / 5m):
  aimaas_monitor_model_qps{model,version,window}
  aimaas_monitor_model_success_ratio{model,version,window}
  aimaas_monitor_model_latency_ms{model,version,window,quantile="0.5|0.95|0.99"}
  aimaas_monitor_model_queue_time_ms{model,version,window}            (mean)
  aimaas_monitor_model_requests{model,version,window}                 (requests in the window)
  aimaas_monitor_model_failures{model,version,window,reason}
  aimaas_monitor_model_reporting_replicas{model,version}
  aimaas_monitor_node_cpu_percent{node}, aimaas_monitor_node_memory_used_bytes{node},
  aimaas_monitor_node_memory_total_bytes{node}, aimaas_monitor_node_gpu_memory_used_bytes{node},
  aimaas_monitor_node_gpu_memory_total_bytes{node}, aimaas_monitor_node_gpu_utilization_percent{node}
  aimaas_monitor_alerts{state}, aimaas_monitor_series, aimaas_monitor_deltas_accepted, aimaas_monitor_leader
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from aimaas.monitor.v1 import monitor_pb2 as mpb
from services.monitor.aggregation import MetricsStore, preferred
from services.monitor.alerts import AlertView

_WINDOWS = (("1m", mpb.WINDOW_1M), ("5m", mpb.WINDOW_5M))


class AggregateCollector(Collector):
    def __init__(
        self,
        store: MetricsStore,
        alerts: AlertView,
        *,
        window_seconds: dict[int, float],
        is_leader: Callable[[], bool],
    ) -> None:
        self._store = store
        self._alerts = alerts
        self._windows = window_seconds
        self._is_leader = is_leader
        self._families: list[GaugeMetricFamily] = []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return list(self._families)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # families vary with the data; no registration-time check

    def refresh(self) -> None:
        """Recompute the families from the store (on the event loop)."""
        for _ in self._refresh():
            pass

    async def arefresh(self) -> None:
        """`refresh`, yielding to other tasks between model versions."""
        for _ in self._refresh():
            await asyncio.sleep(0)

    def _refresh(self) -> Iterator[None]:
        labels = ["model", "version", "window"]
        qps = GaugeMetricFamily("aimaas_monitor_model_qps", "Requests per second", labels=labels)
        success = GaugeMetricFamily("aimaas_monitor_model_success_ratio", "Successful share of requests", labels=labels)
        latency = GaugeMetricFamily(
            "aimaas_monitor_model_latency_ms", "Latency quantiles (ms, in-server)", labels=[*labels, "quantile"]
        )
        queue = GaugeMetricFamily("aimaas_monitor_model_queue_time_ms", "Mean batcher queue time (ms)", labels=labels)
        requests = GaugeMetricFamily("aimaas_monitor_model_requests", "Requests in the window", labels=labels)
        failures = GaugeMetricFamily(
            "aimaas_monitor_model_failures", "Failed requests in the window, by reason", labels=[*labels, "reason"]
        )
        replicas = GaugeMetricFamily(
            "aimaas_monitor_model_reporting_replicas", "Replicas reporting recently", labels=["model", "version"]
        )
        groups: dict[tuple[str, int], list] = {}
        for series in self._store.series():
            groups.setdefault((series.model, series.version), []).append(series)
        for (model, version), members in sorted(groups.items()):
            for name, window in _WINDOWS:
                aggregate = self._store.aggregate(preferred(members), self._windows[window])
                values = [model, str(version), name]
                qps.add_metric(values, aggregate.qps)
                success.add_metric(values, aggregate.success_rate)
                for q in (0.5, 0.95, 0.99):
                    latency.add_metric([*values, str(q)], aggregate.latency_ms(q))
                queue.add_metric(values, aggregate.mean_queue_ms())
                requests.add_metric(values, aggregate.requests)
                for reason, count in sorted(aggregate.failures.items()):
                    failures.add_metric([*values, reason], count)
            replicas.add_metric([model, str(version)], self._store.load_signal(model, version).reporting_replicas)
            yield
        node_families = {
            field: GaugeMetricFamily(f"aimaas_monitor_node_{field}", f"Host {field.replace('_', ' ')}", labels=["node"])
            for field in (
                "cpu_percent", "memory_used_bytes", "memory_total_bytes", "gpu_memory_used_bytes",
                "gpu_memory_total_bytes", "gpu_utilization_percent",
            )
        }
        for node, resources in sorted(self._store.nodes().items()):
            usage = resources.usage
            for field, family in node_families.items():
                if field.startswith("gpu") and not usage.gpu_memory_total_bytes:
                    continue  # no GPU: absent, not zero
                family.add_metric([node], float(getattr(usage, field)))
        alerts = GaugeMetricFamily("aimaas_monitor_alerts", "Alerts by state", labels=["state"])
        counts = {"pending": 0, "firing": 0}
        for alert in self._alerts.list(include_resolved=False):
            key = "firing" if alert.state == mpb.ALERT_STATE_FIRING else "pending"
            counts[key] += 1
        for state, count in counts.items():
            alerts.add_metric([state], count)
        series_count = GaugeMetricFamily("aimaas_monitor_series", "Series held in memory")
        series_count.add_metric([], self._store.series_count)
        deltas = GaugeMetricFamily("aimaas_monitor_deltas_accepted", "Statistics deltas accepted since start")
        deltas.add_metric([], self._store.deltas_accepted)
        leader = GaugeMetricFamily("aimaas_monitor_leader", "1 while this replica evaluates alerts")
        leader.add_metric([], 1 if self._is_leader() else 0)
        families = [
            qps, success, latency, queue, requests, failures, replicas, *node_families.values(),
            alerts, series_count, deltas, leader,
        ]
        # A family without samples (e.g. GPU figures on a CPU-only mesh) is left out altogether.
        self._families = [family for family in families if family.samples]
