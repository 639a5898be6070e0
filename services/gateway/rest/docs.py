"""Interactive API docs that work without internet access.

FastAPI's default /docs page loads Swagger UI from a CDN; gateways often run where no CDN is
reachable, so the Swagger UI and ReDoc assets shipped in the `fastapi-offline` package are served
from the gateway itself. Besides the whole API at /docs, each deployment has its own page
(/docs/deployments/<name>) showing only the inference and management operations of that deployment,
with the name filled in: the `docs_url` a deployment reports.
"""

from __future__ import annotations

import copy
import importlib.resources
import re
from typing import Any

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from aimaas.tasks import FEATURE_EXTRACTION
from services.gateway.rest.tasks import TaskCard, predict_schemas

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
REDOC_PATH = "/redoc"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
# Paths whose first parameter is the deployment (== model) name.
_DEPLOYMENT_PREFIXES = ("/v2/models/{", "/v1/deployments/{")
_NAME_RE = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
PREDICT_PATH = "/v1/models/{name}/predict"
EMBEDDINGS_PATH = "/v1/embeddings"
CardLookup = Callable[..., Awaitable[tuple[str, TaskCard | None]]]


def deployment_docs_path(name: str) -> str:
    """Path of a deployment's docs page (the `docs_url` of a deployment, after the public base URL)."""
    return f"{DOCS_PATH}/deployments/{name}"


def assets_directory() -> str:
    return str(importlib.resources.files("fastapi_offline") / "static")


def deployment_openapi(spec: dict[str, Any], name: str, card: TaskCard | None = None) -> dict[str, Any]:
    """The operations of one deployment: paths that start with a deployment/model parameter, with
    that parameter replaced by `name` (so "Try it out" needs no typing). For a task model (`card`)
    also its predict operation with the task's schema and a working example (and /v1/embeddings
    for a feature-extraction model); without one, predict is left out."""
    paths: dict[str, Any] = {}
    for path, item in spec.get("paths", {}).items():
        if path == PREDICT_PATH:
            if card is None:
                continue
            item = copy.deepcopy(item)
            item["post"].update(predict_schemas(card))
            prefix = "/v1/models/{"
        elif path == EMBEDDINGS_PATH:
            if card is None or card.task != FEATURE_EXTRACTION:
                continue
            item = copy.deepcopy(item)
            item["post"]["requestBody"]["content"]["application/json"]["example"] = {
                "model": name, "input": ["first text", "second text"],
            }
            paths[path] = item
            continue
        else:
            prefix = next((p for p in _DEPLOYMENT_PREFIXES if path.startswith(p)), None)
        if prefix is None:
            continue
        param = path[len(prefix) :].split("}", 1)[0]
        item = copy.deepcopy(item)
        for key, operation in item.items():
            if isinstance(operation, dict) and "parameters" in operation:
                operation["parameters"] = [
                    p for p in operation["parameters"] if not (p.get("in") == "path" and p.get("name") == param)
                ]
            if key == "parameters" and isinstance(operation, list):
                item[key] = [p for p in operation if not (p.get("in") == "path" and p.get("name") == param)]
        paths[path.replace("{" + param + "}", name, 1)] = item
    result = {key: value for key, value in spec.items() if key != "paths"}
    result["paths"] = paths
    task = f" It serves a **{card.task}** model: call `POST /v1/models/{name}/predict`." if card else ""
    result["info"] = {
        **spec.get("info", {}),
        "title": f"{name} — {spec.get('info', {}).get('title', 'API')}",
        "description": f"Inference and management operations of deployment `{name}`.{task} "
        f"The whole API is documented at {DOCS_PATH}.",
    }
    return result


def mount_docs(app: FastAPI, task_card: CardLookup | None = None) -> None:
    """Serve /docs (Swagger UI), /redoc and per-deployment pages with local assets. Replaces FastAPI's
    CDN-based pages if the app was created with them. `task_card(name)` -> (version, card) gives a
    deployment page its task schema (services.gateway.rest.tasks.TaskCatalog.card)."""
    replaced = {DOCS_PATH, REDOC_PATH, OAUTH2_REDIRECT_PATH, app.docs_url, app.redoc_url}
    replaced |= {app.swagger_ui_oauth2_redirect_url}
    replaced.discard(None)

    def is_replaced(route: Any) -> bool:
        # Included routers appear as entries without a path of their own: never removed.
        return isinstance(getattr(route, "path", None), str) and route.path in replaced

    app.router.routes[:] = [route for route in app.router.routes if not is_replaced(route)]
    app.mount(ASSETS_PATH, StaticFiles(directory=assets_directory()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    def page(request: Request, spec_url: str, title: str) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + spec_url,
            title=title,
            oauth2_redirect_url=root + OAUTH2_REDIRECT_PATH,
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
        )

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return page(request, openapi_url, f"{app.title} — API docs")

    @app.get(OAUTH2_REDIRECT_PATH, include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} — API reference",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )

    @app.get(DOCS_PATH + "/deployments/{name}", include_in_schema=False)
    async def deployment_page(request: Request, name: str) -> HTMLResponse:
        if not _NAME_RE.match(name):
            return HTMLResponse("not a deployment name", status_code=404)
        return page(request, f"{deployment_docs_path(name)}/openapi.json", f"{name} — API docs")

    @app.get(DOCS_PATH + "/deployments/{name}/openapi.json", include_in_schema=False)
    async def deployment_spec(name: str) -> JSONResponse:
        if not _NAME_RE.match(name):
            return JSONResponse({"error": f"{name!r} is not a deployment name"}, status_code=404)
        card = None
        if task_card is not None:
            try:
                _, card = await task_card(name, wait=False)  # a docs page never scales a deployment up
            except Exception:  # noqa: BLE001 - unknown or not serving yet: the generic page
                card = None
        return JSONResponse(deployment_openapi(app.openapi(), name, card))
