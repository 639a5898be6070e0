"""Acceptance (issue 6): an injected failure burst fires an alert within two windows and resolves after;
a real webhook receiver gets exactly one firing and one resolved notification. And with two monitor
replicas, killing the leader (SIGKILL, no resignation) loses neither alerting nor the load signal, and
sends no duplicate notification."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from services.common.etcd import EtcdClient
from tests.support.inference import inference_settings, running_inference, write_model
from tests.support.models import mlp_model
from tests.support.monitor import InferenceLoad as Load
from tests.support.monitor import WebhookReceiver, eventually, monitor_settings, running_monitor
from tests.support.servers import free_port

WINDOW = 6.0  # "1m" with window_scale 0.1
SUBJECT = "model=mlp,version=1"


def error_rule(url: str) -> mpb.AlertRule:
    return mpb.AlertRule(
        id="errors", name="error burst", metric=mpb.ALERT_METRIC_ERROR_RATE, threshold=0.3, window=mpb.WINDOW_1M,
        for_seconds=1, model="mlp", webhook_urls=[url], enabled=True, labels={"team": "ml"},
    )


@pytest.fixture
def repository(tmp_path):
    root = tmp_path / "models"
    write_model(root, "mlp", mlp_model(inputs=4, hidden=8, outputs=3))
    return root


@pytest.fixture
async def receiver():
    # The first POST is refused (503): the notifier must retry, and still deliver each notification once.
    server = WebhookReceiver(fail_first=1)
    await server.start()
    yield server
    await server.stop()


@pytest.mark.timeout(90)
async def test_failure_burst_fires_once_and_resolves_once(etcd_settings, repository, receiver):
    async with running_monitor(monitor_settings(etcd_settings)) as monitor:
        async with grpc.aio.insecure_channel(monitor.address) as channel:
            stub = mpb_grpc.MonitorServiceStub(channel)
            await stub.CreateAlertRule(mpb.CreateAlertRuleRequest(rule=error_rule(receiver.url)))
            node_settings = inference_settings(repository, monitor_address=monitor.address, stats_interval_seconds=0.1)
            async with running_inference(node_settings) as node, Load(node.grpc.address) as load:
                await asyncio.sleep(2.0)  # healthy traffic: nothing fires
                assert receiver.attempts == [] and (await stub.ListAlerts(mpb.ListAlertsRequest())).alerts == []
                load.burst = True
                burst_started = time.monotonic()
                await eventually(lambda: receiver.accepted, timeout=2 * WINDOW, what="the firing notification")
                fired_after = time.monotonic() - burst_started
                load.burst = False
                burst_ended = time.monotonic()
                (alert,) = (await stub.ListAlerts(mpb.ListAlertsRequest())).alerts
                assert alert.state == mpb.ALERT_STATE_FIRING and alert.subject == SUBJECT and alert.value > 0.3
                await eventually(lambda: len(receiver.accepted) == 2, timeout=3 * WINDOW, what="the resolved notification")
                resolved_after = time.monotonic() - burst_ended
                await asyncio.sleep(2.0)  # nothing more arrives
        print(f"fired {fired_after:.1f}s after the burst began; resolved {resolved_after:.1f}s after it ended")
        assert fired_after <= 2 * WINDOW
        assert receiver.statuses() == [("firing", SUBJECT), ("resolved", SUBJECT)]
        assert len(receiver.attempts) == 3  # the refused first attempt was retried
        firing, resolved = receiver.accepted
        assert firing["rule"] == {
            "id": "errors", "name": "error burst", "metric": "error_rate", "threshold": 0.3, "window": "1m",
            "for_seconds": 1, "labels": {"team": "ml"},
        }
        assert firing["alert"]["state"] == "ALERT_STATE_FIRING" and "error rate" in firing["alert"]["summary"]
        assert resolved["alert"]["state"] == "ALERT_STATE_RESOLVED" and resolved["alert"]["resolved_at"]
        # The recorded state says both notifications went out.
        async with grpc.aio.insecure_channel(monitor.address) as channel:
            alerts = (await mpb_grpc.MonitorServiceStub(channel).ListAlerts(
                mpb.ListAlertsRequest(include_resolved=True))).alerts
        assert [(a.state, a.notified) for a in alerts] == [(mpb.ALERT_STATE_RESOLVED, True)]


def monitor_process(etcd_settings, port: int) -> subprocess.Popen:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIMAAS_")},
        "AIMAAS_ETCD__ENDPOINTS": etcd_settings.endpoints,
        "AIMAAS_ETCD__NAMESPACE": etcd_settings.namespace,
        "AIMAAS_ETCD__SESSION_TTL_SECONDS": str(etcd_settings.session_ttl_seconds),
        "AIMAAS_LOG__LEVEL": "WARNING",
        "AIMAAS_MONITOR__GRPC_PORT": str(port),
        "AIMAAS_MONITOR__METRICS_PORT": "-1",
        "AIMAAS_MONITOR__DASHBOARD_PORT": "-1",
        "AIMAAS_MONITOR__WINDOW_SCALE": "0.1",
        "AIMAAS_MONITOR__FINE_BUCKET_SECONDS": "0.5",
        "AIMAAS_MONITOR__COARSE_BUCKET_SECONDS": "6",
        "AIMAAS_MONITOR__EVALUATION_INTERVAL_SECONDS": "0.25",
        "AIMAAS_MONITOR__REPLICA_STALE_SECONDS": "3",
        "AIMAAS_MONITOR__WEBHOOK_RETRY_INITIAL_SECONDS": "0.05",
        "AIMAAS_MONITOR__WEBHOOK_RETRY_MAX_SECONDS": "0.2",
        "AIMAAS_MONITOR__AUTH__ENABLED": "false",
    }
    return subprocess.Popen([sys.executable, "-m", "services.monitor"], env=env, cwd=os.getcwd())


async def leader_identity(etcd_settings) -> str | None:
    async with EtcdClient(etcd_settings) as etcd:
        candidates = await etcd.get_prefix(etcd.keys.leader("monitor") + "/")
    if not candidates:
        return None
    return min(candidates, key=lambda kv: kv.create_revision).value.decode()


@pytest.mark.timeout(120)
async def test_killing_the_leader_loses_no_alerting_and_sends_no_duplicate(etcd_settings, repository, receiver):
    port = free_port()
    first = monitor_process(etcd_settings, port)
    first_address = f"127.0.0.1:{port}"
    try:
        await eventually(lambda: leader_identity(etcd_settings), timeout=20, what="the first monitor leads")
        assert await leader_identity(etcd_settings) == first_address
        async with running_monitor(monitor_settings(etcd_settings)) as second, \
                grpc.aio.insecure_channel(second.address) as channel:
            stub = mpb_grpc.MonitorServiceStub(channel)
            assert not second.is_leader
            await stub.CreateAlertRule(mpb.CreateAlertRuleRequest(rule=error_rule(receiver.url)))
            # The node reports to both replicas.
            node_settings = inference_settings(
                repository, monitor_address=f"{first_address},{second.address}", stats_interval_seconds=0.1,
                monitor_retry_initial_seconds=0.05, monitor_retry_max_seconds=0.3,
            )
            async with running_inference(node_settings) as node, Load(node.grpc.address) as load:
                load.burst = True
                await eventually(lambda: receiver.accepted, timeout=2 * WINDOW, what="firing from the first leader")
                # The follower mirrors the leader's alert state.
                await eventually(lambda: [a for a in second.alert_view.list(False) if a.notified], what="mirror")
                first.send_signal(signal.SIGKILL)  # a crash: no resignation, the lease runs out
                first.wait(10)
                killed_at = time.monotonic()
                await eventually(lambda: second.is_leader, timeout=15, what="the survivor takes over")
                took_over = time.monotonic() - killed_at
                # Still failing: the survivor must not notify "firing" again.
                await asyncio.sleep(2.0)
                assert receiver.statuses() == [("firing", SUBJECT)]
                # The load signal lives on the survivor too.
                signal_now = await stub.GetLoadSignal(mpb.GetLoadSignalRequest(model="mlp", version=1))
                assert signal_now.reporting_replicas == 1 and signal_now.qps > 0
                load.burst = False
                await eventually(lambda: len(receiver.accepted) == 2, timeout=3 * WINDOW, what="resolved from the survivor")
                await asyncio.sleep(1.5)
            print(f"the survivor led {took_over:.1f}s after the kill")
            assert receiver.statuses() == [("firing", SUBJECT), ("resolved", SUBJECT)]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
