"""Pure parts of the CLI around the gateway: extra inference nodes, service wiring, the admin
token file, traffic options and the status views."""

from __future__ import annotations

import pathlib

import click
import pytest

from aimaas.cli.cluster import deployment_entry, node_entry
from aimaas.cli.deploy import parse_traffic
from aimaas.cli.mesh import wiring_settings
from aimaas.cli.ports import base_service, default_ports, inference_node_names, plan_ports
from aimaas.cli.state import admin_token_path, read_admin_token, write_admin_token
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.sdk import Deployment
from aimaas.sdk.deployments import is_ready, progress_line, status_word
from aimaas.types.v1 import types_pb2


def test_extra_inference_nodes_take_the_next_ports() -> None:
    assert inference_node_names(3) == ["inference", "inference-2", "inference-3"]
    assert base_service("inference-3") == "inference" and base_service("registry") == "registry"
    assert dict(default_ports("inference-2")) == {"grpc": 8303, "metrics": 8304}
    plan = plan_ports(inference_node_names(2) + ["monitor"], offset=100)
    assert plan["inference-2"] == {"grpc": 8403, "metrics": 8404}
    # Overrides of AIMAAS_INFERENCE__*_PORT are the first node's only.
    plan = plan_ports(inference_node_names(2), overrides={("inference", "grpc"): 9000})
    assert plan["inference"]["grpc"] == 9000 and plan["inference-2"]["grpc"] == 8303


def test_gateway_and_monitor_wiring() -> None:
    plan = plan_ports(["registry", "monitor", "scheduler", "inference", "gateway"])
    gateway = wiring_settings("gateway", plan)
    assert gateway == {
        "AIMAAS_GATEWAY__REGISTRY_ADDRESS": "127.0.0.1:8101",
        "AIMAAS_GATEWAY__SCHEDULER_ADDRESS": "127.0.0.1:8201",
        "AIMAAS_GATEWAY__MONITOR_ADDRESS": "127.0.0.1:8401",
        "AIMAAS_GATEWAY__AUTH__ENABLED": "false",
    }
    secured = wiring_settings("gateway", plan, auth=True, admin_token="t" * 40)
    assert secured["AIMAAS_GATEWAY__AUTH__ENABLED"] == "true"
    assert secured["AIMAAS_GATEWAY__AUTH__BOOTSTRAP_ADMIN_TOKEN"] == "t" * 40
    assert wiring_settings("inference", plan) == {"AIMAAS_INFERENCE__MONITOR_ADDRESS": "127.0.0.1:8401"}
    assert wiring_settings("scheduler", plan) == {"AIMAAS_SCHEDULER__MONITOR_ADDRESS": "127.0.0.1:8401"}
    without_monitor = plan_ports(["registry", "scheduler", "gateway"])
    assert wiring_settings("gateway", without_monitor)["AIMAAS_GATEWAY__MONITOR_ADDRESS"] == ""
    assert wiring_settings("registry", plan) == {}
    assert wiring_settings("monitor", plan, auth=True, admin_token="t" * 40) == {
        "AIMAAS_MONITOR__DASHBOARD_PORT": "8403",
        "AIMAAS_MONITOR__AUTH__ENABLED": "true",
        "AIMAAS_MONITOR__AUTH__BOOTSTRAP_ADMIN_TOKEN": "t" * 40,
    }


def test_admin_token_file_is_owner_only(tmp_path: pathlib.Path) -> None:
    assert read_admin_token(tmp_path) is None
    write_admin_token(tmp_path, "secret-token")
    assert read_admin_token(tmp_path) == "secret-token"
    assert admin_token_path(tmp_path).stat().st_mode & 0o777 == 0o600
    write_admin_token(tmp_path, "another")  # replaced, still owner-only
    assert read_admin_token(tmp_path) == "another"


def test_traffic_option() -> None:
    entries = parse_traffic(("1=90", "canary=10"))
    assert entries is not None
    assert [(e.version, e.alias, e.weight) for e in entries] == [(1, None, 90), (None, "canary", 10)]
    assert parse_traffic(()) is None
    for bad in ("1", "=5", "canary=x"):
        with pytest.raises(click.BadParameter):
            parse_traffic((bad,))


def _deployment(ready: int, generation: int = 2, observed: int = 2, conditions: tuple = ()) -> spb.Deployment:
    replica = spb.ReplicaStatus(node_id="n1", address="127.0.0.1:1", state=types_pb2.REPLICA_STATE_READY)
    return spb.Deployment(
        spec=spb.DeploymentSpec(name="mlp", model="mlp", min_replicas=2, max_replicas=2, generation=generation),
        status=spb.DeploymentStatus(
            observed_generation=observed,
            versions=[spb.VersionStatus(version=1, weight=100, desired_replicas=2, ready_replicas=ready, replicas=[replica])],
            conditions=list(conditions),
        ),
    )


def test_deployment_views() -> None:
    assert status_word(_deployment(2)) == "READY" and is_ready(_deployment(2))
    assert status_word(_deployment(1)) == "PENDING" and not is_ready(_deployment(1))
    assert is_ready(_deployment(1), min_replicas=1)
    assert not is_ready(_deployment(2, generation=3, observed=2))  # the scheduler has not seen the spec yet
    stuck = _deployment(0, conditions=(spb.Condition(type="Unschedulable", status=True, reason="NoNodes"),))
    assert status_word(stuck) == "FAILED"
    assert progress_line(stuck) == "v1 (100%): 0/2 ready | Unschedulable: NoNodes"


class _Service:
    http_url = "http://gw:8000"
    endpoint = "gw:8001"


def test_status_entries() -> None:
    from aimaas.sdk.service import AsyncDeployment

    wrapped = Deployment(None, AsyncDeployment(_Service(), _deployment(2)))  # type: ignore[arg-type]
    entry = deployment_entry(wrapped, via_gateway=True)
    assert entry["status"] == "READY" and entry["endpoint"] == "http://gw:8000/v2/models/mlp"
    assert entry["versions"][0]["replicas"] == [{"node_id": "n1", "address": "127.0.0.1:1", "state": "READY", "reason": ""}]
    assert "endpoint" not in deployment_entry(wrapped, via_gateway=False)
    info = spb.NodeInfo(
        node=spb.Node(id="n1", address="a:1", accelerator=types_pb2.ACCELERATOR_CPU, backends=[types_pb2.BACKEND_ONNXRUNTIME]),
        replicas=[spb.ReplicaStatus(model="mlp", version=1, state=types_pb2.REPLICA_STATE_LOADING)],
        memory_used_bytes=5,
    )
    assert node_entry(info) == {
        "id": "n1", "address": "a:1", "accelerator": "CPU", "backends": ["ONNXRUNTIME"],
        "replicas": [{"model": "mlp", "version": 1, "state": "LOADING"}], "memory_used_bytes": 5,
        "memory_capacity_bytes": 0,
    }  # fmt: skip
