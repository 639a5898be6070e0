"""The gateway's multiplexed inference stream to a node (services.gateway.upstream.NodeStream) over
real gRPC: against a real inference node (answers, ids, in-band statuses) and against a scripted
node (deadlines, parameters sent, callers going away, the stream breaking)."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import hpack
import numpy as np
import onnxruntime as ort
import pytest

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common import oip_stream
from services.common.h2grpc import H2GrpcServer, wire
from services.gateway.dataplane import _stream_size_ok
from services.gateway.upstream import Upstream
from services.inference.tensors import add_raw_input
from tests.support.inference import inference_settings, running_inference, write_model
from tests.support.models import mlp_model

MLP = mlp_model(inputs=4, hidden=8, outputs=3, seed=9)


def _request(x: np.ndarray, model: str = "mlp", request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    add_raw_input(request, "x", x)
    return request


def _output(response: pb.ModelInferResponse) -> np.ndarray:
    (tensor,) = response.outputs
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(tensor.shape))


@pytest.fixture
async def node(tmp_path):
    write_model(tmp_path / "models", "mlp", MLP, config={"max_batch_size": 32})
    async with running_inference(inference_settings(tmp_path / "models")) as app:
        yield app.grpc.address


@pytest.fixture
async def upstream():
    upstream = Upstream(eject_seconds=1.0, max_message_bytes=4 * 1024 * 1024)
    yield upstream
    await upstream.close()


async def test_concurrent_callers_share_one_stream_and_each_gets_its_own_answer(node, upstream):
    reference = ort.InferenceSession(MLP.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = random.Random(5)
    stream = upstream.stream(node)
    requests = []
    for i in range(64):
        x = np.random.default_rng(i).standard_normal((rng.randint(1, 8), 4)).astype(np.float32)
        # Callers' ids collide (or are empty): the stream's own ids keep them apart.
        requests.append((x, _request(x, request_id=["", "same", f"id-{i}"][i % 3])))
    sent = [request.SerializeToString() for _, request in requests]
    responses = await asyncio.gather(*(stream.infer(request, 10.0) for _, request in requests))
    for (x, request), response, before in zip(requests, responses, sent, strict=True):
        np.testing.assert_allclose(_output(response), reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
        assert response.id == request.id
        assert request.SerializeToString() == before  # the caller's message is left as it was
    assert upstream.stream(node) is stream and not stream.closed and stream.pending == 0


async def test_in_band_errors_keep_their_status_and_the_stream(node, upstream):
    stream = upstream.stream(node)
    for request, code, fragment in (
        (_request(np.ones((1, 4), np.float32), model="ghost"), grpc.StatusCode.NOT_FOUND, "unknown model 'ghost'"),
        (_request(np.ones((1, 5), np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "input 'x' has shape [1, 5]"),
        (_request(np.ones((1, 4), np.float32), request_id="x"), None, None),
    ):
        if code is None:
            assert (await stream.infer(request, 10.0)).id == "x"
            continue
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.infer(request, 10.0)
        assert info.value.code() == code and fragment in info.value.details()
    assert not stream.closed


class ScriptedNode(pb_grpc.GRPCInferenceServiceServicer):
    """A node whose stream answers by model name: "echo" at once, "hang" never, "break" by aborting
    the whole stream. Every request received is kept."""

    def __init__(self) -> None:
        self.received: list[pb.ModelInferRequest] = []
        self.streams = 0

    async def ModelStreamInfer(self, request_iterator, context):
        self.streams += 1
        async for request in request_iterator:
            self.received.append(request)
            if request.model_name == "break":
                await context.abort(grpc.StatusCode.INTERNAL, "node crashed")
            if request.model_name == "echo":
                answer = pb.ModelInferResponse(model_name="echo", id=request.id)
                yield pb.ModelStreamInferResponse(infer_response=answer)


@pytest.fixture
async def scripted():
    servicer = ScriptedNode()
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_deadline_and_trace_context_travel_in_the_parameters(scripted, upstream):
    servicer, address = scripted
    stream = upstream.stream(address)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.infer(pb.ModelInferRequest(model_name="hang", id="mine"), 0.3, {"traceparent": "00-ab-cd-01"})
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 < time.monotonic() - started < 5
    # The caller's own shorter timeout parameter wins over the gateway's deadline.
    own = pb.ModelInferRequest(model_name="echo", id="own")
    own.parameters["timeout"].int64_param = 1000
    assert (await stream.infer(own, 5.0)).id == "own"
    hung, echoed = servicer.received
    assert hung.parameters[oip_stream.TIMEOUT_PARAMETER].int64_param == 300_000
    assert hung.parameters["traceparent"].string_param == "00-ab-cd-01"
    assert hung.id != "mine"  # the stream's own id went out; the caller's comes back on the answer
    assert echoed.parameters[oip_stream.TIMEOUT_PARAMETER].int64_param == 1000
    assert not stream.closed and stream.pending == 0


async def test_a_caller_going_away_leaves_the_others_alone(scripted, upstream):
    servicer, address = scripted
    stream = upstream.stream(address)
    waiting = asyncio.ensure_future(stream.infer(pb.ModelInferRequest(model_name="hang"), 30.0))
    while not servicer.received:
        await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert stream.pending == 0
    assert (await stream.infer(pb.ModelInferRequest(model_name="echo", id="after"), 5.0)).id == "after"
    assert servicer.streams == 1


async def test_a_broken_stream_fails_its_waiting_requests_as_unavailable_and_is_replaced(scripted, upstream):
    servicer, address = scripted
    stream = upstream.stream(address)
    waiting = [asyncio.ensure_future(stream.infer(pb.ModelInferRequest(model_name="hang"), 30.0)) for _ in range(3)]
    while len(servicer.received) < 3:
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.infer(pb.ModelInferRequest(model_name="break"), 30.0)
    # UNAVAILABLE: the gateway retries these on another replica.
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "node crashed" in info.value.details()
    for future in waiting:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await future
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert stream.closed
    with pytest.raises(grpc.aio.AioRpcError):
        await stream.infer(pb.ModelInferRequest(model_name="echo"), 5.0)
    replacement = upstream.stream(address)
    assert replacement is not stream
    assert (await replacement.infer(pb.ModelInferRequest(model_name="echo", id="again"), 5.0)).id == "again"
    assert servicer.streams == 2


async def test_a_request_over_the_message_limit_is_refused_and_leaves_the_stream_alone(scripted):
    servicer, address = scripted
    small = Upstream(eject_seconds=1.0, max_message_bytes=1024)
    try:
        stream = small.stream(address)
        big = pb.ModelInferRequest(model_name="echo", raw_input_contents=[b"x" * 2048])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.infer(big, 5.0)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in info.value.details()
        assert stream.pending == 0 and not stream.closed
        assert (await stream.infer(pb.ModelInferRequest(model_name="echo", id="small"), 5.0)).id == "small"
        assert [r.model_name for r in servicer.received] == ["echo"]  # the big one never went out
    finally:
        await small.close()


async def test_a_node_that_is_gone_fails_fast_as_unavailable(upstream):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await upstream.stream("127.0.0.1:1").infer(pb.ModelInferRequest(model_name="echo"), 5.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_only_small_requests_with_raw_tensors_go_on_the_stream():
    small = _request(np.ones((4, 4), np.float32))
    assert _stream_size_ok(small, 1024)
    assert not _stream_size_ok(_request(np.ones((1024, 4), np.float32)), 1024)
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    assert not _stream_size_ok(typed, 1024)
    assert _stream_size_ok(pb.ModelInferRequest(model_name="m"), 1024)  # the node explains what is missing


class RawNode:
    """A node that speaks raw HTTP/2 and grants the gateway a stream window of only `window` bytes,
    so its writes are held by real flow control until the test opens the window (`open_window`).
    Each complete request is answered at once (model name and the stream's id echoed)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.received: list[pb.ModelInferRequest] = []
        self.messages: list[bytes] = []  # the same requests as sent
        self.body = bytearray()  # every request byte the gateway sent on its stream
        self.ready = asyncio.Event()  # the gateway has applied our SETTINGS
        self.address = ""
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve_connection, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def open_window(self, increment: int) -> None:
        assert self._writer is not None
        self._writer.write(wire.window_update(1, increment))

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        encoder, decoder = hpack.Encoder(), hpack.Decoder()
        try:
            assert await reader.readexactly(len(wire.PREFACE)) == wire.PREFACE
            writer.write(wire.settings_frame({wire.SETTINGS_INITIAL_WINDOW_SIZE: self.window}))
            buffer = bytearray()
            while True:
                head = await reader.readexactly(9)
                payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
                kind, flags, stream_id = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                if kind == wire.SETTINGS:
                    if flags & wire.ACK:
                        self.ready.set()
                    else:
                        writer.write(wire.frame(wire.SETTINGS, wire.ACK, 0))
                elif kind == wire.HEADERS:
                    headers = dict(decoder.decode(payload, raw=True))
                    assert headers[b":path"] == b"/inference.GRPCInferenceService/ModelStreamInfer"
                    block = encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
                    writer.write(wire.frame(wire.HEADERS, wire.END_HEADERS, stream_id, block))
                elif kind == wire.DATA:
                    self.body += payload
                    buffer += payload
                    while len(buffer) >= 5 and len(buffer) >= 5 + int.from_bytes(buffer[1:5], "big"):
                        size = int.from_bytes(buffer[1:5], "big")
                        self.messages.append(bytes(buffer[5:5 + size]))
                        del buffer[:5 + size]
                        request = pb.ModelInferRequest.FromString(self.messages[-1])
                        self.received.append(request)
                        answer = pb.ModelStreamInferResponse(
                            infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                        ).SerializeToString()
                        writer.write(wire.frame(wire.DATA, 0, stream_id, len(answer).to_bytes(5, "big") + answer))
                    if flags & wire.END_STREAM:
                        block = encoder.encode([("grpc-status", "0")])
                        writer.write(wire.frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, stream_id, block))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_node():
    node = RawNode(window=10)
    await node.start()
    yield node
    await node.stop()


async def test_requests_that_expire_while_writes_are_held_up_are_never_sent(raw_node, upstream):
    stream = upstream.stream(raw_node.address)
    await asyncio.wait_for(raw_node.ready.wait(), 5)  # the node's 10-byte stream window is in force
    first = asyncio.ensure_future(stream.infer(pb.ModelInferRequest(model_name="first", id="mine"), 10.0))
    while stream.pending == 0:
        await asyncio.sleep(0.01)
    assert stream._stream.queued == 1  # "first" is held by flow control (10 bytes of it went out)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.infer(pb.ModelInferRequest(model_name="expired"), 0.1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stream.pending == 1 and raw_node.received == [] and len(raw_node.body) == 10
    raw_node.open_window(1 << 20)
    assert (await asyncio.wait_for(first, 5)).id == "mine"
    assert (await stream.infer(pb.ModelInferRequest(model_name="later", id="l"), 5.0)).id == "l"
    # "expired" never went out: the node got exactly the other two messages.
    assert [r.model_name for r in raw_node.received] == ["first", "later"]
    assert bytes(raw_node.body) == b"".join(len(m).to_bytes(5, "big") + m for m in raw_node.messages)
    assert not stream.closed and stream.pending == 0


class DrainingNode(ScriptedNode):
    """ScriptedNode plus "slow": answered once the test sets `release`; `ended` once its requests end."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.ended = False

    async def ModelStreamInfer(self, request_iterator, context):
        self.streams += 1
        async for request in request_iterator:
            self.received.append(request)
            if request.model_name in ("echo", "slow"):
                if request.model_name == "slow":
                    await self.release.wait()
                answer = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                yield pb.ModelStreamInferResponse(infer_response=answer)
        self.ended = True


@pytest.fixture(params=["h2", "grpcio"])
async def draining(request):
    servicer = DrainingNode()
    if request.param == "h2":
        server = H2GrpcServer()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = await server.start("127.0.0.1", 0)
    else:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    yield servicer, f"127.0.0.1:{port}", server
    await server.stop(0)


async def _stop_timed(server, grace: float) -> float:
    started = time.monotonic()
    await asyncio.wait_for(server.stop(grace), grace + 5)
    return time.monotonic() - started


async def test_a_node_stopping_gracefully_lets_the_pending_request_finish(draining, upstream):
    servicer, address, server = draining
    stream = upstream.stream(address)
    assert (await stream.infer(pb.ModelInferRequest(model_name="echo", id="before"), 5.0)).id == "before"
    waiting = asyncio.ensure_future(stream.infer(pb.ModelInferRequest(model_name="slow", id="pending"), 10.0))
    while len(servicer.received) < 2:
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(_stop_timed(server, 5.0))  # GOAWAY: in-flight calls may finish
    while not stream.closed:  # no new requests go on a stream to a node that is going away
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.infer(pb.ModelInferRequest(model_name="echo"), 5.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.sleep(0.1)
    assert not waiting.done() and not stopping.done() and stream.pending == 1
    servicer.release.set()
    assert (await asyncio.wait_for(waiting, 5)).id == "pending"
    # The stream half-closes once its last answer is in, so the node's drain ends long before the grace.
    assert await stopping < 2.0
    assert servicer.ended and servicer.streams == 1
    assert stream.closed and stream.pending == 0
    assert upstream.stream(address) is not stream


async def test_a_node_stopping_gracefully_is_not_held_by_an_idle_stream(draining, upstream):
    servicer, address, server = draining
    stream = upstream.stream(address)
    assert (await stream.infer(pb.ModelInferRequest(model_name="echo", id="one"), 5.0)).id == "one"
    assert await _stop_timed(server, 5.0) < 2.0
    assert servicer.ended and stream.closed


async def test_a_node_stopping_gracefully_is_not_held_once_the_last_request_expires(draining, upstream):
    servicer, address, server = draining
    stream = upstream.stream(address)
    waiting = asyncio.ensure_future(stream.infer(pb.ModelInferRequest(model_name="hang"), 0.5))
    while not servicer.received:
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(_stop_timed(server, 5.0))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await waiting
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await stopping < 2.0
    assert servicer.ended and stream.closed


async def test_a_node_leaving_the_routing_table_gets_its_idle_stream_closed(scripted, upstream):
    """A draining node is not held for its whole grace period by the gateway's open stream."""
    _, address = scripted
    stream = upstream.stream(address)
    assert (await stream.infer(pb.ModelInferRequest(model_name="echo", id="one"), 5.0)).id == "one"
    upstream.retain({address})  # still routed: kept
    await asyncio.sleep(0.05)
    assert not stream.closed
    upstream.retain(set())
    for _ in range(100):
        if stream.closed:
            break
        await asyncio.sleep(0.01)
    assert stream.closed
    replacement = upstream.stream(address)  # routed again later: a fresh channel and stream
    assert replacement is not stream
    assert (await replacement.infer(pb.ModelInferRequest(model_name="echo", id="two"), 5.0)).id == "two"


async def test_polling_for_a_lone_request_gives_the_same_answers_and_only_a_lone_request_polls(node, monkeypatch):
    from services.common.aio import poll_while_pending
    from services.gateway import upstream as upstream_module

    polled: list[tuple[asyncio.Future, float, int]] = []  # (future, seconds, requests on the stream then)

    def recording(future, seconds):
        polled.append((future, seconds, stream.pending))
        poll_while_pending(future, seconds)

    monkeypatch.setattr(upstream_module, "poll_while_pending", recording)
    reference = ort.InferenceSession(MLP.SerializeToString(), providers=["CPUExecutionProvider"])
    polling = Upstream(eject_seconds=1.0, max_message_bytes=4 * 1024 * 1024, poll_seconds=0.01)
    try:
        stream = polling.stream(node)
        # One at a time: every request is alone on the stream, so each one polls (for 10 ms).
        for i in range(8):
            x = np.random.default_rng(100 + i).standard_normal((1 + i % 4, 4)).astype(np.float32)
            response = await stream.infer(_request(x, request_id=f"one-{i}"), 10.0)
            np.testing.assert_allclose(_output(response), reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
            assert response.id == f"one-{i}"
            assert len(polled) == i + 1
            future, seconds, pending = polled[-1]
            assert seconds == 0.01 and pending == 1 and future.done()
        # Sixteen at once: all start in the same loop iteration, before any answer can be read, so
        # only the first is alone on the stream; the others find it busy and do not poll.
        polled.clear()
        xs = [np.random.default_rng(200 + i).standard_normal((1 + i % 5, 4)).astype(np.float32) for i in range(16)]
        responses = await asyncio.gather(*(stream.infer(_request(x, request_id=f"many-{i}"), 10.0)
                                           for i, x in enumerate(xs)))
        for i, (x, response) in enumerate(zip(xs, responses, strict=True)):
            np.testing.assert_allclose(_output(response), reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
            assert response.id == f"many-{i}"
        assert [(seconds, pending) for _, seconds, pending in polled] == [(0.01, 1)]
        assert polling.stream(node) is stream and not stream.closed and stream.pending == 0
    finally:
        await polling.close()
    # Without poll_seconds (the default) nothing polls.
    polled.clear()
    plain = Upstream(eject_seconds=1.0, max_message_bytes=4 * 1024 * 1024)
    try:
        stream = plain.stream(node)
        x = np.ones((2, 4), np.float32)
        response = await stream.infer(_request(x), 10.0)
        np.testing.assert_allclose(_output(response), reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    finally:
        await plain.close()
    assert polled == []
