"""The /v1 management API (services/gateway/rest/management.py) served by uvicorn against a real
registry and scheduler (gRPC on port 0, real etcd, real object store), with real API-key auth."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from aimaas.registry.v1 import registry_pb2_grpc
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from aimaas.types.v1 import types_pb2 as tpb
from services.common.auth import ApiKeyStore, Authenticator, AuthSettings
from services.common.etcd import EtcdClient, to_json
from services.gateway.rest.docs import mount_docs
from services.gateway.rest.management import ManagementBackends, build_management_router
from tests.support.models import large_model_bytes, mlp_bytes
from tests.support.registry import registry_settings, running_registry
from tests.support.scheduler import running_scheduler, scheduler_settings

ADMIN_TOKEN = "bootstrap-admin-token-for-tests-0123456789abcdef"
PUBLIC_URL = "http://gateway.example:8000"


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """uvicorn on 127.0.0.1:0 (real HTTP: chunked uploads, streaming responses); yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def management_app(backends: ManagementBackends, auth: Authenticator) -> FastAPI:
    app = FastAPI(title="AIMaaS gateway", docs_url=None, redoc_url=None)
    app.include_router(build_management_router(backends, auth))
    mount_docs(app)
    return app


@dataclass
class Mesh:
    url: str
    etcd: EtcdClient
    store: ApiKeyStore
    app: FastAPI
    scheduler_app: Any

    def client(self, token: str | None = ADMIN_TOKEN, **kwargs) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kwargs)


@contextlib.asynccontextmanager
async def running_mesh(etcd_settings, store_settings, *, monitor_address: str | None = None, auth_enabled: bool = True):
    async with (
        running_registry(registry_settings(etcd_settings, store_settings)) as (registry_app, _),
        running_scheduler(scheduler_settings(etcd_settings)) as (scheduler_app, _),
    ):
        etcd = EtcdClient(etcd_settings)
        store = ApiKeyStore(etcd)
        await store.start()
        channels = [grpc.aio.insecure_channel(app.grpc.address) for app in (registry_app, scheduler_app)]
        monitor = None
        if monitor_address:
            channels.append(grpc.aio.insecure_channel(monitor_address))
            monitor = mpb_grpc.MonitorServiceStub(channels[-1])
        backends = ManagementBackends(
            registry=registry_pb2_grpc.RegistryServiceStub(channels[0]),
            scheduler=scheduler_pb2_grpc.SchedulerServiceStub(channels[1]),
            monitor=monitor,
            api_keys=store,
            public_http_url=PUBLIC_URL,
        )
        auth = Authenticator(store, AuthSettings(enabled=auth_enabled, bootstrap_admin_token=ADMIN_TOKEN))
        app = management_app(backends, auth)
        try:
            async with serving(app) as url:
                yield Mesh(url=url, etcd=etcd, store=store, app=app, scheduler_app=scheduler_app)
        finally:
            for channel in channels:
                await channel.close()
            await store.stop()
            await etcd.close()


@pytest.fixture
async def mesh(etcd_settings, local_store_settings):
    async with running_mesh(etcd_settings, local_store_settings) as mesh:
        yield mesh


def expect_error(response: httpx.Response, status: int, fragment: str = "") -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert fragment.lower() in body["error"].lower(), body
    return body["error"]


async def body_stream(data: bytes, piece: int = 256 * 1024) -> AsyncIterator[bytes]:
    """A chunked (no Content-Length) request body."""
    for start in range(0, len(data), piece):
        yield data[start : start + piece]
        await asyncio.sleep(0)


async def push(client: httpx.AsyncClient, model: str, data: bytes, **params) -> httpx.Response:
    params.setdefault("create_model", "true")
    return await client.post(f"/v1/models/{model}/versions", params=params, content=body_stream(data))


# -- models ----------------------------------------------------------------------------------------


async def test_model_lifecycle_and_errors(mesh):
    async with mesh.client() as c:
        created = await c.post("/v1/models", json={"name": "fraud", "description": "d", "labels": {"team": "risk"}})
        assert created.status_code == 201, created.text
        assert created.json()["name"] == "fraud" and created.json()["labels"] == {"team": "risk"}
        expect_error(await c.post("/v1/models", json={"name": "fraud"}), 409, "exists")
        expect_error(await c.post("/v1/models", json={"name": "Bad_Name"}), 400, "name")
        expect_error(await c.post("/v1/models", json={"name": "x", "nope": 1}), 400, "nope")
        expect_error(await c.post("/v1/models", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
        lone_surrogate = b'{"name": "x", "labels": {"k": "\\ud800"}}'  # valid JSON, not encodable as UTF-8
        as_json = {"Content-Type": "application/json"}
        expect_error(await c.post("/v1/models", content=lone_surrogate, headers=as_json), 400, "labels.k")
        for name in ("alpha", "beta", "gamma"):
            labels = {"tier": "b" if name == "beta" else "a"}
            assert (await c.post("/v1/models", json={"name": name, "labels": labels})).status_code == 201

        first = (await c.get("/v1/models", params={"page_size": 2})).json()
        assert [m["name"] for m in first["models"]] == ["alpha", "beta"] and first["next_page_token"]
        second = (await c.get("/v1/models", params={"page_size": 2, "page_token": first["next_page_token"]})).json()
        assert [m["name"] for m in second["models"]] == ["fraud", "gamma"]
        if second["next_page_token"]:  # a full page may carry a token to an empty last page
            assert (await c.get("/v1/models", params={"page_token": second["next_page_token"]})).json()["models"] == []
        labelled = (await c.get("/v1/models", params={"label": "tier=a"})).json()
        assert [m["name"] for m in labelled["models"]] == ["alpha", "gamma"]
        expect_error(await c.get("/v1/models", params={"label": "no-equals"}), 400, "query.label")
        expect_error(await c.get("/v1/models", params={"page_token": "garbage!"}), 400, "page_token")
        expect_error(await c.get("/v1/models", params={"page_size": -1}), 400, "page_size")

        updated = await c.patch("/v1/models/fraud", json={"description": "new"})
        assert updated.status_code == 200 and updated.json()["description"] == "new"
        assert updated.json()["labels"] == {"team": "risk"}  # not in the patch: kept
        detail = (await c.get("/v1/models/fraud")).json()
        assert detail["description"] == "new" and detail["aliases"] == [] and detail["latest_version"] == 0

        assert (await c.delete("/v1/models/fraud")).status_code == 204
        expect_error(await c.get("/v1/models/fraud"), 404, "fraud")
        expect_error(await c.patch("/v1/models/fraud", json={"description": "x"}), 404)


# -- versions: streaming upload and download ------------------------------------------------------


async def test_streaming_upload_of_onnx_model_and_download(mesh):
    data = mlp_bytes(inputs=4, outputs=3)
    digest = hashlib.sha256(data).hexdigest()
    async with mesh.client() as c:
        expect_error(await push(c, "iris", data, create_model="false"), 404, "iris")
        uploaded = await push(c, "iris", data, sha256=digest, alias=["production"], description="first")
        assert uploaded.status_code == 201, uploaded.text
        version = uploaded.json()["version"]
        assert version["version"] == 1 and version["sha256"] == digest and version["size_bytes"] == len(data)
        assert version["format"] == "onnx" and version["state"] == "active" and version["description"] == "first"
        assert version["signature"]["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
        assert version["signature"]["outputs"][0]["shape"] == [-1, 3]

        # Same bytes again: a new version, deduplicated blob; header digest and Content-Length size checks.
        again = await c.post(
            "/v1/models/iris/versions",
            content=data,
            headers={"X-Content-SHA256": digest, "Content-Type": "application/octet-stream"},
        )
        assert again.status_code == 201 and again.json()["deduplicated"] is True and again.json()["version"]["version"] == 2

        expect_error(await push(c, "iris", data, sha256="0" * 64), 400, "sha256")
        expect_error(await push(c, "iris", data, sha256="XYZ"), 400, "sha256")
        expect_error(await push(c, "iris", data, size_bytes=len(data) + 1), 400, "size")
        expect_error(await push(c, "iris", b"definitely not onnx"), 400)
        expect_error(await push(c, "iris", b""), 400)

        listed = (await c.get("/v1/models/iris/versions")).json()
        assert [v["version"] for v in listed["versions"]] == [1, 2]
        archived = await c.post("/v1/models/iris/versions/2/archive")
        assert archived.status_code == 200 and archived.json()["state"] == "archived"
        assert [v["version"] for v in (await c.get("/v1/models/iris/versions")).json()["versions"]] == [1]
        everything = (await c.get("/v1/models/iris/versions", params={"include_archived": "true"})).json()
        assert [v["version"] for v in everything["versions"]] == [1, 2]
        expect_error(await c.post("/v1/models/iris/versions/5/archive"), 404)
        assert (await c.get("/v1/models/iris/versions/2")).json()["sha256"] == digest
        expect_error(await c.get("/v1/models/iris/versions/9"), 404)
        expect_error(await c.get("/v1/models/iris/versions/0"), 400)

        async with c.stream("GET", "/v1/models/iris/versions/1/artifact") as download:
            assert download.status_code == 200
            assert download.headers["x-content-sha256"] == digest
            assert int(download.headers["content-length"]) == len(data)
            body = b"".join([chunk async for chunk in download.aiter_bytes()])
        assert body == data
        expect_error(await c.get("/v1/models/iris/versions/7/artifact"), 404)
        assert (await c.get("/v1/models/iris/aliases/production")).json()["version"] == 1


async def test_early_registry_rejection_keeps_its_status(mesh):
    """The registry rejects the metadata (unknown model, declared size over its limit) while a large
    chunked body is still coming: the caller gets that precise error every time, never a 5xx."""
    data = b"\0" * (4 * 1024 * 1024)
    async with mesh.client() as c:
        for _ in range(5):
            expect_error(await push(c, "ghost", data, create_model="false"), 404, "ghost")
            expect_error(await push(c, "ghost", data, size_bytes=10**15), 400, "limit")


async def test_large_upload_streams_in_chunks(mesh):
    """An 9 MiB artifact sent chunked (no Content-Length): arrives intact through the 1 MiB gRPC chunks."""
    data = large_model_bytes(9 * 1024 * 1024)
    async with mesh.client() as c:
        uploaded = await push(c, "big", data, sha256=hashlib.sha256(data).hexdigest())
        assert uploaded.status_code == 201, uploaded.text
        assert uploaded.json()["version"]["size_bytes"] == len(data)
        async with c.stream("GET", "/v1/models/big/versions/1/artifact") as download:
            digest = hashlib.sha256()
            async for chunk in download.aiter_bytes():
                digest.update(chunk)
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


async def test_upload_reaches_the_store_while_the_body_is_still_arriving(mesh, local_store_settings):
    """No buffering of the whole artifact: the first 6 MiB are in the object store's partial file
    while the client still holds back the rest of the body."""
    data = large_model_bytes(12 * 1024 * 1024)
    head = 6 * 1024 * 1024
    partial_dir = local_store_settings.path / ".tmp"

    def stored_so_far() -> int:
        return sum(f.stat().st_size for f in partial_dir.glob("*.part")) if partial_dir.is_dir() else 0

    async def held_back_body() -> AsyncIterator[bytes]:
        yield data[:head]
        for _ in range(300):  # up to 15 s
            if stored_so_far() >= 2 * 1024 * 1024:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("nothing reached the store before the body ended: the upload is buffered")
        yield data[head:]

    async with mesh.client() as c:
        uploaded = await c.post("/v1/models/streamed/versions", params={"create_model": "true"}, content=held_back_body())
        assert uploaded.status_code == 201, uploaded.text
        assert uploaded.json()["version"]["sha256"] == hashlib.sha256(data).hexdigest()


async def test_upload_aborted_by_client_records_no_version(mesh):
    # What arrived before the crash is a complete, valid ONNX model: only cancelling the registry
    # call (rather than half-closing it) keeps it from being recorded as a version.
    data = mlp_bytes()

    async def dies_halfway() -> AsyncIterator[bytes]:
        yield data
        await asyncio.sleep(0.3)
        raise RuntimeError("client crashed")

    async with mesh.client() as c:
        assert (await c.post("/v1/models", json={"name": "partial"})).status_code == 201
        with pytest.raises((RuntimeError, httpx.HTTPError)):
            await c.post("/v1/models/partial/versions", content=dies_halfway())
        # The upload was cancelled, not half-closed: no version, and the server still serves.
        await asyncio.sleep(0.5)
        versions = (await c.get("/v1/models/partial/versions")).json()["versions"]
        assert versions == []
        assert (await c.get("/v1/models/partial")).json()["latest_version"] == 0


# -- aliases ---------------------------------------------------------------------------------------


async def test_aliases_with_compare_and_swap(mesh):
    async with mesh.client() as c:
        for seed in range(2):
            assert (await push(c, "fraud", mlp_bytes(seed=seed))).status_code == 201
        set_ = await c.put("/v1/models/fraud/aliases/prod", json={"version": 1, "expected_version": 0})
        assert set_.status_code == 200 and set_.json()["version"] == 1
        expect_error(await c.put("/v1/models/fraud/aliases/prod", json={"version": 2, "expected_version": 0}), 409)
        moved = await c.put("/v1/models/fraud/aliases/prod", json={"version": 2, "expected_version": 1})
        assert moved.json()["version"] == 2
        forced = await c.put("/v1/models/fraud/aliases/canary", json={"version": 1})
        assert forced.status_code == 200
        expect_error(await c.put("/v1/models/fraud/aliases/bad", json={"version": 5}), 404)
        expect_error(await c.put("/v1/models/fraud/aliases/x", json={"version": -1}), 400)
        names = [a["name"] for a in (await c.get("/v1/models/fraud/aliases")).json()["aliases"]]
        assert names == ["canary", "prod"]
        expect_error(await c.delete("/v1/models/fraud/aliases/prod", params={"expected_version": 1}), 409)
        assert (await c.delete("/v1/models/fraud/aliases/prod")).status_code == 204
        expect_error(await c.get("/v1/models/fraud/aliases/prod"), 404)


# -- deployments -----------------------------------------------------------------------------------


async def read_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict]]:
    event = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: ") :])


async def test_deployments_apply_get_list_events_delete(mesh):
    async with mesh.client() as c:
        for seed in range(2):
            assert (await push(c, "web", mlp_bytes(seed=seed))).status_code == 201
        expect_error(await c.get("/v1/deployments/web"), 404)
        expect_error(await c.get("/v1/deployments/web/events"), 404)
        expect_error(await c.put("/v1/deployments/web", json={"traffic": [{"version": 1, "weight": 60}]}), 400, "100")
        expect_error(await c.put("/v1/deployments/web", json={"traffic": [{"version": 1, "alias": "x"}]}), 400, "exactly one")
        expect_error(await c.put("/v1/deployments/web", json={"traffic": [{"version": 9, "weight": 100}]}), 404, "version 9")
        expect_error(await c.put("/v1/deployments/nope", json={}), 404)

        # Defaults: the model named like the deployment, 100% on its latest version.
        applied = await c.put("/v1/deployments/web", json={"min_replicas": 0, "max_replicas": 2})
        assert applied.status_code == 200, applied.text
        body = applied.json()
        assert body["model"] == "web" and body["traffic"] == [{"version": 2, "alias": None, "weight": 100}]
        assert body["endpoint"] == f"{PUBLIC_URL}/v2/models/web/infer"
        assert body["docs_url"] == f"{PUBLIC_URL}/docs/deployments/web"
        assert applied.headers["x-changed"] == "true"
        same = await c.put("/v1/deployments/web", json={"min_replicas": 0, "max_replicas": 2})
        assert same.headers["x-changed"] == "false" and same.json()["generation"] == body["generation"]

        assert (await c.get("/v1/deployments/web")).json()["name"] == "web"
        listed = (await c.get("/v1/deployments", params={"model": "web"})).json()
        assert [d["name"] for d in listed["deployments"]] == ["web"]
        assert (await c.get("/v1/deployments", params={"model": "other"})).json()["deployments"] == []

        async with c.stream("GET", "/v1/deployments/web/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = read_events(stream)
            kind, first = await anext(events)
            assert kind == "deployment" and first["generation"] == body["generation"]
            changed = await c.put(
                "/v1/deployments/web",
                json={
                    "traffic": [{"version": 1, "weight": 10}, {"version": 2, "weight": 90}],
                    "min_replicas": 0,
                    "max_replicas": 2,
                },
            )
            assert changed.status_code == 200, changed.text

            async def next_generation():
                async for kind, data in events:
                    if kind == "deployment" and data["generation"] > first["generation"]:
                        return data
                return None

            update = await asyncio.wait_for(next_generation(), 15)
            assert [t["weight"] for t in update["traffic"]] == [10, 90]
            assert (await c.delete("/v1/deployments/web")).status_code == 204

            async def until_deleted():
                async for kind, data in events:
                    if kind == "deleted":
                        return data
                return None

            assert await asyncio.wait_for(until_deleted(), 15) == {"name": "web"}
        expect_error(await c.get("/v1/deployments/web"), 404)
        expect_error(await c.delete("/v1/deployments/web"), 404)

        # A bounded stream ends on its own.
        assert (await c.put("/v1/deployments/web", json={"min_replicas": 0})).status_code == 200
        bounded = await asyncio.wait_for(c.get("/v1/deployments/web/events", params={"timeout_seconds": 0.3}), 10)
        assert bounded.status_code == 200 and bounded.text.startswith("event: deployment")


async def test_event_stream_reports_a_scheduler_failure_and_ends(mesh):
    async with mesh.client() as c:
        assert (await push(c, "web", mlp_bytes())).status_code == 201
        assert (await c.put("/v1/deployments/web", json={"min_replicas": 0})).status_code == 200
        async with c.stream("GET", "/v1/deployments/web/events") as stream:
            events = read_events(stream)
            assert (await anext(events))[0] == "deployment"
            await mesh.scheduler_app.grpc.stop()  # the scheduler goes away mid-stream

            async def rest():
                return [event async for event in events]

            remaining = await asyncio.wait_for(rest(), 15)
        assert remaining and remaining[-1][0] == "error" and remaining[-1][1]["error"], remaining
        expect_error(await c.get("/v1/deployments/web"), 503)


async def test_nodes_listing(mesh):
    lease = await mesh.etcd.grant_lease(30)
    node = spb.Node(
        id="n1",
        address="127.0.0.1:9",
        accelerator=tpb.ACCELERATOR_CPU,
        backends=[tpb.BACKEND_ONNXRUNTIME],
        memory_capacity_bytes=8 << 30,
    )
    await mesh.etcd.put(mesh.etcd.keys.node("n1"), to_json(node), lease=lease)
    async with mesh.client() as c:
        nodes = (await c.get("/v1/nodes")).json()["nodes"]
    assert [(n["id"], n["accelerator"], n["backends"], n["memory_capacity_bytes"]) for n in nodes] == [
        ("n1", "cpu", ["onnxruntime"], 8 << 30)
    ]


# -- metrics ---------------------------------------------------------------------------------------


class MetricsMonitor(mpb_grpc.MonitorServiceServicer):
    """A real gRPC monitor answering QueryMetrics with one sample, recording the queries."""

    def __init__(self) -> None:
        self.queries: list[mpb.QueryMetricsRequest] = []

    async def QueryMetrics(self, request, context):  # noqa: N802 - gRPC method name
        self.queries.append(request)
        sample = mpb.MetricsSample(
            model=request.model, version=1, qps=12.5, p99_latency_ms=7.0, batch_sizes={4: 10}, request_count=100
        )
        return mpb.QueryMetricsResponse(window=request.window, samples=[sample])


async def test_metrics_from_monitor_and_503_without_one(etcd_settings, local_store_settings, mesh):
    async with mesh.client() as c:
        expect_error(await c.get("/v1/metrics"), 503, "no monitor")
    monitor = MetricsMonitor()
    server = grpc.aio.server()
    mpb_grpc.add_MonitorServiceServicer_to_server(monitor, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with running_mesh(etcd_settings, local_store_settings, monitor_address=f"127.0.0.1:{port}") as other:
            async with other.client() as c:
                reply = await c.get("/v1/metrics", params={"model": "fraud", "window": "5m"})
                assert reply.status_code == 200, reply.text
                sample = reply.json()["samples"][0]
                assert reply.json()["window"] == "5m"
                got = (sample["model"], sample["qps"], sample["batch_sizes"], sample["request_count"])
                assert got == ("fraud", 12.5, {"4": 10}, 100)
                expect_error(await c.get("/v1/metrics", params={"window": "2d"}), 400, "window")
        assert monitor.queries[0].window == mpb.WINDOW_5M and monitor.queries[0].model == "fraud"
    finally:
        await server.stop(0)


# -- auth and API keys -----------------------------------------------------------------------------


async def test_api_keys_and_roles(mesh):
    async with mesh.client() as admin:
        expect_error(await admin.post("/v1/api-keys", json={"name": "x", "role": "unspecified"}), 400, "role")
        expect_error(await admin.post("/v1/api-keys", json={"name": "x", "role": "root"}), 400, "role")
        viewer = (await admin.post("/v1/api-keys", json={"name": "ci-viewer", "role": "viewer"})).json()
        developer = await admin.post("/v1/api-keys", json={"name": "dev", "role": "developer", "model_scope": ["alpha"]})
        assert developer.status_code == 201, developer.text
        developer = developer.json()
        assert viewer["token"].startswith("aimaas_") and viewer["key"]["role"] == "viewer"
        keys = (await admin.get("/v1/api-keys")).json()["keys"]
        assert {k["name"] for k in keys} == {"ci-viewer", "dev"}
        assert all("token" not in k and "secret_hash" not in k for k in keys)
        assert (await admin.post("/v1/models", json={"name": "beta"})).status_code == 201

    async with mesh.client(token=None) as anonymous:
        expect_error(await anonymous.get("/v1/models"), 401)
    async with mesh.client(token="aimaas_nope_nope") as wrong:
        expect_error(await wrong.get("/v1/models"), 401)
    async with mesh.client(token=viewer["token"]) as c:
        assert (await c.get("/v1/models")).status_code == 200
        expect_error(await c.post("/v1/models", json={"name": "gamma"}), 403, "write")
        expect_error(await c.get("/v1/api-keys"), 403, "admin")
        expect_error(await c.put("/v1/deployments/beta", json={}), 403)
    async with mesh.client(token=developer["token"]) as c:
        assert (await c.post("/v1/models", json={"name": "alpha"})).status_code == 201
        expect_error(await c.post("/v1/models", json={"name": "gamma"}), 403, "scope")
        expect_error(await c.get("/v1/models/beta"), 403, "scope")
        expect_error(await c.put("/v1/deployments/x", json={"model": "beta"}), 403, "scope")
        # Listings only show models in the key's scope.
        assert [m["name"] for m in (await c.get("/v1/models")).json()["models"]] == ["alpha"]
        expect_error(await c.post("/v1/api-keys", json={"name": "y", "role": "admin"}), 403)

    async with mesh.client() as admin:
        assert (await admin.delete(f"/v1/api-keys/{viewer['key']['id']}")).status_code == 204
        expect_error(await admin.delete("/v1/api-keys/doesnotexist"), 404)
    async with mesh.client(token=viewer["token"]) as c:
        expect_error(await c.get("/v1/models"), 401, "revoked")


async def test_role_matrix_on_management_endpoints(mesh):
    """Every role against each permission class of /v1: 2xx where the role grants it, 403 where not,
    401 without a key."""
    classes = {
        "read": ("GET", "/v1/models", None),
        "write": ("POST", "/v1/models", lambda i: {"name": f"m{i}"}),
        "admin": ("GET", "/v1/api-keys", None),
    }
    grants = {
        "admin": {"read", "write", "admin"},
        "developer": {"read", "write"},
        "invoker": {"read"},
        "viewer": {"read"},
    }
    async with mesh.client() as admin:
        tokens = {}
        for role in grants:
            created = await admin.post("/v1/api-keys", json={"name": f"{role} key", "role": role})
            assert created.status_code == 201, created.text
            tokens[role] = created.json()["token"]
    seen = 0
    for role, token in [*tokens.items(), ("anonymous", None)]:
        async with mesh.client(token=token) as c:
            for kind, (method, path, body) in classes.items():
                seen += 1
                response = await c.request(method, path, json=body(seen) if body else None)
                expected = 401 if token is None else (200 if kind in grants[role] else 403)
                if expected == 200 and method == "POST":
                    expected = 201
                assert response.status_code == expected, (role, kind, response.status_code, response.text)


async def test_backend_outage_is_503(etcd_settings, local_store_settings):
    """The registry gone: a precise 503, not a 500 or a hang."""
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    etcd = EtcdClient(etcd_settings)
    store = ApiKeyStore(etcd)
    backends = ManagementBackends(
        registry=registry_pb2_grpc.RegistryServiceStub(channel),
        scheduler=scheduler_pb2_grpc.SchedulerServiceStub(channel),
        monitor=None,
        api_keys=store,
        public_http_url=PUBLIC_URL,
        call_timeout_seconds=5,
    )
    app = management_app(backends, Authenticator(None, AuthSettings(enabled=False)))
    try:
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            expect_error(await c.get("/v1/models"), 503)
            expect_error(await c.get("/v1/deployments/web/events"), 503)
            expect_error(await c.post("/v1/models/x/versions", content=b"abc"), 503)
    finally:
        await channel.close()
        await etcd.close()


# -- docs ------------------------------------------------------------------------------------------


async def test_offline_docs_and_deployment_docs(mesh):
    async with mesh.client(token=None) as c:
        page = await c.get("/docs")
        assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
        assert "https://" not in page.text and "http://" not in page.text  # every asset is local
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
            response = await c.get(f"/docs/assets/{asset}")
            assert response.status_code == 200 and len(response.content) > 10_000, asset
        assert "/docs/assets/redoc.standalone.js" in (await c.get("/redoc")).text

        spec = (await c.get("/openapi.json")).json()
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        upload = spec["paths"]["/v1/models/{name}/versions"]["post"]
        assert "application/octet-stream" in upload["requestBody"]["content"]
        assert upload["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")

        web = await c.get("/docs/deployments/web")
        assert web.status_code == 200 and "/docs/deployments/web/openapi.json" in web.text
        filtered = (await c.get("/docs/deployments/web/openapi.json")).json()
        assert "/v1/deployments/web" in filtered["paths"] and "/v1/deployments/web/events" in filtered["paths"]
        assert all("{name}" not in path for path in filtered["paths"]) and "/v1/models" not in filtered["paths"]
        get_op = filtered["paths"]["/v1/deployments/web"]["get"]
        assert all(p["name"] != "name" for p in get_op.get("parameters", []))
        assert (await c.get("/docs/deployments/Not_A_Name")).status_code == 404


CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]


@pytest.mark.timeout(90)
async def test_docs_render_in_a_browser_without_internet(mesh):
    """Swagger UI really renders the operations from local assets: any request leaving the gateway
    is blocked and recorded (as if there were no internet)."""
    from playwright.async_api import async_playwright

    outside: list[str] = []

    async def only_gateway(route):
        if route.request.url.startswith(mesh.url):
            await route.continue_()
        else:
            outside.append(route.request.url)
            await route.abort()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.route("**/*", only_gateway)
            await page.goto(f"{mesh.url}/docs")
            await page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            paths = set(await page.locator(".opblock-summary-path").all_inner_texts())
            assert {"/v1/models", "/v1/models/{name}/versions", "/v1/deployments/{name}/events", "/v1/api-keys"} <= {
                p.replace("\u200b", "") for p in paths
            }
            assert await page.locator(".btn.authorize").count() == 1  # the Bearer scheme

            await page.goto(f"{mesh.url}/docs/deployments/web")
            await page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            texts = await page.locator(".opblock-summary-path").all_inner_texts()
            deployment_paths = {p.replace("\u200b", "") for p in texts}
            assert "/v1/deployments/web" in deployment_paths and "/v1/models" not in deployment_paths
        finally:
            await browser.close()
    assert outside == []
