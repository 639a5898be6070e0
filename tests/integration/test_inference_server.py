"""The inference server over real gRPC: precise errors, batching under concurrency, limits, standalone
repository behaviour, health, reflection, metrics, mesh-mode repository refusal, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import structlog
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc
from services.common.grpc_server import GrpcService, reflection_pool_of
from services.common.metrics import Metrics
from services.common.settings import TelemetrySettings
from services.common.tracing import setup_telemetry
from services.inference.app import SERVICE_NAME, parse_args, settings_from_args
from services.inference.backends.base import TensorInfo
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.dataplane import DataPlane
from services.inference.servicer import InferenceServicer, register
from services.inference.settings import InferenceServerSettings, InferenceSettings
from services.inference.tensors import add_raw_input
from tests.support.inference import fake_backend, inference_settings, running_inference, write_model
from tests.support.models import identity_model, mlp_model, scale_model

MLP = mlp_model(inputs=8, hidden=16, outputs=5, seed=3)
# Pure-Python backends whose executions block until released (see tests.support.inference.FakeBackend).
SMALL_QUEUE = fake_backend(input_specs=(TensorInfo("x", "FP32", (-1, 4)),))
QUEUE_TIMEOUT = fake_backend(input_specs=(TensorInfo("x", "FP32", (-1, 4)),))


@pytest.fixture
def repository(tmp_path):
    root = tmp_path / "models"
    # Batching model: a queue delay makes merging certain even on a loaded machine.
    write_model(root, "mlp", MLP, config={"max_batch_size": 16, "dynamic_batching": {"max_queue_delay_us": 5000}})
    write_model(root, "ragged", scale_model(["batch", "n"]), config={"dynamic_batching": {"max_queue_delay_us": 5000}})
    write_model(root, "strings", identity_model(TensorProto.STRING, ["batch"]))
    write_model(root, "small-queue", b"fake", config={"backend": "small-queue", "dynamic_batching": {"max_queue_size": 2}})
    write_model(root, "timeout", b"fake", config={"backend": "queue-timeout", "dynamic_batching": {"default_timeout_ms": 100}})
    write_model(root, "broken", b"this is not onnx")
    write_model(root, "misconfigured", MLP, config={"max_batch_size": -1, "colour": "blue"})
    return root


@contextlib.asynccontextmanager
async def serving(repository, *, metrics_port: int = -1):
    SMALL_QUEUE.instances.clear()
    QUEUE_TIMEOUT.instances.clear()
    backends = {"onnxruntime": OnnxRuntimeBackend, "small-queue": SMALL_QUEUE, "queue-timeout": QUEUE_TIMEOUT}
    # Model-thread execution throughout: the queue tests hold a batch on the model thread.
    settings = inference_settings(repository, metrics_port=metrics_port, inline_execution_below_us=0)
    async with running_inference(settings, backends=backends) as app:
        try:
            yield app
        finally:
            for instance in (*SMALL_QUEUE.instances, *QUEUE_TIMEOUT.instances):
                instance.release.set()


@pytest.fixture
async def server(repository):
    async with serving(repository) as app:
        yield app


@pytest.fixture
async def stub(server):
    channel = grpc.aio.insecure_channel(server.grpc.address)
    yield grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    await channel.close()


async def expect(call, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()
    return info.value.details()


def mlp_request(x: np.ndarray, model: str = "mlp") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    add_raw_input(request, "x", x)
    return request


# ------------------------------------------------------------------------------------ bad input


async def test_bad_inputs_are_invalid_argument_naming_the_problem(stub):
    ok = np.ones((2, 8), np.float32)
    await stub.ModelInfer(mlp_request(ok))

    await expect(stub.ModelInfer(mlp_request(ok.astype(np.int32))), grpc.StatusCode.INVALID_ARGUMENT,
                 "input 'x' has datatype INT32", "expects FP32")
    await expect(stub.ModelInfer(mlp_request(np.ones((2, 7), np.float32))), grpc.StatusCode.INVALID_ARGUMENT,
                 "input 'x' has shape [2, 7]", "expects [-1, 8]")

    request = mlp_request(ok)
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    await expect(stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT,
                 "input 'x': raw contents hold 60 bytes", "needs 64 bytes")

    await expect(stub.ModelInfer(pb.ModelInferRequest(model_name="mlp")), grpc.StatusCode.INVALID_ARGUMENT,
                 "missing input 'x'")
    request = mlp_request(ok)
    add_raw_input(request, "extra", ok)
    await expect(stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'extra'", "its inputs: x")

    request = mlp_request(ok)
    request.outputs.add(name="logits")
    await expect(stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT,
                 "unknown requested output 'logits'", "its outputs: y")

    request = mlp_request(ok)
    request.inputs[0].contents.fp32_contents.extend(ok.ravel().tolist())
    await expect(stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT,
                 "input 'x' sets typed contents", "raw_input_contents")

    # Typed contents alone are fine.
    typed = pb.ModelInferRequest(model_name="mlp")
    typed.inputs.add(name="x", datatype="FP32", shape=[2, 8]).contents.fp32_contents.extend(ok.ravel().tolist())
    response = await stub.ModelInfer(typed)
    assert list(response.outputs[0].shape) == [2, 5]

    strings = pb.ModelInferRequest(model_name="strings")
    add_raw_input(strings, "x", np.array([b"ok", b"\xff\xfe"], dtype=object))
    await expect(stub.ModelInfer(strings), grpc.StatusCode.INVALID_ARGUMENT,
                 "input 'x': BYTES element 1 is not valid UTF-8")


async def test_unknown_model_loading_and_failed_models(server, stub):
    await expect(stub.ModelInfer(mlp_request(np.ones((1, 8), np.float32), model="nope")),
                 grpc.StatusCode.NOT_FOUND, "unknown model 'nope'")
    await expect(stub.ModelMetadata(pb.ModelMetadataRequest(name="nope")), grpc.StatusCode.NOT_FOUND, "nope")
    await expect(stub.ModelConfig(pb.ModelConfigRequest(name="mlp", version="4")), grpc.StatusCode.NOT_FOUND,
                 "model 'mlp' has no version 4")
    server.data_plane.mark_loading("later", "1")
    await expect(stub.ModelInfer(mlp_request(np.ones((1, 8), np.float32), model="later")),
                 grpc.StatusCode.UNAVAILABLE, "model 'later' version 1 is still loading")
    await expect(stub.ModelInfer(mlp_request(np.ones((1, 8), np.float32), model="broken")),
                 grpc.StatusCode.UNAVAILABLE, "model 'broken' version 1 failed to load", "ONNX Runtime cannot load")
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="later"))).ready


async def test_repository_reports_failures_with_reasons(stub):
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
    states = {m.name: (m.state, m.reason) for m in index.models}
    assert states["mlp"] == ("READY", "")
    assert states["broken"][0] == "UNAVAILABLE"
    assert "ONNX Runtime cannot load model.onnx" in states["broken"][1]
    assert states["misconfigured"][0] == "UNAVAILABLE"
    assert "misconfigured/config.json is invalid" in states["misconfigured"][1]
    assert "max_batch_size" in states["misconfigured"][1] and "colour" in states["misconfigured"][1]
    ready = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert {m.state for m in ready.models} == {"READY"} and "broken" not in {m.name for m in ready.models}
    await expect(stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken")),
                 grpc.StatusCode.FAILED_PRECONDITION, "failed to load model 'broken'", "version 1")
    await expect(stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="../etc")),
                 grpc.StatusCode.INVALID_ARGUMENT, "invalid model name")
    request = pb.RepositoryModelLoadRequest(model_name="mlp")
    request.parameters["config"].string_param = "{}"
    await expect(stub.RepositoryModelLoad(request), grpc.StatusCode.INVALID_ARGUMENT,
                 "repository parameters (config) are not supported")


# ------------------------------------------------------------------------------------ batching


async def test_concurrent_clients_get_exactly_their_results(server):
    session = ort.InferenceSession(MLP.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((int(rng.integers(1, 9)), 8)).astype(np.float32) for _ in range(64)]
    expected = [session.run(None, {"x": x})[0] for x in inputs]
    before = server.data_plane.statistics("mlp")[0]
    clients = [triton_aio.InferenceServerClient(server.grpc.address) for _ in range(64)]

    async def call(client, i: int):
        tensor = triton.InferInput("x", list(inputs[i].shape), "FP32")
        tensor.set_data_from_numpy(inputs[i])
        return await client.infer("mlp", [tensor], request_id=str(i))

    try:
        results = await asyncio.gather(*(call(client, i) for i, client in enumerate(clients)))
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    for i, result in enumerate(results):
        assert result.get_response().id == str(i)
        np.testing.assert_allclose(result.as_numpy("y"), expected[i], rtol=1e-5, atol=1e-5)
    stats = server.data_plane.statistics("mlp")[0]
    requests = stats.inference_stats.success.count - before.inference_stats.success.count
    executions = stats.execution_count - before.execution_count
    assert requests == 64 and stats.inference_count - before.inference_count == sum(len(x) for x in inputs)
    assert executions < requests, "batching did not merge any requests"
    assert max(b.batch_size for b in stats.batch_stats) <= 16 + 8  # max_batch_size, or one oversized request


async def test_requests_with_different_inner_shapes_are_not_merged(server, stub):
    shapes = [(1, 2), (2, 3), (1, 2), (3, 3), (2, 5)]
    arrays = [np.random.default_rng(i).standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)]
    requests = []
    for x in arrays:
        request = pb.ModelInferRequest(model_name="ragged")
        add_raw_input(request, "x", x)
        requests.append(stub.ModelInfer(request))
    responses = await asyncio.gather(*requests)
    for x, response in zip(arrays, responses):
        assert tuple(response.outputs[0].shape) == x.shape
        np.testing.assert_allclose(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(x.shape), x * 2)
    stats = server.data_plane.statistics("ragged")[0]
    assert stats.execution_count >= 3  # at least one execution per distinct inner shape (2, 3, 5)
    assert stats.inference_count == sum(s[0] for s in shapes)


async def test_full_queue_is_resource_exhausted(server, stub):
    (instance,) = SMALL_QUEUE.instances
    instance.release.clear()
    x = np.ones((1, 4), np.float32)
    running = asyncio.ensure_future(stub.ModelInfer(mlp_request(x, "small-queue")))
    await _until(lambda: instance.calls == 2)  # warm-up, then this one (blocked)
    queued = [asyncio.ensure_future(stub.ModelInfer(mlp_request(x, "small-queue"))) for _ in range(2)]
    await _until(lambda: server.data_plane.queued("small-queue") == 2)
    await expect(stub.ModelInfer(mlp_request(x, "small-queue")), grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "queue of model 'small-queue' version 1 is full (2 requests waiting)")
    instance.release.set()
    await asyncio.gather(running, *queued)


async def test_queue_timeout_and_caller_deadline(server, stub):
    (instance,) = QUEUE_TIMEOUT.instances
    instance.release.clear()
    x = np.ones((1, 4), np.float32)
    running = asyncio.ensure_future(stub.ModelInfer(mlp_request(x, "timeout")))
    await _until(lambda: instance.calls == 2)
    await expect(stub.ModelInfer(mlp_request(x, "timeout")), grpc.StatusCode.DEADLINE_EXCEEDED,
                 "waited more than the 100 ms queue timeout of model 'timeout' version 1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(mlp_request(x, "timeout"), timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    instance.release.set()
    await running


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------------------------ the server


async def test_health_reflection_and_metrics(repository):
    # Its own server: a metrics endpoint costs its HTTP server's 0.5 s shutdown poll.
    async with serving(repository, metrics_port=0) as server:
        await _check_health_reflection_and_metrics(server)


async def _check_health_reflection_and_metrics(server):
    channel = grpc.aio.insecure_channel(server.grpc.address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            status = (await health.Check(health_pb2.HealthCheckRequest(service=service))).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()

    def reflect() -> tuple[list[str], list[str]]:
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
        from google.protobuf.descriptor_pool import DescriptorPool

        with grpc.insecure_channel(server.grpc.address) as sync_channel:
            database = ProtoReflectionDescriptorDatabase(sync_channel)
            services = list(database.get_services())
            pool = DescriptorPool(database)
            methods = [m.name for m in pool.FindServiceByName(SERVICE_NAME).methods]
        return services, methods

    services, methods = await asyncio.to_thread(reflect)
    assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
    assert {"ModelInfer", "ModelStreamInfer", "RepositoryIndex"} <= set(methods)

    client = triton_aio.InferenceServerClient(server.grpc.address)
    try:
        tensor = triton.InferInput("x", [1, 8], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 8), np.float32))
        await client.infer("mlp", [tensor])
    finally:
        await client.close()
    port = server.metrics_endpoint.port
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    assert 'aimaas_inference_requests_total{model="mlp",outcome="success",version="1"}' in text
    assert 'aimaas_inference_loaded_models{backend="onnxruntime"}' in text
    assert 'aimaas_grpc_server_handled_total{code="OK",method="/inference.GRPCInferenceService/ModelInfer"}' in text


async def test_mesh_mode_repository_calls_are_refused():
    """Without a repository (mesh mode) the scheduler places models: load/unload are refused."""
    log = structlog.get_logger()
    telemetry = setup_telemetry(TelemetrySettings(), "test")
    metrics = Metrics()
    settings = InferenceServerSettings(grpc_port=0, metrics_port=-1, shutdown_grace_seconds=0)
    plane = DataPlane(settings, registry=CollectorRegistry(), telemetry=telemetry, logger=log, backends={})
    plane.mark_loading("mlp", "3")
    service = GrpcService(settings, metrics=metrics, telemetry=telemetry, logger=log, reflection_pool=reflection_pool_of(pb.DESCRIPTOR))
    service.add_service(SERVICE_NAME, register(InferenceServicer(plane, None, version="t", is_ready=lambda: True, logger=log)))
    await service.start()
    channel = grpc.aio.insecure_channel(service.address)
    try:
        stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
        await expect(stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp")),
                     grpc.StatusCode.FAILED_PRECONDITION, "models on a mesh node are placed by the scheduler")
        await expect(stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mlp")),
                     grpc.StatusCode.FAILED_PRECONDITION, "placed by the scheduler")
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state) for m in index.models] == [("mlp", "3", "LOADING")]
    finally:
        await channel.close()
        await service.stop()
        await plane.close()


def test_cli_flags_map_onto_settings(tmp_path):
    args = parse_args(["--model-repository", str(tmp_path), "--port", "0", "--metrics-port", "-1"])
    settings = settings_from_args(args, InferenceSettings())
    assert settings.inference.model_repository == tmp_path
    assert settings.inference.grpc_port == 0 and settings.inference.metrics_port == -1
    with pytest.raises(SystemExit, match="is not a directory"):
        settings_from_args(parse_args(["--model-repository", str(tmp_path / "missing")]), InferenceSettings())
    with pytest.raises(SystemExit):
        parse_args(["--port", "70000"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_standalone_process_serves_and_stops_on_sigterm(tmp_path):
    write_model(tmp_path / "models", "mlp", MLP)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMAAS_")}
    env["AIMAAS_LOG__LEVEL"] = "WARNING"
    process = subprocess.Popen(
        [sys.executable, "-m", "services.inference", "--model-repository", str(tmp_path / "models"),
         "--port", str(port), "--metrics-port", "-1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.is_server_ready():
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        tensor = triton.InferInput("x", [1, 8], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 8), np.float32))
        assert client.infer("mlp", [tensor]).as_numpy("y").shape == (1, 5)
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_rpc_spans_parent_queue_wait_and_link_the_batch(repository):
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(TelemetrySettings(), "inference", extra_processors=[SimpleSpanProcessor(exporter)])
    async with running_inference(inference_settings(repository), telemetry=telemetry) as app:
        channel = grpc.aio.insecure_channel(app.grpc.address)
        try:
            stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            await asyncio.gather(*(stub.ModelInfer(mlp_request(np.ones((1, 8), np.float32))) for _ in range(4)))
        finally:
            await channel.close()
    spans = exporter.get_finished_spans()
    rpc_spans = {s.context.span_id: s for s in spans if s.name.endswith("ModelInfer")}
    queue_spans = [s for s in spans if s.name == "queue wait"]
    batch_spans = [s for s in spans if s.name == "batch execution"]
    assert len(rpc_spans) == 4 and len(queue_spans) == 4 and batch_spans
    assert {s.parent.span_id for s in queue_spans} == set(rpc_spans)
    linked = {link.context.span_id for batch in batch_spans for link in batch.links}
    assert linked == set(rpc_spans)
    assert all(batch.parent.span_id in rpc_spans for batch in batch_spans)
    assert all(s.context.trace_id == rpc_spans[s.parent.span_id].context.trace_id for s in queue_spans)


# ------------------------------------------------- per-request deadline and in-band status (streams)


def _with_timeout(request: pb.ModelInferRequest, microseconds) -> pb.ModelInferRequest:
    if isinstance(microseconds, str):
        request.parameters["timeout"].string_param = microseconds
    else:
        request.parameters["timeout"].int64_param = microseconds
    return request


async def test_request_timeout_parameter_is_the_requests_deadline(server, stub):
    """Triton's `timeout` request parameter (µs) bounds a request, unary or on a stream, where a
    stream's own deadline cannot (the gateway multiplexes many callers on one stream)."""
    (instance,) = SMALL_QUEUE.instances
    instance.release.clear()
    x = np.ones((1, 4), np.float32)
    running = asyncio.ensure_future(stub.ModelInfer(mlp_request(x, "small-queue")))
    await _until(lambda: instance.calls == 2)  # warm-up, then this one (blocked)

    started = time.monotonic()
    await expect(stub.ModelInfer(_with_timeout(mlp_request(x, "small-queue"), 50_000)), grpc.StatusCode.DEADLINE_EXCEEDED,
                 "waiting in the queue of model 'small-queue' version 1")
    assert time.monotonic() - started < 5  # the request's 50 ms, not the blocked model's release
    await expect(stub.ModelInfer(_with_timeout(mlp_request(x, "small-queue"), "soon")), grpc.StatusCode.INVALID_ARGUMENT,
                 "request parameter 'timeout' must be a non-negative int64 (microseconds)")

    call = stub.ModelStreamInfer()
    timed = _with_timeout(mlp_request(x, "small-queue"), 50_000)
    timed.id = "timed"
    await call.write(timed)
    (response,) = [await call.read()]
    assert response.infer_response.id == "timed"
    assert "waiting in the queue" in response.error_message
    assert response.infer_response.parameters["aimaas_status"].string_param == "DEADLINE_EXCEEDED"
    instance.release.set()
    await running

    # Every in-band error says its status code, as a unary call's status would.
    for request, code in (
        (mlp_request(np.ones((1, 8), np.float32), "nope"), "NOT_FOUND"),
        (mlp_request(np.ones((1, 7), np.float32)), "INVALID_ARGUMENT"),
        (_with_timeout(mlp_request(np.ones((1, 8), np.float32)), -1), "INVALID_ARGUMENT"),
    ):
        await call.write(request)
        response = await call.read()
        assert response.error_message
        assert response.infer_response.parameters["aimaas_status"].string_param == code, response.error_message
    # A generous timeout changes nothing for a request that is served.
    await call.write(_with_timeout(mlp_request(np.ones((1, 8), np.float32)), 10_000_000))
    response = await call.read()
    assert not response.error_message and response.infer_response.outputs[0].shape == [1, 5]
    await call.done_writing()
