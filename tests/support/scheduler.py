"""Scheduler test helpers: in-process and subprocess schedulers, inference node subprocesses, and
polling helpers over etcd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from services.common.etcd import EtcdClient, from_json
from services.common.settings import EtcdSettings, LogSettings, ObjectStoreSettings
from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerServerSettings, SchedulerSettings
from tests.support.servers import free_port

REPO = pathlib.Path(__file__).resolve().parents[2]


def scheduler_settings(etcd: EtcdSettings, store: ObjectStoreSettings | None = None, **server: Any) -> SchedulerSettings:
    values: dict[str, Any] = dict(
        grpc_port=0,
        metrics_port=-1,
        shutdown_grace_seconds=1,
        reconcile_debounce_seconds=0.02,
        autoscale_interval_seconds=0.5,
        node_stats_fallback=False,
    )
    values.update(server)
    fields: dict[str, Any] = dict(etcd=etcd, log=LogSettings(level="WARNING"), scheduler=SchedulerServerSettings(**values))
    if store is not None:
        fields["object_store"] = store
    return SchedulerSettings(**fields)


@contextlib.asynccontextmanager
async def running_scheduler(
    settings: SchedulerSettings, *, load_signal: Any = None
) -> AsyncIterator[tuple[SchedulerApp, scheduler_pb2_grpc.SchedulerServiceStub]]:
    app = SchedulerApp(settings, load_signal=load_signal)
    await app.start()
    channel = grpc.aio.insecure_channel(app.grpc.address)
    try:
        yield app, scheduler_pb2_grpc.SchedulerServiceStub(channel)
    finally:
        await channel.close()
        await app.stop()


def base_env(etcd: EtcdSettings, store: ObjectStoreSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMAAS_")}
    env.update(
        {
            "AIMAAS_ETCD__ENDPOINTS": etcd.endpoints,
            "AIMAAS_ETCD__NAMESPACE": etcd.namespace,
            "AIMAAS_ETCD__SESSION_TTL_SECONDS": str(etcd.session_ttl_seconds),
            "AIMAAS_OBJECT_STORE__KIND": store.kind.value,
            "AIMAAS_OBJECT_STORE__PATH": str(store.path),
            "AIMAAS_LOG__LEVEL": "WARNING",
            "PYTHONPATH": str(REPO),
        }
    )
    return env


class Process:
    """A service subprocess (`python -m services.<name>`), logging to a file."""

    def __init__(self, name: str, module: str, env: dict[str, str], log_dir: pathlib.Path, port: int) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Process:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
        log.close()
        return self

    def kill(self) -> None:
        """kill -9"""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def inference_node(
    node_id: str, etcd: EtcdSettings, store: ObjectStoreSettings, tmp_path: pathlib.Path, **extra: str
) -> Process:
    port = free_port()
    env = base_env(etcd, store)
    env.update(
        {
            "AIMAAS_INFERENCE__NODE_ID": node_id,
            "AIMAAS_INFERENCE__HOST": "127.0.0.1",
            "AIMAAS_INFERENCE__GRPC_PORT": str(port),
            "AIMAAS_INFERENCE__METRICS_PORT": "-1",
            "AIMAAS_INFERENCE__CACHE_DIR": str(tmp_path / f"cache-{node_id}"),
            "AIMAAS_INFERENCE__BACKENDS": '["onnxruntime"]',
            "AIMAAS_INFERENCE__INTRA_OP_THREADS": "1",
            "AIMAAS_INFERENCE__INTER_OP_THREADS": "1",
            "AIMAAS_INFERENCE__UNLOAD_DRAIN_SECONDS": "0.5",
            "AIMAAS_INFERENCE__SHUTDOWN_GRACE_SECONDS": "1",
        }
    )
    env.update(extra)
    return Process(node_id, "services.inference", env, tmp_path, port)


def scheduler_process(
    name: str, etcd: EtcdSettings, store: ObjectStoreSettings, tmp_path: pathlib.Path, **extra: str
) -> Process:
    port = free_port()
    env = base_env(etcd, store)
    env.update(
        {
            "AIMAAS_SCHEDULER__HOST": "127.0.0.1",
            "AIMAAS_SCHEDULER__GRPC_PORT": str(port),
            "AIMAAS_SCHEDULER__METRICS_PORT": "-1",
            "AIMAAS_SCHEDULER__RECONCILE_DEBOUNCE_SECONDS": "0.02",
            "AIMAAS_SCHEDULER__SHUTDOWN_GRACE_SECONDS": "1",
            "AIMAAS_SCHEDULER__NODE_STATS_FALLBACK": "false",
            "AIMAAS_LOG__LEVEL": "INFO",
        }
    )
    env.update(extra)
    return Process(name, "services.scheduler", env, tmp_path, port)


async def eventually(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition", interval: float = 0.05):
    """Poll an async or sync check until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def replica_states(etcd: EtcdClient, model: str) -> dict[tuple[str, int], int]:
    """(node, version) -> ReplicaState of every status of `model`."""
    states = {}
    for kv in await etcd.get_prefix(etcd.keys.statuses_prefix()):
        parsed = etcd.keys.parse_status_key(kv.key)
        if parsed is not None and parsed[1] == model:
            states[(parsed[0], parsed[2])] = from_json(kv.value, spb.ReplicaStatus).state
    return states


async def assignments(etcd: EtcdClient, model: str | None = None) -> dict[tuple[str, str, int], spb.Assignment]:
    found = {}
    for kv in await etcd.get_prefix(etcd.keys.assignments_prefix()):
        parsed = etcd.keys.parse_assignment_key(kv.key)
        if parsed is not None and (model is None or parsed[1] == model):
            found[parsed] = from_json(kv.value, spb.Assignment)
    return found


def condition(deployment: spb.Deployment, kind: str) -> spb.Condition | None:
    return next((c for c in deployment.status.conditions if c.type == kind), None)
