"""The state file of `aimaas up` and the helpers around it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import psutil
import pytest

from aimaas.cli.mesh import discover_services, read_log_tail
from aimaas.cli.models import parse_labels, resolve_registry, tensor_specs
from aimaas.cli.state import MeshState, ProcessRecord, StateError, load_state, remove_state, save_state, state_path
from aimaas.types.v1 import types_pb2


def sample_state(state_dir: pathlib.Path) -> MeshState:
    me = psutil.Process()
    return MeshState(
        state_dir=str(state_dir),
        etcd_endpoint="127.0.0.1:12379",
        object_store={"kind": "local", "path": str(state_dir / "objects")},
        processes=[
            ProcessRecord("etcd", None, None, {"client": "127.0.0.1:12379"}),
            ProcessRecord("registry", me.pid, me.create_time(), {"grpc": "127.0.0.1:18101"}, "r.log", ["python"]),
        ],
        created="2024-01-01T00:00:00+00:00",
    )


def test_round_trip(tmp_path: pathlib.Path) -> None:
    state = sample_state(tmp_path)
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state
    assert [record.name for record in state.managed_processes()] == ["registry"]
    remove_state(tmp_path)
    assert load_state(tmp_path) is None


def test_unreadable_state_is_reported(tmp_path: pathlib.Path) -> None:
    state_path(tmp_path).write_text("{not json")
    with pytest.raises(StateError, match="unreadable"):
        load_state(tmp_path)


def test_liveness_checks_pid_and_start_time() -> None:
    me = psutil.Process()
    assert ProcessRecord("x", me.pid, me.create_time(), {}).is_alive()
    # Same pid, other start time: a recycled pid is not our process.
    assert not ProcessRecord("x", me.pid, me.create_time() - 100, {}).is_alive()
    assert not ProcessRecord("x", None, None, {}).is_alive()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    assert not ProcessRecord("x", finished.pid, None, {}).is_alive()


def test_registry_address_resolution(tmp_path: pathlib.Path) -> None:
    assert resolve_registry(None, tmp_path) == "127.0.0.1:8101"
    save_state(tmp_path, sample_state(tmp_path))
    assert resolve_registry(None, tmp_path) == "127.0.0.1:18101"
    assert resolve_registry("10.0.0.1:1", tmp_path) == "10.0.0.1:1"


def test_discover_services_needs_a_main_module(tmp_path: pathlib.Path) -> None:
    for name in ("registry", "gateway", "scheduler"):
        (tmp_path / name).mkdir()
    (tmp_path / "registry" / "__main__.py").touch()
    (tmp_path / "gateway" / "__main__.py").touch()
    assert discover_services(tmp_path) == ["registry", "gateway"]
    assert discover_services(None) == []


def test_log_tail_reads_from_the_offset(tmp_path: pathlib.Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("old run\n" + "".join(f"line {i}\n" for i in range(100)))
    assert read_log_tail(log, offset=len("old run\n"), lines=3) == ["line 97", "line 98", "line 99"]
    assert read_log_tail(log, offset=0, lines=200)[0] == "old run"
    assert read_log_tail(tmp_path / "missing.log") == []


def test_small_formatting_helpers() -> None:
    specs = [types_pb2.TensorSpec(name="x", datatype="FP32", shape=[-1, 4])]
    assert tensor_specs(specs) == "x FP32 [-1, 4]"
    assert parse_labels(("team=vision", "empty=")) == {"team": "vision", "empty": ""}
    with pytest.raises(Exception, match="KEY=VALUE"):
        parse_labels(("novalue",))

