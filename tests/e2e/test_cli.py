"""The `aimaas` CLI end to end: real etcd and registry processes started by `aimaas up`.

Each mesh runs on ports shifted by a free offset (etcd included), so the tests never collide with a
developer's running mesh, and in its own state dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aimaas.cli.ports import DEFAULT_PORTS, default_ports, port_is_free

needs_etcd = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd not installed (apt-get install etcd-server)")

# Offsets keep every port between 10000 and the Linux ephemeral range (32768+).
_OFFSET_RANGE = (10000 - 2379, 32000 - 8403)


def cli_env(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("AIMAAS_")}
    env.update(extra)
    return env


def run_cli(*args: str | pathlib.Path, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimaas.cli", *map(str, args)],
        env=env if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def free_port_offset() -> int:
    """An offset at which every port of the mesh table is free right now."""
    ports = [port for table in DEFAULT_PORTS.values() for port in table.values()]
    # A second inference node (`--inference-nodes 2`) takes the next ports.
    ports += [port for port in default_ports("inference-2").values()]
    for _ in range(100):
        offset = random.randint(*_OFFSET_RANGE)
        if all(port_is_free(port + offset) for port in ports):
            return offset
    raise RuntimeError("no free port offset found")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass
class Mesh:
    state_dir: pathlib.Path
    offset: int

    def cli(self, *args: str | pathlib.Path) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--state-dir", self.state_dir)

    def status(self) -> dict[str, Any]:
        return json.loads(ok(self.cli("status", "--json")).stdout)

    def process(self, name: str) -> dict[str, Any]:
        return next(entry for entry in self.status()["processes"] if entry["name"] == name)


def start_mesh(state_dir: pathlib.Path, *extra: str) -> Mesh:
    offset = free_port_offset()
    ok(run_cli("up", "--state-dir", state_dir, "--base-port-offset", offset, "--timeout", 45, *extra))
    return Mesh(state_dir, offset)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(tmp_path_factory.mktemp("mesh"))
    yield running
    running.cli("down")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A 4 -> 8 linear layer (MatMul + Add) with a dynamic batch dimension."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("models") / "linear.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@needs_etcd
def test_status_reports_etcd_and_registry_healthy(mesh: Mesh) -> None:
    document = mesh.status()
    by_name = {entry["name"]: entry for entry in document["processes"]}
    assert {"etcd", "registry"} <= by_name.keys()
    for entry in by_name.values():
        assert entry["alive"] and entry["healthy"], entry
        assert pathlib.Path(entry["log"]).is_file()
    # Shifted ports: the defaults plus the offset, never the developer's 2379/8101.
    assert by_name["etcd"]["endpoints"]["client"] == f"127.0.0.1:{2379 + mesh.offset}"
    assert by_name["registry"]["endpoints"] == {
        "grpc": f"127.0.0.1:{8101 + mesh.offset}",
        "metrics": f"127.0.0.1:{8102 + mesh.offset}",
    }
    assert document["object_store"] == {"kind": "local", "path": str(mesh.state_dir / "objects")}


@needs_etcd
def test_push_list_show(mesh: Mesh, onnx_model: pathlib.Path) -> None:
    pushed = ok(mesh.cli("models", "push", onnx_model, "--name", "linear", "--alias", "production", "--json"))
    version = json.loads(pushed.stdout)["version"]
    assert version["model"] == "linear"
    assert version["version"] == "1"
    assert version["sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert int(version["size_bytes"]) == onnx_model.stat().st_size
    assert version["format"] == "MODEL_FORMAT_ONNX"

    human = ok(mesh.cli("models", "push", onnx_model, "--name", "linear"))
    assert "pushed linear version 2" in human.stdout
    assert "x FP32 [-1, 4]" in human.stdout and "y FP32 [-1, 8]" in human.stdout

    listed = json.loads(ok(mesh.cli("models", "list", "--json")).stdout)
    assert [(m["name"], m["latest_version"]) for m in listed["models"]] == [("linear", "2")]
    assert "linear" in ok(mesh.cli("models", "list")).stdout

    shown = json.loads(ok(mesh.cli("models", "show", "linear", "--json")).stdout)
    assert shown["model"]["name"] == "linear"
    assert [(a["name"], a["version"]) for a in shown["aliases"]] == [("production", "1")]
    assert [v["version"] for v in shown["versions"]] == ["1", "2"]
    signature = shown["versions"][0]["signature"]
    assert signature["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert signature["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "8"]}]
    table = ok(mesh.cli("models", "show", "linear")).stdout
    assert "production" in table and "ONNX" in table


@needs_etcd
def test_unknown_model_is_a_clean_error(mesh: Mesh) -> None:
    result = mesh.cli("models", "show", "no-such-model")
    assert result.returncode == 1
    assert result.stderr.startswith("error: NOT_FOUND: ")
    assert "Traceback" not in result.stderr


@needs_etcd
def test_registry_serves_reflection(mesh: Mesh) -> None:
    address = mesh.process("registry")["endpoints"]["grpc"]
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {service.name for response in responses for service in response.list_services_response.service}
    assert "aimaas.registry.v1.RegistryService" in names
    assert "grpc.health.v1.Health" in names


@needs_etcd
def test_up_again_is_idempotent(mesh: Mesh) -> None:
    before = {entry["name"]: entry["pid"] for entry in mesh.status()["processes"]}
    result = ok(mesh.cli("up", "--base-port-offset", str(mesh.offset)))
    assert "already running" in result.stderr
    assert {entry["name"]: entry["pid"] for entry in mesh.status()["processes"]} == before


@needs_etcd
def test_down_stops_everything_and_keeps_data(tmp_path: pathlib.Path, onnx_model: pathlib.Path) -> None:
    running = start_mesh(tmp_path / "state")
    try:
        ok(running.cli("models", "push", onnx_model, "--name", "kept"))
        pids = [entry["pid"] for entry in running.status()["processes"]]
        assert len(pids) >= 2
    finally:
        ok(running.cli("down"))
    assert all(gone(pid) for pid in pids)
    assert not (tmp_path / "state" / "state.json").exists()
    assert running.status() == {"state_dir": str(tmp_path / "state"), "running": False, "processes": []}
    assert (tmp_path / "state" / "etcd").is_dir()
    assert any(path.is_file() for path in (tmp_path / "state" / "objects").rglob("*"))
    assert "nothing to stop" in ok(running.cli("down")).stderr


def test_up_without_etcd_on_path_fails_clearly(tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_cli("up", "--state-dir", tmp_path / "state", env=cli_env(PATH=str(empty)))
    assert result.returncode == 1
    assert "etcd" in result.stderr and "apt-get install etcd-server" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "state.json").exists()


@needs_etcd
def test_up_names_a_busy_port(tmp_path: pathlib.Path) -> None:
    offset = free_port_offset()
    port = 8101 + offset
    with socket.create_server(("127.0.0.1", port)):
        result = run_cli("up", "--state-dir", tmp_path / "state", "--base-port-offset", offset)
    assert result.returncode == 1
    assert f"port {port} (registry grpc) is already in use" in result.stderr
    assert not (tmp_path / "state" / "state.json").exists()


def test_push_to_an_absent_registry_is_a_clean_error(tmp_path: pathlib.Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"not really a model")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    result = run_cli(
        "models", "push", artifact, "--name", "m", "--registry", address, "--timeout", "2",
        "--state-dir", tmp_path / "state",
    )  # fmt: skip
    assert result.returncode == 1
    assert "\nerror: UNAVAILABLE: " in "\n" + result.stderr
    assert "Traceback" not in result.stderr
