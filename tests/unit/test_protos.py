"""Contract checks: the protos lint clean and the inference API is wire-compatible with the
Open Inference Protocol as the reference client (tritonclient) encodes it."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2

from inference import grpc_predict_v2_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _buf() -> str:
    found = shutil.which("buf") or str(pathlib.Path(sys.executable).parent / "buf")
    if not pathlib.Path(found).exists():
        pytest.fail("buf not installed (pip install buf-bin, part of the [dev] extra)")
    return found


def test_buf_lint_passes():
    result = subprocess.run([_buf(), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_violation(tmp_path):
    # Guards against a lint configuration that silently checks nothing.
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    bad = tmp_path / "protos" / "aimaas" / "bad" / "v1"
    bad.mkdir(parents=True)
    (bad / "bad.proto").write_text(
        'syntax = "proto3";\npackage aimaas.bad.v1;\nenum Color { RED = 0; }\nmessage thing { string Name = 1; }\n'
    )
    result = subprocess.run([_buf(), "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ENUM_ZERO_VALUE_SUFFIX" in result.stdout or "UNSPECIFIED" in result.stdout


def _messages(file_descriptor) -> dict[str, descriptor_pb2.DescriptorProto]:
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            walk(name, nested)

    for message in proto.message_type:
        walk(proto.package, message)
    return found


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[int, tuple]:
    return {f.number: (f.name, f.type, f.label, f.type_name) for f in message.field}


def test_inference_service_matches_the_reference_client():
    from tritonclient.grpc import model_config_pb2, service_pb2

    ours = _messages(grpc_predict_v2_pb2.DESCRIPTOR)
    theirs = {**_messages(service_pb2.DESCRIPTOR), **_messages(model_config_pb2.DESCRIPTOR)}
    assert ours, "no messages found"
    for name, message in ours.items():
        assert name in theirs, f"{name} is not a message of the protocol"
        reference = _fields(theirs[name])
        for number, field in _fields(message).items():
            # Every field we declare exists in the protocol with the same number, name and type.
            assert reference.get(number) == field, f"{name} field {number}: ours {field}, protocol {reference.get(number)}"

    our_service = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert our_service.full_name == their_service.full_name == "inference.GRPCInferenceService"
    for method in our_service.methods:
        reference = their_service.methods_by_name[method.name]
        assert method.input_type.full_name == reference.input_type.full_name
        assert method.output_type.full_name == reference.output_type.full_name
        assert method.client_streaming == reference.client_streaming
        assert method.server_streaming == reference.server_streaming
    required = {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
        "RepositoryModelUnload",
    }
    assert required <= {m.name for m in our_service.methods}


def test_every_service_contract_is_generated():
    from aimaas.auth.v1 import auth_pb2_grpc
    from aimaas.monitor.v1 import monitor_pb2_grpc
    from aimaas.registry.v1 import registry_pb2_grpc
    from aimaas.scheduler.v1 import scheduler_pb2_grpc

    for stub in (
        registry_pb2_grpc.RegistryServiceStub,
        scheduler_pb2_grpc.SchedulerServiceStub,
        monitor_pb2_grpc.MonitorServiceStub,
        auth_pb2_grpc.AuthServiceStub,
    ):
        assert callable(stub)


def test_generated_stubs_are_not_tracked():
    result = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = [p for p in result.stdout.splitlines() if p.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"))]
    assert tracked == []
