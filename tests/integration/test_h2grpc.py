"""services.common.h2grpc.H2GrpcServer against real gRPC clients (grpc.aio and sync grpcio channels)
and raw sockets on loopback: the four call shapes, metadata, status codes and details, limits,
deadlines, cancellation, health, interceptors, garbage on the wire, and graceful stop.

Handlers work on bytes (no (de)serializers) so every byte on the wire is the test's own.
Every client call carries a deadline so that a server bug fails a test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Callable

import grpc
import hpack
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.h2grpc import H2GrpcServer
from services.common.h2grpc.connection import MAX_CONTROL_ANSWERS_WHILE_PAUSED

pytestmark = pytest.mark.timeout(60)

SERVICE = "test.Echo"
MiB = 1024 * 1024
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def pattern(size: int) -> bytes:
    """Deterministic, non-uniform bytes: a corrupted or reordered chunk cannot compare equal."""
    block = bytes(range(256)) + bytes(range(255, -1, -1)) + b"\x00\x01\x02"
    return (block * (size // len(block) + 1))[:size]


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


# -- the service under test -------------------------------------------------------------------------------


class Probe:
    """What the handlers saw, for assertions on the server side of a call."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()  # set only when a handler is torn down (CancelledError/GeneratorExit)
        self.metadata: tuple | None = None
        self.peer: str | None = None
        self.time_remaining: float | None = None
        self.context_state: tuple | None = None
        self.code_after_set: grpc.StatusCode | None = None
        self.details_after_set: str | None = None
        self.calls = 0


def echo_handlers(probe: Probe) -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context) -> bytes:
        probe.calls += 1
        return request

    async def length(request: bytes, context) -> bytes:
        probe.calls += 1
        return str(len(request)).encode()

    async def meta(request: bytes, context) -> bytes:
        probe.metadata = tuple(tuple(item) for item in context.invocation_metadata())
        probe.peer = context.peer()
        probe.context_state = (context.cancelled(), context.done())
        await context.send_initial_metadata((("x-init", "i"), ("x-init-bin", b"\x00\xff")))
        context.set_trailing_metadata((("x-trail", "t"), ("x-trail-bin", b"\x01\x02\x03")))
        return request

    async def abort(request: bytes, context) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.decode("utf-8"))
        raise AssertionError("abort returned")  # pragma: no cover - abort must raise

    async def set_code(request: bytes, context) -> bytes:
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("no such thing")
        probe.code_after_set = context.code()
        probe.details_after_set = context.details()
        return b"a response the client must not mistake for success"

    async def raise_(request: bytes, context) -> bytes:
        raise RuntimeError("boom")

    async def sleep(request: bytes, context) -> bytes:
        # Request: seconds to sleep, as text.
        probe.time_remaining = context.time_remaining()
        probe.started.set()
        try:
            await asyncio.sleep(float(request.decode()))
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        return b"slept"

    async def big(request: bytes, context) -> bytes:
        return pattern(int(request.decode()))

    def stream_spec(request: bytes) -> tuple[int, int]:
        # Request: b"count" or b"count,size"; message i is u32(i) padded to size bytes.
        count, _, size = request.decode().partition(",")
        return int(count), int(size or 4)

    def numbered(i: int, size: int) -> bytes:
        return u32(i) + pattern(size - 4)

    async def stream_gen(request: bytes, context) -> AsyncIterator[bytes]:
        count, size = stream_spec(request)
        for i in range(count):
            yield numbered(i, size)

    async def stream_write(request: bytes, context) -> None:
        count, size = stream_spec(request)
        for i in range(count):
            await context.write(numbered(i, size))

    async def total(request_iterator, context) -> bytes:
        count = value = 0
        async for message in request_iterator:
            count += 1
            value += int.from_bytes(message, "big")
        return f"{count}:{value}".encode()

    async def bidi(request_iterator, context) -> AsyncIterator[bytes]:
        try:
            async for message in request_iterator:
                probe.started.set()
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            probe.cancelled.set()
            raise

    async def bidi_hang(request_iterator, context) -> AsyncIterator[bytes]:
        # Echoes the first message, then blocks in its own await (not in a read): only a task
        # cancellation can end it early.
        try:
            async for message in request_iterator:
                yield message
                probe.started.set()
                await asyncio.sleep(30)
        except (asyncio.CancelledError, GeneratorExit):
            probe.cancelled.set()
            raise

    async def bidi_reject(request_iterator, context) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not for you")  # before reading anything

    async def bidi_ctx(request_iterator, context) -> None:
        # The read()/write() form: the iterator argument is ignored.
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            await context.write(message)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Len": grpc.unary_unary_rpc_method_handler(length),
        "Meta": grpc.unary_unary_rpc_method_handler(meta),
        "Abort": grpc.unary_unary_rpc_method_handler(abort),
        "SetCode": grpc.unary_unary_rpc_method_handler(set_code),
        "Raise": grpc.unary_unary_rpc_method_handler(raise_),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        "Big": grpc.unary_unary_rpc_method_handler(big),
        "StreamGen": grpc.unary_stream_rpc_method_handler(stream_gen),
        "StreamWrite": grpc.unary_stream_rpc_method_handler(stream_write),
        "Sum": grpc.stream_unary_rpc_method_handler(total),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "BidiCtx": grpc.stream_stream_rpc_method_handler(bidi_ctx),
        "BidiHang": grpc.stream_stream_rpc_method_handler(bidi_hang),
        "BidiReject": grpc.stream_stream_rpc_method_handler(bidi_reject),
    })


class Running:
    def __init__(self, server: H2GrpcServer, port: int, probe: Probe) -> None:
        self.server = server
        self.port = port
        self.probe = probe
        self.target = f"127.0.0.1:{port}"


@pytest.fixture
async def make_server():
    """Start H2GrpcServers with the echo service on free ports; all are stopped at teardown."""
    started: list[H2GrpcServer] = []

    async def make(**kwargs) -> Running:
        probe = Probe()
        server = H2GrpcServer(**kwargs)
        server.add_generic_rpc_handlers((echo_handlers(probe),))
        port = await server.start("127.0.0.1", 0)
        started.append(server)
        return Running(server, port, probe)

    yield make
    for server in started:
        await server.stop(0)


@pytest.fixture
async def echo(make_server) -> Running:
    return await make_server(max_message_bytes=4 * MiB)


@pytest.fixture
async def channel(echo: Running):
    async with grpc.aio.insecure_channel(echo.target) as ch:
        yield ch


def unary(ch: grpc.aio.Channel, name: str):
    return ch.unary_unary(f"/{SERVICE}/{name}")


async def assert_serves(target: str) -> None:
    """A fresh connection still gets a correct answer."""
    async with grpc.aio.insecure_channel(target) as ch:
        assert await unary(ch, "Unary")(b"still alive", timeout=5) == b"still alive"


# -- 1. unary ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"hello", b"", b"\x00", pattern(1000)], ids=["text", "empty", "nul", "1000B"])
async def test_unary_echo_round_trip(channel, payload):
    assert await unary(channel, "Unary")(payload, timeout=5) == payload


async def test_unary_sequential_calls_reuse_the_connection(channel, echo):
    for i in range(50):
        assert await unary(channel, "Unary")(u32(i), timeout=5) == u32(i)
    assert echo.probe.calls == 50


# -- 2. metadata ---------------------------------------------------------------------------------------------


async def test_metadata_both_ways_and_context_accessors(channel, echo):
    call = unary(channel, "Meta")(b"m", metadata=(("x-key", "v"), ("x-bin", b"\x00\x01")), timeout=5)
    assert await call == b"m"

    seen = echo.probe.metadata
    assert ("x-key", "v") in seen
    assert ("x-bin", b"\x00\x01") in seen  # -bin values arrive base64-decoded, as bytes
    # HTTP/2 pseudo-headers and transport headers are not metadata in grpc.aio.
    assert not any(key.startswith(":") or key in ("content-type", "te", "grpc-timeout") for key, _ in seen)
    assert echo.probe.peer.startswith("ipv4:127.0.0.1:"), echo.probe.peer
    assert echo.probe.context_state == (False, False)  # neither cancelled nor done while running

    initial = tuple(await call.initial_metadata())
    assert ("x-init", "i") in initial
    assert ("x-init-bin", b"\x00\xff") in initial
    trailing = tuple(await call.trailing_metadata())
    assert ("x-trail", "t") in trailing
    assert ("x-trail-bin", b"\x01\x02\x03") in trailing
    assert await call.code() == grpc.StatusCode.OK


# -- 3. status codes and details -----------------------------------------------------------------------------


@pytest.mark.parametrize("details", [
    "bad thing: ünïcode % 100",
    "literal %41 and %2 and 100%, tab\tnewline\nend 日本語 🚀",
])
async def test_abort_sends_code_and_exact_details(channel, details):
    # grpc-message is percent-encoded on the wire; the client must decode back to the exact text.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(channel, "Abort")(details.encode("utf-8"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == details


async def test_set_code_without_raising_sends_that_status(channel, echo):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(channel, "SetCode")(b"x", timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "no such thing"
    assert echo.probe.code_after_set == grpc.StatusCode.NOT_FOUND
    assert echo.probe.details_after_set == "no such thing"


# -- 4. unexpected exceptions --------------------------------------------------------------------------------


async def test_handler_exception_is_unknown_and_server_keeps_serving(channel, echo):
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel, "Raise")(b"x", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNKNOWN
    assert await unary(channel, "Unary")(b"after", timeout=5) == b"after"
    await assert_serves(echo.target)


# -- 5. unknown methods --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [f"/{SERVICE}/Nope", "/no.such.Service/Method", "/"])
async def test_unknown_method_or_service_is_unimplemented(channel, path):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(path)(b"x", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert await unary(channel, "Unary")(b"ok", timeout=5) == b"ok"


async def test_unknown_streaming_method_is_unimplemented(channel):
    # No request messages are written: a grpc.aio client whose pending write fails because the call
    # already ended reports INTERNAL instead of the received status (a client-side race that a
    # grpc.aio server triggers too), which would make this test about the client, not the server.
    call = channel.stream_stream(f"/{SERVICE}/NopeStream")(timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    call = channel.unary_stream(f"/{SERVICE}/NopeStream")(b"x", timeout=5)
    assert await call.code() == grpc.StatusCode.UNIMPLEMENTED


# -- 6. server streaming -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["StreamGen", "StreamWrite"])
async def test_server_stream_1000_messages_in_order(channel, method):
    call = channel.unary_stream(f"/{SERVICE}/{method}")(b"1000", timeout=10)
    received = [message async for message in call]
    assert received == [u32(i) for i in range(1000)]
    assert await call.code() == grpc.StatusCode.OK


async def test_server_stream_zero_messages(channel):
    call = channel.unary_stream(f"/{SERVICE}/StreamGen")(b"0", timeout=5)
    assert [message async for message in call] == []
    assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("method", ["StreamGen", "StreamWrite"])
async def test_server_stream_larger_than_flow_control_windows(channel, method):
    # 200 x 64 KiB = 12.5 MiB: far past any initial window, so the server must wait for WINDOW_UPDATEs.
    count, size = 200, 64 * 1024
    call = channel.unary_stream(f"/{SERVICE}/{method}")(f"{count},{size}".encode(), timeout=20)
    index = 0
    async for message in call:
        assert len(message) == size
        assert message == u32(index) + pattern(size - 4)
        index += 1
    assert index == count


# -- 7. client streaming and bidi ----------------------------------------------------------------------------


async def test_client_stream_sums_1000_messages(channel):
    async def requests():
        for i in range(1000):
            yield u32(i)

    result = await channel.stream_unary(f"/{SERVICE}/Sum")(requests(), timeout=10)
    assert result == f"1000:{sum(range(1000))}".encode()


async def test_client_stream_with_no_messages(channel):
    assert await channel.stream_unary(f"/{SERVICE}/Sum")(iter([]), timeout=5) == b"0:0"


@pytest.mark.parametrize("method", ["Bidi", "BidiCtx"])
async def test_bidi_interleaved_write_one_read_one(channel, method):
    call = channel.stream_stream(f"/{SERVICE}/{method}")(timeout=20)
    for i in range(1000):
        await call.write(u32(i))
        assert await call.read() == u32(i)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("method", ["Bidi", "BidiCtx"])
async def test_bidi_write_all_then_read_all(channel, method):
    call = channel.stream_stream(f"/{SERVICE}/{method}")(timeout=20)
    for i in range(1000):
        await call.write(u32(i))
    await call.done_writing()
    received = [message async for message in call]
    assert received == [u32(i) for i in range(1000)]
    assert await call.code() == grpc.StatusCode.OK


# -- 8. large messages ---------------------------------------------------------------------------------------


async def test_large_request_echoed(channel):
    # 3 MiB each way: many DATA frames, and several rounds of WINDOW_UPDATE in both directions.
    payload = pattern(3 * MiB)
    assert await unary(channel, "Unary")(payload, timeout=20) == payload


async def test_large_response_to_tiny_request(channel):
    response = await unary(channel, "Big")(str(3 * MiB).encode(), timeout=20)
    assert response == pattern(3 * MiB)


async def test_large_random_request_echoed(channel):
    payload = os.urandom(3 * MiB + 7)  # not a multiple of any frame or window size
    assert await unary(channel, "Unary")(payload, timeout=20) == payload


async def test_concurrent_1mib_echoes_on_one_channel(channel):
    payloads = [bytes([i]) * 16 + os.urandom(MiB - 16) for i in range(20)]
    results = await asyncio.gather(*(unary(channel, "Unary")(p, timeout=30) for p in payloads))
    assert [len(r) for r in results] == [MiB] * 20
    assert results == payloads


# -- 9. concurrency ------------------------------------------------------------------------------------------


async def test_200_concurrent_unary_calls(channel):
    payloads = [f"call-{i}-".encode() * (i % 7 + 1) for i in range(200)]
    results = await asyncio.gather(*(unary(channel, "Unary")(p, timeout=20) for p in payloads))
    assert results == payloads


async def test_concurrent_mixed_call_shapes(channel):
    async def one_unary(i):
        assert await unary(channel, "Unary")(u32(i), timeout=20) == u32(i)

    async def one_stream(i):
        call = channel.unary_stream(f"/{SERVICE}/StreamGen")(b"50", timeout=20)
        assert [m async for m in call] == [u32(j) for j in range(50)]

    async def one_bidi(i):
        call = channel.stream_stream(f"/{SERVICE}/Bidi")(iter([u32(i)] * 20), timeout=20)
        assert [m async for m in call] == [u32(i)] * 20

    await asyncio.gather(*(f(i) for i in range(30) for f in (one_unary, one_stream, one_bidi)))


# -- 10. message size limit ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "size"), [(4 * MiB, 5 * MiB), (64 * 1024, 100 * 1024), (64 * 1024, 64 * 1024 + 1)],
                         ids=["4MiB-limit-5MiB", "64KiB-limit-100KiB", "64KiB-limit-plus-1"])
async def test_request_over_max_message_bytes_is_resource_exhausted(make_server, limit, size):
    # A message that fits one DATA frame (the 64 KiB limit cases) must be checked as well as one spread
    # over several frames. `Len` answers with a few bytes, so only the request can be over the limit.
    running = await make_server(max_message_bytes=limit)
    async with grpc.aio.insecure_channel(running.target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(ch, "Len")(pattern(size), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert running.probe.calls == 0  # the handler never saw it
        # The same channel (same connection) still works.
        assert await unary(ch, "Unary")(b"next", timeout=5) == b"next"
        # A message of exactly the limit is allowed.
        assert await unary(ch, "Unary")(pattern(limit), timeout=10) == pattern(limit)


async def test_oversized_message_inside_a_client_stream_is_resource_exhausted(make_server):
    running = await make_server(max_message_bytes=64 * 1024)
    async with grpc.aio.insecure_channel(running.target) as ch:
        call = ch.stream_unary(f"/{SERVICE}/Sum")(iter([b"\x01", pattern(200 * 1024), b"\x02"]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await unary(ch, "Unary")(b"next", timeout=5) == b"next"


# -- 11. deadlines -------------------------------------------------------------------------------------------


async def test_deadline_exceeded_promptly_and_handler_cancelled(channel, echo):
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(channel, "Sleep")(b"5", timeout=0.3)
    elapsed = time.monotonic() - start
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 2.0
    remaining = echo.probe.time_remaining
    # The client's grpc-timeout header is rounded up (grpcio sends "301m" for a 0.3 s deadline on a
    # warm connection), so the server may see up to ~1% more than the client asked for; not more.
    assert remaining is not None and 0.1 < remaining <= 0.3 * 1.01 + 0.001
    await asyncio.wait_for(echo.probe.cancelled.wait(), 2)  # the handler must not sleep on for 5 s
    assert await unary(channel, "Unary")(b"after", timeout=5) == b"after"


async def test_server_enforces_grpc_timeout_itself(echo):
    # A grpc client resets the stream on its own deadline, which hides whether the server honours
    # grpc-timeout. A raw HTTP/2 client that never resets shows it: the server must end the call with
    # DEADLINE_EXCEEDED and cancel the handler.
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
    try:
        encoder = hpack.Encoder()
        block = encoder.encode([
            (":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/Sleep"),
            (":authority", echo.target), ("content-type", "application/grpc"), ("te", "trailers"),
            ("grpc-timeout", "200m"),
        ])
        message = b"\x00" + u32(2) + b"30"
        writer.write(PREFACE + h2_frame(4, 0, 0) + h2_frame(1, 0x4, 1, block) + h2_frame(0, 0x1, 1, message))
        await writer.drain()
        start = time.monotonic()
        status = await asyncio.wait_for(read_grpc_status(reader, stream_id=1), 3)
        assert status == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        assert time.monotonic() - start < 2.0
        await asyncio.wait_for(echo.probe.cancelled.wait(), 2)
    finally:
        writer.close()


# -- 12. client cancellation ---------------------------------------------------------------------------------


async def test_client_cancel_of_unary_cancels_handler(channel, echo):
    call = unary(channel, "Sleep")(b"30", timeout=20)
    await asyncio.wait_for(echo.probe.started.wait(), 5)
    assert call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(echo.probe.cancelled.wait(), 2)
    assert await unary(channel, "Unary")(b"after", timeout=5) == b"after"


async def test_client_cancel_of_bidi_cancels_handler(channel, echo):
    call = channel.stream_stream(f"/{SERVICE}/BidiHang")(timeout=20)
    await call.write(b"one")
    assert await call.read() == b"one"
    await asyncio.wait_for(echo.probe.started.wait(), 5)
    assert call.cancel()
    await asyncio.wait_for(echo.probe.cancelled.wait(), 2)
    assert await unary(channel, "Unary")(b"after", timeout=5) == b"after"


# -- 13. health (generated registration) ---------------------------------------------------------------------


async def test_health_check_and_watch():
    server = H2GrpcServer()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = await server.start("127.0.0.1", 0)
    try:
        await servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            response = await stub.Check(health_pb2.HealthCheckRequest(service="svc"), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Check(health_pb2.HealthCheckRequest(service="unknown"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            watch = stub.Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=10)
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await servicer.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
            second = await asyncio.wait_for(watch.read(), 5)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
    finally:
        await server.stop(0)


# -- 14. interceptors ----------------------------------------------------------------------------------------


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "denied by interceptor")


class RecordingInterceptor(grpc.aio.ServerInterceptor):
    """Records what it sees; rejects calls carrying `x-deny: yes`."""

    def __init__(self, name: str, log: list) -> None:
        self.name = name
        self.log = log

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        metadata = tuple(tuple(item) for item in handler_call_details.invocation_metadata)
        self.log.append((self.name, handler_call_details.method, metadata))
        if ("x-deny", "yes") in metadata:
            return grpc.unary_unary_rpc_method_handler(_deny)
        return await continuation(handler_call_details)


async def test_interceptors_see_calls_and_can_reject(make_server):
    log: list = []
    running = await make_server(interceptors=[RecordingInterceptor("outer", log), RecordingInterceptor("inner", log)])
    async with grpc.aio.insecure_channel(running.target) as ch:
        assert await unary(ch, "Unary")(b"ok", metadata=(("x-user", "alice"),), timeout=5) == b"ok"
        assert [entry[0] for entry in log] == ["outer", "inner"]  # in registration order
        assert all(entry[1] == f"/{SERVICE}/Unary" for entry in log)
        assert all(("x-user", "alice") in entry[2] for entry in log)
        assert running.probe.calls == 1

        log.clear()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(ch, "Unary")(b"no", metadata=(("x-deny", "yes"),), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details() == "denied by interceptor"
        assert [entry[0] for entry in log] == ["outer"]  # the outer one short-circuited the chain
        assert running.probe.calls == 1  # the real handler never ran

        # Streaming calls pass through interceptors too.
        log.clear()
        call = ch.unary_stream(f"/{SERVICE}/StreamGen")(b"3", timeout=5)
        assert [m async for m in call] == [u32(i) for i in range(3)]
        assert [entry[1] for entry in log] == [f"/{SERVICE}/StreamGen"] * 2


# -- 15. garbage on the wire ---------------------------------------------------------------------------------


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + u32(stream_id) + payload


async def read_frames(reader: asyncio.StreamReader):
    while True:
        head = await reader.readexactly(9)
        length = int.from_bytes(head[:3], "big")
        payload = await reader.readexactly(length)
        yield head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload


async def read_grpc_status(reader: asyncio.StreamReader, stream_id: int) -> str:
    """grpc-status from the END_STREAM header block of a stream (HEADERS without CONTINUATION)."""
    decoder = hpack.Decoder()
    async for kind, flags, sid, payload in read_frames(reader):
        if kind == 1:  # HEADERS: decode every block to keep the HPACK table in step
            headers = dict(decoder.decode(payload))
            if sid == stream_id and flags & 0x1:
                return headers.get("grpc-status")
        elif kind == 3 and sid == stream_id:
            raise AssertionError(f"stream reset (code {int.from_bytes(payload, 'big')}) before a status")
    raise AssertionError("connection ended without a status")


async def assert_closed_by_server(reader: asyncio.StreamReader, within: float = 2.0) -> None:
    async def until_eof():
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(65536):
                pass

    await asyncio.wait_for(until_eof(), within)


def random_garbage() -> bytes:
    """Seeded random bytes whose first frame header is a DATA or RST_STREAM frame on a stream the client
    never opened: every conforming server must fail the connection on it (RFC 9113 §5.1, §6.1, §6.4)."""
    rng = random.Random(20240601)
    while True:
        head = rng.randbytes(9)
        if head[3] in (0, 3) and int.from_bytes(head[5:9], "big") & 0x7FFFFFFF and int.from_bytes(head[:3], "big") < 16384:
            return head + rng.randbytes(64 * 1024)


GARBAGE = {
    "http1-request": b"GET / HTTP/1.1\r\n\r\n",
    "http1-long-request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n",
    "preface-then-random": PREFACE + random_garbage(),
    "preface-then-oversized-frame": PREFACE + b"\xff" * 64,
    "preface-settings-then-bad-hpack": PREFACE + h2_frame(4, 0, 0) + h2_frame(1, 0x5, 1, b"\xff" * 32),
    "preface-settings-then-headers-on-stream-0": PREFACE + h2_frame(4, 0, 0) + h2_frame(1, 0x5, 0, b"\x82"),
}


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
async def test_garbage_gets_connection_closed_and_server_survives(echo, channel, garbage):
    assert await unary(channel, "Unary")(b"before", timeout=5) == b"before"
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
    try:
        writer.write(garbage)
        with contextlib.suppress(ConnectionResetError):
            await writer.drain()
        await assert_closed_by_server(reader)
    finally:
        writer.close()
    # The existing connection and a new one both still work.
    assert await unary(channel, "Unary")(b"after", timeout=5) == b"after"
    await assert_serves(echo.target)


@pytest.mark.parametrize("sent", [b"", PREFACE[:10], PREFACE], ids=["nothing", "half-preface", "preface-only"])
async def test_client_that_disconnects_early_does_not_hurt_server(echo, sent):
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
        if sent:
            writer.write(sent)
            await writer.drain()
        await asyncio.sleep(0.01)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await asyncio.sleep(0.1)
    await assert_serves(echo.target)
    # No connection is left behind for the ones that went away.
    assert len(echo.server.connections) <= 1


async def test_client_vanishing_mid_call_cancels_handler(echo):
    # A raw client opens a call and then drops the TCP connection: the handler must be cancelled.
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
    block = hpack.Encoder().encode([
        (":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/Sleep"),
        (":authority", echo.target), ("content-type", "application/grpc"), ("te", "trailers"),
    ])
    writer.write(PREFACE + h2_frame(4, 0, 0) + h2_frame(1, 0x4, 1, block) + h2_frame(0, 0x1, 1, b"\x00" + u32(2) + b"30"))
    await writer.drain()
    await asyncio.wait_for(echo.probe.started.wait(), 5)
    writer.close()
    await asyncio.wait_for(echo.probe.cancelled.wait(), 2)
    await assert_serves(echo.target)


def request_headers(encoder: hpack.Encoder, target: str, method: str) -> bytes:
    return encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/{method}"),
                           (":authority", target), ("content-type", "application/grpc"), ("te", "trailers")])


async def test_an_early_status_leaves_the_stream_open_for_the_rest_of_the_request(echo):
    """The status of a streaming call answered before its request ends is sent without resetting the
    stream (grpcio's asyncio clients report a write that fails on a reset stream as INTERNAL instead
    of the status); what the client still sends is read and dropped, and the stream closes with it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
    encoder = hpack.Encoder()
    try:
        writer.write(PREFACE + h2_frame(4, 0, 0) + h2_frame(1, 0x4, 1, request_headers(encoder, echo.target, "BidiReject")))
        await writer.drain()
        decoder = hpack.Decoder()
        frames = read_frames(reader)
        status = None
        while status is None:
            kind, flags, sid, payload = await asyncio.wait_for(anext(frames), 5)
            assert not (kind == 3 and sid == 1), "stream 1 was reset"
            if kind == 1 and sid == 1 and flags & 0x1:
                status = dict(decoder.decode(payload))
        assert status["grpc-status"] == "7" and status["grpc-message"] == "not for you"
        assert 1 in echo.server.connections.copy().pop()._calls  # open until the client ends its side
        # The client, unaware yet, sends a message and ends its side; then a new call on the connection.
        writer.write(h2_frame(0, 0x1, 1, b"\x00" + u32(2) + b"hi")
                     + h2_frame(1, 0x4, 3, request_headers(encoder, echo.target, "Unary"))
                     + h2_frame(0, 0x1, 3, b"\x00" + u32(2) + b"ok"))
        await writer.drain()
        answer = b""
        while True:
            kind, flags, sid, payload = await asyncio.wait_for(anext(frames), 5)
            assert sid != 1, f"a frame of type {kind} on the finished stream 1"
            if kind == 1:
                decoded = dict(decoder.decode(payload))
                if sid == 3 and flags & 0x1:
                    assert decoded["grpc-status"] == "0"
                    break
            elif kind == 0 and sid == 3:
                answer += payload
        assert answer == b"\x00" + u32(2) + b"ok"
        assert not echo.server.connections.copy().pop()._calls  # both streams are closed
    finally:
        writer.close()


async def goaway_code(reader: asyncio.StreamReader, within: float = 5.0) -> int:
    """The error code of the GOAWAY the server sends before it closes the connection."""

    async def find() -> int:
        async for kind, _flags, _sid, payload in read_frames(reader):
            if kind == 7:
                return int.from_bytes(payload[4:8], "big")
        raise AssertionError("closed without GOAWAY")

    return await asyncio.wait_for(find(), within)


async def assert_calmed(echo: Running, flood: bytes) -> None:
    """`flood` after the preface ends the connection with GOAWAY ENHANCE_YOUR_CALM; others are served."""
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
    try:
        writer.write(PREFACE + h2_frame(4, 0, 0) + flood)
        with contextlib.suppress(ConnectionResetError):
            await writer.drain()
        assert await goaway_code(reader) == 0xB
    finally:
        writer.close()
    await assert_serves(echo.target)


async def test_rapid_reset_flood_ends_the_connection_and_the_server_keeps_serving(echo):
    """HTTP/2 rapid reset (CVE-2023-44487): streams opened and reset at once, far faster than any real
    client cancels, end the connection with ENHANCE_YOUR_CALM."""
    encoder = hpack.Encoder()
    await assert_calmed(echo, b"".join(h2_frame(1, 0x4, 2 * i + 1, request_headers(encoder, echo.target, "Sleep"))
                                       + h2_frame(3, 0, 2 * i + 1, u32(8)) for i in range(5000)))


async def test_cancels_at_a_real_clients_pace_are_fine(echo):
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
    encoder = hpack.Encoder()
    try:
        writer.write(PREFACE + h2_frame(4, 0, 0))
        for i in range(200):  # 200 open-and-cancel pairs: within the burst any client may use
            writer.write(h2_frame(1, 0x4, 2 * i + 1, request_headers(encoder, echo.target, "Sleep"))
                         + h2_frame(3, 0, 2 * i + 1, u32(8)))
        writer.write(h2_frame(1, 0x4, 401, request_headers(encoder, echo.target, "Unary"))
                     + h2_frame(0, 0x1, 401, b"\x00" + u32(2) + b"ok"))
        await writer.drain()
        assert await asyncio.wait_for(read_grpc_status(reader, 401), 5) == "0"
    finally:
        writer.close()


@pytest.mark.parametrize("frame", [h2_frame(6, 0, 0, b"12345678"), h2_frame(4, 0, 0)], ids=["PING", "SETTINGS"])
async def test_control_frame_floods_end_the_connection(echo, frame):
    await assert_calmed(echo, frame * 5000)


async def test_pings_while_our_answers_go_unread_end_the_connection(echo):
    """A client that stops reading cannot make the server buffer PING answers without bound; a few
    PINGs from a slow reader are fine."""
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
    encoder = hpack.Encoder()
    try:
        # Windows wide open, then 64 MiB of responses the client never reads: the server's buffer fills.
        writer.write(PREFACE + h2_frame(4, 0, 0, (4).to_bytes(2, "big") + u32(2**31 - 1))
                     + h2_frame(8, 0, 0, u32(2**31 - 1 - 65535))
                     + h2_frame(1, 0x4, 1, request_headers(encoder, echo.target, "StreamGen"))
                     + h2_frame(0, 0x1, 1, b"\x00" + u32(10) + b"256,262144"))
        await writer.drain()
        connection = None
        for _ in range(500):
            connection = next(iter(echo.server.connections), None)
            if connection is not None and connection.write_paused:
                break
            await asyncio.sleep(0.01)
        assert connection is not None and connection.write_paused
        # A few PINGs are what a slow but honest reader sends (bandwidth probes): answered...
        writer.write(h2_frame(6, 0, 0, b"12345678") * 10)
        await writer.drain()
        await asyncio.sleep(0.2)
        assert connection.write_paused and not connection._closed
        # ...but past the bound, without ever reading, the connection ends (at a pace under the flood limit).
        for _ in range(MAX_CONTROL_ANSWERS_WHILE_PAUSED // 250 + 1):
            writer.write(h2_frame(6, 0, 0, b"12345678") * 250)
            await writer.drain()
            await asyncio.sleep(0.6)
        for _ in range(500):
            if connection._closed:
                break
            await asyncio.sleep(0.01)
        assert connection._closed
    finally:
        writer.close()
    await assert_serves(echo.target)


async def test_a_client_preface_without_settings_is_a_protocol_error(echo):
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
    try:
        writer.write(PREFACE + h2_frame(6, 0, 0, b"12345678"))
        await writer.drain()
        assert await goaway_code(reader) == 0x1
    finally:
        writer.close()


# -- sync grpcio client --------------------------------------------------------------------------------------


def _sync_client_session(target: str) -> None:
    with grpc.insecure_channel(target) as ch:
        assert ch.unary_unary(f"/{SERVICE}/Unary")(b"sync", timeout=5) == b"sync"
        response, call = ch.unary_unary(f"/{SERVICE}/Meta").with_call(
            b"m", metadata=(("x-key", "v"), ("x-bin", b"\x00\x01")), timeout=5)
        assert response == b"m"
        assert ("x-init-bin", b"\x00\xff") in tuple(call.initial_metadata())
        assert ("x-trail", "t") in tuple(call.trailing_metadata())
        assert list(ch.unary_stream(f"/{SERVICE}/StreamWrite")(b"100", timeout=5)) == [u32(i) for i in range(100)]
        assert ch.stream_unary(f"/{SERVICE}/Sum")(iter([u32(i) for i in range(100)]), timeout=5) == b"100:4950"
        assert list(ch.stream_stream(f"/{SERVICE}/BidiCtx")(iter([b"a", b"b"]), timeout=5)) == [b"a", b"b"]
        big = pattern(3 * MiB)
        assert ch.unary_unary(f"/{SERVICE}/Unary")(big, timeout=20) == big
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary(f"/{SERVICE}/Abort")("bad thing: ünïcode % 100".encode(), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "bad thing: ünïcode % 100"


async def test_sync_grpcio_client(echo):
    # The sync client blocks, so it runs in a thread while the server runs on this loop.
    await asyncio.to_thread(_sync_client_session, echo.target)


# -- 16. graceful stop ---------------------------------------------------------------------------------------


async def test_stop_lets_in_flight_call_finish_and_refuses_new_connections(make_server):
    running = await make_server()
    async with grpc.aio.insecure_channel(running.target) as ch:
        call = unary(ch, "Sleep")(b"0.5", timeout=10)
        await asyncio.wait_for(running.probe.started.wait(), 5)
        start = time.monotonic()
        stopping = asyncio.create_task(running.server.stop(5))
        await asyncio.sleep(0.1)
        # While the grace runs, the listener is already closed.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", running.port)
        assert await call == b"slept"
        await asyncio.wait_for(stopping, 5)
        # stop returns once the last call is done, not after the whole grace.
        assert time.monotonic() - start < 3.0
    assert not running.probe.cancelled.is_set()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", running.port)
    async with grpc.aio.insecure_channel(running.target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(ch, "Unary")(b"x", timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_stop_cancels_call_running_past_grace(make_server):
    running = await make_server()
    async with grpc.aio.insecure_channel(running.target) as ch:
        call = unary(ch, "Sleep")(b"30", timeout=20)
        await asyncio.wait_for(running.probe.started.wait(), 5)
        start = time.monotonic()
        await asyncio.wait_for(running.server.stop(0.3), 5)
        assert time.monotonic() - start < 2.0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call, 3)  # an error status, not a hang
        assert info.value.code() != grpc.StatusCode.OK
        await asyncio.wait_for(running.probe.cancelled.wait(), 2)


async def test_stop_with_idle_connections_returns_promptly(make_server):
    running = await make_server()
    async with grpc.aio.insecure_channel(running.target) as ch:
        assert await unary(ch, "Unary")(b"x", timeout=5) == b"x"
        start = time.monotonic()
        await asyncio.wait_for(running.server.stop(5), 5)
        assert time.monotonic() - start < 1.0  # no calls in flight: nothing to wait for


# -- compressed requests and the stream limit -----------------------------------------------------------------


async def test_gzip_compressed_requests_are_decompressed(echo: Running):
    payload = pattern(256 * 1024)  # compresses well, so the client really sends a compressed message
    async with grpc.aio.insecure_channel(echo.target, compression=grpc.Compression.Gzip) as ch:
        assert await unary(ch, "Unary")(payload, timeout=5) == payload


async def test_streams_over_the_concurrency_limit_are_refused_and_the_rest_served(make_server):
    running = await make_server(max_concurrent_streams=2)
    started = time.monotonic()
    async with grpc.aio.insecure_channel(running.target) as ch:
        # grpc clients queue calls beyond the peer's SETTINGS_MAX_CONCURRENT_STREAMS: all complete.
        results = await asyncio.gather(*(unary(ch, "Unary")(bytes([n]), timeout=10) for n in range(20)))
    assert results == [bytes([n]) for n in range(20)]
    assert time.monotonic() - started < 10
