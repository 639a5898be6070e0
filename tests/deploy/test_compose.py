"""deploy/compose: valid against the Compose specification, a sound start order, health checks that
really probe grpc.health.v1, and Prometheus/OTel/Grafana wired to what the services expose."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import sys

import yaml

from tests.support.registry import registry_settings, running_registry

AIMAAS_SERVICES = {"registry", "scheduler", "inference", "monitor", "gateway"}


def aimaas_services(check, compose):
    """compose service name → AIMaaS service it runs."""
    found = {}
    for name, service in compose["services"].items():
        which = check.service_of_command(service.get("command"))
        if which is not None:
            found[name] = which
    return found


def test_compose_file_follows_the_compose_specification(check, compose):
    assert check.validate_compose(compose) == []


def test_compose_validation_rejects_broken_files(check, compose):
    broken = copy.deepcopy(compose)
    broken["services"]["registry"]["depends_on"]["etcd"]["condition"] = "service_ready"
    broken["services"]["gateway"]["ports"] = "8000:8000"
    broken["services"]["etcd"]["helthcheck"] = {}
    problems = check.validate_compose(broken)
    assert len(problems) == 3, problems
    joined = "\n".join(problems)
    assert "service_ready" in joined and "helthcheck" in joined and "services.gateway.ports" in joined


def test_every_service_and_its_settings(check, compose):
    assert set(aimaas_services(check, compose).values()) == AIMAAS_SERVICES
    assert check.check_compose_settings(compose) == []


def test_interpolation_uses_defaults_and_keeps_literal_dollars(check):
    assert check.interpolate("${A:-x}/${B-y}/${C}/$${D}") == "x/y//${D}"


def test_start_order_waits_for_healthy_dependencies(check, compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", dependency
    # etcd and the bucket come first; the gateway last.
    for name, which in aimaas_services(check, compose).items():
        assert services[name]["depends_on"]["etcd" if which != "gateway" else "registry"]["condition"] == "service_healthy"
    for name in ("registry", "inference"):
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert "mc mb --ignore-existing" in services["minio-init"]["command"][0]


def health_command(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    return test[1:]


def test_health_checks_probe_each_service_grpc_port(check, compose):
    for name, which in aimaas_services(check, compose).items():
        service = compose["services"][name]
        env = {k: v for k, v in check.compose_env(service).items() if k.startswith("AIMAAS_")}
        with check.environment(env):
            port = getattr(check.service_settings()[which](), which).grpc_port
        command = health_command(service)
        assert "grpc_serving" in command[-1] and f"'127.0.0.1:{port}'" in command[-1], name
    for name in ("etcd", "minio"):
        assert "healthcheck" in compose["services"][name]


async def test_health_check_command_follows_real_grpc_health(check, compose, restartable_etcd, s3_settings):
    """The exact command of the registry's healthcheck: exit 0 while SERVING, 1 once etcd is gone."""
    from services.common.settings import EtcdSettings

    command = health_command(compose["services"]["registry"])
    etcd = EtcdSettings(endpoints=restartable_etcd.endpoint, session_ttl_seconds=3, timeout_seconds=1)

    async def probe(address: str) -> int:
        argv = [sys.executable if c == "python" else c for c in command]
        argv[-1] = argv[-1].replace("127.0.0.1:8101", address)
        process = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return await process.wait()

    async with running_registry(registry_settings(etcd, s3_settings)) as (app, _):
        assert await probe(app.grpc.address) == 0
        restartable_etcd.kill()
        deadline = asyncio.get_running_loop().time() + 20
        while await probe(app.grpc.address) != 1:
            assert asyncio.get_running_loop().time() < deadline, "health never turned NOT_SERVING"
            await asyncio.sleep(0.5)
    assert await probe(app.grpc.address) == 1  # nothing listening


def test_prometheus_scrapes_every_metrics_endpoint(check, compose):
    config = yaml.safe_load((check.DEPLOY / "compose" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    for name, which in aimaas_services(check, compose).items():
        env = {k: v for k, v in check.compose_env(compose["services"][name]).items() if k.startswith("AIMAAS_")}
        with check.environment(env):
            port = getattr(check.service_settings()[which](), which).metrics_port
        assert f"{name}:{port}" in targets, f"{name}'s /metrics is not scraped"
    for target in targets:
        assert target.split(":")[0] in compose["services"], f"scrape target {target} is no compose service"


def test_traces_flow_from_services_to_the_collector_to_jaeger(check, compose):
    collector = yaml.safe_load((check.DEPLOY / "compose" / "otel-collector.yaml").read_text())
    grpc_endpoint = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    for name in aimaas_services(check, compose):
        endpoint = check.compose_env(compose["services"][name])["AIMAAS_TELEMETRY__OTLP_ENDPOINT"]
        assert re.fullmatch(r"http://otel-collector:(\d+)", endpoint).group(1) == grpc_endpoint.rsplit(":", 1)[1]
    pipeline = collector["service"]["pipelines"]["traces"]
    exporter = collector["exporters"][pipeline["exporters"][0]]
    assert exporter["endpoint"].split(":")[0] == "jaeger" and "jaeger" in compose["services"]
    assert compose["services"]["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_grafana_provisions_the_dashboard_and_its_datasources(check, compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith(".."))
    compose_dir = check.COMPOSE_FILE.parent
    provisioning = (compose_dir / next(k for k, v in mounts.items() if v == "/etc/grafana/provisioning")).resolve()
    providers = yaml.safe_load((provisioning / "dashboards" / "aimaas.yaml").read_text())["providers"]
    dashboards_dir = providers[0]["options"]["path"]
    host_dir = (compose_dir / next(k for k, v in mounts.items() if v == dashboards_dir)).resolve()
    assert host_dir == check.DEPLOY / "grafana" / "dashboards"
    dashboard = host_dir / "aimaas.json"
    assert dashboard.is_file(), "deploy/grafana/dashboards/aimaas.json (the monitor's dashboard) is missing"
    datasources = yaml.safe_load((provisioning / "datasources" / "aimaas.yaml").read_text())["datasources"]
    provided = {d["uid"] for d in datasources}
    for d in datasources:
        host = re.match(r"https?://([^:/]+)", d["url"]).group(1)
        assert host in compose["services"], d
    used = {
        m.group(1) for m in re.finditer(r'"datasource"\s*:\s*\{[^{}]*"uid"\s*:\s*"([^"$]+)"', dashboard.read_text())
    }
    assert used <= provided, f"dashboard uses datasources {used - provided} that are not provisioned"
    json.loads(dashboard.read_text())
