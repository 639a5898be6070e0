"""The port table of `aimaas up` and the plan built from it."""

from __future__ import annotations

import socket

import pytest

from aimaas.cli.environment import CliEnvironment, InvalidEnvironment
from aimaas.cli.mesh import endpoints_of, service_settings
from aimaas.cli.ports import DEFAULT_PORTS, SERVICE_NAMES, busy_ports, plan_ports, port_env_var, port_is_free


def test_table_matches_the_design_defaults() -> None:
    assert dict(DEFAULT_PORTS["gateway"]) == {"grpc": 8001, "http": 8000, "metrics": 8002}
    assert dict(DEFAULT_PORTS["registry"]) == {"grpc": 8101, "metrics": 8102}
    assert dict(DEFAULT_PORTS["scheduler"]) == {"grpc": 8201, "metrics": 8202}
    assert dict(DEFAULT_PORTS["inference"]) == {"grpc": 8301, "metrics": 8302}
    assert dict(DEFAULT_PORTS["monitor"]) == {"grpc": 8401, "metrics": 8402, "http": 8403}
    assert dict(DEFAULT_PORTS["etcd"]) == {"client": 2379, "peer": 2380}
    assert set(SERVICE_NAMES) == DEFAULT_PORTS.keys() - {"etcd"}
    all_ports = [port for table in DEFAULT_PORTS.values() for port in table.values()]
    assert len(all_ports) == len(set(all_ports))


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        DEFAULT_PORTS["registry"]["grpc"] = 1  # type: ignore[index]


def test_plan_applies_the_offset_to_every_port_etcd_included() -> None:
    plan = plan_ports(["etcd", "registry"], offset=1000)
    assert plan == {"etcd": {"client": 3379, "peer": 3380}, "registry": {"grpc": 9101, "metrics": 9102}}


def test_explicit_overrides_win_over_the_offset() -> None:
    plan = plan_ports(["registry"], offset=1000, overrides={("registry", "grpc"): 7777})
    assert plan["registry"] == {"grpc": 7777, "metrics": 9102}


def test_plan_rejects_out_of_range_and_clashing_ports() -> None:
    with pytest.raises(ValueError, match="outside 1..65535"):
        plan_ports(["monitor"], offset=60000)
    with pytest.raises(ValueError, match="both use port 8102"):
        plan_ports(["registry", "scheduler"], overrides={("scheduler", "grpc"): 8102})


def test_env_var_names_follow_the_settings_convention() -> None:
    assert port_env_var("registry", "grpc") == "AIMAAS_REGISTRY__GRPC_PORT"
    assert port_env_var("monitor", "http") == "AIMAAS_MONITOR__HTTP_PORT"
    assert service_settings("gateway", {"grpc": 1, "http": 2, "metrics": 3}) == {
        "AIMAAS_GATEWAY__HOST": "127.0.0.1",
        "AIMAAS_GATEWAY__GRPC_PORT": "1",
        "AIMAAS_GATEWAY__HTTP_PORT": "2",
        "AIMAAS_GATEWAY__METRICS_PORT": "3",
    }
    assert endpoints_of({"grpc": 1}) == {"grpc": "127.0.0.1:1"}


def test_port_overrides_come_from_the_environment() -> None:
    env = CliEnvironment({"AIMAAS_REGISTRY__GRPC_PORT": "9999", "AIMAAS_LOG__FORMAT": "json"})
    assert env.port_overrides() == {("registry", "grpc"): 9999}
    with pytest.raises(InvalidEnvironment, match="AIMAAS_MONITOR__HTTP_PORT"):
        CliEnvironment({"AIMAAS_MONITOR__HTTP_PORT": "http"}).port_overrides()


def test_busy_ports_names_the_process_and_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert not port_is_free(port)
        busy = busy_ports({"registry": {"grpc": port}})
    assert len(busy) == 1
    message = busy[0].describe()
    assert f"port {port} (registry grpc) is already in use" in message
    assert port_is_free(port)
