"""The mesh-mode node agent against real etcd, real object stores and real ONNX models."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import structlog
from moto.server import ThreadedMotoServer
from prometheus_client import CollectorRegistry

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.etcd import EtcdClient, from_json, to_json
from services.common.objectstore import ObjectStore, create_object_store
from services.common.objectstore.keys import blob_key
from services.common.settings import EtcdSettings, LogSettings, ObjectStoreSettings
from services.common.tracing import setup_telemetry
from services.inference.app import InferenceApp
from services.inference.dataplane import DataPlane, ModelState
from services.inference.node import NodeAgent
from services.inference.settings import InferenceServerSettings, InferenceSettings
from tests.support.models import mlp_bytes
from tests.support.servers import free_port

NODE = "node-a"
LOADING, READY, FAILED = tpb.REPLICA_STATE_LOADING, tpb.REPLICA_STATE_READY, tpb.REPLICA_STATE_FAILED


def settings_for(etcd: EtcdSettings, store: ObjectStoreSettings, tmp_path, **inference) -> InferenceSettings:
    values = dict(
        node_id=NODE,
        grpc_port=0,
        metrics_port=-1,
        cache_dir=tmp_path / "cache",
        load_retry_initial_seconds=0.2,
        load_retry_max_seconds=0.5,
        unload_drain_seconds=1,
    )
    values.update(inference)
    return InferenceSettings(etcd=etcd, object_store=store, inference=InferenceServerSettings(**values))


@contextlib.asynccontextmanager
async def running_agent(settings: InferenceSettings) -> AsyncIterator[tuple[NodeAgent, DataPlane, EtcdClient, ObjectStore]]:
    """The agent as the app wires it in mesh mode, around a real data plane."""
    logger = structlog.get_logger("test")
    telemetry = setup_telemetry(settings.telemetry, "inference-test")
    etcd = EtcdClient(settings.etcd)
    store = create_object_store(settings.object_store)
    data_plane = DataPlane(
        settings.inference, registry=CollectorRegistry(), telemetry=telemetry, logger=logger, engine_store=store
    )
    agent = NodeAgent(settings, data_plane, etcd, store, "127.0.0.1:9999", logger)
    await agent.start()
    try:
        yield agent, data_plane, etcd, store
    finally:
        await agent.stop()
        await data_plane.close()
        await store.close()
        await etcd.close()
        telemetry.shutdown()


async def upload_blob(store: ObjectStore, data: bytes, *, stored: bytes | None = None) -> str:
    """Put `stored` (default: `data`) under the digest of `data`."""
    digest = hashlib.sha256(data).hexdigest()
    await store.ensure_ready()
    await store.put_bytes(blob_key(digest), data if stored is None else stored)
    return digest


async def assign(etcd: EtcdClient, model: str, version: int, digest: str, **fields) -> None:
    assignment = spb.Assignment(node_id=NODE, model=model, version=version, sha256=digest, **fields)
    await etcd.put(etcd.keys.assignment(NODE, model, version), to_json(assignment))


async def read_status(etcd: EtcdClient, model: str, version: int) -> spb.ReplicaStatus | None:
    kv = await etcd.get(etcd.keys.status(NODE, model, version))
    return None if kv is None else from_json(kv.value, spb.ReplicaStatus)


async def eventually(check: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """Poll an async or sync check until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def wait_state(etcd: EtcdClient, model: str, version: int, state: int, timeout: float = 10.0) -> spb.ReplicaStatus:
    async def check():
        status = await read_status(etcd, model, version)
        return status if status is not None and status.state == state else None

    return await eventually(check, timeout, f"{model}/{version} {tpb.ReplicaState.Name(state)}")


def reference(data: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(data).run(None, {"x": x})[0]


def infer_request(model: str, version: int, x: np.ndarray) -> pb.ModelInferRequest:
    """An Open Inference Protocol request with one raw FP32 input."""
    request = pb.ModelInferRequest(model_name=model, model_version=str(version), id="t")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    return request


def output_of(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(response.outputs[0].shape))


async def infer(data_plane: DataPlane, model: str, version: int, x: np.ndarray) -> np.ndarray:
    """Through the data plane's request path (decode, validate, batcher, backend)."""
    return output_of(await data_plane.infer(infer_request(model, version, x)))


@contextlib.asynccontextmanager
async def running_node(settings: InferenceSettings) -> AsyncIterator[tuple[InferenceApp, pb_grpc.GRPCInferenceServiceStub, EtcdClient]]:
    """A whole inference node in mesh mode (gRPC server on a free port), plus a client and etcd access."""
    app = InferenceApp(settings)
    await app.start()
    etcd = EtcdClient(settings.etcd)
    channel = grpc.aio.insecure_channel(app.grpc.address)
    try:
        yield app, pb_grpc.GRPCInferenceServiceStub(channel), etcd
    finally:
        await channel.close()
        await app.stop()
        await etcd.close()


def node_settings(etcd: EtcdSettings, store: ObjectStoreSettings, tmp_path, **inference) -> InferenceSettings:
    settings = settings_for(
        etcd, store, tmp_path, backends=["onnxruntime"], intra_op_threads=1, inter_op_threads=1,
        shutdown_grace_seconds=1, **inference,
    )
    return settings.model_copy(update={"log": LogSettings(level="WARNING")})


async def test_assignment_is_loaded_served_and_unloaded(etcd_settings, local_store_settings, tmp_path):
    settings = settings_for(etcd_settings, local_store_settings, tmp_path)
    model = mlp_bytes()
    async with running_agent(settings) as (agent, data_plane, etcd, store):
        digest = await upload_blob(store, model)
        node = await eventually(lambda: etcd.get(etcd.keys.node(NODE)), what="node record")
        record = from_json(node.value, spb.Node)
        assert record.address == "127.0.0.1:9999"
        assert list(record.backends) == [tpb.BACKEND_ONNXRUNTIME]
        assert record.accelerator == tpb.ACCELERATOR_CPU
        assert record.memory_capacity_bytes > 0
        assert record.started.seconds > 0
        assert node.lease == agent.lease_id
        # The record is written before the agent marks itself registered.
        await eventually(agent.healthy, what="agent healthy")

        # Every state the status key passes through, as a watcher sees it.
        seen: list[int] = []
        revision = await etcd.current_revision()

        async def watch() -> None:
            async for event in etcd.watch_prefix(etcd.keys.statuses_prefix(NODE), start_revision=revision + 1):
                seen.append(from_json(event.value, spb.ReplicaStatus).state if event.kind == "put" else -1)

        watcher = asyncio.create_task(watch())
        await assign(etcd, "mlp", 1, digest, format=tpb.MODEL_FORMAT_ONNX)
        status = await wait_state(etcd, "mlp", 1, READY)
        assert status.memory_bytes > 0
        assert status.backend == tpb.BACKEND_ONNXRUNTIME
        assert status.address == "127.0.0.1:9999"
        assert status.reason == ""
        assert (await etcd.get(etcd.keys.status(NODE, "mlp", 1))).lease == agent.lease_id

        x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
        np.testing.assert_allclose(await infer(data_plane, "mlp", 1, x), reference(model, x), rtol=1e-5)
        # The node advertises the cached artifact for placement.
        await eventually(
            lambda: _cached(etcd, digest), what="digest in the node record"
        )

        await etcd.delete(etcd.keys.assignment(NODE, "mlp", 1))
        await eventually(lambda: _absent(etcd, etcd.keys.status(NODE, "mlp", 1)), what="status deleted")
        assert data_plane.state("mlp", "1")[0] is ModelState.UNAVAILABLE
        assert data_plane.loaded() == []
        assert not agent.cache.pinned(digest)
        watcher.cancel()
        assert seen[0] == LOADING
        assert READY in seen and seen[-1] == -1
        # Published states may coalesce (one writer, latest value wins) but never go backwards.
        assert set(seen) <= {LOADING, READY, tpb.REPLICA_STATE_UNLOADING, -1}


async def _cached(etcd: EtcdClient, digest: str) -> bool:
    kv = await etcd.get(etcd.keys.node(NODE))
    return kv is not None and digest in from_json(kv.value, spb.Node).cached_sha256


async def _absent(etcd: EtcdClient, key: str) -> bool:
    return await etcd.get(key) is None


async def test_mesh_node_serves_its_assignments_over_grpc_and_deregisters_on_shutdown(
    etcd_settings, local_store_settings, tmp_path
):
    settings = node_settings(etcd_settings, local_store_settings, tmp_path)
    model = mlp_bytes()
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    async with running_node(settings) as (app, stub, etcd):
        digest = await upload_blob(app.store, model)
        node = from_json((await eventually(lambda: etcd.get(etcd.keys.node(NODE)), what="node")).value, spb.Node)
        assert node.address == app.grpc.address
        await assign(etcd, "mlp", 1, digest)
        status = await wait_state(etcd, "mlp", 1, READY)
        assert status.address == app.grpc.address and status.memory_bytes > 0
        response = await stub.ModelInfer(infer_request("mlp", 1, x), timeout=5)
        np.testing.assert_allclose(output_of(response), reference(model, x), rtol=1e-5)

        await etcd.delete(etcd.keys.assignment(NODE, "mlp", 1))
        await eventually(lambda: _absent(etcd, etcd.keys.status(NODE, "mlp", 1)), what="status deleted")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(infer_request("mlp", 1, x), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        await assign(etcd, "mlp", 2, digest)
        await wait_state(etcd, "mlp", 2, READY)
        # Shutdown deregisters first: node record and statuses vanish with the lease.
        await app.grpc.stop()
        assert await etcd.get(etcd.keys.node(NODE)) is None
        assert await etcd.get_prefix(etcd.keys.statuses_prefix(NODE)) == []


async def test_stop_deregisters_at_once_and_keeps_models_loaded(etcd_settings, local_store_settings, tmp_path):
    settings = settings_for(etcd_settings, local_store_settings, tmp_path, unload_drain_seconds=30)
    async with running_agent(settings) as (agent, data_plane, etcd, store):
        digest = await upload_blob(store, mlp_bytes())
        await assign(etcd, "mlp", 1, digest)
        await wait_state(etcd, "mlp", 1, READY)
        started = time.monotonic()
        await agent.stop()
        assert time.monotonic() - started < 2
        assert await etcd.get(etcd.keys.node(NODE)) is None
        assert await etcd.get_prefix(etcd.keys.statuses_prefix(NODE)) == []
        assert not await agent.healthy()
        # Unloading is the app's job after draining, not the agent's.
        assert data_plane.loaded() == [("mlp", "1")]


async def test_corrupt_blob_fails_and_is_never_loaded(etcd_settings, local_store_settings, tmp_path):
    settings = settings_for(etcd_settings, local_store_settings, tmp_path)
    async with running_agent(settings) as (agent, data_plane, etcd, store):
        digest = await upload_blob(store, mlp_bytes(), stored=mlp_bytes(seed=1))
        await assign(etcd, "mlp", 1, digest)
        status = await wait_state(etcd, "mlp", 1, FAILED)
        assert status.reason.startswith(f"sha256 mismatch: expected {digest}, got ")
        assert data_plane.state("mlp", "1")[0] is not ModelState.READY
        assert data_plane.loaded() == []
        assert digest not in agent.cache.cached_digests()
        assert not (agent.cache.directory / digest).exists()


async def test_tensorrt_work_on_a_node_without_tensorrt_fails_with_the_reason(
    etcd_settings, local_store_settings, tmp_path
):
    settings = settings_for(etcd_settings, local_store_settings, tmp_path)
    async with running_agent(settings) as (agent, data_plane, etcd, store):
        await assign(etcd, "plan", 1, "a" * 64, format=tpb.MODEL_FORMAT_TENSORRT_PLAN)
        await assign(etcd, "trt", 1, "b" * 64, backend=tpb.BACKEND_TENSORRT)
        plan = await wait_state(etcd, "plan", 1, FAILED)
        assert "requires TensorRT, which this node does not have: " in plan.reason
        trt = await wait_state(etcd, "trt", 1, FAILED)
        assert trt.reason.startswith("backend tensorrt is not available on this node: ")
        assert data_plane.loaded() == []


async def test_object_store_outage_is_retried_until_the_load_succeeds(etcd_settings, s3_settings, tmp_path):
    model = mlp_bytes()
    # Upload through the running S3 server; moto servers of one process share their data, so a
    # second server started later on another port serves the same bucket.
    uploader = create_object_store(s3_settings)
    digest = await upload_blob(uploader, model)
    await uploader.close()
    port = free_port()
    late = s3_settings.model_copy(update={"endpoint": f"127.0.0.1:{port}", "timeout_seconds": 2})
    settings = settings_for(etcd_settings, late, tmp_path, load_max_attempts=30)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    async with running_agent(settings) as (agent, data_plane, etcd, store):
        await assign(etcd, "mlp", 1, digest)

        async def retrying():
            status = await read_status(etcd, "mlp", 1)
            return status if status is not None and "retrying" in status.reason else None

        status = await eventually(retrying, what="a retry reason")
        assert status.state == LOADING
        assert status.reason.startswith("object store unavailable: ")
        assert data_plane.state("mlp", "1")[0] is ModelState.LOADING
        await asyncio.sleep(1)
        await asyncio.to_thread(server.start)
        try:
            status = await wait_state(etcd, "mlp", 1, READY, timeout=15)
            assert status.reason == ""
            x = np.ones((1, 4), np.float32)
            np.testing.assert_allclose(await infer(data_plane, "mlp", 1, x), reference(model, x), rtol=1e-5)
        finally:
            await asyncio.to_thread(server.stop)


async def test_unassigned_while_downloading_is_abandoned(etcd_settings, s3_settings, tmp_path):
    unreachable = s3_settings.model_copy(update={"endpoint": f"127.0.0.1:{free_port()}", "timeout_seconds": 1})
    settings = settings_for(etcd_settings, unreachable, tmp_path, load_max_attempts=30)
    async with running_agent(settings) as (agent, data_plane, etcd, store):
        await assign(etcd, "mlp", 1, "c" * 64)
        await wait_state(etcd, "mlp", 1, LOADING)
        await etcd.delete(etcd.keys.assignment(NODE, "mlp", 1))
        await eventually(lambda: _absent(etcd, etcd.keys.status(NODE, "mlp", 1)), what="status deleted")
        assert data_plane.state("mlp", "1")[0] is ModelState.UNAVAILABLE


async def test_object_store_that_stays_down_fails_after_the_last_attempt(etcd_settings, s3_settings, tmp_path):
    unreachable = s3_settings.model_copy(update={"endpoint": f"127.0.0.1:{free_port()}", "timeout_seconds": 1})
    settings = settings_for(etcd_settings, unreachable, tmp_path, load_max_attempts=2, load_retry_initial_seconds=0.1)
    async with running_agent(settings) as (agent, data_plane, etcd, store):
        await assign(etcd, "mlp", 1, "d" * 64)
        status = await wait_state(etcd, "mlp", 1, FAILED)
        assert status.reason.startswith("object store unavailable: ")
        assert status.reason.endswith("gave up after 2 attempts")
        assert data_plane.state("mlp", "1")[0] is ModelState.UNAVAILABLE


async def test_etcd_outage_keeps_serving_and_the_node_re_registers(restartable_etcd, local_store_settings, tmp_path):
    etcd_settings = EtcdSettings(endpoints=restartable_etcd.endpoint, session_ttl_seconds=2, timeout_seconds=1)
    settings = node_settings(etcd_settings, local_store_settings, tmp_path)
    model = mlp_bytes()
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    expected = reference(model, x)
    async with running_node(settings) as (app, stub, etcd):
        digest = await upload_blob(app.store, model)
        await assign(etcd, "mlp", 1, digest)
        await wait_state(etcd, "mlp", 1, READY)
        agent = app.agent
        old_lease = agent.lease_id

        calls, failures = 0, []
        stop = asyncio.Event()

        async def client() -> None:
            nonlocal calls
            while not stop.is_set():
                try:
                    response = await stub.ModelInfer(infer_request("mlp", 1, x), timeout=5)
                    np.testing.assert_allclose(output_of(response), expected, rtol=1e-5)
                    calls += 1
                except Exception as exc:  # noqa: BLE001 - counted
                    failures.append(exc)
                await asyncio.sleep(0.005)

        caller = asyncio.create_task(client())
        await asyncio.to_thread(restartable_etcd.stop)
        # Past the TTL: the session is lost, yet the model keeps serving.
        await eventually(lambda: _unhealthy(agent), timeout=10, what="session lost")
        await asyncio.sleep(1)
        during_outage = calls
        await asyncio.to_thread(restartable_etcd.start)

        async def re_registered() -> bool:
            node = await etcd.get(etcd.keys.node(NODE))
            status = await etcd.get(etcd.keys.status(NODE, "mlp", 1))
            return (
                node is not None
                and status is not None
                and node.lease != old_lease
                and node.lease == status.lease == agent.lease_id
                and from_json(status.value, spb.ReplicaStatus).state == READY
            )

        await eventually(re_registered, timeout=15, what="re-registration under a new lease")
        await eventually(agent.healthy, what="agent healthy again")
        # The lost lease is revoked on recovery, so nothing of ours can vanish with it later.
        await eventually(lambda: _lease_gone(etcd, old_lease), timeout=5, what="old lease gone")
        await asyncio.sleep(0.2)
        stop.set()
        await caller
        assert failures == []
        assert calls > during_outage > 0
        # Still assigned: never unloaded.
        assert app.data_plane.loaded() == [("mlp", "1")]


async def _unhealthy(agent: NodeAgent) -> bool:
    return not await agent.healthy()


async def _lease_gone(etcd: EtcdClient, lease: int) -> bool:
    return await etcd.lease_time_to_live(lease) < 0


async def test_re_listing_after_a_session_loss_unloads_only_what_was_unassigned(
    restartable_etcd, local_store_settings, tmp_path
):
    etcd_settings = EtcdSettings(endpoints=restartable_etcd.endpoint, session_ttl_seconds=2, timeout_seconds=1)
    settings = settings_for(etcd_settings, local_store_settings, tmp_path)
    async with running_agent(settings) as (agent, data_plane, etcd, store):
        first, second = mlp_bytes(), mlp_bytes(seed=1)
        await assign(etcd, "a", 1, await upload_blob(store, first))
        await assign(etcd, "b", 1, await upload_blob(store, second))
        await wait_state(etcd, "a", 1, READY)
        await wait_state(etcd, "b", 1, READY)
        # While the node's session is lost, its assignment of b is removed and the history compacted,
        # so only a re-list can tell.
        await asyncio.to_thread(restartable_etcd.stop)
        await eventually(lambda: _unhealthy(agent), timeout=10, what="session lost")
        await asyncio.to_thread(restartable_etcd.start)
        await etcd.delete(etcd.keys.assignment(NODE, "b", 1))
        await etcd.compact(await etcd.current_revision())
        await eventually(lambda: _absent(etcd, etcd.keys.status(NODE, "b", 1)), timeout=15, what="b unloaded")
        await wait_state(etcd, "a", 1, READY)
        assert data_plane.loaded() == [("a", "1")]


async def test_changed_assignment_reloads_while_serving_and_a_rewrite_retries_a_failure(
    etcd_settings, local_store_settings, tmp_path
):
    settings = settings_for(etcd_settings, local_store_settings, tmp_path)
    model = mlp_bytes()
    x = np.ones((2, 4), np.float32)
    async with running_agent(settings) as (agent, data_plane, etcd, store):
        digest = await upload_blob(store, model)
        await assign(etcd, "mlp", 1, digest, batching=tpb.BatchingConfig(enabled=True, max_batch_size=4))
        first = await wait_state(etcd, "mlp", 1, READY)
        assert data_plane.config("mlp", "1").max_batch_size == 4
        # Same load, written by a new scheduler leader: nothing to do.
        await assign(etcd, "mlp", 1, digest, leader_revision=7, batching=tpb.BatchingConfig(enabled=True, max_batch_size=4))
        await asyncio.sleep(0.3)
        assert (await read_status(etcd, "mlp", 1)).updated == first.updated

        # New batching: reloaded, and requests keep succeeding throughout (the old instance serves
        # until the new one is READY).
        failures: list[Exception] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                try:
                    await infer(data_plane, "mlp", 1, x)
                except Exception as exc:  # noqa: BLE001 - counted
                    failures.append(exc)
                await asyncio.sleep(0.002)

        caller = asyncio.create_task(client())
        batching = tpb.BatchingConfig(enabled=True, max_batch_size=8, max_queue_delay_us=100)
        await assign(etcd, "mlp", 1, digest, batching=batching, precision=tpb.PRECISION_FP16)
        await eventually(lambda: data_plane.config("mlp", "1").max_batch_size == 8, what="reload")
        config = data_plane.config("mlp", "1")
        assert config.dynamic_batching.max_queue_delay_microseconds == 100
        # The new instance serves a moment before its READY is written: wait for the re-published status.
        async def republished() -> spb.ReplicaStatus | None:
            status = await read_status(etcd, "mlp", 1)
            return status if status is not None and status.state == READY and status.updated != first.updated else None

        status = await eventually(republished, what="READY re-published after the reload")
        assert status.reason == ""
        stop.set()
        await caller
        assert failures == []

        # A failed load is retried when the scheduler rewrites the assignment (e.g. blob re-uploaded).
        bad = mlp_bytes(seed=3)
        bad_digest = await upload_blob(store, bad, stored=b"garbage")
        await assign(etcd, "other", 1, bad_digest)
        await wait_state(etcd, "other", 1, FAILED)
        await store.put_bytes(blob_key(bad_digest), bad)
        await assign(etcd, "other", 1, bad_digest, leader_revision=8)
        await wait_state(etcd, "other", 1, READY)
        np.testing.assert_allclose(await infer(data_plane, "other", 1, x), reference(bad, x), rtol=1e-5)


async def test_a_load_the_backend_rejects_is_failed_with_its_reason(etcd_settings, local_store_settings, tmp_path):
    settings = settings_for(etcd_settings, local_store_settings, tmp_path)
    async with running_agent(settings) as (agent, data_plane, etcd, store):
        # Correct digest, but not an ONNX model: verification passes, the backend refuses it.
        digest = await upload_blob(store, b"not an onnx model")
        await assign(etcd, "junk", 1, digest)
        status = await wait_state(etcd, "junk", 1, FAILED)
        assert status.reason
        state, reason = data_plane.state("junk", "1")
        assert state is ModelState.FAILED and reason == status.reason
        assert not agent.cache.pinned(digest)
        # Unassigning a failed replica cleans the data plane too.
        await etcd.delete(etcd.keys.assignment(NODE, "junk", 1))
        await eventually(lambda: _absent(etcd, etcd.keys.status(NODE, "junk", 1)), what="status deleted")
        assert data_plane.state("junk", "1")[0] is ModelState.UNAVAILABLE
