"""How a CLI command reaches the mesh: through the gateway when one runs, else service by service.

The gateway is the public edge, so commands go through it whenever it is known (explicit
--gateway, or recorded by `aimaas up` in the state dir). A mesh without a gateway (or an explicit
--registry / --scheduler) is called service by service with the same SDK.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click
import grpc

from aimaas.cli.output import CliError, current
from aimaas.cli.ports import DEFAULT_PORTS, LOOPBACK
from aimaas.cli.state import StateError, load_state, read_admin_token, service_address
from aimaas.sdk import AimaasError, ModelService

DEFAULT_STATE_DIR = pathlib.Path(".aimaas")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Target:
    # Gateway gRPC address, or None: call the services directly.
    gateway: str | None
    # Direct addresses: every service without a gateway, or explicit overrides beside it.
    direct: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    http_url: str | None = None

    def address_of(self, service: str) -> str:
        return self.direct.get(service) or self.gateway or "?"

    def describe(self, service: str) -> str:
        if service in self.direct or self.gateway is None:
            return f"the {service}"
        return "the gateway"


def resolve_target(
    state_dir: pathlib.Path,
    *,
    gateway: str | None = None,
    registry: str | None = None,
    scheduler: str | None = None,
) -> Target:
    env = current().env
    try:
        state = load_state(state_dir.resolve())
    except StateError:
        state = None
    api_key = env.get("AIMAAS_API_KEY") or read_admin_token(state_dir.resolve())
    direct = {name: address for name, address in (("registry", registry), ("scheduler", scheduler)) if address}
    http_url = None
    if gateway is None and state is not None:
        record = state.find("gateway")
        if record is not None:
            gateway = record.endpoints["grpc"]
            if "http" in record.endpoints:
                http_url = f"http://{record.endpoints['http']}"
    if gateway is None and state is None:
        gateway = env.get("AIMAAS_ENDPOINT") or f"{LOOPBACK}:{DEFAULT_PORTS['gateway']['grpc']}"
    if gateway is None:
        for name in ("registry", "scheduler"):
            direct.setdefault(name, service_address(name, None, state_dir))
    return Target(gateway, direct, api_key, http_url)


def open_service(target: Target, timeout: float, inference: str | None = None) -> ModelService:
    endpoints = dict(target.direct)
    if inference is not None:
        endpoints["inference"] = inference
    # Without a gateway the endpoint is only a placeholder for services that are not given.
    endpoint = target.gateway or endpoints.get("registry") or endpoints.get("scheduler")
    try:
        return ModelService(
            endpoint, target.api_key, timeout=timeout, http_url=target.http_url, _service_endpoints=endpoints,
            _gateway=target.gateway is not None,
        )  # fmt: skip
    except AimaasError as exc:
        raise CliError(f"{exc.status()}: {exc.message()}") from None


def sdk_error(exc: AimaasError, target: Target, service: str) -> CliError:
    """`<STATUS>: <message>`, with a hint when the server is not there at all."""
    message = f"{exc.status()}: {exc.message()}"
    if exc.code is grpc.StatusCode.UNAVAILABLE:
        message += (
            f"\nhint: is {target.describe(service)} running at {target.address_of(service)}? "
            "(`aimaas up` starts the local mesh)"
        )
    elif exc.code is grpc.StatusCode.UNAUTHENTICATED:
        message += "\nhint: set AIMAAS_API_KEY to an API key (`aimaas keys create`)"
    return CliError(message)


@contextmanager
def cli_errors(target: Target, service: str) -> Iterator[None]:
    try:
        yield
    except AimaasError as exc:
        raise sdk_error(exc, target, service) from None


def gateway_option(command: F) -> F:
    return click.option(
        "--gateway", metavar="HOST:PORT",
        help="Gateway gRPC address [default: from the state dir of `aimaas up`, else $AIMAAS_ENDPOINT "
        "or 127.0.0.1:8001]. The API key comes from $AIMAAS_API_KEY, else the state dir.",
    )(command)  # fmt: skip


def with_service(service: str) -> Callable[[F], F]:
    """Wraps a command taking `client: ModelService` and `target: Target` from --gateway, --registry/
    --scheduler, --state-dir and a timeout option (`timeout` or `rpc_timeout`)."""

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(
            *args: Any,
            gateway: str | None,
            state_dir: pathlib.Path,
            registry: str | None = None,
            scheduler: str | None = None,
            **kwargs: Any,
        ) -> Any:
            # Per-call deadline: --rpc-timeout where a command has one (its --timeout is a wait), else --timeout.
            timeout = kwargs["rpc_timeout"] if "rpc_timeout" in kwargs else kwargs.pop("timeout", 30.0)
            target = resolve_target(state_dir, gateway=gateway, registry=registry, scheduler=scheduler)
            client = open_service(target, timeout)
            try:
                with cli_errors(target, service):
                    return command(*args, client=client, target=target, **kwargs)
            finally:
                client.close()

        return wrapper  # type: ignore[return-value]

    return decorate
