"""Dynamic batching semantics, through the data plane on a pure-Python fake backend."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from inference import grpc_predict_v2_pb2 as pb
from services.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from services.common.settings import TelemetrySettings
from services.common.tracing import setup_telemetry
from services.inference.backends.base import TensorInfo
from services.inference.batcher import ExecutionFailed
from services.inference.dataplane import DataPlane, ModelSpec
from services.inference.settings import BatchingDefaults, InferenceServerSettings
from services.inference.tensors import add_raw_input
from tests.support.inference import fake_backend


async def loaded(tmp_path, *, telemetry=None, **backend_attributes):
    """A data plane with model 'm' (fake backend, y = 2x) loaded; returns (plane, backend instance)."""
    batching = backend_attributes.pop("batching", BatchingDefaults())
    # Default: every batch on the model thread, so tests can hold one there with `block`.
    inline_us = backend_attributes.pop("inline_us", 0)
    backend = fake_backend(**backend_attributes)
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"x")
    plane = DataPlane(
        InferenceServerSettings(backends=["fake"], batching=batching, inline_execution_below_us=inline_us),
        registry=CollectorRegistry(),
        telemetry=telemetry or setup_telemetry(TelemetrySettings(), "test"),
        logger=structlog.get_logger(),
        backends={"fake": backend},
    )
    await plane.load(ModelSpec("m", "1", artifact))
    instance = backend.instances[0]
    instance.executions.clear()  # forget the warm-up
    return plane, instance


def request(x: np.ndarray, **fields) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", **fields)
    add_raw_input(message, "x", x)
    return message


def result(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(tuple(response.outputs[0].shape))


def block(instance) -> None:
    instance.release.clear()


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


async def test_waiting_requests_merge_and_each_gets_its_own_rows(tmp_path):
    plane, backend = await loaded(tmp_path)
    block(backend)
    first = asyncio.create_task(plane.infer(request(np.full((1, 4), -1, np.float32))))
    await until(lambda: len(backend.executions) == 1)  # running, holding the model thread
    sizes = [3, 1, 2, 4]
    inputs = [np.random.default_rng(i).standard_normal((n, 4)).astype(np.float32) for i, n in enumerate(sizes)]
    waiting = [asyncio.create_task(plane.infer(request(x, id=f"r{i}"))) for i, x in enumerate(inputs)]
    await asyncio.sleep(0.02)
    backend.release.set()
    await first
    responses = await asyncio.gather(*waiting)
    assert [e["x"].shape[0] for e in backend.executions] == [1, sum(sizes)]  # one merged batch
    for i, (x, response) in enumerate(zip(inputs, responses)):
        assert response.id == f"r{i}"
        np.testing.assert_array_equal(result(response), x * 2)
    stats = plane.statistics("m")[0]
    assert stats.execution_count == 2 and stats.inference_count == 11
    assert stats.inference_stats.success.count == 5 and stats.inference_stats.compute_infer.count == 5
    assert sorted(b.batch_size for b in stats.batch_stats) == [1, 10]
    await plane.close()


async def test_max_batch_size_splits_in_arrival_order(tmp_path):
    plane, backend = await loaded(tmp_path, batching=BatchingDefaults(max_batch_size=4))
    block(backend)
    first = asyncio.create_task(plane.infer(request(np.zeros((1, 4), np.float32))))
    await until(lambda: len(backend.executions) == 1)
    waiting = [asyncio.create_task(plane.infer(request(np.full((n, 4), n, np.float32)))) for n in (2, 2, 3, 1)]
    await asyncio.sleep(0.02)
    backend.release.set()
    await asyncio.gather(first, *waiting)
    # 2+2 fill a batch; 3 does not fit after them and 1 stays behind it (arrival order).
    assert [e["x"].shape[0] for e in backend.executions] == [1, 4, 4]
    await plane.close()


async def test_incompatible_shapes_are_not_merged(tmp_path):
    plane, backend = await loaded(tmp_path, input_specs=(TensorInfo("x", "FP32", (-1, -1)),))
    block(backend)
    first = asyncio.create_task(plane.infer(request(np.zeros((1, 2), np.float32))))
    await until(lambda: len(backend.executions) == 1)
    shapes = [(1, 2), (2, 3), (1, 2), (1, 3)]
    waiting = [asyncio.create_task(plane.infer(request(np.ones(s, np.float32)))) for s in shapes]
    await asyncio.sleep(0.02)
    backend.release.set()
    await first
    responses = await asyncio.gather(*waiting)
    assert [e["x"].shape for e in backend.executions] == [(1, 2), (2, 2), (3, 3)]
    assert [tuple(r.outputs[0].shape) for r in responses] == shapes
    await plane.close()


async def test_oversized_request_runs_alone(tmp_path):
    plane, backend = await loaded(tmp_path, batching=BatchingDefaults(max_batch_size=4))
    response = await plane.infer(request(np.ones((9, 4), np.float32)))
    assert result(response).shape == (9, 4)
    assert [e["x"].shape[0] for e in backend.executions] == [9]
    await plane.close()


async def test_request_beyond_the_backend_limit_is_rejected(tmp_path):
    plane, _ = await loaded(tmp_path, limit=8, batching=BatchingDefaults(max_batch_size=4))
    with pytest.raises(InvalidArgument, match="the request has 9 rows but model 'm' version 1 executes at most 8 rows"):
        await plane.infer(request(np.ones((9, 4), np.float32)))
    await plane.infer(request(np.ones((8, 4), np.float32)))  # within the limit: runs alone
    await plane.close()


async def test_full_queue_is_resource_exhausted(tmp_path):
    plane, backend = await loaded(tmp_path, batching=BatchingDefaults(max_queue_size=2))
    block(backend)
    first = asyncio.create_task(plane.infer(request(np.zeros((1, 4), np.float32))))
    await until(lambda: len(backend.executions) == 1)
    queued = [asyncio.create_task(plane.infer(request(np.zeros((1, 4), np.float32)))) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="queue of model 'm' version 1 is full \\(2 requests waiting\\)"):
        await plane.infer(request(np.zeros((1, 4), np.float32)))
    backend.release.set()
    await asyncio.gather(first, *queued)
    assert plane.statistics("m")[0].inference_stats.fail.count == 1
    await plane.close()


async def test_queue_timeout_is_deadline_exceeded(tmp_path):
    plane, backend = await loaded(tmp_path, batching=BatchingDefaults(default_timeout_ms=50))
    block(backend)
    first = asyncio.create_task(plane.infer(request(np.zeros((1, 4), np.float32))))
    await until(lambda: len(backend.executions) == 1)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="waited more than the 50 ms queue timeout of model 'm' version 1"):
        await plane.infer(request(np.zeros((1, 4), np.float32)))
    assert 0.04 < time.monotonic() - started < 1.0
    # A request already executing is not subject to the queue timeout.
    await asyncio.sleep(0.03)
    backend.release.set()
    await first
    await plane.close()


async def test_caller_deadline_while_queued_and_while_executing(tmp_path):
    plane, backend = await loaded(tmp_path)
    loop = asyncio.get_running_loop()
    block(backend)
    executing = asyncio.create_task(plane.infer(request(np.zeros((1, 4), np.float32)), deadline=loop.time() + 0.05))
    await until(lambda: len(backend.executions) == 1)
    with pytest.raises(DeadlineExceeded, match="deadline exceeded after .* ms waiting in the queue"):
        await plane.infer(request(np.zeros((1, 4), np.float32)), deadline=loop.time() + 0.05)
    with pytest.raises(DeadlineExceeded, match="while model 'm' version 1 was executing"):
        await executing
    with pytest.raises(DeadlineExceeded, match="before the request reached the queue"):
        await plane.infer(request(np.zeros((1, 4), np.float32)), deadline=loop.time() - 1)
    backend.release.set()
    await plane.infer(request(np.zeros((1, 4), np.float32)))  # the model thread is free again
    await plane.close()


async def test_cancelled_caller_leaves_the_queue(tmp_path):
    plane, backend = await loaded(tmp_path)
    block(backend)
    first = asyncio.create_task(plane.infer(request(np.zeros((1, 4), np.float32))))
    await until(lambda: len(backend.executions) == 1)
    gone = asyncio.create_task(plane.infer(request(np.ones((1, 4), np.float32))))
    kept = asyncio.create_task(plane.infer(request(np.full((1, 4), 3, np.float32))))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0.01)
    backend.release.set()
    await first
    np.testing.assert_array_equal(result(await kept), np.full((1, 4), 6, np.float32))
    assert [e["x"].tolist() for e in backend.executions][1] == [[3, 3, 3, 3]]
    stats = plane.statistics("m")[0]
    assert stats.inference_stats.fail.count == 1
    await plane.close()


async def test_batching_disabled_runs_each_request_alone_off_the_loop(tmp_path):
    plane, backend = await loaded(tmp_path, batching=BatchingDefaults(enabled=False))
    loop_thread = threading.get_ident()
    threads = []
    original = type(backend).infer

    def record(self, inputs, names):
        threads.append(threading.get_ident())
        return original(self, inputs, names)

    type(backend).infer = record
    responses = await asyncio.gather(*(plane.infer(request(np.full((2, 4), i, np.float32))) for i in range(6)))
    assert [e["x"].shape[0] for e in backend.executions] == [2] * 6
    assert len(set(threads)) == 1 and threads[0] != loop_thread  # one model thread, not the loop
    for i, response in enumerate(responses):
        np.testing.assert_array_equal(result(response), np.full((2, 4), 2 * i, np.float32))
    assert plane.config("m").max_batch_size == 0 and list(plane.config("m").input[0].dims) == [-1, 4]
    await plane.close()


async def test_queue_delay_waits_for_rows_but_not_past_a_full_batch(tmp_path):
    plane, backend = await loaded(tmp_path, batching=BatchingDefaults(max_batch_size=4, max_queue_delay_us=300_000))
    started = time.monotonic()
    await asyncio.gather(*(plane.infer(request(np.ones((1, 4), np.float32))) for _ in range(4)))
    assert time.monotonic() - started < 0.25  # full at 4 rows: dispatched without waiting
    assert [e["x"].shape[0] for e in backend.executions] == [4]
    started = time.monotonic()
    await plane.infer(request(np.ones((1, 4), np.float32)))
    assert time.monotonic() - started >= 0.29  # alone: held for the queue delay
    assert plane.config("m").dynamic_batching.max_queue_delay_microseconds == 300_000
    await plane.close()


async def test_a_failed_batch_fails_its_requests_only(tmp_path):
    plane, backend = await loaded(tmp_path, fail_infer="CUDA error: an illegal memory access")
    with pytest.raises(ExecutionFailed, match="model 'm' version 1 failed to execute: CUDA error"):
        await plane.infer(request(np.ones((1, 4), np.float32)))
    type(backend).fail_infer = ""
    await plane.infer(request(np.ones((1, 4), np.float32)))
    assert plane.statistics("m")[0].inference_stats.fail.count == 1
    await plane.close()


async def test_spans_queue_wait_and_linked_batch(tmp_path):
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(TelemetrySettings(), "test", extra_processors=[SimpleSpanProcessor(exporter)])
    plane, backend = await loaded(tmp_path, telemetry=telemetry)
    tracer = telemetry.tracer("test")
    block(backend)
    first = asyncio.create_task(plane.infer(request(np.zeros((1, 4), np.float32))))  # untraced: no spans
    await until(lambda: len(backend.executions) == 1)
    request_spans, tasks = [], []
    for i in range(3):
        span = tracer.start_span(f"request {i}")
        request_spans.append(span)
        tasks.append(asyncio.create_task(plane.infer(request(np.ones((1, 4), np.float32)), parent=trace.set_span_in_context(span))))
    await asyncio.sleep(0.02)
    backend.release.set()
    await asyncio.gather(first, *tasks)
    for span in request_spans:
        span.end()
    spans = exporter.get_finished_spans()
    queue_spans = [s for s in spans if s.name == "queue wait"]
    (batch,) = [s for s in spans if s.name == "batch execution"]
    request_ids = {s.context.span_id for s in request_spans}
    assert len(queue_spans) == 3 and {s.parent.span_id for s in queue_spans} == request_ids
    assert {link.context.span_id for link in batch.links} == request_ids
    assert batch.parent.span_id in request_ids
    assert batch.attributes["aimaas.batch.requests"] == 3 and batch.attributes["aimaas.batch.rows"] == 3
    await plane.close()



def executing_threads(backend) -> list:
    """The thread of each execution of `backend` from now on, in order."""
    threads = []
    original = backend.infer

    def infer(inputs, outputs):
        threads.append(threading.current_thread())
        return original(inputs, outputs)

    backend.infer = infer
    return threads


async def test_fast_batches_move_onto_the_loop_and_slow_ones_back_to_the_thread(tmp_path):
    plane, backend = await loaded(tmp_path, inline_us=10_000)
    x = np.ones((2, 4), np.float32)
    threads = executing_threads(backend)
    first = await plane.infer(request(x))  # no measurement yet: the model thread
    assert threads[-1] is not threading.main_thread()
    second = await plane.infer(request(x))  # measured fast, nothing waiting: at once, on the loop
    assert threads[-1] is threading.main_thread()
    np.testing.assert_array_equal(result(first), 2 * x)
    np.testing.assert_array_equal(result(second), 2 * x)
    # Concurrent callers each run at once: nothing is ever waiting to merge with.
    before = len(backend.executions)
    responses = await asyncio.gather(*(plane.infer(request(np.full((1, 4), i, np.float32))) for i in range(5)))
    assert [e["x"].shape[0] for e in backend.executions[before:]] == [1] * 5
    for i, response in enumerate(responses):
        np.testing.assert_array_equal(result(response), np.full((1, 4), 2 * i, np.float32))
    # A failure on the loop reaches its caller as a precise error, and the model keeps serving.
    backend.fail_infer = "kaput"
    with pytest.raises(ExecutionFailed, match="kaput"):
        await plane.infer(request(x))
    assert threads[-1] is threading.main_thread()
    backend.fail_infer = ""
    np.testing.assert_array_equal(result(await plane.infer(request(x))), 2 * x)
    # A slow model drifts back to the thread as its moving average crosses the bound.
    backend.delay_seconds = 0.2
    for _ in range(3):
        await plane.infer(request(x))
    assert threads[-1] is not threading.main_thread()
    await plane.close()


async def test_one_stalled_run_does_not_move_a_fast_model_off_the_loop(tmp_path):
    plane, backend = await loaded(tmp_path, inline_us=10_000)
    x = np.ones((1, 4), np.float32)
    threads = executing_threads(backend)
    await plane.infer(request(x))  # measured on the thread
    await plane.infer(request(x))  # fast: on the loop
    backend.delay_seconds = 0.15  # one run stalls (a preempted thread): alone it would lift the average past 10 ms
    await plane.infer(request(x))
    backend.delay_seconds = 0
    await plane.infer(request(x))
    assert threads[-1] is threading.main_thread()
    backend.delay_seconds = 0.15  # two slow runs in a row: the model did become slow
    await plane.infer(request(x))
    await plane.infer(request(x))
    backend.delay_seconds = 0
    await plane.infer(request(x))
    assert threads[-1] is not threading.main_thread()
    await plane.close()


async def test_fast_batches_with_a_queue_delay_still_merge_on_the_loop(tmp_path):
    import threading

    batching = BatchingDefaults(max_queue_delay_us=20_000)
    plane, backend = await loaded(tmp_path, inline_us=10_000, batching=batching)
    threads = executing_threads(backend)
    await plane.infer(request(np.ones((1, 4), np.float32)))  # measured on the thread
    before = len(backend.executions)
    responses = await asyncio.gather(*(plane.infer(request(np.full((1, 4), i, np.float32))) for i in range(5)))
    assert [e["x"].shape[0] for e in backend.executions[before:]] == [5]  # held, then one merged batch
    assert threads[-1] is threading.main_thread()
    for i, response in enumerate(responses):
        np.testing.assert_array_equal(result(response), np.full((1, 4), 2 * i, np.float32))
    await plane.close()


async def test_a_failed_batch_on_the_loop_fails_its_requests_and_the_model_keeps_serving(tmp_path):
    batching = BatchingDefaults(max_queue_delay_us=20_000)
    plane, backend = await loaded(tmp_path, inline_us=10_000, batching=batching)
    await plane.infer(request(np.ones((1, 4), np.float32)))  # measured on the thread
    backend.fail_infer = "kaput"
    outcomes = await asyncio.gather(
        *(plane.infer(request(np.full((1, 4), i, np.float32))) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, ExecutionFailed) and "failed to execute: kaput" in o.message for o in outcomes)
    backend.fail_infer = ""
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(result(await plane.infer(request(x))), 2 * x)
    stats = plane.statistics("m")[0]
    assert stats.inference_stats.fail.count == 3 and stats.inference_stats.success.count == 2
    await plane.close()
