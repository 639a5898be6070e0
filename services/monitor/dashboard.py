"""The dashboard: an HTTP page (FastAPI on uvicorn) and the JSON it polls.

`GET /` serves the page (it holds no data); `GET /api/overview` needs an API key with READ
(`Authorization: Bearer …`, G2's `require`) and returns per model/version figures with a chart
timeline, nodes with resource use, deployments and the active alerts. `GET /healthz` is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from google.protobuf import json_format

from aimaas.monitor.v1 import monitor_pb2 as mpb
from services.common.auth import Authenticator, Permission, require
from services.common.errors import AimaasError, Unavailable, http_status_for
from services.common.etcd import EtcdError
from services.monitor.aggregation import MetricsStore, preferred
from services.monitor.alerts import AlertView, ClusterView
from services.monitor.dashboard_page import PAGE
from services.monitor.rules import RuleStore

_STATE_NAMES = {v: k.removeprefix("ALERT_STATE_").lower() for k, v in mpb.AlertState.items()}


class Overview:
    """Builds the dashboard's JSON from the store, the cluster records and the alert mirror."""

    def __init__(
        self,
        store: MetricsStore,
        cluster: ClusterView,
        alerts: AlertView,
        *,
        window_seconds: float,
        stale_seconds: float,
        is_leader: Any = lambda: False,
        rules: RuleStore | None = None,
    ) -> None:
        self._store = store
        self._cluster = cluster
        self._alerts = alerts
        self._window = window_seconds
        self._stale = stale_seconds
        self._is_leader = is_leader
        self._rules = rules

    async def build(self) -> dict[str, Any]:
        now = time.time()
        try:
            cluster = await self._cluster.snapshot()
        except EtcdError:
            cluster = None  # metrics still render; cluster tables stay empty
        groups: dict[tuple[str, int], list] = {}
        for series in self._store.series():
            groups.setdefault((series.model, series.version), []).append(series)
        models = []
        for (model, version), members in sorted(groups.items()):
            await asyncio.sleep(0)  # a large mesh: let reports and keep-alives through between versions
            whole = preferred(members)
            aggregate = self._store.aggregate(whole, self._window)
            models.append(
                {
                    "model": model,
                    "version": version,
                    "qps": aggregate.qps,
                    "success_rate": aggregate.success_rate,
                    "p50_ms": aggregate.latency_ms(0.5),
                    "p95_ms": aggregate.latency_ms(0.95),
                    "p99_ms": aggregate.latency_ms(0.99),
                    "queue_ms": aggregate.mean_queue_ms(),
                    "requests": aggregate.requests,
                    "failures": aggregate.failure_count,
                    "replicas": sum(
                        1 for s in members
                        if s.kind != mpb.REPORTER_KIND_GATEWAY and now - s.last_report <= self._stale
                    ),
                    "timeline": self._store.timeline(whole),
                }
            )
        reporters = self._store.nodes()
        node_ids = sorted(set(reporters) | set(cluster.nodes if cluster else ()))
        nodes = []
        for node_id in node_ids:
            resources = reporters.get(node_id)
            record = cluster.nodes.get(node_id) if cluster else None
            age = now - resources.last_report if resources is not None else None
            usage = resources.usage if resources is not None else mpb.ResourceUsage()
            nodes.append(
                {
                    "id": node_id,
                    "address": record.address if record is not None else "",
                    "up": record is not None or (age is not None and age <= self._stale),
                    "cpu_percent": usage.cpu_percent if resources is not None else None,
                    "memory_used_bytes": usage.memory_used_bytes,
                    "memory_total_bytes": usage.memory_total_bytes,
                    "gpu_memory_used_bytes": usage.gpu_memory_used_bytes,
                    "gpu_memory_total_bytes": usage.gpu_memory_total_bytes,
                    "gpu_utilization_percent": usage.gpu_utilization_percent,
                    "age_seconds": age,
                }
            )
        deployments = []
        if cluster is not None:
            for name, spec in sorted(cluster.deployments.items()):
                status = cluster.statuses.get(name)
                ready = sum(v.ready_replicas for v in status.versions) if status is not None else 0
                traffic = ", ".join(
                    f"{t.alias or ('v' + str(t.version))}: {t.weight}%" for t in spec.traffic
                ) if spec.traffic else ""
                deployments.append(
                    {
                        "name": name,
                        "model": spec.model,
                        "traffic": traffic,
                        "ready": ready,
                        "min_replicas": spec.min_replicas,
                        "max_replicas": spec.max_replicas,
                    }
                )
        alerts = []
        active = self._alerts.list(include_resolved=False)
        names: dict[str, str] = {}
        if active and self._rules is not None:
            with contextlib.suppress(EtcdError):
                names = {rule.id: rule.name for rule in await self._rules.list()}
        for alert in active:
            alerts.append(
                {
                    "rule_id": alert.rule_id,
                    "rule_name": names.get(alert.rule_id, ""),
                    "subject": alert.subject,
                    "state": _STATE_NAMES.get(alert.state, "unknown"),
                    "value": alert.value,
                    "active_since": json_format.MessageToDict(alert).get("activeSince"),
                    "summary": alert.summary,
                }
            )
        return {
            "as_of": now,
            "window": f"{self._window:g}s",
            "leader": bool(self._is_leader()),
            "models": models,
            "nodes": nodes,
            "deployments": deployments,
            "alerts": alerts,
        }


def build_dashboard_app(overview: Overview, authenticator: Authenticator) -> FastAPI:
    app = FastAPI(title="AIMaaS monitor dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.authenticator = authenticator

    @app.exception_handler(AimaasError)
    async def _domain_error(_request: Request, exc: AimaasError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=http_status_for(exc.code))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={"cache-control": "no-store"})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/overview", dependencies=[require(Permission.READ)])
    async def api_overview() -> JSONResponse:
        try:
            data = await overview.build()
        except EtcdError as exc:
            raise Unavailable(f"metadata store unavailable: {exc}") from None
        return JSONResponse(data, headers={"cache-control": "no-store"})

    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the process's gRPC side owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class DashboardServer:
    """uvicorn in this process's event loop, on a socket bound up front (port 0 works)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self._app = app
        self._host = host
        self._requested = port
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.port: int | None = None

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._requested))
        sock.listen(128)
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2)
        self._server = _EmbeddedServer(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]), name="dashboard")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
            self._task = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
