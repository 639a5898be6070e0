"""Acceptance (issue 6): the dashboard renders live data in headless Chromium with auth on — a viewer
API key typed into the page, live QPS/latency/error charts of a model a real node serves, the node with
its resources, a deployment, and a firing alert. The test takes a screenshot and checks the page."""

from __future__ import annotations

import grpc
import httpx
import pytest
from playwright.async_api import async_playwright

from aimaas.auth.v1 import auth_pb2
from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from services.common.auth import ApiKeyStore, AuthSettings
from services.common.etcd import EtcdClient, to_json
from tests.support.inference import inference_settings, running_inference, write_model
from tests.support.models import mlp_model
from tests.support.monitor import InferenceLoad, eventually, monitor_settings, running_monitor

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]


@pytest.mark.timeout(90)
async def test_dashboard_renders_live_data_with_auth(etcd_settings, tmp_path):
    repository = tmp_path / "models"
    write_model(repository, "mlp", mlp_model(inputs=4, hidden=8, outputs=3))
    async with EtcdClient(etcd_settings) as etcd:
        keys = ApiKeyStore(etcd)
        _, viewer_token = await keys.create("dashboard viewer", auth_pb2.ROLE_VIEWER)
        deployment = spb.DeploymentSpec(name="mlp", model="mlp", min_replicas=1, max_replicas=3,
                                        traffic=[spb.TrafficTarget(version=1, weight=100)])
        await etcd.put(etcd.keys.deployment("mlp"), to_json(deployment))
        status = spb.DeploymentStatus(versions=[spb.VersionStatus(version=1, weight=100, ready_replicas=1)])
        await etcd.put(etcd.keys.deployment_status("mlp"), to_json(status))

    settings = monitor_settings(etcd_settings, auth=AuthSettings(enabled=True))
    async with running_monitor(settings) as monitor:
        base = f"http://127.0.0.1:{monitor.dashboard.port}"
        async with httpx.AsyncClient(base_url=base) as client:
            # The data needs a key; the page itself holds none.
            anonymous = await client.get("/api/overview")
            assert anonymous.status_code == 401 and "error" in anonymous.json()
            bad = await client.get("/api/overview", headers={"authorization": "Bearer aimaas_nope_nope"})
            assert bad.status_code == 401 and bad.json()["error"]
            assert (await client.get("/")).status_code == 200
        async with grpc.aio.insecure_channel(monitor.address) as channel:
            await mpb_grpc.MonitorServiceStub(channel).CreateAlertRule(mpb.CreateAlertRuleRequest(rule=mpb.AlertRule(
                id="ghost-idle", name="ghost has no traffic", metric=mpb.ALERT_METRIC_NO_TRAFFIC, model="ghost",
                enabled=True)))
        node_settings = inference_settings(repository, monitor_address=monitor.address, stats_interval_seconds=0.2)
        async with running_inference(node_settings) as node, InferenceLoad(node.grpc.address) as load:
            await eventually(lambda: load.sent > 50, what="traffic")
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                try:
                    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
                    await page.goto(base + "/")
                    # Signed out: the key form, and no data.
                    await page.wait_for_selector("#login:not([hidden])", timeout=10_000)
                    await page.fill("#token", "aimaas_wrong_token")
                    await page.click("#login-form button")
                    await page.wait_for_function(
                        "document.getElementById('login-error').textContent.length > 0", timeout=10_000
                    )
                    await page.fill("#token", viewer_token)
                    await page.click("#login-form button")
                    card = page.locator('.card[data-model="mlp"][data-version="1"]')
                    await card.wait_for(timeout=10_000)
                    # Live: QPS above zero, charts drawn from the timeline, then a later poll changes the count.
                    await page.wait_for_function(
                        """() => {
                            const q = document.querySelector('.card[data-model="mlp"] .qps');
                            return q && parseFloat(q.textContent) > 5;
                        }""",
                        timeout=15_000,
                    )
                    charts = await card.locator("svg[data-metric] polyline").evaluate_all(
                        "lines => lines.map(l => [l.parentNode.dataset.metric, l.getAttribute('points').split(' ').length])"
                    )
                    first_count = int(await card.locator(".requests").text_content())
                    await page.wait_for_function(
                        f"""() => parseInt(document.querySelector('.card[data-model="mlp"] .requests').textContent)
                            > {first_count}""",
                        timeout=15_000,
                    )
                    await page.wait_for_selector("#alerts .firing", timeout=15_000)
                    await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                    text = await page.inner_text("body")
                    # The key survives a reload (sessionStorage), and is sent as a Bearer header.
                    await page.reload()
                    await card.wait_for(timeout=10_000)
                    stored = await page.evaluate("sessionStorage.getItem('aimaas_token')")
                finally:
                    await browser.close()
        assert stored == viewer_token
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
        assert "mlp v1" in text and "success" in text and "p99" in text
        # Three hand-drawn charts (QPS, p99, error rate), a point per bucket of the 5m window (30 s / 0.5 s).
        assert [name for name, _ in charts] == ["qps", "p99_ms", "error_rate"]
        assert all(points == 60 for _, points in charts), charts
        assert node.reporter.reporter_id in text  # the node, with its resources
        assert "up" in text and "GiB" in text
        assert "ghost has no traffic" in text  # the rule's name
        assert "model=ghost" in text and "firing" in text
        assert "mlp" in text and "v1: 100%" in text and "1 / 1–3" in text  # the deployment
