"""`aimaas deploy | predict`: deployments on the scheduler and a direct request to a replica."""

from __future__ import annotations

import json
import pathlib
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from rich.markup import escape

from aimaas.cli.state import service_address
from aimaas.cli.models import DEFAULT_STATE_DIR, resolve_registry
from aimaas.cli.output import CliError, current, rpc_error
from aimaas.registry.v1 import registry_pb2, registry_pb2_grpc
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from aimaas.types.v1 import types_pb2

READY = types_pb2.REPLICA_STATE_READY
_POLL_S = 0.2
_PROBLEM_CONDITIONS = frozenset({"Unschedulable", "RolledBack"})

# KServe v2 datatype -> numpy dtype (little endian, as the raw contents carry them).
_NUMPY = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}  # fmt: skip


def resolve_scheduler(explicit: str | None, state_dir: pathlib.Path) -> str:
    """--scheduler, else the scheduler recorded by `aimaas up` in the state dir, else the default port."""
    return service_address("scheduler", explicit, state_dir)


@contextmanager
def _rpc_errors(address: str, what: str) -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise rpc_error(exc, address, what) from None


def _to_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def ready_addresses(deployment: spb.Deployment, version: int | None = None) -> list[tuple[int, str]]:
    """(version, address) of every READY replica, highest weight first."""
    found = []
    versions = sorted(deployment.status.versions, key=lambda v: -v.weight)
    for status in versions:
        if version is not None and status.version != version:
            continue
        for replica in status.replicas:
            if replica.state == READY and replica.address:
                found.append((status.version, replica.address))
    return found


def is_ready(deployment: spb.Deployment, min_replicas: int) -> bool:
    serving = [v for v in deployment.status.versions if v.weight > 0]
    if deployment.status.observed_generation < deployment.spec.generation or not serving:
        return False
    need = max(min_replicas, 1)
    return all(v.ready_replicas >= need for v in serving)


def progress_line(deployment: spb.Deployment) -> str:
    parts = [
        f"v{v.version} ({v.weight}%): {v.ready_replicas}/{v.desired_replicas} ready" for v in deployment.status.versions
    ]
    reasons = [
        f"{c.type}: {c.reason}" + (f" ({c.message})" if c.message else "")
        for c in deployment.status.conditions
        # Only what is wrong: a problem condition that holds, or a good one that does not.
        if c.reason and (c.status if c.type in _PROBLEM_CONDITIONS else not c.status)
    ]
    return "; ".join(parts or ["no replicas yet"]) + (" | " + "; ".join(reasons) if reasons else "")


def scheduler_options(command: Any) -> Any:
    command = click.option(
        "--scheduler", metavar="HOST:PORT",
        help="Scheduler gRPC address [default: from the state dir of `aimaas up`, else 127.0.0.1:8201].",
    )(command)  # fmt: skip
    command = click.option(
        "--state-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
        default=DEFAULT_STATE_DIR, show_default=True, help="State dir of `aimaas up` (to find the services).",
    )(command)  # fmt: skip
    command = click.option(
        "--rpc-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
        help="Deadline of each call in seconds.",
    )(command)  # fmt: skip
    return command


@click.command()
@click.argument("model")
@click.option("--name", help="Deployment name [default: MODEL].")
@click.option("--version", "version", type=click.IntRange(min=1), help="Deploy this version.")
@click.option("--alias", help="Deploy the version this alias points at (follows the alias when it moves).")
@click.option("--min", "min_replicas", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--max", "max_replicas", type=click.IntRange(min=0), help="[default: --min]")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until --min replicas are READY.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True, help="Seconds to wait.")
@click.option("--registry", metavar="HOST:PORT", help="Registry gRPC address (to resolve the latest version).")
@click.option("--json", "as_json", is_flag=True, help="Print the deployment as JSON.")
@scheduler_options
def deploy(
    model: str,
    name: str | None,
    version: int | None,
    alias: str | None,
    min_replicas: int,
    max_replicas: int | None,
    wait: bool,
    timeout: float,
    registry: str | None,
    as_json: bool,
    scheduler: str | None,
    state_dir: pathlib.Path,
    rpc_timeout: float,
) -> None:
    """Deploy MODEL (its latest version unless --version or --alias) and wait until it is READY."""
    context = current()
    out, err = context.out, context.err
    if version is not None and alias is not None:
        raise click.UsageError("give at most one of --version and --alias")
    if max_replicas is None:
        max_replicas = max(min_replicas, 1)
    if max_replicas < min_replicas:
        raise click.BadParameter(f"--max {max_replicas} is below --min {min_replicas}", param_hint="--max")
    if version is None and alias is None:
        registry_address = resolve_registry(registry, state_dir)
        with grpc.insecure_channel(registry_address) as channel, _rpc_errors(registry_address, "the registry"):
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            resolved = stub.ResolveVersion(
                registry_pb2.ResolveVersionRequest(model=model, reference="latest"), timeout=rpc_timeout
            )
            version = resolved.version.version
    target = spb.TrafficTarget(weight=100, version=version) if alias is None else spb.TrafficTarget(weight=100, alias=alias)
    spec = spb.DeploymentSpec(
        name=name or model, model=model, traffic=[target], min_replicas=min_replicas, max_replicas=max_replicas
    )
    address = resolve_scheduler(scheduler, state_dir)
    with grpc.insecure_channel(address) as channel, _rpc_errors(address, "the scheduler"):
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        applied = stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec), timeout=rpc_timeout)
        deployment = applied.deployment
        which = f"version {version}" if alias is None else f"alias {alias!r}"
        err.print(
            f"applied deployment {spec.name} ({model} {which}, generation {deployment.spec.generation}"
            + ("" if applied.changed else ", unchanged") + ")",
            markup=False,
        )
        if wait:
            deployment = _wait_ready(stub, spec.name, min_replicas, timeout, rpc_timeout, err)
    if as_json:
        document = _to_dict(deployment)
        document["endpoints"] = [{"version": str(v), "address": a} for v, a in ready_addresses(deployment)]
        _print_json(document)
        return
    out.print(f"deployment {spec.name}: model {model}", markup=False)
    for status in deployment.status.versions:
        out.print(
            f"  version {status.version} weight {status.weight}%: "
            f"{status.ready_replicas}/{status.desired_replicas} replicas ready",
            markup=False,
        )
    endpoints = ready_addresses(deployment)
    if endpoints:
        for served, endpoint in endpoints:
            out.print(f"  endpoint {endpoint} (version {served})", markup=False)
    elif wait:
        out.print("  no READY replica", markup=False)
    else:
        out.print("  not waiting for replicas (--no-wait); `aimaas deploy` again or `predict` once READY", markup=False)


def _wait_ready(
    stub: scheduler_pb2_grpc.SchedulerServiceStub, name: str, min_replicas: int, timeout: float, rpc_timeout: float, err: Any
) -> spb.Deployment:
    """Poll GetDeployment until every version with traffic has --min READY replicas."""
    deadline = time.monotonic() + timeout
    last_line = None
    while True:
        deployment = stub.GetDeployment(
            spb.GetDeploymentRequest(name=name), timeout=min(rpc_timeout, max(deadline - time.monotonic(), 0.1))
        ).deployment
        line = progress_line(deployment)
        if line != last_line:
            err.print(f"waiting: {escape(line)}")
            last_line = line
        if is_ready(deployment, min_replicas):
            return deployment
        if time.monotonic() >= deadline:
            raise CliError(f"DEADLINE_EXCEEDED: deployment {name} not ready after {timeout:g}s: {line}")
        time.sleep(_POLL_S)


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
    dtype = _NUMPY.get(datatype)
    if dtype is None:
        raise CliError(f"cannot fill a {datatype} input with random data")
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=_NUMPY[datatype]).tobytes()


def _decode(raw: bytes, datatype: str, shape: list[int]) -> list[Any]:
    if datatype == "BYTES":
        items, offset = [], 0
        while offset + 4 <= len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4 : offset + 4 + length].decode("utf-8", "replace"))
            offset += 4 + length
        return items
    return np.frombuffer(raw, dtype=_NUMPY[datatype]).reshape(shape).tolist()


def _typed_values(tensor: Any) -> list[Any]:
    contents = tensor.contents
    for field in ("fp32_contents", "fp64_contents", "int_contents", "int64_contents", "uint_contents",
                  "uint64_contents", "bool_contents"):  # fmt: skip
        values = list(getattr(contents, field))
        if values:
            return values
    return [b.decode("utf-8", "replace") for b in contents.bytes_contents]


def _truncate(values: list[Any], limit: int = 16) -> str:
    flat = np.asarray(values, dtype=object).reshape(-1).tolist() if values else []
    text = ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in flat[:limit])
    return f"[{text}{', ...' if len(flat) > limit else ''}] ({len(flat)} values)"


@click.command()
@click.argument("model")
@click.option("--deployment", help="Deployment to find a READY replica in [default: MODEL].")
@click.option("--version", help="Model version to call [default: the replica's].")
@click.option("--input", "-i", "inputs", multiple=True, metavar="NAME=JSON_ARRAY", help="Input values (repeatable).")
@click.option("--random", "use_random", is_flag=True, help="Fill every input not given with random data.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size with --random.")
@click.option("--node", metavar="HOST:PORT", help="Call this inference node instead of a replica of the deployment.")
@click.option("--json", "as_json", is_flag=True, help="Print the outputs as JSON.")
@scheduler_options
def predict(
    model: str,
    deployment: str | None,
    version: str | None,
    inputs: tuple[str, ...],
    use_random: bool,
    batch: int,
    node: str | None,
    as_json: bool,
    scheduler: str | None,
    state_dir: pathlib.Path,
    rpc_timeout: float,
) -> None:
    """Send one inference request for MODEL straight to a READY replica."""
    from inference import grpc_predict_v2_pb2 as pb
    from inference import grpc_predict_v2_pb2_grpc

    out = current().out
    given = _parse_inputs(inputs)
    if node is None:
        address = resolve_scheduler(scheduler, state_dir)
        with grpc.insecure_channel(address) as channel, _rpc_errors(address, "the scheduler"):
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            found = stub.GetDeployment(
                spb.GetDeploymentRequest(name=deployment or model), timeout=rpc_timeout
            ).deployment
        wanted = int(version) if version and version.isdigit() else None
        replicas = ready_addresses(found, wanted)
        if not replicas:
            raise CliError(
                f"UNAVAILABLE: deployment {deployment or model} has no READY replica"
                + (f" of version {version}" if version else "") + f" ({progress_line(found)})"
            )
        served, node = replicas[0]
        version = version or str(served)
    with grpc.insecure_channel(node) as channel, _rpc_errors(node, "the inference node"):
        stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(
            pb.ModelMetadataRequest(name=model, version=version or ""), timeout=rpc_timeout
        )
        request = pb.ModelInferRequest(model_name=model, model_version=version or "")
        rng = np.random.default_rng()
        for spec in metadata.inputs:
            if spec.name in given:
                array = np.asarray(given[spec.name], dtype=object if spec.datatype == "BYTES" else _NUMPY.get(spec.datatype))
                if spec.datatype == "BYTES":
                    array = np.vectorize(lambda s: s.encode() if isinstance(s, str) else s, otypes=[object])(array)
            elif use_random:
                shape = [d if d >= 0 else 1 for d in spec.shape]
                if shape and spec.shape[0] < 0:  # the dynamic leading dim is the batch
                    shape[0] = batch
                array = _random_tensor(spec.datatype, shape, rng)
            else:
                raise click.UsageError(f"input {spec.name!r} ({spec.datatype} {list(spec.shape)}) has no value; "
                                       "give --input NAME=JSON_ARRAY or --random")  # fmt: skip
            request.inputs.append(
                pb.ModelInferRequest.InferInputTensor(name=spec.name, datatype=spec.datatype, shape=list(array.shape))
            )
            request.raw_input_contents.append(_raw(array, spec.datatype))
        unknown = set(given) - {spec.name for spec in metadata.inputs}
        if unknown:
            raise click.BadParameter(f"model has no input {', '.join(sorted(unknown))}", param_hint="--input")
        response = stub.ModelInfer(request, timeout=rpc_timeout)
    outputs = []
    for index, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if index < len(response.raw_output_contents):
            values = _decode(response.raw_output_contents[index], tensor.datatype, shape)
        else:
            values = _typed_values(tensor)
        outputs.append({"name": tensor.name, "datatype": tensor.datatype, "shape": shape, "data": values})
    if as_json:
        _print_json(
            {"model_name": response.model_name, "model_version": response.model_version, "node": node, "outputs": outputs}
        )
        return
    out.print(f"{response.model_name} version {response.model_version} on {node}", markup=False)
    for output in outputs:
        out.print(f"  {output['name']} {output['datatype']} {output['shape']}: {_truncate(output['data'])}", markup=False)
