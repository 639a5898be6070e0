"""Shared fixtures: real etcd and S3-protocol servers on loopback, isolated per test by namespace."""

from __future__ import annotations

import os
import uuid

import pytest

from services.common.settings import EtcdSettings, ObjectStoreKind, ObjectStoreSettings
from tests.support.servers import EtcdProcess, S3Server


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory):
    server = EtcdProcess(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def restartable_etcd(tmp_path):
    """A private etcd the test may stop and start (outage tests)."""
    server = EtcdProcess(tmp_path / "etcd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd_settings(etcd_server) -> EtcdSettings:
    # A fresh key namespace per test keeps tests independent on one shared server.
    return EtcdSettings(
        endpoints=etcd_server.endpoint,
        namespace=f"/test-{uuid.uuid4().hex[:12]}/aimaas/v1",
        session_ttl_seconds=3,
    )


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_settings(s3_server) -> ObjectStoreSettings:
    return ObjectStoreSettings(
        kind=ObjectStoreKind.S3,
        endpoint=s3_server.endpoint,
        bucket=f"test-{uuid.uuid4().hex[:12]}",
        access_key=S3Server.access_key,
        secret_key=S3Server.secret_key,
        part_size_bytes=5 * 1024 * 1024,
    )


@pytest.fixture
def local_store_settings(tmp_path) -> ObjectStoreSettings:
    return ObjectStoreSettings(kind=ObjectStoreKind.LOCAL, path=tmp_path / "objects")


@pytest.fixture(params=["local", "s3"])
def store_settings(request) -> ObjectStoreSettings:
    """Both object store implementations, for tests that must hold on either."""
    return request.getfixturevalue(f"{request.param}_store_settings" if request.param == "local" else "s3_settings")


@pytest.fixture(scope="session")
def task_models(tmp_path_factory: pytest.TempPathFactory):
    """Tiny Hugging Face models built from configs (and MiniLM's real weights), exported once."""
    from tests.support.hf_models import TaskModels

    return TaskModels(tmp_path_factory.mktemp("task-models"))


def pytest_configure(config):
    # Tests must not pick up a developer's AIMAAS_* environment.
    for name in list(os.environ):
        if name.startswith("AIMAAS_"):
            del os.environ[name]
    # No model hub is reachable here: every Hugging Face model is built or shipped locally.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
