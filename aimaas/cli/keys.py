"""`aimaas keys create | list | revoke`: API keys on the gateway (admin only)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import click
from google.protobuf.json_format import MessageToDict
from rich.table import Table

from aimaas.auth.v1 import auth_pb2
from aimaas.cli.connect import DEFAULT_STATE_DIR, Target, gateway_option, with_service
from aimaas.cli.output import CliError, current
from aimaas.sdk import ModelService
from aimaas.sdk.service import ROLES


def key_options(command: Any) -> Any:
    command = with_service("auth")(command)
    command = click.option(
        "--state-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
        default=DEFAULT_STATE_DIR, show_default=True, help="State dir of `aimaas up` (to find the gateway).",
    )(command)  # fmt: skip
    command = click.option(
        "--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True, help="Deadline of each call.",
    )(command)  # fmt: skip
    return gateway_option(command)


def _require_gateway(target: Target) -> None:
    if target.gateway is None:
        raise CliError("API keys live behind the gateway, and this mesh has none; start one with `aimaas up`")


def _key_dict(key: auth_pb2.ApiKey) -> dict[str, Any]:
    document = MessageToDict(key, preserving_proto_field_name=True)
    document.pop("secret_hash", None)
    return document


@click.group()
def keys() -> None:
    """Create, list and revoke API keys (admin)."""


@keys.command()
@click.argument("name")
@click.option("--role", type=click.Choice(sorted(ROLES)), required=True, help="What the key may do.")
@click.option("--model", "models", multiple=True, help="Limit the key to this model (repeatable) [default: all].")
@click.option("--ttl", type=click.IntRange(min=0), default=0, show_default=True, help="Seconds until it expires (0: never).")
@click.option("--json", "as_json", is_flag=True, help="Print the key and its token as JSON.")
@key_options
def create(
    name: str, role: str, models: tuple[str, ...], ttl: int, as_json: bool, client: ModelService, target: Target
) -> None:
    """Create an API key NAME; its token is printed once and never again."""
    _require_gateway(target)
    key, token = client.create_api_key(name, role, models, ttl)
    if as_json:
        click.echo(json.dumps({"key": _key_dict(key), "token": token}, indent=2, sort_keys=True))
        return
    context = current()
    context.out.print(token, markup=False)
    context.err.print(
        f"created key {key.id} ({name}, {role}); the token above is shown only now: store it "
        "(clients send it as `Authorization: Bearer <token>`, the SDK and CLI read $AIMAAS_API_KEY)",
        markup=False,
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the keys as JSON.")
@key_options
def list_keys(as_json: bool, client: ModelService, target: Target) -> None:
    """List API keys (never their secrets)."""
    _require_gateway(target)
    found = client.list_api_keys()
    if as_json:
        click.echo(json.dumps({"keys": [_key_dict(key) for key in found]}, indent=2, sort_keys=True))
        return
    out = current().out
    if not found:
        out.print("no API keys (create one with `aimaas keys create NAME --role ROLE`)")
        return
    table = Table()
    for column in ("id", "name", "role", "models", "created", "expires"):
        table.add_column(column)
    for key in found:
        table.add_row(
            key.id, key.name, auth_pb2.Role.Name(key.role).removeprefix("ROLE_").lower(),
            ", ".join(key.model_scope) or "all",
            key.created.ToDatetime().isoformat(timespec="seconds") if key.HasField("created") else "",
            key.expires.ToDatetime().isoformat(timespec="seconds") if key.HasField("expires") else "never",
        )  # fmt: skip
    out.print(table)


@keys.command()
@click.argument("key_id")
@key_options
def revoke(key_id: str, client: ModelService, target: Target) -> None:
    """Revoke the API key KEY_ID; requests with its token fail from now on."""
    _require_gateway(target)
    client.revoke_api_key(key_id)
    current().out.print(f"revoked key {key_id}", markup=False)
