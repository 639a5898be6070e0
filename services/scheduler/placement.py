"""Pure placement: which nodes receive new replicas. No I/O, no clock, no etcd.

A `Placer` holds a view of the cluster (capacity and memory use per node) and places requests one
after another, updating its view as it goes, so a whole reconcile pass places every deployment
against one consistent picture.

Rules, in order:
1. capability: the node has the backend the replica needs (a TensorRT plan, or a deployment that
   asks for a GPU, needs `tensorrt`; a CPU deployment needs `onnxruntime`; otherwise any backend),
   and is schedulable (not on probation after flapping);
2. spread: replicas of one version go to distinct nodes (the caller excludes nodes that already host
   the version);
3. free memory: capacity minus the measured memory of loaded replicas (estimates for loads not
   measured yet) must hold the replica's memory estimate;
4. preference: nodes that already cache the artifact first, then the least loaded (memory use
   fraction, then replica count).

Data structures (see bench/placement): one binary heap of nodes per capability class, keyed by load,
with lazy invalidation (a stamp per node), and an index digest → nodes caching it. Placing k
replicas costs O(k log n) plus the nodes skipped for spread or memory, not a scan of every node.

Eviction of idle replicas (density) is decided by the planner, which knows which replicas are idle;
the placer only offers the primitives it needs (`eligible`, `release`, `add_usage`), used on the
insufficient-memory path alone, so the common path stays as fast as before.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from aimaas.types.v1 import types_pb2 as tpb

ANY_BACKEND = tpb.BACKEND_UNSPECIFIED


class Pool(StrEnum):
    """Which memory a replica uses: host RAM, or the GPU's (TensorRT engines)."""

    HOST = "host"
    GPU = "gpu"


@dataclass(slots=True)
class NodeCapacity:
    id: str
    backends: frozenset[int]
    accelerator: int = tpb.ACCELERATOR_CPU
    host_capacity: int = 0
    gpu_capacity: int = 0
    host_used: int = 0
    gpu_used: int = 0
    replicas: int = 0
    cached: frozenset[str] = frozenset()
    # False while the node is on probation (it flapped): it keeps what it has, gets nothing new.
    schedulable: bool = True

    def capacity(self, pool: Pool) -> int:
        return self.gpu_capacity if pool is Pool.GPU else self.host_capacity

    def used(self, pool: Pool) -> int:
        return self.gpu_used if pool is Pool.GPU else self.host_used

    def free(self, pool: Pool) -> int:
        capacity = self.capacity(pool)
        if capacity <= 0:
            # Unknown capacity (e.g. GPU memory not detected): never the reason to refuse.
            return 1 << 62
        return capacity - self.used(pool)

    def load(self, pool: Pool) -> float:
        capacity = self.capacity(pool)
        return self.used(pool) / capacity if capacity > 0 else 0.0


@dataclass(frozen=True, slots=True)
class ReplicaRequest:
    """`count` more replicas of one version (`key`, e.g. (model, version))."""

    key: Hashable
    count: int
    memory_bytes: int
    backend: int = ANY_BACKEND
    pool: Pool = Pool.HOST
    sha256: str = ""
    # Nodes that must not receive it: they already host the version, or it failed there lately.
    exclude: frozenset[str] = frozenset()
    # For messages: "a GPU", "TensorRT" ...
    accelerator: int = tpb.ACCELERATOR_UNSPECIFIED


@dataclass(slots=True)
class Placement:
    nodes: list[str] = field(default_factory=list)
    unplaced: int = 0
    # CamelCase reason when some replicas could not be placed: NoNodes, NoGpuNodes, NoTensorRTNodes,
    # NoOnnxRuntimeNodes, NotEnoughNodes, InsufficientMemory.
    reason: str = ""
    message: str = ""


def backend_name(backend: int) -> str:
    return {tpb.BACKEND_ONNXRUNTIME: "onnxruntime", tpb.BACKEND_TENSORRT: "tensorrt"}.get(backend, "any")


class Placer:
    def __init__(self, nodes: Iterable[NodeCapacity]) -> None:
        self.nodes: list[NodeCapacity] = list(nodes)
        self._index = {node.id: i for i, node in enumerate(self.nodes)}
        self._stamp = [0] * len(self.nodes)
        # (backend, pool) -> heap of (load, replicas, stamp, node index)
        self._heaps: dict[tuple[int, Pool], list[tuple[float, int, int, int]]] = {}
        self._cached: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for digest in node.cached:
                self._cached.setdefault(digest, []).append(i)

    def node(self, node_id: str) -> NodeCapacity | None:
        i = self._index.get(node_id)
        return None if i is None else self.nodes[i]

    @staticmethod
    def _capable(node: NodeCapacity, backend: int) -> bool:
        if backend == ANY_BACKEND:
            return bool(node.backends)
        return backend in node.backends

    def _heap(self, backend: int, pool: Pool) -> list[tuple[float, int, int, int]]:
        heap = self._heaps.get((backend, pool))
        if heap is None:
            heap = [
                (node.load(pool), node.replicas, self._stamp[i], i)
                for i, node in enumerate(self.nodes)
                if node.schedulable and self._capable(node, backend)
            ]
            heapq.heapify(heap)
            self._heaps[(backend, pool)] = heap
        return heap

    def _commit(self, i: int, memory: int, pool: Pool) -> None:
        node = self.nodes[i]
        if pool is Pool.GPU:
            node.gpu_used += memory
        else:
            node.host_used += memory
        node.replicas += 1
        self._stamp[i] += 1
        for (backend, heap_pool), heap in self._heaps.items():
            if node.schedulable and self._capable(node, backend):
                heapq.heappush(heap, (node.load(heap_pool), node.replicas, self._stamp[i], i))

    def add_usage(self, node_id: str, memory: int, pool: Pool) -> None:
        """Account memory placed outside this placer (e.g. an existing replica found later)."""
        i = self._index.get(node_id)
        if i is not None:
            self._commit(i, memory, pool)

    def eligible(self, node_id: str, request: ReplicaRequest) -> bool:
        """Could the node take a replica of `request` if it had the memory (capability, probation,
        exclusion)?"""
        node = self.node(node_id)
        return (
            node is not None
            and node.schedulable
            and node.id not in request.exclude
            and self._capable(node, request.backend)
        )

    def release(self, node_id: str, host_memory: int, gpu_memory: int) -> None:
        """Forget a replica of the node (evicted): its memory is free again."""
        i = self._index.get(node_id)
        if i is None:
            return
        node = self.nodes[i]
        node.host_used -= host_memory
        node.gpu_used -= gpu_memory
        node.replicas = max(0, node.replicas - 1)
        self._stamp[i] += 1
        for (backend, heap_pool), heap in self._heaps.items():
            if node.schedulable and self._capable(node, backend):
                heapq.heappush(heap, (node.load(heap_pool), node.replicas, self._stamp[i], i))

    def place(self, request: ReplicaRequest) -> Placement:
        result = Placement()
        if request.count <= 0:
            return result
        chosen: list[int] = []
        chosen_set: set[int] = set()
        memory, pool, exclude = request.memory_bytes, request.pool, request.exclude
        memory_short = False

        # 1. Nodes that already cache the artifact, least loaded first.
        if request.sha256:
            candidates = []
            for i in self._cached.get(request.sha256, ()):
                node = self.nodes[i]
                if not node.schedulable or node.id in exclude or not self._capable(node, request.backend):
                    continue
                if node.free(pool) < memory:
                    memory_short = True
                    continue
                candidates.append((node.load(pool), node.replicas, i))
            candidates.sort()
            for _, _, i in candidates[: request.count]:
                chosen.append(i)
                chosen_set.add(i)

        # 2. The least loaded capable nodes.
        if len(chosen) < request.count:
            heap = self._heap(request.backend, pool)
            aside: list[tuple[float, int, int, int]] = []
            while len(chosen) < request.count and heap:
                entry = heapq.heappop(heap)
                i = entry[3]
                if entry[2] != self._stamp[i]:
                    continue  # stale: the node's load changed since this entry was pushed
                node = self.nodes[i]
                if i in chosen_set or node.id in exclude:
                    aside.append(entry)
                    continue
                if node.free(pool) < memory:
                    memory_short = True
                    aside.append(entry)
                    continue
                chosen.append(i)
                chosen_set.add(i)
                aside.append(entry)  # becomes stale at commit; a fresh entry replaces it
            for entry in aside:
                heapq.heappush(heap, entry)

        for i in chosen:
            self._commit(i, memory, pool)
        result.nodes = [self.nodes[i].id for i in chosen]
        result.unplaced = request.count - len(chosen)
        if result.unplaced:
            result.reason, result.message = self._why(request, result.unplaced, memory_short)
        return result

    def _why(self, request: ReplicaRequest, missing: int, memory_short: bool) -> tuple[str, str]:
        capable = [node for node in self.nodes if self._capable(node, request.backend)]
        if not capable:
            if request.backend == tpb.BACKEND_TENSORRT and request.accelerator == tpb.ACCELERATOR_GPU:
                return "NoGpuNodes", "a GPU was requested but no inference node with a GPU (TensorRT) is registered"
            if request.backend == tpb.BACKEND_TENSORRT:
                return "NoTensorRTNodes", "the artifact is a TensorRT plan but no inference node has TensorRT"
            if request.backend == tpb.BACKEND_ONNXRUNTIME:
                return "NoOnnxRuntimeNodes", "no inference node has the onnxruntime backend"
            return "NoNodes", "no inference node is registered"
        schedulable = [node for node in capable if node.schedulable]
        if memory_short:
            return (
                "InsufficientMemory",
                f"no {backend_name(request.backend)} node has {request.memory_bytes} bytes of free "
                f"{request.pool.value} memory for another replica",
            )
        return (
            "NotEnoughNodes",
            f"replicas of one version go to distinct nodes: {len(schedulable)} schedulable "
            f"{backend_name(request.backend)} node(s) ({len(capable) - len(schedulable)} on probation) "
            f"for {missing} more replica(s) besides the {len(request.exclude)} node(s) already used",
        )
