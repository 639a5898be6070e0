"""TensorRT engines shared through the object store (issue 3, item 3), driven through the data plane and
whole mesh nodes with the CPU fakes of TensorRT and CUDA (tests/unit/tensorrt_fakes.py) against both
object stores: the first node builds and uploads the engine, every other node of that GPU kind fetches
it without building, a corrupt cached engine is rebuilt, and ONNX Runtime loads never touch the cache.
The real TensorRT path runs in tests/gpu."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time

import numpy as np
import pytest
import structlog
from prometheus_client import CollectorRegistry

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.common.etcd import EtcdClient, from_json, to_json
from services.common.objectstore import LocalObjectStore, ObjectStoreUnavailable, create_object_store
from services.common.objectstore.keys import ENGINES_PREFIX, blob_key, engine_key
from services.common.settings import LogSettings, ObjectStoreKind, ObjectStoreSettings, TelemetrySettings
from services.common.tracing import setup_telemetry
from services.inference.app import InferenceApp
from services.inference.backends import tensorrt as trt_backend
from services.inference.backends.base import LoadOptions
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.backends.tensorrt import TensorRTBackend, is_plan
from services.inference.dataplane import DataPlane, ModelLoadFailed, ModelSpec
from services.inference.settings import InferenceServerSettings, InferenceSettings
from tests.integration.test_inference_node import infer, reference
from tests.support.models import mlp_bytes
from tests.unit import tensorrt_fakes

ONNX = mlp_bytes()
DIGEST = hashlib.sha256(ONNX).hexdigest()
# What the fakes report: an sm_90 GPU and TensorRT 10.8.0.43.
KEY = engine_key(DIGEST, "sm_90", "10.8.0.43", "FP32")
BACKENDS = {"tensorrt": TensorRTBackend, "onnxruntime": OnnxRuntimeBackend}


@pytest.fixture
def fake_gpu(monkeypatch):
    fake_trt, fake_rt = tensorrt_fakes.install(monkeypatch)
    yield fake_trt, fake_rt
    trt_backend.reset_probe_cache()
    assert not fake_rt.allocations and not fake_rt.streams, "device memory or streams leaked"


@pytest.fixture
async def store(store_settings):
    store = create_object_store(store_settings)
    await store.ensure_ready()
    yield store
    await store.close()


@pytest.fixture
def artifact(tmp_path):
    """The verified artifact as a node's cache holds it."""
    path = tmp_path / "cache" / "sha256" / DIGEST
    path.parent.mkdir(parents=True)
    path.write_bytes(ONNX)
    return path


def node(store, **settings) -> DataPlane:
    """One node's data plane: TensorRT preferred, ONNX Runtime as fallback, engines shared via `store`."""
    fields = {"backends": ["tensorrt", "onnxruntime"], **settings}
    return DataPlane(
        InferenceServerSettings(**fields),
        registry=CollectorRegistry(),
        telemetry=setup_telemetry(TelemetrySettings(), "test"),
        logger=structlog.get_logger(),
        backends=BACKENDS,
        engine_store=store,
    )


def spec(artifact, **fields) -> ModelSpec:
    values = {"name": "m", "version": "1", "artifact": artifact, "sha256": DIGEST, "options": LoadOptions(precision="FP32")}
    values.update(fields)
    return ModelSpec(**values)


X = np.random.default_rng(4).standard_normal((5, 4)).astype(np.float32)


async def test_one_build_serves_every_node(fake_gpu, store, artifact):
    fake_trt, _ = fake_gpu
    first = node(store)
    info = await first.load(spec(artifact))
    assert info.backend == "tensorrt" and len(fake_trt.state.builds) == 1
    assert await store.exists(KEY) and is_plan(await store.get_bytes(KEY))
    np.testing.assert_allclose(await infer(first, "m", 1, X), reference(ONNX, X), rtol=1e-5)

    # Two more nodes of the same GPU kind, loading at the same time: both fetch, neither builds.
    others = [node(store), node(store)]
    infos = await asyncio.gather(*(plane.load(spec(artifact)) for plane in others))
    assert [i.backend for i in infos] == ["tensorrt", "tensorrt"]
    assert len(fake_trt.state.builds) == 1
    for plane in others:
        np.testing.assert_allclose(await infer(plane, "m", 1, X), reference(ONNX, X), rtol=1e-5)
    # One engine per (artifact, GPU arch, TensorRT version, precision): nothing else was written.
    assert [o.key async for o in store.list(ENGINES_PREFIX)] == [KEY]

    # Another precision is another engine.
    await first.load(spec(artifact, version="2", options=LoadOptions(precision="FP16")))
    assert len(fake_trt.state.builds) == 2 and "FP16" in fake_trt.state.builds[-1]["flags"]
    assert await store.exists(engine_key(DIGEST, "sm_90", "10.8.0.43", "FP16"))
    for plane in (first, *others):
        await plane.close()


async def test_a_corrupt_cached_engine_is_rebuilt_and_replaced(fake_gpu, store, artifact):
    fake_trt, _ = fake_gpu
    await store.put_bytes(KEY, b"ftrt" + b"\xff" * 64)  # a plan's magic, garbage inside
    plane = node(store)
    await plane.load(spec(artifact))
    assert len(fake_trt.state.builds) == 1
    stored = await store.get_bytes(KEY)
    assert is_plan(stored) and len(stored) > 100
    np.testing.assert_allclose(await infer(plane, "m", 1, X), reference(ONNX, X), rtol=1e-5)
    # The replacement serves the next node without a build.
    again = node(store)
    await again.load(spec(artifact))
    assert len(fake_trt.state.builds) == 1
    await plane.close()
    await again.close()


class DownStore(LocalObjectStore):
    """An object store that is unreachable for engines."""

    async def get_bytes(self, key, *, offset=0, length=None):
        raise ObjectStoreUnavailable("connection refused")

    async def put_bytes(self, key, data):
        raise ObjectStoreUnavailable("connection refused")


async def test_an_unreachable_store_builds_locally(fake_gpu, tmp_path, artifact):
    fake_trt, _ = fake_gpu
    store = DownStore(ObjectStoreSettings(kind=ObjectStoreKind.LOCAL, path=tmp_path / "objects"))
    plane = node(store)
    assert (await plane.load(spec(artifact))).backend == "tensorrt"
    assert len(fake_trt.state.builds) == 1
    np.testing.assert_allclose(await infer(plane, "m", 1, X), reference(ONNX, X), rtol=1e-5)
    await plane.close()


async def test_only_tensorrt_onnx_loads_use_the_cache(fake_gpu, store, artifact, tmp_path):
    fake_trt, _ = fake_gpu
    # ONNX Runtime chosen: loaded as before, nothing built or stored.
    plane = node(store)
    assert (await plane.load(spec(artifact, backend="onnxruntime"))).backend == "onnxruntime"
    # A TensorRT plan artifact loads directly: no build, no engine written.
    plan = trt_backend.build_engine(ONNX, LoadOptions(max_batch_size=8))
    builds = len(fake_trt.state.builds)
    plan_path = tmp_path / "model.plan"
    plan_path.write_bytes(plan)
    plan_spec = spec(plan_path, name="p", format="tensorrt_plan", sha256=hashlib.sha256(plan).hexdigest())
    assert (await plane.load(plan_spec)).backend == "tensorrt"
    assert len(fake_trt.state.builds) == builds
    # No digest (standalone mode) or no store: TensorRT builds with load(), the store is not touched.
    await plane.load(spec(artifact, name="standalone", sha256=""))
    assert len(fake_trt.state.builds) == builds + 1
    local = node(None)
    await local.load(spec(artifact))
    assert len(fake_trt.state.builds) == builds + 2
    assert [o.key async for o in store.list(ENGINES_PREFIX)] == []
    for name, version in (("m", 1), ("p", 1), ("standalone", 1)):
        np.testing.assert_allclose(await infer(plane, name, version, X), reference(ONNX, X), rtol=1e-5)
    await plane.close()
    await local.close()


async def test_engine_cache_load_failures_are_failed_with_the_reason(fake_gpu, store, artifact, tmp_path):
    plane = node(store)
    with pytest.raises(ModelLoadFailed, match="INT8 needs calibration"):
        await plane.load(spec(artifact, options=LoadOptions(precision="INT8")))
    with pytest.raises(ModelLoadFailed, match="use_gpu=False"):
        await plane.load(spec(artifact, name="cpu", backend="tensorrt", options=LoadOptions(use_gpu=False)))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelLoadFailed, match="could not parse the ONNX model"):
        await plane.load(spec(broken, name="broken"))
    assert [o.key async for o in store.list(ENGINES_PREFIX)] == []
    await plane.close()


async def wait_ready(etcd: EtcdClient, node_id: str, timeout: float = 15.0) -> spb.ReplicaStatus:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        kv = await etcd.get(etcd.keys.status(node_id, "m", 1))
        status = None if kv is None else from_json(kv.value, spb.ReplicaStatus)
        if status is not None and status.state == tpb.REPLICA_STATE_READY:
            return status
        assert status is None or status.state != tpb.REPLICA_STATE_FAILED, status.reason
        await asyncio.sleep(0.05)
    raise AssertionError(f"{node_id}: m/1 not READY in {timeout}s (last: {status})")


async def test_mesh_nodes_share_one_engine(fake_gpu, etcd_settings, local_store_settings, tmp_path):
    """Whole mesh-mode nodes (agent, cache, data plane) assigned the same TensorRT model: the first
    builds the engine, the second fetches it."""
    fake_trt, _ = fake_gpu
    etcd = EtcdClient(etcd_settings)
    await etcd.connect()
    store = create_object_store(local_store_settings)
    await store.ensure_ready()
    await store.put_bytes(blob_key(DIGEST), ONNX)
    await store.close()
    async with contextlib.AsyncExitStack() as stack:
        builds = []
        for node_id in ("gpu-a", "gpu-b"):
            settings = InferenceSettings(
                log=LogSettings(level="WARNING"),
                etcd=etcd_settings,
                object_store=local_store_settings,
                inference=InferenceServerSettings(
                    node_id=node_id, grpc_port=0, metrics_port=-1, cache_dir=tmp_path / node_id,
                    backends=["tensorrt", "onnxruntime"], shutdown_grace_seconds=1,
                ),
            )
            app = InferenceApp(settings, backends=BACKENDS)
            await app.start()
            stack.push_async_callback(app.stop)
            assignment = spb.Assignment(
                node_id=node_id, model="m", version=1, sha256=DIGEST,
                backend=tpb.BACKEND_TENSORRT, precision=tpb.PRECISION_FP32,
            )
            await etcd.put(etcd.keys.assignment(node_id, "m", 1), to_json(assignment))
            status = await wait_ready(etcd, node_id)
            assert status.backend == tpb.BACKEND_TENSORRT
            np.testing.assert_allclose(await infer(app.data_plane, "m", 1, X), reference(ONNX, X), rtol=1e-5)
            builds.append(len(fake_trt.state.builds))
        assert builds == [1, 1]  # built by the first node, fetched by the second
    await etcd.close()
