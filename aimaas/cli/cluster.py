"""The cluster part of `aimaas status`: deployments with their replicas, and inference nodes."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.sdk import Deployment, ModelService
from aimaas.sdk.deployments import status_reason, status_word
from aimaas.types.v1 import types_pb2


# Status words (aimaas.sdk.deployments.status_word) in the status table; PENDING and others yellow.
STATUS_COLOURS = {"READY": "green", "DEGRADED": "dark_orange", "FAILED": "red"}


def _enum(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix)


def deployment_entry(deployment: Deployment, via_gateway: bool) -> dict[str, Any]:
    raw = deployment.raw
    entry: dict[str, Any] = {
        "name": raw.spec.name,
        "model": raw.spec.model,
        "status": status_word(raw),
        "status_reason": status_reason(raw),
        "min_replicas": raw.spec.min_replicas,
        "max_replicas": raw.spec.max_replicas,
        "generation": raw.spec.generation,
        "versions": [
            {
                "version": v.version,
                "weight": v.weight,
                "desired_replicas": v.desired_replicas,
                "ready_replicas": v.ready_replicas,
                "replicas": [
                    {"node_id": r.node_id, "address": r.address,
                     "state": _enum(types_pb2.ReplicaState, r.state, "REPLICA_STATE_"), "reason": r.reason}
                    for r in v.replicas
                ],  # fmt: skip
            }
            for v in raw.status.versions
        ],
    }
    if via_gateway:
        entry["endpoint"] = deployment.endpoint
        entry["docs_url"] = deployment.docs_url
    return entry


def node_entry(info: spb.NodeInfo) -> dict[str, Any]:
    node = info.node
    return {
        "id": node.id,
        "address": node.address,
        "accelerator": _enum(types_pb2.Accelerator, node.accelerator, "ACCELERATOR_"),
        "backends": [_enum(types_pb2.Backend, b, "BACKEND_") for b in node.backends],
        "replicas": [
            {"model": r.model, "version": r.version, "state": _enum(types_pb2.ReplicaState, r.state, "REPLICA_STATE_")}
            for r in info.replicas
        ],
        "memory_used_bytes": info.memory_used_bytes,
        "memory_capacity_bytes": node.memory_capacity_bytes,
    }


def cluster_document(client: ModelService, via_gateway: bool) -> dict[str, Any]:
    deployments = [deployment_entry(d, via_gateway) for d in client.list_deployments()]
    nodes = [node_entry(n) for n in client.list_nodes()]
    return {"deployments": deployments, "nodes": nodes}


def deployments_table(entries: list[dict[str, Any]]) -> Table:
    table = Table(title="deployments")
    for column in ("deployment", "model", "status", "version", "weight", "ready", "replicas"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        versions = entry["versions"] or [{"version": "-", "weight": "-", "ready_replicas": 0, "desired_replicas": 0, "replicas": []}]
        for index, version in enumerate(versions):
            replicas = "\n".join(f"{r['node_id']} {r['address']} {r['state']}" for r in version["replicas"]) or "-"
            colour = STATUS_COLOURS.get(entry["status"], "yellow")
            status = f"[{colour}]{entry['status']}[/]"
            if entry.get("status_reason") and entry["status"] != "READY":
                status += "\n" + escape(entry["status_reason"])
            table.add_row(
                entry["name"] if index == 0 else "", entry["model"] if index == 0 else "",
                status if index == 0 else "", str(version["version"]),
                f"{version['weight']}%", f"{version['ready_replicas']}/{version['desired_replicas']}", escape(replicas),
            )  # fmt: skip
    return table


def nodes_table(entries: list[dict[str, Any]]) -> Table:
    table = Table(title="inference nodes")
    for column in ("node", "address", "accelerator", "backends", "replicas", "memory used"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        replicas = "\n".join(f"{r['model']} v{r['version']} {r['state']}" for r in entry["replicas"]) or "-"
        used = entry["memory_used_bytes"] / 2**20
        table.add_row(
            escape(entry["id"]), entry["address"], entry["accelerator"], ", ".join(entry["backends"]),
            escape(replicas), f"{used:.0f} MiB",
        )  # fmt: skip
    return table
