"""The monitor's gRPC API against a real etcd: reports in, metrics and load signal out, rule CRUD with
precise errors, alert list/watch, Prometheus exposition."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from services.common.etcd import EtcdClient
from services.common.sketch import LatencySketch
from services.scheduler.autoscaler import MonitorSignalSource
from tests.support.monitor import eventually, monitor_settings, running_monitor


def report(node: str, model: str = "m", version: int = 1, success: int = 90, failed: int = 10,
           latency_us: float = 20_000, cpu: float = 25.0) -> mpb.ReportStatsRequest:
    sketch = LatencySketch()
    sketch.add_many([latency_us] * success)
    end = time.time_ns()
    delta = mpb.StatsDelta(
        model=model, version=version, success_count=success, failure_counts={"INVALID_ARGUMENT": failed} if failed else {},
        latency=sketch.to_proto(), in_flight=4, queued=1, batch_sizes={1: success},
    )
    delta.interval_start.FromNanoseconds(end - 1_000_000_000)
    delta.interval_end.FromNanoseconds(end)
    return mpb.ReportStatsRequest(
        reporter_kind=mpb.REPORTER_KIND_INFERENCE_NODE, reporter_id=node, deltas=[delta],
        resources=mpb.ResourceUsage(cpu_percent=cpu, memory_used_bytes=1 << 29, memory_total_bytes=1 << 30),
    )


async def send(stub: mpb_grpc.MonitorServiceStub, *requests: mpb.ReportStatsRequest) -> int:
    call = stub.ReportStats()
    for request in requests:
        await call.write(request)
    await call.done_writing()
    return (await call).accepted_deltas


async def test_reports_queries_load_signal_and_metrics(etcd_settings):
    async with running_monitor(monitor_settings(etcd_settings, metrics_port=0)) as app:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = mpb_grpc.MonitorServiceStub(channel)
            assert await send(stub, report("node-a"), report("node-b", cpu=75)) == 2
            response = await stub.QueryMetrics(mpb.QueryMetricsRequest(model="m", version=1))
            (sample,) = response.samples
            assert sample.request_count == 200 and sample.failure_count == 20
            assert sample.success_rate == pytest.approx(0.9)
            assert sample.qps == pytest.approx(200, rel=0.05)
            assert sample.p99_latency_ms == pytest.approx(20, rel=0.01)
            assert dict(sample.batch_sizes) == {1: 180}
            by_node = await stub.QueryMetrics(mpb.QueryMetricsRequest(node_id="node-b", window=mpb.WINDOW_5M))
            assert [s.resources.cpu_percent for s in by_node.samples] == [75]
            assert by_node.samples[0].resources.memory_total_bytes == 1 << 30

            signal = await stub.GetLoadSignal(mpb.GetLoadSignalRequest(model="m", version=1))
            assert signal.reporting_replicas == 2 and signal.in_flight_per_replica == 4 and signal.age_seconds < 5
            # The scheduler's real client reads the same signal.
            source = MonitorSignalSource(app.address)
            try:
                sample_seen = await source.sample("m", 1, [])
            finally:
                await source.close()
            assert sample_seen is not None and sample_seen.replicas == 2 and sample_seen.in_flight == 8

            for bad, message in [
                (mpb.QueryMetricsRequest(version=1), "version needs model"),
                (mpb.QueryMetricsRequest(window=9), "unknown window 9"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.QueryMetrics(bad)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetLoadSignal(mpb.GetLoadSignalRequest(model="m"))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        app.collector.refresh()
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{app.metrics_endpoint.port}/metrics")).text
        assert 'aimaas_monitor_model_qps{model="m",version="1",window="1m"}' in text
        assert 'aimaas_monitor_model_success_ratio{model="m",version="1",window="1m"} 0.9' in text
        assert 'aimaas_monitor_model_latency_ms{model="m",quantile="0.99",version="1",window="1m"}' in text
        assert 'aimaas_monitor_node_cpu_percent{node="node-b"} 75.0' in text
        assert "aimaas_monitor_node_gpu_memory_total_bytes{" not in text  # no GPU: absent, not zero


async def test_rule_crud_and_errors(etcd_settings):
    async with running_monitor(monitor_settings(etcd_settings)) as app:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = mpb_grpc.MonitorServiceStub(channel)
            rule = mpb.AlertRule(id="high-errors", name="errors", metric=mpb.ALERT_METRIC_ERROR_RATE, threshold=0.2,
                                 enabled=True, webhook_urls=["http://127.0.0.1:9/hook"])
            created = (await stub.CreateAlertRule(mpb.CreateAlertRuleRequest(rule=rule))).rule
            assert created.window == mpb.WINDOW_1M and created.comparison == mpb.COMPARISON_GREATER_THAN
            generated = (await stub.CreateAlertRule(mpb.CreateAlertRuleRequest(
                rule=mpb.AlertRule(name="slow", metric=mpb.ALERT_METRIC_P99_LATENCY_MS, threshold=100)))).rule
            assert generated.id
            assert (await stub.GetAlertRule(mpb.GetAlertRuleRequest(id="high-errors"))).rule == created
            assert {r.id for r in (await stub.ListAlertRules(mpb.ListAlertRulesRequest())).rules} == {
                "high-errors", generated.id}
            created.threshold = 0.3
            updated = (await stub.UpdateAlertRule(mpb.UpdateAlertRuleRequest(rule=created))).rule
            assert updated.threshold == 0.3
            # Stored as JSON under the rule key (readable with etcdctl).
            async with EtcdClient(etcd_settings) as etcd:
                stored = await etcd.get(etcd.keys.alert_rule("high-errors"))
            assert stored is not None and b'"threshold":0.3' in stored.value

            async def fails(call, request, code, message):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(request)
                assert caught.value.code() == code, caught.value.details()
                assert message in caught.value.details()

            invalid = grpc.StatusCode.INVALID_ARGUMENT
            await fails(stub.CreateAlertRule, mpb.CreateAlertRuleRequest(rule=rule), grpc.StatusCode.ALREADY_EXISTS,
                        "already exists")
            await fails(stub.CreateAlertRule, mpb.CreateAlertRuleRequest(), invalid, "rule is required")
            await fails(stub.CreateAlertRule, mpb.CreateAlertRuleRequest(rule=mpb.AlertRule(name="x")), invalid,
                        "rule.metric must be one of")
            await fails(stub.GetAlertRule, mpb.GetAlertRuleRequest(id="nope"), grpc.StatusCode.NOT_FOUND, "not found")
            await fails(stub.GetAlertRule, mpb.GetAlertRuleRequest(id=""), invalid, "rule id is required")
            await fails(stub.GetAlertRule, mpb.GetAlertRuleRequest(id="a/b"), invalid, "must match")
            missing = mpb.AlertRule(id="nope", name="x", metric=mpb.ALERT_METRIC_ERROR_RATE, threshold=0.1)
            await fails(stub.UpdateAlertRule, mpb.UpdateAlertRuleRequest(rule=missing), grpc.StatusCode.NOT_FOUND,
                        "not found")
            await fails(stub.UpdateAlertRule, mpb.UpdateAlertRuleRequest(rule=mpb.AlertRule(name="x")), invalid,
                        "rule.id is required")
            await fails(stub.DeleteAlertRule, mpb.DeleteAlertRuleRequest(id="nope"), grpc.StatusCode.NOT_FOUND,
                        "not found")
            await stub.DeleteAlertRule(mpb.DeleteAlertRuleRequest(id="high-errors"))
            assert [r.id for r in (await stub.ListAlertRules(mpb.ListAlertRulesRequest())).rules] == [generated.id]


async def test_watch_alerts_streams_current_then_changes(etcd_settings):
    async with running_monitor(monitor_settings(etcd_settings)) as app:
        await eventually(lambda: app.is_leader, what="leadership")
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = mpb_grpc.MonitorServiceStub(channel)
            await stub.CreateAlertRule(mpb.CreateAlertRuleRequest(rule=mpb.AlertRule(
                id="quiet", name="no traffic", metric=mpb.ALERT_METRIC_NO_TRAFFIC, model="ghost", enabled=True)))
            # A model with no statistics at all has no traffic: the alert fires at once (for_seconds 0).
            await eventually(lambda: stub.ListAlerts(mpb.ListAlertsRequest()), what="an alert")
            watch = stub.WatchAlerts(mpb.WatchAlertsRequest())
            first = await asyncio.wait_for(watch.read(), 5)
            assert first.alert.rule_id == "quiet" and first.alert.state == mpb.ALERT_STATE_FIRING
            assert first.alert.subject == "model=ghost"
            # Traffic arrives: the alert resolves, and the watch says so.
            await send(stub, report("n", model="ghost", failed=0))
            change = await asyncio.wait_for(watch.read(), 5)
            assert change.alert.state == mpb.ALERT_STATE_RESOLVED and change.alert.resolved_at.seconds > 0
            watch.cancel()
            assert (await stub.ListAlerts(mpb.ListAlertsRequest())).alerts == []
            resolved = (await stub.ListAlerts(mpb.ListAlertsRequest(include_resolved=True))).alerts
            assert [a.state for a in resolved] == [mpb.ALERT_STATE_RESOLVED]


async def test_graceful_stop_ends_report_and_watch_streams(etcd_settings):
    # A long grace period: the streams must end because the monitor ends them, not because it expired.
    app_settings = monitor_settings(etcd_settings, shutdown_grace_seconds=30)
    async with running_monitor(app_settings) as app:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = mpb_grpc.MonitorServiceStub(channel)
            await eventually(lambda: app.alert_view.synced.is_set(), what="alert state loaded")
            reports = stub.ReportStats()
            await reports.write(report("node-a"))
            await eventually(lambda: app.store.deltas_accepted == 1, what="the report")
            watch = stub.WatchAlerts(mpb.WatchAlertsRequest())
            await eventually(lambda: app.alert_view._subscribers, what="the watch")
            stopping = asyncio.create_task(app.stop())
            # The report stream ends cleanly with its summary; the watch is told to come back.
            assert (await asyncio.wait_for(reports, 20)).accepted_deltas == 1
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(watch.read(), 20)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "watch again" in caught.value.details()
            await asyncio.wait_for(stopping, 25)


async def test_a_report_that_cannot_be_merged_is_rejected_precisely(etcd_settings):
    async with running_monitor(monitor_settings(etcd_settings)) as app:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = mpb_grpc.MonitorServiceStub(channel)
            bad = report("node-a")
            bad.deltas[0].latency.alpha = 0.05
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await send(stub, report("node-a"), bad)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "alpha 0.05" in caught.value.details()
            # The good report before it counts; nothing of the bad one does.
            (sample,) = (await stub.QueryMetrics(mpb.QueryMetricsRequest(model="m"))).samples
            assert sample.request_count == 100
