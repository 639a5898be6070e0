"""`aimaas deploy` and `aimaas predict` end to end on a real mesh without a gateway (etcd, registry,
monitor, scheduler, inference node): the CLI calls the scheduler directly and predicts on a READY
replica. The same commands through the gateway: tests/e2e/test_gateway_e2e.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.e2e.test_cli import Mesh, needs_etcd, ok, start_mesh
from tests.support.models import mlp_bytes

pytestmark = needs_etcd


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(tmp_path_factory.mktemp("deploy-mesh"), "--without", "gateway")
    try:
        yield running
    finally:
        ok(running.cli("down"))


@pytest.fixture(scope="module")
def pushed_mlp(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    path.write_bytes(mlp_bytes())
    ok(mesh.cli("models", "push", path, "--name", "mlp"))
    return "mlp"


def test_deploy_waits_ready_then_predict(mesh: Mesh, pushed_mlp: str) -> None:
    deployed = ok(mesh.cli("deploy", pushed_mlp, "--min", "1", "--timeout", "60"))
    assert "deployment mlp: model mlp" in deployed.stdout
    assert "1/1 replicas ready" in deployed.stdout
    assert "endpoint 127.0.0.1:" in deployed.stdout
    assert "waiting:" in deployed.stderr

    again = json.loads(ok(mesh.cli("deploy", pushed_mlp, "--version", "1", "--json")).stdout)
    assert again["spec"]["name"] == "mlp"
    assert again["endpoints"] and again["endpoints"][0]["version"] == "1"

    result = json.loads(ok(mesh.cli("predict", pushed_mlp, "--random", "--batch", "2", "--json")).stdout)
    assert result["model_name"] == "mlp"
    assert result["node"] == mesh.process("inference")["endpoints"]["grpc"]  # no gateway: the replica itself
    [output] = result["outputs"]
    assert output["name"] == "y" and output["datatype"] == "FP32"
    assert output["shape"] == [2, 3]
    assert len(output["data"]) == 2 and all(len(row) == 3 for row in output["data"])

    explicit = ok(mesh.cli("predict", pushed_mlp, "--input", "x=[[1, 2, 3, 4]]"))
    assert "y FP32 [1, 3]" in explicit.stdout


def test_deploy_unknown_model_is_not_found(mesh: Mesh) -> None:
    result = mesh.cli("deploy", "no-such-model", "--timeout", "5")
    assert result.returncode == 1
    assert result.stderr.startswith("error: NOT_FOUND: "), result.stderr
    assert "Traceback" not in result.stderr


def test_predict_bad_input_is_a_clean_error(mesh: Mesh, pushed_mlp: str) -> None:
    ok(mesh.cli("deploy", pushed_mlp, "--min", "1"))
    result = mesh.cli("predict", pushed_mlp, "--input", "x=[[1, 2]]")
    assert result.returncode == 1
    assert result.stderr.startswith("error: INVALID_ARGUMENT: input 'x' has shape [1, 2]"), result.stderr
    keys = mesh.cli("keys", "list")
    assert keys.returncode == 1 and "has none" in keys.stderr


def test_deploy_unknown_version_is_not_found(mesh: Mesh, pushed_mlp: str) -> None:
    result = mesh.cli("deploy", pushed_mlp, "--version", "99", "--name", "mlp-missing")
    assert result.returncode == 1
    assert result.stderr.startswith("error: NOT_FOUND: "), result.stderr
    assert "Traceback" not in result.stderr


def test_import_a_hugging_face_directory_deploy_and_predict_text(mesh: Mesh, task_models) -> None:
    source = task_models.sources["sentiment"]
    imported = ok(mesh.cli("models", "import", "hf", source, "--name", "cli-sentiment"))
    assert "pushed cli-sentiment version 1" in imported.stdout
    assert "text-classification (2 labels: negative, positive; max 64 tokens" in imported.stdout
    assert "text BYTES [-1]" in imported.stdout
    assert "import: done" in imported.stderr  # the export steps and the upload show progress

    again = ok(mesh.cli("models", "import", "hf", source, "--name", "cli-sentiment", "--json"))
    assert json.loads(again.stdout)["deduplicated"] is True

    ok(mesh.cli("deploy", "cli-sentiment", "--min", "1", "--timeout", "60"))
    result = json.loads(ok(mesh.cli("predict", "cli-sentiment", "--text", "i love this movie", "--text", "awful",
                                    "--json")).stdout)  # fmt: skip
    outputs = {o["name"]: o for o in result["outputs"]}
    assert outputs["label"]["shape"] == [2] and set(outputs["label"]["data"]) <= {"negative", "positive"}
    assert outputs["scores"]["shape"] == [2, 2]


def test_import_errors_are_clean(mesh: Mesh, tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    result = mesh.cli("models", "import", "hf", tmp_path)
    assert result.returncode == 1
    assert "cannot tell the task of architecture GPT2LMHeadModel" in result.stderr
    assert "Traceback" not in result.stderr
    missing = mesh.cli("models", "import", "hf", "acme/not-in-the-cache")
    assert missing.returncode == 1 and "not in the local Hugging Face cache" in missing.stderr
