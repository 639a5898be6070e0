"""Pure placement: capability, memory, spread, cache preference, least loaded, reasons, speed."""

from __future__ import annotations

import time

import pytest

from aimaas.types.v1 import types_pb2 as tpb
from services.scheduler.placement import NodeCapacity, Placer, Pool, ReplicaRequest

GiB = 1024**3
ORT, TRT = tpb.BACKEND_ONNXRUNTIME, tpb.BACKEND_TENSORRT


def cpu(node_id: str, capacity: int = 8 * GiB, used: int = 0, **fields) -> NodeCapacity:
    return NodeCapacity(id=node_id, backends=frozenset({ORT}), host_capacity=capacity, host_used=used, **fields)


def gpu(node_id: str, gpu_capacity: int = 16 * GiB, gpu_used: int = 0, **fields) -> NodeCapacity:
    return NodeCapacity(
        id=node_id,
        backends=frozenset({ORT, TRT}),
        accelerator=tpb.ACCELERATOR_GPU,
        host_capacity=64 * GiB,
        gpu_capacity=gpu_capacity,
        gpu_used=gpu_used,
        **fields,
    )


def request(count: int = 1, memory: int = GiB, **fields) -> ReplicaRequest:
    return ReplicaRequest(key=("m", 1), count=count, memory_bytes=memory, **fields)


def test_spreads_replicas_over_distinct_nodes_least_loaded_first():
    placer = Placer([cpu("a", used=4 * GiB), cpu("b", used=1 * GiB), cpu("c", used=2 * GiB)])
    result = placer.place(request(count=2, backend=ORT))
    assert result.nodes == ["b", "c"] and result.unplaced == 0
    # The view is updated: b now holds 2 GiB more.
    assert placer.node("b").host_used == 2 * GiB
    assert placer.node("b").replicas == 1


def test_prefers_nodes_that_cache_the_artifact():
    placer = Placer([cpu("a"), cpu("b", used=6 * GiB, cached=frozenset({"d" * 64}))])
    assert placer.place(request(backend=ORT, sha256="d" * 64)).nodes == ["b"]
    # ...but not when it lacks memory for the replica.
    placer = Placer([cpu("a"), cpu("b", used=7.5 * GiB, cached=frozenset({"d" * 64}))])
    assert placer.place(request(backend=ORT, sha256="d" * 64)).nodes == ["a"]


def test_filters_by_free_memory_and_says_why():
    placer = Placer([cpu("a", used=7 * GiB), cpu("b", used=7.5 * GiB)])
    result = placer.place(request(memory=2 * GiB, backend=ORT))
    assert result.nodes == [] and result.unplaced == 1
    assert result.reason == "InsufficientMemory"
    assert placer.place(request(memory=GiB // 2, backend=ORT)).nodes == ["a"]


def test_tensorrt_only_on_tensorrt_nodes_and_gpu_memory():
    placer = Placer([cpu("a"), gpu("g1", gpu_used=15 * GiB), gpu("g2")])
    result = placer.place(request(count=2, memory=2 * GiB, backend=TRT, pool=Pool.GPU, accelerator=tpb.ACCELERATOR_GPU))
    # g1 has no GPU memory left; the CPU node cannot run TensorRT at all.
    assert result.nodes == ["g2"] and result.unplaced == 1 and result.reason == "InsufficientMemory"


@pytest.mark.parametrize(
    ("backend", "accelerator", "reason"),
    [
        (TRT, tpb.ACCELERATOR_GPU, "NoGpuNodes"),
        (TRT, tpb.ACCELERATOR_UNSPECIFIED, "NoTensorRTNodes"),
    ],
)
def test_no_capable_node(backend, accelerator, reason):
    result = Placer([cpu("a"), cpu("b")]).place(request(backend=backend, pool=Pool.GPU, accelerator=accelerator))
    assert result.nodes == [] and result.reason == reason


def test_no_nodes_at_all():
    assert Placer([]).place(request()).reason == "NoNodes"


def test_spread_limit_and_exclusions():
    placer = Placer([cpu("a"), cpu("b"), cpu("c")])
    result = placer.place(request(count=3, backend=ORT, exclude=frozenset({"a"})))
    assert sorted(result.nodes) == ["b", "c"] and result.unplaced == 1
    assert result.reason == "NotEnoughNodes"


def test_nodes_on_probation_get_nothing_new():
    placer = Placer([cpu("a", schedulable=False), cpu("b")])
    assert placer.place(request(count=2, backend=ORT)).nodes == ["b"]
    placer = Placer([cpu("a", schedulable=False, cached=frozenset({"x" * 64}))])
    result = placer.place(request(backend=ORT, sha256="x" * 64))
    assert result.nodes == [] and result.reason == "NotEnoughNodes" and "1 on probation" in result.message


def test_unknown_gpu_capacity_never_refuses():
    placer = Placer([gpu("g", gpu_capacity=0)])
    assert placer.place(request(memory=100 * GiB, backend=TRT, pool=Pool.GPU)).nodes == ["g"]


def test_any_backend_uses_every_node_and_balances():
    placer = Placer([cpu(f"n{i}") for i in range(4)])
    for version in range(8):
        placer.place(ReplicaRequest(key=("m", version + 1), count=1, memory_bytes=GiB))
    assert sorted(node.replicas for node in placer.nodes) == [2, 2, 2, 2]


def test_ten_thousand_replicas_over_a_thousand_nodes_is_fast():
    nodes = [cpu(f"n{i:04d}", capacity=64 * GiB) if i % 5 else gpu(f"n{i:04d}") for i in range(1000)]
    started = time.perf_counter()
    placer = Placer(nodes)
    placed = 0
    for model in range(2500):
        needs_gpu = model % 10 == 0
        result = placer.place(
            ReplicaRequest(
                key=(f"m{model}", 1),
                count=4,
                memory_bytes=256 * 1024**2,
                backend=TRT if needs_gpu else ORT,
                pool=Pool.GPU if needs_gpu else Pool.HOST,
            )
        )
        placed += len(result.nodes)
    elapsed = time.perf_counter() - started
    assert placed == 10_000
    assert elapsed < 1.0, elapsed
