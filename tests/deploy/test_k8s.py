"""deploy/k8s: overlays render offline, every object passes the Kubernetes schemas (strict), and the
objects hang together (selectors, ports, probes, security, capacity, secrets, GPU pool)."""

from __future__ import annotations

import copy
import pathlib
import re

import pytest

OVERLAYS = ("dev", "production")
AIMAAS_SERVICES = {"registry", "scheduler", "inference", "monitor", "gateway"}


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def aimaas_containers(check, objects):
    """(workload, container, service) for containers running an AIMaaS service."""
    for workload, container in check.workloads(objects):
        service = check.service_of_command(container.get("command"))
        if service is not None:
            yield workload, container, service


def quantity_bytes(text: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "K": 1000, "M": 1000**2, "G": 1000**3}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text))
    assert match, f"unparsable quantity {text!r}"
    return int(match.group(1)) * units.get(match.group(2), 1)


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def pod_templates(objects):
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield obj, obj["spec"]["template"]
        elif obj["kind"] == "CronJob":
            yield obj, obj["spec"]["jobTemplate"]["spec"]["template"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_pass_kubernetes_schemas(check, rendered, overlay):
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"} <= kinds
    assert check.validate_k8s(objects) == []


def test_schema_validation_rejects_broken_objects(check, rendered):
    """The validator is not vacuous: an unknown field, a wrong type and an unknown kind are reported."""
    deployment = copy.deepcopy(next(o for o in rendered["dev"] if o["kind"] == "Deployment"))
    unknown_field = copy.deepcopy(deployment)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    unknown_kind = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    problems = check.validate_k8s([unknown_field, wrong_type, unknown_kind])
    assert len(problems) == 3, problems
    assert "readinesProbe" in problems[0]
    assert "replicas" in problems[1]
    assert "Widget" in problems[2]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_runs_with_valid_settings(check, rendered, overlay):
    """Each container's AIMAAS_* variables are known settings of its service and build valid settings."""
    objects = rendered[overlay]
    services = {service for _, _, service in aimaas_containers(check, objects)}
    assert services == AIMAAS_SERVICES
    assert check.check_k8s_settings(objects) == []


def test_settings_check_reports_typos_and_bad_values(check, rendered):
    objects = copy.deepcopy(rendered["dev"])
    registry = next(o for o in objects if o["metadata"]["name"] == "aimaas-registry" and o["kind"] == "Deployment")
    env = registry["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "AIMAAS_REGISTRY__GRPC_PROT", "value": "8101"})
    env.append({"name": "AIMAAS_REGISTRY__MAX_ARTIFACT_BYTES", "value": "0"})
    env[:] = [e for e in env if e["name"] != "AIMAAS_REGISTRY__HOST"]
    problems = check.check_k8s_settings(objects)
    assert any("AIMAAS_REGISTRY__GRPC_PROT is not a setting of registry" in p for p in problems), problems
    assert any("AIMAAS_REGISTRY__MAX_ARTIFACT_BYTES" in p for p in problems), problems
    # A validation failure stops before the loopback check; fix the value to see it.
    env[:] = [e for e in env if e["name"] != "AIMAAS_REGISTRY__MAX_ARTIFACT_BYTES"]
    assert any("HOST binds loopback" in p for p in check.check_k8s_settings(objects))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_grpc_health_probes_match_the_settings(check, rendered, overlay, tmp_path):
    objects = rendered[overlay]
    for workload, container, service in aimaas_containers(check, objects):
        env = check.container_env(objects, workload, container, tmp_path)
        aimaas = {k: v for k, v in env.items() if k.startswith("AIMAAS_")}
        with check.environment(aimaas):
            server = getattr(check.service_settings()[service](), service)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        where = workload["metadata"]["name"]
        assert ports["grpc"] == server.grpc_port, where
        assert ports["metrics"] == server.metrics_port, where
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(server.metrics_port), where
        tls = bool(aimaas.get("AIMAAS_GATEWAY__TLS_CERT_FILE"))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]
            if tls:
                # Kubelet gRPC probes cannot speak TLS: the gateway's open REST health endpoints instead.
                assert spec["httpGet"]["scheme"] == "HTTPS" and spec["httpGet"]["path"].startswith("/v2/health/"), where
                assert spec["httpGet"]["port"] == "http" and ports["http"] == server.http_port
            else:
                assert spec["grpc"]["port"] == server.grpc_port, (where, probe)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_with_read_only_root_and_limits(check, rendered, overlay):
    for workload, template in pod_templates(rendered[overlay]):
        spec = template["spec"]
        where = workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] != 0, where
        assert spec.get("automountServiceAccountToken") is False, where
        for container in spec["containers"] + spec.get("initContainers", []):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (where, kind)
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: unpinned image {image}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_volumes_and_capacity_fits_the_limits(check, rendered, overlay, tmp_path):
    """With a read-only root, the inference cache must be an emptyDir big enough for the cache limit,
    and the memory offered to models must leave room for the process within the memory limit."""
    objects = rendered[overlay]
    inference = [(w, c) for w, c, s in aimaas_containers(check, objects) if s == "inference"]
    assert inference
    for workload, container in inference:
        env = {k: v for k, v in check.container_env(objects, workload, container, tmp_path).items() if k.startswith("AIMAAS_")}
        with check.environment(env):
            settings = check.service_settings()["inference"]().inference
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert "/tmp" in mounts
        cache = mounts.get(str(settings.cache_dir))
        assert cache is not None and "emptyDir" in cache, f"cache dir {settings.cache_dir} is not a volume"
        assert settings.cache_max_bytes <= quantity_bytes(cache["emptyDir"]["sizeLimit"])
        memory_limit = quantity_bytes(container["resources"]["limits"]["memory"])
        assert 0 < settings.memory_capacity_bytes < memory_limit
        assert memory_limit - settings.memory_capacity_bytes >= 512 * 1024**2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdbs_and_hpas_point_at_real_pods(rendered, overlay):
    objects = rendered[overlay]
    templates = list(pod_templates(objects))
    for service in by_kind(objects, "Service"):
        matched = [(w, t) for w, t in templates if selects({"matchLabels": service["spec"]["selector"]}, t["metadata"]["labels"])]
        assert matched, f"Service {service['metadata']['name']} selects no pods"
        container_ports = {p["name"] for _, t in matched for c in t["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, (service["metadata"]["name"], port)
    deployments = {d["metadata"]["name"] for d in by_kind(objects, "Deployment")}
    stateful_sets = {s["metadata"]["name"] for s in by_kind(objects, "StatefulSet")}
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"], t["metadata"]["labels"]) for _, t in templates), pdb["metadata"]["name"]
    covered = {
        w["metadata"]["name"] for w, t in templates
        if any(selects(p["spec"]["selector"], t["metadata"]["labels"]) for p in by_kind(objects, "PodDisruptionBudget"))
    }
    assert deployments | stateful_sets <= covered, f"no PodDisruptionBudget for {(deployments | stateful_sets) - covered}"
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in by_kind(objects, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"aimaas-gateway", "aimaas-inference"}
    for name, hpa in hpas.items():
        assert name in deployments
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        # An apply resets replicas to the manifest's count: never below what the HPA keeps.
        deployment = next(d for d in by_kind(objects, "Deployment") if d["metadata"]["name"] == name)
        assert deployment["spec"]["replicas"] == hpa["spec"]["minReplicas"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_admit_each_pod_somewhere(rendered, overlay):
    objects = rendered[overlay]
    policies = by_kind(objects, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in policies), "no default deny"
    allow = [p for p in policies if p["spec"].get("ingress")]
    for workload, template in pod_templates(objects):
        if workload["kind"] in ("Job", "CronJob"):
            continue  # clients only
        labels = template["metadata"]["labels"]
        assert any(selects(p["spec"]["podSelector"], labels) for p in allow), f"{workload['metadata']['name']} is unreachable"
    # Only the gateway is open to everyone (a rule without `from`) on its service ports.
    open_rules = [
        (p["metadata"]["name"], rule) for p in allow for rule in p["spec"]["ingress"] if "from" not in rule
    ]
    assert {name for name, _ in open_rules} <= {"aimaas-gateway", "aimaas-monitor"}
    monitor_open = [rule for name, rule in open_rules if name == "aimaas-monitor"]
    assert all(port["port"] == 8403 for rule in monitor_open for port in rule["ports"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_monitor_address_lists_every_monitor_replica(check, rendered, overlay, tmp_path):
    """The monitor is a StatefulSet of >= 2 behind a headless Service; every reporter (inference CPU and
    GPU, gateway) and querier (scheduler, gateway) lists exactly `<statefulset>-<i>.<headless>:8401` for
    each replica (a replica left out would miss reports), and each pod advertises its own stable name."""
    objects = rendered[overlay]
    [(monitor, container)] = [(w, c) for w, c, s in aimaas_containers(check, objects) if s == "monitor"]
    assert monitor["kind"] == "StatefulSet"
    name, replicas, headless = monitor["metadata"]["name"], monitor["spec"]["replicas"], monitor["spec"]["serviceName"]
    assert replicas >= 2
    [service] = [s for s in by_kind(objects, "Service") if s["metadata"]["name"] == headless]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert selects({"matchLabels": service["spec"]["selector"]}, monitor["spec"]["template"]["metadata"]["labels"])
    assert 8401 in {p["port"] for p in service["spec"]["ports"]}
    expected = {f"{name}-{i}.{headless}:8401" for i in range(replicas)}

    advertised = set()
    for i in range(replicas):
        env = check.container_env(objects, monitor, container, tmp_path, {"metadata.name": f"{name}-{i}"})
        advertised.add(env["AIMAAS_MONITOR__ADVERTISE_ADDRESS"])
    assert advertised == expected

    checked: dict[str, set[str]] = {}
    for workload, container, service_name in aimaas_containers(check, objects):
        if service_name == "monitor":
            continue
        env = check.container_env(objects, workload, container, tmp_path)
        for variable, value in env.items():
            if re.fullmatch(r"AIMAAS_[A-Z]+__MONITOR_ADDRESS", variable):
                listed = [a.strip() for a in value.split(",")]
                assert set(listed) == expected and len(listed) == len(expected), (workload["metadata"]["name"], variable, value)
                checked.setdefault(service_name, set()).add(workload["metadata"]["name"])
    assert set(checked) == {"inference", "gateway", "scheduler"}, checked
    inference = {w["metadata"]["name"] for w, _, s in aimaas_containers(check, objects) if s == "inference"}
    assert checked["inference"] == inference  # the GPU pool too, where there is one
    assert check.check_k8s_monitor_addresses(objects) == []


def test_monitor_address_check_reports_missing_replicas(check, rendered):
    """check.py finds a reporter that leaves a replica out, a scale-up without the address lists, a
    pod that advertises something else than its stable name, and a multi-replica monitor Deployment."""
    def monitor_of(objects):
        return next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "aimaas-monitor")

    def env_of(objects, kind, name):
        workload = next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)
        return workload["spec"]["template"]["spec"]["containers"][0]["env"]

    objects = copy.deepcopy(rendered["production"])
    gpu = next(e for e in env_of(objects, "Deployment", "aimaas-inference-gpu") if e["name"] == "AIMAAS_INFERENCE__MONITOR_ADDRESS")
    gpu["value"] = gpu["value"].split(",")[0]
    problems = check.check_k8s_monitor_addresses(objects)
    assert len(problems) == 1 and "aimaas-inference-gpu" in problems[0] and "aimaas-monitor-1." in problems[0], problems

    objects = copy.deepcopy(rendered["dev"])
    monitor_of(objects)["spec"]["replicas"] = 3
    problems = check.check_k8s_monitor_addresses(objects)
    assert {p.split(":")[0] for p in problems} == {
        "Deployment/aimaas-inference", "Deployment/aimaas-gateway", "Deployment/aimaas-scheduler"
    }, problems
    assert all("aimaas-monitor-2.aimaas-monitor-headless:8401" in p for p in problems)

    objects = copy.deepcopy(rendered["dev"])
    for item in env_of(objects, "StatefulSet", "aimaas-monitor"):
        if item["name"] == "AIMAAS_MONITOR__ADVERTISE_ADDRESS":
            item["value"] = "aimaas-monitor:8401"
    problems = check.check_k8s_monitor_addresses(objects)
    assert len(problems) == 2 and all("advertises 'aimaas-monitor:8401'" in p for p in problems), problems

    objects = copy.deepcopy(rendered["dev"])
    monitor = monitor_of(objects)
    monitor["kind"] = "Deployment"
    problems = check.check_k8s_monitor_addresses(objects)
    assert len(problems) == 1 and "see part of the reports" in problems[0], problems


def test_dev_bundles_etcd_and_minio_and_production_uses_external_ones(check, rendered, tmp_path):
    dev, production = rendered["dev"], rendered["production"]
    dev_sets = {s["metadata"]["name"] for s in by_kind(dev, "StatefulSet")}
    assert dev_sets == {"aimaas-etcd", "aimaas-minio", "aimaas-monitor"}
    assert any(j["metadata"]["name"] == "aimaas-minio-bucket" for j in by_kind(dev, "Job"))
    assert {s["metadata"]["name"] for s in by_kind(production, "StatefulSet")} == {"aimaas-monitor"}
    services = {s["metadata"]["name"] for s in by_kind(dev, "Service")}

    def common(objects):
        return next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("aimaas-common"))["data"]

    dev_config, production_config = common(dev), common(production)
    assert dev_config["AIMAAS_ETCD__ENDPOINTS"].split(":")[0] in services
    assert dev_config["AIMAAS_OBJECT_STORE__ENDPOINT"].split(":")[0] in services
    for endpoint in production_config["AIMAAS_ETCD__ENDPOINTS"].split(","):
        assert not endpoint.startswith("aimaas-etcd")
    assert production_config["AIMAAS_OBJECT_STORE__SECURE"] == "true"


def test_secrets_exist_in_dev_and_are_operator_provided_in_production(check, rendered):
    readme = check.README.read_text()
    for overlay in OVERLAYS:
        objects = rendered[overlay]
        secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
        referenced: dict[str, set[str]] = {}
        for workload, container in check.workloads(objects):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.setdefault(ref["name"], set()).add(ref["key"])
            for volume in workload["spec"]["template"]["spec"].get("volumes", []):
                if "secret" in volume:
                    referenced.setdefault(volume["secret"]["secretName"], set())
        assert {"aimaas-s3", "aimaas-auth"} <= {re.sub(r"-[a-z0-9]{10}$", "", n) for n in referenced}
        if overlay == "dev":
            for name, keys in referenced.items():
                assert name in secrets, f"dev references missing Secret {name}"
                assert keys <= set(secrets[name]["data"]), (name, keys)
        else:
            assert secrets == {}, "production must not carry secret values"
            for name, keys in referenced.items():
                assert "kubectl -n aimaas create secret" in readme and name in readme, f"README does not say how to create {name}"
                for key in keys:
                    assert key in readme, f"README does not name key {key} of {name}"


def test_production_has_a_tensorrt_gpu_pool_and_dev_does_not(check, rendered, tmp_path):
    def gpu_workloads(objects):
        return [
            (w, c) for w, c in check.workloads(objects) if "nvidia.com/gpu" in c["resources"].get("limits", {})
        ]

    assert gpu_workloads(rendered["dev"]) == []
    [(workload, container)] = gpu_workloads(rendered["production"])
    spec = workload["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"aimaas.io/node-pool": "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "aimaas-gpu" in container["image"]
    env = check.container_env(rendered["production"], workload, container, tmp_path)
    assert env["AIMAAS_INFERENCE__BACKENDS"].startswith('["tensorrt"')


def test_commands_are_console_scripts_of_real_modules(check, rendered):
    import importlib.util

    scripts = check.console_scripts()
    for overlay in OVERLAYS:
        for _, container, service in aimaas_containers(check, rendered[overlay]):
            module, _, function = scripts[container["command"][0]].partition(":")
            assert importlib.util.find_spec(module) is not None, f"{module} (aimaas-{service}) does not exist"
            assert f"def {function}(" in pathlib.Path(importlib.util.find_spec(module).origin).read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_waits_longer_than_the_graceful_shutdown(check, rendered, overlay, tmp_path):
    """SIGKILL must not cut the drain short: the pod's grace period covers the service's own."""
    objects = rendered[overlay]
    for workload, container, service in aimaas_containers(check, objects):
        env = {k: v for k, v in check.container_env(objects, workload, container, tmp_path).items() if k.startswith("AIMAAS_")}
        with check.environment(env):
            server = getattr(check.service_settings()[service](), service)
        drain = server.shutdown_grace_seconds + getattr(server, "unload_drain_seconds", 0)
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > drain, f"{workload['metadata']['name']}: {grace}s <= {drain}s of draining"
