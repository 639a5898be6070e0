"""`aimaas deploy | predict`: deployments and one inference, through the gateway when one runs
(else the scheduler directly and a READY replica of the deployment)."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import click
import numpy as np
from google.protobuf.json_format import MessageToDict
from rich.markup import escape

from aimaas.cli.connect import DEFAULT_STATE_DIR, Target, cli_errors, gateway_option, open_service, with_service
from aimaas.cli.output import CliError, current
from aimaas.sdk import ModelService, Traffic
from aimaas.sdk.deployments import is_ready, progress_line, ready_addresses, status_reason, status_word
from aimaas.sdk.tensors import NUMPY_DTYPES

_POLL_S = 0.2

def _to_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def scheduler_options(command: Any) -> Any:
    """--gateway, --scheduler, --state-dir and --rpc-timeout; the command gets `client` and `target`."""
    command = with_service("scheduler")(command)
    command = click.option(
        "--scheduler", metavar="HOST:PORT", help="Call this scheduler directly instead of going through the gateway.",
    )(command)  # fmt: skip
    command = click.option(
        "--state-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
        default=DEFAULT_STATE_DIR, show_default=True, help="State dir of `aimaas up` (to find the services).",
    )(command)  # fmt: skip
    command = click.option(
        "--rpc-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
        help="Deadline of each call in seconds.",
    )(command)  # fmt: skip
    return gateway_option(command)


def parse_traffic(values: tuple[str, ...]) -> list[Traffic] | None:
    """VERSION=WEIGHT or ALIAS=WEIGHT entries."""
    if not values:
        return None
    entries = []
    for value in values:
        target, sep, weight = value.rpartition("=")
        if not sep or not target or not weight.isdigit():
            raise click.BadParameter(f"{value!r} is not VERSION=WEIGHT or ALIAS=WEIGHT", param_hint="--traffic")
        if target.isdigit():
            entries.append(Traffic(int(weight), version=int(target)))
        else:
            entries.append(Traffic(int(weight), alias=target))
    return entries


@click.command()
@click.argument("model")
@click.option("--name", help="Deployment name [default: MODEL].")
@click.option("--version", "version", type=click.IntRange(min=1), help="Deploy this version.")
@click.option("--alias", help="Deploy the version this alias points at (follows the alias when it moves).")
@click.option(
    "--traffic", "traffic", multiple=True, metavar="VERSION=WEIGHT|ALIAS=WEIGHT",
    help="Traffic split entry in percent (repeatable), e.g. --traffic 1=90 --traffic canary=10.",
)  # fmt: skip
@click.option("--min", "min_replicas", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--max", "max_replicas", type=click.IntRange(min=0), help="[default: --min]")
@click.option("--accelerator", type=click.Choice(["cpu", "gpu"]), help="Run only on nodes with this accelerator.")
@click.option("--instance-type", help="Named replica size (cpu.small, gpu.medium, ...): accelerator and reserved memory.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until --min replicas are READY.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True, help="Seconds to wait.")
@click.option("--registry", metavar="HOST:PORT", help="Call this registry directly (to resolve the latest version).")
@click.option("--json", "as_json", is_flag=True, help="Print the deployment as JSON.")
@scheduler_options
def deploy(
    model: str,
    name: str | None,
    version: int | None,
    alias: str | None,
    traffic: tuple[str, ...],
    min_replicas: int,
    max_replicas: int | None,
    accelerator: str | None,
    instance_type: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
    rpc_timeout: float,
    client: ModelService,
    target: Target,
) -> None:
    """Deploy MODEL (its latest version unless --version, --alias or --traffic) and wait until it is READY."""
    err, out = current().err, current().out
    if sum(bool(x) for x in (version, alias, traffic)) > 1:
        raise click.UsageError("give at most one of --version, --alias and --traffic")
    if max_replicas is None:
        max_replicas = max(min_replicas, 1)
    if max_replicas < min_replicas:
        raise click.BadParameter(f"--max {max_replicas} is below --min {min_replicas}", param_hint="--max")
    with cli_errors(target, "registry"):
        if version is None and alias is None and not traffic:
            version = client.resolve_version(model, "latest")
    deployment = client.deploy(
        model, version, alias=alias, name=name, min_instances=min_replicas, max_instances=max_replicas,
        accelerator=accelerator, instance_type=instance_type, traffic=parse_traffic(traffic),
    )  # fmt: skip
    which = f"version {version}" if version is not None else f"alias {alias!r}" if alias else f"traffic {', '.join(traffic)}"
    err.print(
        f"applied deployment {deployment.name} ({model} {which}, generation {deployment.raw.spec.generation})",
        markup=False,
    )
    if wait:
        _wait_ready(deployment, min_replicas, timeout, err)
    raw = deployment.raw
    gateway = target.gateway is not None
    if as_json:
        document = _to_dict(raw)
        document["endpoints"] = [{"version": str(v), "address": a} for v, a in ready_addresses(raw)]
        if gateway:
            document["endpoint"] = deployment.endpoint
            document["grpc_endpoint"] = deployment.grpc_endpoint
            document["docs_url"] = deployment.docs_url
        _print_json(document)
        return
    word, reason = status_word(raw), status_reason(raw)
    out.print(f"deployment {deployment.name}: model {model} ({word}{f': {reason}' if reason else ''})", markup=False)
    for status in raw.status.versions:
        out.print(
            f"  version {status.version} weight {status.weight}%: "
            f"{status.ready_replicas}/{status.desired_replicas} replicas ready",
            markup=False,
        )
    endpoints = ready_addresses(raw)
    for served, endpoint in endpoints:
        out.print(f"  endpoint {endpoint} (replica of version {served})", markup=False)
    if gateway:
        out.print(f"  REST  {deployment.endpoint}/infer", markup=False)
        out.print(f"  gRPC  {deployment.grpc_endpoint} (model name {deployment.name})", markup=False)
        out.print(f"  docs  {deployment.docs_url}", markup=False)
    if not endpoints:
        if wait:
            out.print("  no READY replica", markup=False)
        else:
            out.print("  not waiting for replicas (--no-wait); `aimaas deploy` again or `predict` once READY", markup=False)


def _wait_ready(deployment: Any, min_replicas: int, timeout: float, err: Any) -> None:
    """Poll the deployment until every version with traffic has --min READY replicas, printing changes."""
    deadline = time.monotonic() + timeout
    last_line = None
    while True:
        line = progress_line(deployment.raw)
        if line != last_line:
            err.print(f"waiting: {escape(line)}")
            last_line = line
        if is_ready(deployment.raw, min_replicas):
            # Through a gateway: also until it routes to the replicas (its etcd watch follows shortly).
            deployment.wait_ready(max(deadline - time.monotonic(), 0.1), min_replicas)
            return
        if time.monotonic() >= deadline:
            raise CliError(f"DEADLINE_EXCEEDED: deployment {deployment.name} not ready after {timeout:g}s: {line}")
        time.sleep(_POLL_S)
        deployment.refresh()


def _parse_inputs(values: tuple[str, ...]) -> dict[str, Any]:
    parsed = {}
    for value in values:
        key, sep, data = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not NAME=JSON_ARRAY", param_hint="--input")
        try:
            parsed[key] = json.loads(data)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"{key}: {exc}", param_hint="--input") from None
    return parsed


def _random_tensor(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([b"x" * int(n) for n in rng.integers(1, 8, size=int(np.prod(shape)))], dtype=object).reshape(shape)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise CliError(f"cannot fill a {datatype} input with random data")
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def _json_values(array: np.ndarray) -> Any:
    if array.dtype == object:
        return np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b, otypes=[object])(
            array
        ).tolist() if array.size else array.tolist()
    return array.tolist()


def _truncate(array: np.ndarray, limit: int = 16) -> str:
    flat = np.asarray(_json_values(array), dtype=object).reshape(-1).tolist()
    text = ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in flat[:limit])
    return f"[{text}{', ...' if len(flat) > limit else ''}] ({len(flat)} values)"


@click.command()
@click.argument("model")
@click.option("--deployment", help="Deployment to find a READY replica in, without a gateway [default: MODEL].")
@click.option("--version", help="Model version to call [default: by the deployment's traffic split].")
@click.option("--input", "-i", "inputs", multiple=True, metavar="NAME=JSON_ARRAY", help="Input values (repeatable).")
@click.option("--text", "texts", multiple=True, help="A text for a text task model (repeatable: one batch).")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="An image file for an image task model (repeatable: one batch).")
@click.option("--random", "use_random", is_flag=True, help="Fill every input not given with random data.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size with --random.")
@click.option("--node", metavar="HOST:PORT", help="Call this inference node instead of the gateway or a replica.")
@click.option("--json", "as_json", is_flag=True, help="Print the outputs as JSON.")
@scheduler_options
def predict(
    model: str,
    deployment: str | None,
    version: str | None,
    inputs: tuple[str, ...],
    texts: tuple[str, ...],
    images: tuple[pathlib.Path, ...],
    use_random: bool,
    batch: int,
    node: str | None,
    as_json: bool,
    rpc_timeout: float,
    client: ModelService,
    target: Target,
) -> None:
    """Send one inference request for MODEL (through the gateway when one runs)."""
    out = current().out
    given = _parse_inputs(inputs)
    # Task models take BYTES `text` / `image` (aimaas.tasks).
    if texts:
        given["text"] = list(texts)
    if images:
        given["image"] = [path.read_bytes() for path in images]
    if node is None and target.gateway is None:
        found = client.get_deployment(deployment or model).raw
        wanted = int(version) if version and version.isdigit() else None
        replicas = ready_addresses(found, wanted)
        if not replicas:
            raise CliError(
                f"UNAVAILABLE: deployment {deployment or model} has no READY replica"
                + (f" of version {version}" if version else "") + f" ({progress_line(found)})"
            )
        served, node = replicas[0]
        version = version or str(served)
    via = node or target.gateway or "?"
    caller = open_service(target, rpc_timeout, inference=node) if node else client
    try:
        with cli_errors(target if node is None else Target(None, {"inference": node}), "inference"):
            signature = caller.model_metadata(model, version or "")
            unknown = set(given) - {spec.name for spec in signature.inputs}
            if unknown:
                raise click.BadParameter(f"model has no input {', '.join(sorted(unknown))}", param_hint="--input")
            rng = np.random.default_rng()
            values: dict[str, Any] = {}
            for spec in signature.inputs:
                if spec.name in given:
                    values[spec.name] = given[spec.name]
                elif use_random:
                    shape = [d if d >= 0 else 1 for d in spec.shape]
                    if shape and spec.shape[0] < 0:  # the dynamic leading dim is the batch
                        shape[0] = batch
                    values[spec.name] = _random_tensor(spec.datatype, shape, rng)
                else:
                    raise click.UsageError(f"input {spec.name!r} ({spec.datatype} {list(spec.shape)}) has no value; "
                                           "give --input NAME=JSON_ARRAY or --random")  # fmt: skip
            result = caller.infer(model, values, version=version or "")
    finally:
        if caller is not client:
            caller.close()
    outputs = [
        {"name": name, "datatype": result.datatypes.get(name, ""), "shape": list(array.shape), "data": _json_values(array)}
        for name, array in result.outputs.items()
    ]
    if as_json:
        _print_json({"model_name": result.model_name, "model_version": result.model_version, "node": via, "outputs": outputs})
        return
    out.print(f"{result.model_name} version {result.model_version} via {via}", markup=False)
    for name, array in result.outputs.items():
        out.print(f"  {name} {result.datatypes.get(name, '')} {list(array.shape)}: {_truncate(array)}", markup=False)
