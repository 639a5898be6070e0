"""`aimaas models push | import hf | list | show`: the registry from the command line."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any, TypeVar

import click
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.markup import escape
from rich.table import Table

from aimaas.cli.connect import DEFAULT_STATE_DIR, Target, gateway_option, with_service
from aimaas.cli.output import current, human_bytes
from aimaas.cli.state import service_address
from aimaas.sdk import ModelService
from aimaas.registry.v1 import registry_pb2 as pb
from aimaas.tasks import TASKS
from aimaas.types.v1 import types_pb2

FORMATS = {"auto": None, "onnx": "onnx", "tensorrt-plan": "tensorrt-plan"}

F = TypeVar("F", bound=Callable[..., Any])


def resolve_registry(explicit: str | None, state_dir: pathlib.Path) -> str:
    """--registry, else the registry recorded by `aimaas up` in the state dir, else the default port."""
    return service_address("registry", explicit, state_dir)


def registry_options(command: F) -> F:
    """--gateway, --registry, --state-dir and --timeout of every command that calls the registry; the
    command gets `client` (the SDK, through the gateway when one runs) and `target`."""
    command = with_service("registry")(command)
    command = click.option(
        "--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
        help="Deadline of each call in seconds (uploads get extra time per byte).",
    )(command)  # fmt: skip
    command = click.option(
        "--state-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
        default=DEFAULT_STATE_DIR, show_default=True, help="State dir of `aimaas up` (to find the services).",
    )(command)  # fmt: skip
    command = click.option(
        "--registry", metavar="HOST:PORT",
        help="Call this registry directly instead of going through the gateway.",
    )(command)  # fmt: skip
    return gateway_option(command)


def _consoles() -> tuple[Console, Console]:
    context = current()
    return context.out, context.err


def _to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def format_name(value: int) -> str:
    return types_pb2.ModelFormat.Name(value).removeprefix("MODEL_FORMAT_")


def state_name(value: int) -> str:
    return pb.VersionState.Name(value).removeprefix("VERSION_STATE_")


def tensor_specs(specs: Any) -> str:
    """`name FP32 [-1, 4]` per tensor, one a line."""
    return "\n".join(f"{spec.name} {spec.datatype} [{', '.join(str(d) for d in spec.shape)}]" for spec in specs)


def parse_labels(values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for value in values:
        key, sep, label = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = label
    return labels


@click.group()
def models() -> None:
    """Push, list and inspect models in the registry."""


@models.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--name", "-n", "model", required=True, help="Model name (created if it does not exist).")
@click.option("--alias", "-a", "aliases", multiple=True, help="Point this alias at the new version (repeatable).")
@click.option("--description", default="", help="Description of the version.")
@click.option("--label", "-l", "labels", multiple=True, metavar="KEY=VALUE", help="Label of the version (repeatable).")
@click.option("--format", "format_", type=click.Choice(sorted(FORMATS)), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the version as JSON.")
@registry_options
def push(
    path: pathlib.Path,
    model: str,
    aliases: tuple[str, ...],
    description: str,
    labels: tuple[str, ...],
    format_: str,
    as_json: bool,
    client: ModelService, target: Target,
) -> None:
    """Upload the artifact at PATH as a new version of a model."""
    out, err = _consoles()
    size = path.stat().st_size
    columns = (
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()
    )
    with Progress(*columns, console=err, transient=False) as progress:
        # The SDK hashes first (the registry verifies the bytes against the digest), then streams.
        uploading = progress.add_task(f"push {path.name}", total=size)
        pushed = client.push(
            path, model, aliases=aliases, description=description, labels=parse_labels(labels),
            format=FORMATS[format_], progress=lambda sent, _total: progress.update(uploading, completed=sent),
        )  # fmt: skip
    _show_pushed(pushed, aliases, as_json)


def _show_pushed(pushed: Any, aliases: tuple[str, ...], as_json: bool, note: str = "") -> None:
    out, _ = _consoles()
    if as_json:
        _print_json({"version": _to_dict(pushed.raw), "deduplicated": pushed.deduplicated})
        return
    version = pushed.raw
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("model", version.model)
    table.add_row("version", str(version.version))
    table.add_row("sha256", version.sha256)
    table.add_row("size", f"{human_bytes(version.size_bytes)} ({version.size_bytes} bytes)")
    table.add_row("format", format_name(version.format))
    if aliases:
        table.add_row("aliases", ", ".join(aliases))
    if version.HasField("task"):
        table.add_row("task", escape(task_summary(version.task)))
    table.add_row("inputs", escape(tensor_specs(version.signature.inputs)) or "-")
    table.add_row("outputs", escape(tensor_specs(version.signature.outputs)) or "-")
    if note:
        table.add_row("note", note)
    elif pushed.deduplicated:
        table.add_row("note", "identical bytes were already stored; no new blob was written")
    out.print(f"pushed {version.model} version {version.version}")
    out.print(table)


def task_summary(task: types_pb2.TaskSpec) -> str:
    """`text-classification (2 labels: negative, positive; max 512 tokens)`."""
    details = []
    if task.labels:
        shown = ", ".join(task.labels[:8]) + (", ..." if len(task.labels) > 8 else "")
        details.append(f"{len(task.labels)} labels: {shown}")
    if task.embedding_dimension:
        details.append(f"{task.embedding_dimension} dimensions")
    if task.max_length:
        details.append(f"max {task.max_length} tokens")
    if task.image_height:
        details.append(f"{task.image_width}x{task.image_height} images")
    if task.source:
        details.append(f"from {task.source}")
    return task.task + (f" ({'; '.join(details)})" if details else "")


@models.group("import")
def import_() -> None:
    """Import a model from a model hub (exported to ONNX here)."""


@import_.command("hf")
@click.argument("source")
@click.option("--name", "-n", "model", help="Model name [default: derived from SOURCE].")
@click.option("--task", type=click.Choice(TASKS), help="Task to export for [default: told by the architecture].")
@click.option("--revision", help="Hub revision (branch, tag or commit) of a hub id.")
@click.option("--alias", "-a", "aliases", multiple=True, help="Point this alias at the version (repeatable).")
@click.option("--description", default="", help="Description of the version.")
@click.option("--label", "-l", "labels", multiple=True, metavar="KEY=VALUE", help="Label of the version (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the version as JSON.")
@registry_options
def import_hf(
    source: str,
    model: str | None,
    task: str | None,
    revision: str | None,
    aliases: tuple[str, ...],
    description: str,
    labels: tuple[str, ...],
    as_json: bool,
    client: ModelService, target: Target,
) -> None:
    """Import the Hugging Face model SOURCE (a model directory, or a hub id through the local Hugging
    Face cache, HF_HOME) as a task model: exported to ONNX with its task, labels and tokenizer, then
    pushed as one version. Importing the same source again reuses the version it made."""
    _, err = _consoles()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        step = progress.add_task(f"import {source}", total=None)
        uploading = None

        def on_step(message: str) -> None:
            progress.update(step, description=f"import: {message}")

        def on_bytes(sent: int, total: int) -> None:
            nonlocal uploading
            if uploading is None:
                progress.update(step, description="import: exported", total=1, completed=1)
                uploading = progress.add_task("push", total=total)
            progress.update(uploading, completed=sent)

        pushed = client.import_huggingface(
            source, model, task=task, revision=revision, aliases=aliases, description=description,
            labels=parse_labels(labels), progress=on_bytes, steps=on_step,
        )  # fmt: skip
        progress.update(step, description="import: done", total=1, completed=1)
    note = "this source was imported before: its version is reused, nothing was exported" if pushed.deduplicated else ""
    _show_pushed(pushed, aliases, as_json, note)


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON.")
@registry_options
def list_models(as_json: bool, client: ModelService, target: Target) -> None:
    """List the models in the registry."""
    out, _ = _consoles()
    found = client.list_models()
    if as_json:
        _print_json({"models": [_to_dict(model) for model in found]})
        return
    if not found:
        out.print("no models yet (push one with `aimaas models push PATH --name NAME`)")
        return
    table = Table()
    table.add_column("model")
    table.add_column("latest version", justify="right")
    table.add_column("description", overflow="fold")
    table.add_column("labels", overflow="fold")
    table.add_column("updated")
    for model in found:
        table.add_row(
            model.name,
            str(model.latest_version) if model.latest_version else "-",
            escape(model.description),
            escape(", ".join(f"{key}={value}" for key, value in sorted(model.labels.items()))),
            model.updated.ToDatetime().isoformat(timespec="seconds") if model.HasField("updated") else "",
        )
    out.print(table)


@models.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the model, aliases and versions as JSON.")
@registry_options
def show(name: str, as_json: bool, client: ModelService, target: Target) -> None:
    """Show a model with its aliases and versions."""
    out, _ = _consoles()
    found = client.get_model(name)
    versions = client.list_versions(name)
    if as_json:
        _print_json(
            {
                "model": _to_dict(found.model),
                "aliases": [_to_dict(alias) for alias in found.aliases],
                "versions": [_to_dict(version) for version in versions],
            }
        )
        return
    model = found.model
    out.print(f"[bold]{model.name}[/]" + (f"  {escape(model.description)}" if model.description else ""))
    if model.labels:
        out.print("labels: " + ", ".join(f"{k}={v}" for k, v in sorted(model.labels.items())), markup=False)
    if found.aliases:
        out.print("aliases: " + ", ".join(f"{a.name} -> {a.version}" for a in found.aliases), markup=False)
    if not versions:
        out.print("no versions yet")
        return
    aliases_of: dict[int, list[str]] = {}
    for alias in found.aliases:
        aliases_of.setdefault(alias.version, []).append(alias.name)
    table = Table()
    table.add_column("version", justify="right")
    table.add_column("aliases")
    table.add_column("state")
    table.add_column("format")
    table.add_column("size", justify="right")
    table.add_column("sha256")
    table.add_column("inputs")
    table.add_column("outputs")
    table.add_column("created")
    for version in versions:
        table.add_row(
            str(version.version),
            ", ".join(aliases_of.get(version.version, [])),
            state_name(version.state),
            format_name(version.format) + (f"\n{version.task.task}" if version.HasField("task") else ""),
            human_bytes(version.size_bytes),
            version.sha256[:12],
            escape(tensor_specs(version.signature.inputs)),
            escape(tensor_specs(version.signature.outputs)),
            version.created.ToDatetime().isoformat(timespec="seconds") if version.HasField("created") else "",
        )
    out.print(table)
