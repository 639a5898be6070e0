"""Gateway settings: defaults per DESIGN.md, environment names, and precise validation errors."""

from __future__ import annotations

import pytest

from services.common.settings import load_settings
from services.gateway.settings import GatewaySettings


def test_defaults_and_nested_environment_names(monkeypatch):
    settings = GatewaySettings()
    gateway = settings.gateway
    assert (gateway.http_port, gateway.grpc_port, gateway.metrics_port) == (8000, 8001, 8002)
    assert gateway.limits.max_body_bytes == 64 * 1024 * 1024 and gateway.auth.enabled
    assert gateway.http_url() == "http://127.0.0.1:8000" and not gateway.tls_enabled
    monkeypatch.setenv("AIMAAS_GATEWAY__LIMITS__MAX_CONCURRENCY", "7")
    monkeypatch.setenv("AIMAAS_GATEWAY__AUTH__ENABLED", "false")
    monkeypatch.setenv("AIMAAS_GATEWAY__STICKY_HEADER", "X-Session")
    monkeypatch.setenv("AIMAAS_GATEWAY__PUBLIC_HTTP_URL", "https://api.example.com/")
    settings = GatewaySettings()
    assert settings.gateway.limits.max_concurrency == 7 and not settings.gateway.auth.enabled
    assert settings.gateway.sticky_header == "x-session"  # gRPC metadata keys are lower case
    assert settings.gateway.http_url() == "https://api.example.com"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("AIMAAS_GATEWAY__SCHEDULER_ADDRESS", "nope", "AIMAAS_GATEWAY__SCHEDULER_ADDRESS: Value error, address 'nope' must be host:port"),
        ("AIMAAS_GATEWAY__REGISTRY_ADDRESS", "host:99999", "AIMAAS_GATEWAY__REGISTRY_ADDRESS"),
        ("AIMAAS_GATEWAY__MONITOR_ADDRESS", "monitor", "monitor address 'monitor' must be host:port"),
        ("AIMAAS_GATEWAY__TLS_CERT_FILE", "/etc/hostname", "tls_cert_file and tls_key_file must be set together"),
        ("AIMAAS_GATEWAY__STICKY_HEADER", "bad header", "AIMAAS_GATEWAY__STICKY_HEADER"),
        ("AIMAAS_GATEWAY__LIMITS__MAX_BODY_BYTES", "10", "AIMAAS_GATEWAY__LIMITS__MAX_BODY_BYTES"),
        ("AIMAAS_GATEWAY__RETRY_MAX_ATTEMPTS", "0", "AIMAAS_GATEWAY__RETRY_MAX_ATTEMPTS"),
        ("AIMAAS_GATEWAY__REPLICA_GRACE_SECONDS", "-1", "AIMAAS_GATEWAY__REPLICA_GRACE_SECONDS"),
        ("AIMAAS_GATEWAY__REPLICA_GRACE_PROBE_SECONDS", "0", "AIMAAS_GATEWAY__REPLICA_GRACE_PROBE_SECONDS"),
    ],
)
def test_bad_values_name_their_variable(monkeypatch, capsys, variable, value, expected):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as info:
        load_settings(GatewaySettings)
    assert info.value.code == 2
    assert expected in capsys.readouterr().err


def test_tls_files_must_exist(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AIMAAS_GATEWAY__TLS_CERT_FILE", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("AIMAAS_GATEWAY__TLS_KEY_FILE", str(tmp_path / "missing.key"))
    with pytest.raises(SystemExit):
        load_settings(GatewaySettings)
    assert "missing.pem' does not exist" in capsys.readouterr().err


def test_replica_grace_settings(monkeypatch):
    gateway = GatewaySettings().gateway
    assert (gateway.replica_grace_seconds, gateway.replica_grace_probe_seconds) == (30.0, 1.0)
    monkeypatch.setenv("AIMAAS_GATEWAY__REPLICA_GRACE_SECONDS", "0")
    monkeypatch.setenv("AIMAAS_GATEWAY__REPLICA_GRACE_PROBE_SECONDS", "0.25")
    gateway = GatewaySettings().gateway
    assert (gateway.replica_grace_seconds, gateway.replica_grace_probe_seconds) == (0.0, 0.25)
