"""Placement speed: 10,000 model replicas over 1,000 simulated nodes (pure placement logic, no I/O).

Two figures, same synthetic cluster (fixed seed):
- `placer`: services.scheduler.placement.Placer placing 2,500 model versions x 4 replicas (spread,
  capability, free memory, cache preference, least loaded) — the issue's target: < 1 s;
- `planner`: one whole reconcile plan (services.scheduler.planner.plan) for 2,500 deployments of 4
  replicas on an empty cluster: alias resolution, splits, placement, assignment records and
  statuses — what a leader computes after a cold start;
- `planner_steady`: the same plan again once every replica is assigned and READY (the pass that
  runs on every change in steady state; it must write nothing).

Cluster: 800 CPU nodes (onnxruntime, 64 GiB) and 200 GPU nodes (tensorrt + onnxruntime, 128 GiB
host, 80 GiB GPU); each node caches 20 random artifacts; 10% of the models need a GPU; artifact
sizes log-uniform between 5 MiB and 1 GiB, memory estimated at 2x the artifact.

Usage: python -m bench.placement.run [--nodes 1000] [--models 2500] [--replicas 4] [--repeats 3]
       [--out bench/results/placement.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import random
import statistics
import time

from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.scheduler.placement import NodeCapacity, Placer, Pool, ReplicaRequest
from services.scheduler.planner import READY, PlannerConfig, Snapshot, Stored, plan

GiB = 1024**3
MiB = 1024**2
TARGET_SECONDS = 1.0


def cluster(nodes: int, models: int, seed: int = 7):
    rng = random.Random(seed)
    digests = [f"{i:064x}" for i in range(models)]
    sizes = [int(math.exp(rng.uniform(math.log(5 * MiB), math.log(GiB)))) for _ in range(models)]
    gpu_models = set(rng.sample(range(models), models // 10))
    node_list = []
    for i in range(nodes):
        gpu = i % 5 == 0
        node_list.append(
            spb.Node(
                id=f"node-{i:04d}",
                address=f"10.0.{i // 256}.{i % 256}:8301",
                accelerator=tpb.ACCELERATOR_GPU if gpu else tpb.ACCELERATOR_CPU,
                backends=[tpb.BACKEND_TENSORRT, tpb.BACKEND_ONNXRUNTIME] if gpu else [tpb.BACKEND_ONNXRUNTIME],
                memory_capacity_bytes=(128 if gpu else 64) * GiB,
                gpu_memory_capacity_bytes=80 * GiB if gpu else 0,
                cached_sha256=[digests[j] for j in rng.sample(range(models), 20)],
            )
        )
    return node_list, digests, sizes, gpu_models


def bench_placer(nodes, digests, sizes, gpu_models, replicas: int) -> tuple[float, int, int]:
    capacities = [
        NodeCapacity(
            id=n.id,
            backends=frozenset(n.backends),
            accelerator=n.accelerator,
            host_capacity=n.memory_capacity_bytes,
            gpu_capacity=n.gpu_memory_capacity_bytes,
            cached=frozenset(n.cached_sha256),
        )
        for n in nodes
    ]
    started = time.perf_counter()
    placer = Placer(capacities)
    placed = unplaced = 0
    for m, digest in enumerate(digests):
        gpu = m in gpu_models
        result = placer.place(
            ReplicaRequest(
                key=(f"model-{m}", 1),
                count=replicas,
                memory_bytes=sizes[m] * 2,
                backend=tpb.BACKEND_TENSORRT if gpu else tpb.BACKEND_ONNXRUNTIME,
                pool=Pool.GPU if gpu else Pool.HOST,
                sha256=digest,
                accelerator=tpb.ACCELERATOR_GPU if gpu else tpb.ACCELERATOR_CPU,
            )
        )
        placed += len(result.nodes)
        unplaced += result.unplaced
        assert len(set(result.nodes)) == len(result.nodes)  # spread
    return time.perf_counter() - started, placed, unplaced


def snapshot_for(nodes, digests, sizes, gpu_models, replicas: int) -> Snapshot:
    snapshot = Snapshot(nodes={n.id: n for n in nodes})
    for m, digest in enumerate(digests):
        model = f"model-{m}"
        snapshot.versions[(model, 1)] = rpb.ModelVersion(
            model=model, version=1, sha256=digest, size_bytes=sizes[m], format=tpb.MODEL_FORMAT_ONNX
        )
        snapshot.aliases[(model, "prod")] = 1
        spec = spb.DeploymentSpec(
            name=f"dep-{m}",
            model=model,
            traffic=[spb.TrafficTarget(alias="prod", weight=100)],
            min_replicas=replicas,
            max_replicas=replicas,
            accelerator=tpb.ACCELERATOR_GPU if m in gpu_models else tpb.ACCELERATOR_CPU,
            generation=1,
        )
        snapshot.deployments[spec.name] = Stored(spec, m + 1, m + 1)
    return snapshot


def apply(snapshot: Snapshot, result) -> None:
    """What etcd and the nodes would do with the plan: assignments stored, replicas READY."""
    for revision, (key, assignment, _) in enumerate(result.assignment_puts, start=10**6):
        snapshot.assignments[key] = Stored(assignment, revision, revision)
        snapshot.replicas[key] = spb.ReplicaStatus(
            node_id=key[0], model=key[1], version=key[2], state=READY, memory_bytes=2 * snapshot.versions[key[1:]].size_bytes
        )
    for revision, (name, status, _) in enumerate(result.status_puts, start=2 * 10**6):
        snapshot.statuses[name] = Stored(status, revision, revision)


def bench_planner(nodes, digests, sizes, gpu_models, replicas: int) -> dict:
    snapshot = snapshot_for(nodes, digests, sizes, gpu_models, replicas)
    config = PlannerConfig()
    started = time.perf_counter()
    cold = plan(snapshot, now=time.time(), leader_revision=1, config=config)
    cold_seconds = time.perf_counter() - started
    apply(snapshot, cold)
    # Statuses now see READY replicas: one pass writes them, the next must write nothing.
    apply(snapshot, plan(snapshot, now=time.time(), leader_revision=1, config=config))
    started = time.perf_counter()
    steady = plan(snapshot, now=time.time(), leader_revision=1, config=config)
    steady_seconds = time.perf_counter() - started
    return {
        "cold_seconds": cold_seconds,
        "cold_assignments": len(cold.assignment_puts),
        "steady_seconds": steady_seconds,
        "steady_writes": len(steady.assignment_puts) + len(steady.assignment_deletes) + len(steady.status_puts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--models", type=int, default=2500)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/placement.json"))
    args = parser.parse_args()

    nodes, digests, sizes, gpu_models = cluster(args.nodes, args.models)
    placer_runs = [bench_placer(nodes, digests, sizes, gpu_models, args.replicas) for _ in range(args.repeats)]
    planner_runs = [bench_planner(nodes, digests, sizes, gpu_models, args.replicas) for _ in range(args.repeats)]
    placer_seconds = [run[0] for run in placer_runs]
    result = {
        "benchmark": "placement of model replicas over simulated nodes (pure logic, no I/O)",
        "target_seconds": TARGET_SECONDS,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "nodes": args.nodes,
        "models": args.models,
        "replicas_per_model": args.replicas,
        "replicas": args.models * args.replicas,
        "repeats": args.repeats,
        "placer": {
            "seconds_median": round(statistics.median(placer_seconds), 4),
            "seconds_max": round(max(placer_seconds), 4),
            "placed": placer_runs[0][1],
            "unplaced": placer_runs[0][2],
            "replicas_per_second": round(placer_runs[0][1] / statistics.median(placer_seconds)),
        },
        "planner": {
            "cold_seconds_median": round(statistics.median(r["cold_seconds"] for r in planner_runs), 4),
            "cold_assignments": planner_runs[0]["cold_assignments"],
            "steady_seconds_median": round(statistics.median(r["steady_seconds"] for r in planner_runs), 4),
            "steady_writes": planner_runs[0]["steady_writes"],
        },
    }
    result["meets_target"] = result["placer"]["seconds_max"] < TARGET_SECONDS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
