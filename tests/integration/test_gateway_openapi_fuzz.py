"""Property-based fuzzing of the gateway's REST API from its own OpenAPI document (schemathesis):
every operation of the REST port (/v1 management and /v2 Open Inference Protocol), bounded examples,
against a real GatewayApp in front of real registry and scheduler gRPC servers (real etcd, object
store) with auth on. Properties: no 5xx, responses conform to the documented status codes, content
types, headers and schemas, schema-violating requests are rejected, no hang (every call has a read
timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.config import SchemathesisConfig

from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from services.common.auth import Authenticator, AuthSettings
from services.common.settings import EtcdSettings, LogSettings, ObjectStoreKind, ObjectStoreSettings
from services.gateway.app import GatewayApp
from services.gateway.rest.docs import mount_docs
from services.gateway.rest.management import ManagementBackends, build_management_router
from services.gateway.settings import GatewayServerSettings, GatewaySettings
from tests.integration.test_gateway_management import ADMIN_TOKEN, PUBLIC_URL, MetricsMonitor
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry
from tests.support.scheduler import running_scheduler, scheduler_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# Operations whose 400s depend on more than the schema can say (artifact bytes that must parse as
# ONNX, traffic weights that must sum to 100, opaque page tokens): a schema-valid request may be
# rightly rejected there, so "positive data acceptance" is not a property of them.
SEMANTIC_400 = {
    "POST /v1/models/{name}/versions",
    "PUT /v1/deployments/{name}",
    "GET /v1/models",
    "GET /v1/models/{name}/versions",
    "GET /v1/deployments",
    "POST /v2/models/{model}/infer",
    "POST /v2/models/{model}/versions/{version}/infer",
    # The deployment must be a task model of the right task, its texts non-blank, its images decodable.
    "POST /v1/models/{name}/predict",
    "POST /v1/embeddings",
}
# Known deviations outside the management API, reported to their owners; each entry names the
# check it suppresses for that operation and why. Remove an entry once fixed.
KNOWN_ISSUES: dict[str, dict[str, str]] = {
    "*": {
        # Starlette answers 405 with the Allow methods of the first route that matched the path,
        # while FastAPI makes one route per method: the header lists one method of several.
        "allow_header_conformance": "framework: 405 Allow header lists one method (G1b/http_app)",
    },
    # G1b (rest/oip.py): the {version} path parameter is documented as any string, but only a
    # positive integer is accepted (a `pattern` on the parameter would make the document precise).
    **{
        f"GET /v2/models/{{model}}/versions/{{version}}{suffix}": {
            "positive_data_acceptance": "G1b: {version} documented as any string, must be a positive integer"
        }
        for suffix in ("", "/ready", "/stats")
    },
}
# Read timeout of every fuzzed call: a hang fails the test instead of stalling it (the event stream
# sends a keep-alive only every 15 s, so a stream that never ends trips this too).
CALL_TIMEOUT_SECONDS = 10


def openapi_document() -> dict[str, Any]:
    """The document of the gateway's composed HTTP app (services.gateway.http_app.build_http_app with
    the management router and docs, as GatewayApp composes it). Building the routers touches no
    backend, so the document is known at collection time: schemathesis parametrizes one test per
    operation from it, and test_served_document_is_the_fuzzed_one checks the live gateway serves it."""
    from services.gateway.http_app import build_http_app

    backends = ManagementBackends(
        registry=None, scheduler=None, monitor=None, api_keys=None, public_http_url=PUBLIC_URL  # type: ignore[arg-type]
    )
    auth = Authenticator(None, AuthSettings(bootstrap_admin_token=ADMIN_TOKEN))
    app = build_http_app(None, auth, GatewaySettings(), build_management_router(backends, auth), mount_docs)
    return app.openapi()


@dataclass
class LiveGateway:
    url: str


@contextlib.contextmanager
def live_gateway(etcd_endpoint: str, objects_dir) -> Iterator[LiveGateway]:
    """Registry, scheduler, a monitor and a real GatewayApp (`python -m services.gateway`'s
    composition) in a background event loop: schemathesis calls are blocking."""
    ready: dict[str, Any] = {}
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        etcd_settings = EtcdSettings(endpoints=etcd_endpoint, namespace=f"/fuzz-{uuid.uuid4().hex[:12]}/aimaas/v1")
        store_settings = ObjectStoreSettings(kind=ObjectStoreKind.LOCAL, path=objects_dir)
        monitor = grpc.aio.server()
        mpb_grpc.add_MonitorServiceServicer_to_server(MetricsMonitor(), monitor)
        monitor_port = monitor.add_insecure_port("127.0.0.1:0")
        await monitor.start()
        try:
            async with (
                running_registry(registry_settings(etcd_settings, store_settings)) as (registry_app, _),
                running_scheduler(scheduler_settings(etcd_settings)) as (scheduler_app, _),
            ):
                settings = GatewaySettings(
                    etcd=etcd_settings,
                    log=LogSettings(level="WARNING"),
                    gateway=GatewayServerSettings(
                        host="127.0.0.1",
                        grpc_port=0,
                        http_port=0,
                        metrics_port=-1,
                        registry_address=registry_app.grpc.address,
                        scheduler_address=scheduler_app.grpc.address,
                        monitor_address=f"127.0.0.1:{monitor_port}",
                        start_wait_seconds=1,
                        auth=AuthSettings(bootstrap_admin_token=ADMIN_TOKEN),
                    ),
                )
                gateway = GatewayApp(settings)
                await gateway.start()
                try:
                    await seed(gateway.http_url)
                    ready["url"] = gateway.http_url
                    started.set()
                    await stop.wait()
                finally:
                    await gateway.stop()
        except BaseException as exc:
            ready["error"] = exc
            started.set()
            raise
        finally:
            await monitor.stop(0)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), name="fuzz-gateway", daemon=True)
    thread.start()
    try:
        assert started.wait(60), "gateway did not start"
        if "error" in ready:
            raise ready["error"]
        yield LiveGateway(url=ready["url"])
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


async def seed(url: str) -> None:
    """The objects the OpenAPI examples name (model iris, version 1, alias production, deployment
    iris), so the explicit phase and some generated cases reach the success paths."""
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
        pushed = await c.post(
            "/v1/models/iris/versions", params={"create_model": "true", "alias": "production"}, content=mlp_bytes()
        )
        assert pushed.status_code == 201, pushed.text
        applied = await c.put("/v1/deployments/iris", json={"min_replicas": 0, "max_replicas": 1})
        assert applied.status_code == 200, applied.text


@pytest.fixture(scope="module")
def gateway(etcd_server, tmp_path_factory):
    with live_gateway(etcd_server.endpoint, tmp_path_factory.mktemp("fuzz-objects")) as live:
        yield live


# The admin token through the document's own Bearer scheme: schemathesis then knows which requests
# carry valid credentials (and still sends some without, expecting 401).
schema = schemathesis.openapi.from_dict(
    openapi_document(),
    config=SchemathesisConfig.from_dict({"auth": {"openapi": {"HTTPBearer": {"bearer": ADMIN_TOKEN}}}}),
)


def test_served_document_is_the_fuzzed_one(gateway):
    served = httpx.get(f"{gateway.url}/openapi.json", timeout=10)
    assert served.status_code == 200
    expected = openapi_document()
    assert served.json()["paths"] == expected["paths"]
    assert served.json()["components"] == expected["components"]
    paths = served.json()["paths"]
    assert "/v1/models/{name}/versions" in paths and "/v1/deployments/{name}/events" in paths
    # The deployment's docs_url page documents its inference endpoints with the name filled in.
    deployment = httpx.get(f"{gateway.url}/v1/deployments/iris", headers=AUTH, timeout=10).json()
    assert deployment["endpoint"] == f"{gateway.url}/v2/models/iris/infer"
    assert deployment["docs_url"] == f"{gateway.url}/docs/deployments/iris"
    page = httpx.get(deployment["docs_url"], timeout=10)
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    filtered = httpx.get(f"{deployment['docs_url']}/openapi.json", timeout=10).json()["paths"]
    assert "/v2/models/iris/infer" in filtered and "/v1/deployments/iris" in filtered


def excluded_checks(label: str) -> list[Any]:
    names = set(KNOWN_ISSUES["*"]) | set(KNOWN_ISSUES.get(label, {}))
    if label in SEMANTIC_400:
        names.add("positive_data_acceptance")
    return [getattr(schemathesis.checks, name) for name in sorted(names)]


@schema.parametrize()
@settings(
    max_examples=10,  # per operation: ~40 operations stay well under a minute on a loaded machine
    deadline=None,
    derandomize=True,  # the same cases on every run: CI failures reproduce
    database=None,  # nothing written to .hypothesis/ in the work tree
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_rest_api_conforms_to_its_openapi_document(case, gateway):
    case.call_and_validate(
        base_url=gateway.url,
        timeout=CALL_TIMEOUT_SECONDS,
        excluded_checks=excluded_checks(case.operation.label),
    )
