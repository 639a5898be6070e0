"""`aimaas`: the command line of AIMaaS (local mesh launcher and registry client)."""

from __future__ import annotations

import json
import pathlib

import click

from aimaas.cli.cluster import cluster_document, deployments_table, nodes_table
from aimaas.cli.connect import gateway_option, open_service, resolve_target, sdk_error
from aimaas.cli.deploy import deploy, predict
from aimaas.cli.keys import keys
from aimaas.cli.environment import CliEnvironment, InvalidEnvironment
from aimaas.cli.mesh import Mesh, UpOptions, status_table
from aimaas.cli.models import DEFAULT_STATE_DIR, models
from aimaas.cli.output import CliContext, CliError, current, make_console
from aimaas.cli.ports import MAX_INFERENCE_NODES, SERVICE_NAMES
from aimaas.sdk import AimaasError

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Where the mesh keeps its state file, logs, etcd data and local objects.",
)


def _mesh() -> Mesh:
    context = current()
    return Mesh(context.env, context.out, context.err)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aimaas")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """AIMaaS: push, deploy and serve models over the Open Inference Protocol."""
    # The composition root: the environment is read here once and handed down.
    ctx.obj = CliContext(CliEnvironment.capture(), make_console(), make_console(stderr=True))


@cli.command()
@state_dir_option
@click.option(
    "--etcd-endpoint", metavar="HOST:PORT",
    help="Use this running etcd instead of starting one [default: $AIMAAS_ETCD__ENDPOINTS].",
)  # fmt: skip
@click.option(
    "--s3-endpoint", metavar="HOST:PORT",
    help="Store objects in this S3 server instead of <state-dir>/objects (keys from "
    "$AIMAAS_OBJECT_STORE__ACCESS_KEY / $AIMAAS_OBJECT_STORE__SECRET_KEY).",
)  # fmt: skip
@click.option("--s3-bucket", help="Bucket on --s3-endpoint [default: aimaas].")
@click.option(
    "--base-port-offset", type=int, default=0, show_default=True,
    help="Add N to every default port (etcd included), to run beside another mesh.",
)  # fmt: skip
@click.option(
    "--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
    help="Seconds each process may take to become healthy.",
)  # fmt: skip
@click.option(
    "--inference-nodes", type=click.IntRange(1, MAX_INFERENCE_NODES), default=1, show_default=True,
    help="Inference node processes to start (replicas of a version go to distinct nodes).",
)  # fmt: skip
@click.option(
    "--auth/--no-auth", default=False, show_default=True,
    help="Make the gateway check API keys; a bootstrap admin token is printed and kept in the state dir.",
)  # fmt: skip
@click.option(
    "--without", multiple=True, type=click.Choice(SERVICE_NAMES),
    help="Do not start this service (repeatable), e.g. to run your own build of it.",
)  # fmt: skip
def up(
    state_dir: pathlib.Path,
    etcd_endpoint: str | None,
    s3_endpoint: str | None,
    s3_bucket: str | None,
    base_port_offset: int,
    timeout: float,
    inference_nodes: int,
    auth: bool,
    without: tuple[str, ...],
) -> None:
    """Start etcd, the object store and every service (registry, monitor, scheduler, inference
    nodes, gateway) on loopback, detached."""
    options = UpOptions(
        state_dir, etcd_endpoint, s3_endpoint, s3_bucket, base_port_offset, timeout, inference_nodes, auth,
        frozenset(without),
    )
    try:
        _mesh().up(options)
    except InvalidEnvironment as exc:
        raise CliError(str(exc)) from None


@cli.command()
@state_dir_option
@click.option(
    "--grace", type=click.FloatRange(min=0), default=15.0, show_default=True,
    help="Seconds to wait after SIGTERM before SIGKILL.",
)  # fmt: skip
def down(state_dir: pathlib.Path, grace: float) -> None:
    """Stop every process of the mesh (services first, etcd last); data stays."""
    _mesh().down(state_dir, grace)


@cli.command()
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts and tests).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="Seconds per health probe.")
@gateway_option
def status(state_dir: pathlib.Path, as_json: bool, timeout: float, gateway: str | None) -> None:
    """Show the mesh processes (pid, endpoints, health), the deployments with their replicas, and the
    inference nodes (exit code 0 even when unhealthy)."""
    document = _mesh().status(state_dir, timeout)
    if document["processes"] or gateway:
        target = resolve_target(state_dir, gateway=gateway)
        client = open_service(target, max(timeout, 5.0))
        try:
            document.update(cluster_document(client, target.gateway is not None))
        except AimaasError as exc:
            # Processes are still worth showing when the control plane does not answer.
            document["cluster_error"] = str(sdk_error(exc, target, "scheduler").format_message())
        finally:
            client.close()
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    out = current().out
    if not document["processes"]:
        out.print(f"not running (no mesh state in {document['state_dir']}); start it with `aimaas up`", markup=False)
    else:
        out.print(f"aimaas mesh in {document['state_dir']}", markup=False)
        out.print(status_table(document))
    if "cluster_error" in document:
        out.print(f"deployments and nodes unavailable: {document['cluster_error']}", markup=False)
    if "deployments" in document:
        if document["deployments"]:
            out.print(deployments_table(document["deployments"]))
        else:
            out.print("no deployments (`aimaas deploy MODEL`)", markup=False)
        out.print(nodes_table(document["nodes"]))


cli.add_command(models)
cli.add_command(keys)
cli.add_command(deploy)
cli.add_command(predict)


def main() -> None:
    cli(prog_name="aimaas")
