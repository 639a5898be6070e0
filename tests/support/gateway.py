"""Run a real gateway in-process (gRPC and HTTP on port 0) against given etcd / registry / scheduler
/ monitor addresses, for every test that needs the public edge.

    settings = gateway_settings(etcd_settings, registry=reg.grpc.address, scheduler=sched.grpc.address)
    async with running_gateway(settings) as gw:
        stub = GRPCInferenceServiceStub(grpc.aio.insecure_channel(gw.grpc_address))
        httpx.get(f"{gw.http_url}/v2/health/ready")
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pydantic import SecretStr

from services.common.auth import AuthSettings
from services.common.settings import EtcdSettings, LogSettings
from services.gateway.app import GatewayApp
from services.gateway.settings import GatewayServerSettings, GatewaySettings, LimitSettings

# A bootstrap admin token for tests that turn auth on (>= 32 characters).
ADMIN_TOKEN = "test-bootstrap-admin-token-0123456789abcdef"


def gateway_settings(
    etcd: EtcdSettings,
    *,
    registry: str = "127.0.0.1:1",
    scheduler: str = "127.0.0.1:1",
    monitor: str = "",
    auth: bool = False,
    limits: dict[str, Any] | None = None,
    **server: Any,
) -> GatewaySettings:
    """Settings on free ports (gRPC and HTTP 0, no metrics port), quiet logs. `auth=True` enables
    authentication with ADMIN_TOKEN as the bootstrap admin token. Unreachable defaults for upstream
    services a test does not need (their calls then fail with UNAVAILABLE)."""
    values: dict[str, Any] = dict(
        grpc_port=0,
        http_port=0,
        metrics_port=-1,
        shutdown_grace_seconds=1,
        registry_address=registry,
        scheduler_address=scheduler,
        monitor_address=monitor,
        auth=AuthSettings(enabled=auth, bootstrap_admin_token=SecretStr(ADMIN_TOKEN) if auth else None),
        limits=LimitSettings(**(limits or {})),
        stats_interval_seconds=1.0,
    )
    values.update(server)
    return GatewaySettings(etcd=etcd, log=LogSettings(level="WARNING"), gateway=GatewayServerSettings(**values))


@contextlib.asynccontextmanager
async def running_gateway(settings: GatewaySettings, **kwargs: Any) -> AsyncIterator[GatewayApp]:
    """A started GatewayApp: `.grpc_address` (host:port), `.http_url` (None-safe only when the HTTP app
    exists), `.dataplane`, `.routing`; stopped gracefully on exit."""
    app = GatewayApp(settings, **kwargs)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def bearer(token: str = ADMIN_TOKEN) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying `token`."""
    return (("authorization", f"Bearer {token}"),)


# -- a mesh of real service processes behind the gateway ---------------------------------------------


class Mesh:
    """Registry, scheduler and inference nodes as `python -m services.<name>` subprocesses (see
    tests/support/scheduler.py), sharing one etcd namespace and a local object store."""

    def __init__(self, etcd: EtcdSettings, store: Any, registry: Any, scheduler: Any, nodes: dict[str, Any]) -> None:
        self.etcd = etcd
        self.store = store
        self.registry = registry
        self.scheduler = scheduler
        self.nodes = nodes

    def processes(self) -> list[Any]:
        return [self.registry, self.scheduler, *self.nodes.values()]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in self.processes())

    def gateway_settings(self, **kwargs: Any) -> GatewaySettings:
        return gateway_settings(self.etcd, registry=self.registry.address, scheduler=self.scheduler.address, **kwargs)

    def stop(self) -> None:
        for process in self.processes():
            process.stop()


def wait_serving(process: Any, timeout: float = 30.0) -> None:
    import time

    from aimaas.cli.health import grpc_serving

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process is not None and process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.process.returncode}:\n{process.log_tail()}")
        if grpc_serving(process.address, timeout=1.0):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{process.name} did not become SERVING:\n{process.log_tail()}")


def start_mesh(etcd: EtcdSettings, tmp: Any, nodes: Sequence[str] = ("node-a", "node-b"), **scheduler_env: str) -> Mesh:
    """Start the processes and wait until each serves; `mesh.stop()` ends them."""
    from services.common.settings import ObjectStoreKind, ObjectStoreSettings
    from tests.support.scheduler import Process, base_env, inference_node, scheduler_process
    from tests.support.servers import free_port

    store = ObjectStoreSettings(kind=ObjectStoreKind.LOCAL, path=tmp / "objects")
    registry_env = base_env(etcd, store)
    registry_port = free_port()
    registry_env.update({"AIMAAS_REGISTRY__GRPC_PORT": str(registry_port), "AIMAAS_REGISTRY__METRICS_PORT": "-1"})
    registry = Process("registry", "services.registry", registry_env, tmp, registry_port)
    scheduler = scheduler_process("scheduler", etcd, store, tmp, **scheduler_env)
    mesh = Mesh(etcd, store, registry, scheduler, {n: inference_node(n, etcd, store, tmp) for n in nodes})
    try:
        for process in mesh.processes():
            process.start()
        for process in mesh.processes():
            wait_serving(process)
    except BaseException:
        mesh.stop()
        raise
    return mesh


async def deploy(
    gateway: GatewayApp,
    name: str,
    models: Sequence[bytes],
    *,
    traffic: Sequence[tuple[int, int]] = ((1, 100),),
    min_replicas: int = 1,
    max_replicas: int | None = None,
    ready_replicas: int | None = None,
    timeout: float = 60.0,
    **spec: Any,
) -> None:
    """Upload `models` as versions 1..n of model `name` through the gateway's registry passthrough,
    apply a deployment, and wait until the gateway's routing table has `ready_replicas` (default:
    min_replicas for one version, else 1) READY replicas of every weighted version."""
    import grpc

    from aimaas.registry.v1 import registry_pb2_grpc
    from aimaas.scheduler.v1 import scheduler_pb2 as spb
    from aimaas.scheduler.v1 import scheduler_pb2_grpc
    from aimaas.types.v1 import types_pb2 as tpb
    from tests.support.registry import upload
    from tests.support.scheduler import eventually

    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        for index, data in enumerate(models):
            await upload(registry, name, data, create_model=index == 0, timeout=60)
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        await scheduler.ApplyDeployment(
            spb.ApplyDeploymentRequest(
                spec=spb.DeploymentSpec(
                    name=name,
                    model=name,
                    traffic=[spb.TrafficTarget(version=v, weight=w) for v, w in traffic],
                    min_replicas=min_replicas,
                    max_replicas=max_replicas or max(min_replicas, 1),
                    accelerator=tpb.ACCELERATOR_CPU,
                    **spec,
                )
            ),
            timeout=30,
        )
    # The scheduler divides min_replicas over the versions of a split by weight.
    wanted = (min_replicas if len(traffic) == 1 else 1) if ready_replicas is None else ready_replicas

    def routed():
        route = gateway.routing.table.find(name)
        if route is None:
            return None
        weighted = [v for v in route.versions if v.weight > 0]
        return route if weighted and all(len(v.replicas) >= wanted for v in weighted) else None

    try:
        await eventually(routed, timeout, f"{wanted} READY replicas of every weighted version of {name}")
    except AssertionError as exc:
        async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
            got = await scheduler_pb2_grpc.SchedulerServiceStub(channel).GetDeployment(
                spb.GetDeploymentRequest(name=name), timeout=10
            )
        raise AssertionError(f"{exc}\nroute: {gateway.routing.table.find(name)}\nstatus: {got.deployment.status}") from None
