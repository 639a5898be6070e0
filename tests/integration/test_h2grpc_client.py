"""services.common.h2grpc.client (H2GrpcConnection, ClientStream) against real gRPC servers (our
H2GrpcServer and grpcio's grpc.aio server) and against a scripted raw HTTP/2 peer on loopback.

Real servers: round trips, metadata, statuses, deadlines, cancellation, limits and shutdown.
Scripted peer: what a real server rarely or never does on demand (flow-control holds, GOAWAY that
drops a stream, silent peers, resets, non-gRPC answers, compressed and split frames, garbage).

Handlers work on bytes so every byte on the wire is the test's own. Every wait has a timeout so a
client bug fails a test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable

import grpc
import hpack
import pytest

from services.common.h2grpc import H2GrpcServer, wire
from services.common.h2grpc.client import H2GrpcConnection

pytestmark = pytest.mark.timeout(60)

SERVICE = "test.Echo"
MiB = 1024 * 1024
WAIT = 5.0  # the longest any single step may take before the test fails


def pattern(size: int) -> bytes:
    """Deterministic, non-uniform bytes: a corrupted or reordered chunk cannot compare equal."""
    block = bytes(range(256)) + bytes(range(255, -1, -1)) + b"\x00\x01\x02"
    return (block * (size // len(block) + 1))[:size]


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def framed(message: bytes, flag: int = 0) -> bytes:
    """A gRPC length-prefixed message."""
    return bytes((flag,)) + len(message).to_bytes(4, "big") + message


def split_messages(body: bytes) -> list[bytes]:
    out = []
    while body:
        assert body[0] == 0, "the client never compresses"
        length = int.from_bytes(body[1:5], "big")
        assert len(body) >= 5 + length, "a truncated message"
        out.append(body[5:5 + length])
        body = body[5 + length:]
    return out


def xs(metadata) -> tuple:
    """The test's own metadata (keys starting with x-), as plain pairs in order."""
    return tuple((key, value) for key, value in metadata if key.startswith("x-"))


async def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# -- the client side of a call ------------------------------------------------------------------------------


class Call:
    """A stream's callbacks, recorded: every message, and every on_close (there must be exactly one)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.closes: list[tuple] = []
        self._closed = asyncio.get_running_loop().create_future()

    def on_message(self, message: bytes) -> None:
        assert not self.closes, "a message after on_close"
        self.messages.append(message)

    def on_close(self, code: grpc.StatusCode, details: str, trailing: tuple) -> None:
        self.closes.append((code, details, trailing))
        if not self._closed.done():
            self._closed.set_result(None)

    @property
    def done(self) -> bool:
        return bool(self.closes)

    async def outcome(self, timeout: float = WAIT) -> tuple:
        await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        await asyncio.sleep(0)  # a second on_close would land here
        assert len(self.closes) == 1, self.closes
        return self.closes[0]


def open_call(conn: H2GrpcConnection, method: str, **kwargs):
    call = Call()
    path = method if method.startswith("/") else f"/{SERVICE}/{method}"
    stream = conn.open_stream(path, on_message=call.on_message, on_close=call.on_close, **kwargs)
    return stream, call


@pytest.fixture(autouse=True)
async def loop_errors():
    """Nothing may escape into the event loop's exception handler (e.g. from a protocol callback)."""
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    previous = loop.get_exception_handler()

    def record(_, context: dict) -> None:
        if not _grpcio_poller_of_a_closed_loop(context):
            errors.append(context)

    loop.set_exception_handler(record)
    yield errors
    loop.set_exception_handler(previous)
    assert not errors, errors


def _grpcio_poller_of_a_closed_loop(context: dict) -> bool:
    """grpc.aio's process-wide completion poller runs on whichever loop is current and hands each event
    to the loop its operation started on; an event still owed to an earlier test's grpcio server (each
    test has its own loop) fails there with 'Event loop is closed'. That is grpcio's, not our client's."""
    exception = context.get("exception")
    return (isinstance(exception, RuntimeError) and "Event loop is closed" in str(exception)
            and "PollerCompletionQueue" in repr(context.get("handle")))


@pytest.fixture
async def connections():
    """Make H2GrpcConnections (closed at teardown)."""
    made: list[H2GrpcConnection] = []

    def make(target: str = "127.0.0.1:0", **kwargs) -> H2GrpcConnection:
        conn = H2GrpcConnection(target, **kwargs)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.close()


# == (a) real servers =========================================================================================


class Probe:
    """What the handlers saw."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.metadata: tuple | None = None

    async def until(self, what: str, count: int = 1) -> None:
        await wait_until(lambda: getattr(self, what) >= count)


def echo_handlers(probe: Probe) -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context) -> bytes:
        return request

    async def bidi(request_iterator, context) -> AsyncIterator[bytes]:
        async for message in request_iterator:
            yield message

    async def numbers(request: bytes, context) -> AsyncIterator[bytes]:
        # Request: b"count,size"; message i is u32(i) padded to size bytes.
        count, size = (int(part) for part in request.decode().split(","))
        for i in range(count):
            yield u32(i) + pattern(size - 4)

    async def meta(request: bytes, context) -> bytes:
        probe.metadata = tuple((key, value) for key, value in context.invocation_metadata())
        await context.send_initial_metadata((("x-init", "i"), ("x-init-bin", b"\x00\xff")))
        context.set_trailing_metadata((("x-trail", "t"), ("x-trail-bin", b"\x01\x02\x03")))
        return request

    async def status(request: bytes, context) -> bytes:
        # Request: b"<code number>:<details, UTF-8>".
        number, _, details = request.decode("utf-8").partition(":")
        code = next(code for code in grpc.StatusCode if code.value[0] == int(number))
        await context.abort(code, details, (("x-why", "because"),))
        raise AssertionError("abort returned")  # pragma: no cover

    async def big(request: bytes, context) -> bytes:
        return pattern(int(request.decode()))

    async def hang(request_iterator, context) -> AsyncIterator[bytes]:
        # Echoes the first message, then blocks until cancelled.
        try:
            async for message in request_iterator:
                yield message
                probe.started += 1
                await asyncio.sleep(30)
        except (asyncio.CancelledError, GeneratorExit):
            probe.cancelled += 1
            raise

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Numbers": grpc.unary_stream_rpc_method_handler(numbers),
        "Meta": grpc.unary_unary_rpc_method_handler(meta),
        "Status": grpc.unary_unary_rpc_method_handler(status),
        "Big": grpc.unary_unary_rpc_method_handler(big),
        "Hang": grpc.stream_stream_rpc_method_handler(hang),
    })


class RealServer:
    def __init__(self, kind: str, max_message_bytes: int) -> None:
        self.kind = kind
        self.probe = Probe()
        self.port = 0
        self._stopped = False
        if kind == "h2":
            self.server = H2GrpcServer(max_message_bytes=max_message_bytes)
        else:
            self.server = grpc.aio.server(options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ])
        self.server.add_generic_rpc_handlers((echo_handlers(self.probe),))

    async def start(self) -> None:
        if self.kind == "h2":
            self.port = await self.server.start("127.0.0.1", 0)
        else:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()

    async def stop(self, grace: float | None) -> None:
        self._stopped = True
        await self.server.stop(grace)

    async def connect(self, make, **kwargs) -> H2GrpcConnection:
        conn = make(f"127.0.0.1:{self.port}", **kwargs)
        await conn.connect("127.0.0.1", self.port, timeout=WAIT)
        return conn


@pytest.fixture(params=["h2", "grpcio"])
async def server(request):
    running = RealServer(request.param, max_message_bytes=8 * MiB)
    await running.start()
    yield running
    if not running._stopped:
        await running.server.stop(0)


async def test_bidi_echo_of_many_messages_in_order(server, connections):
    conn = await server.connect(connections)
    stream, call = open_call(conn, "Bidi")
    sent = [u32(i) + pattern(i % 50) for i in range(1000)]
    for message in sent:
        stream.write(message)
    stream.end()
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    assert call.messages == sent
    # Interleaved: one out, one back, on a second stream of the same connection.
    stream, call = open_call(conn, "Bidi")
    for i in range(200):
        stream.write(u32(i))
        await wait_until(lambda: len(call.messages) == i + 1)  # noqa: B023
    stream.end()
    assert (await call.outcome())[0] == grpc.StatusCode.OK
    assert call.messages == [u32(i) for i in range(200)]


@pytest.mark.parametrize("count,size", [(500, 8), (48, 512 * 1024)], ids=["small", "24MiB-total"])
async def test_server_streaming_arrives_in_order(server, connections, count, size):
    # 48 x 512 KiB is past both windows we grant (1 MiB per stream, 16 MiB for the connection): the
    # client must hand window back on both levels.
    conn = await server.connect(connections, max_message_bytes=8 * MiB)
    stream, call = open_call(conn, "Numbers")
    stream.write(f"{count},{size}".encode())
    stream.end()
    assert await call.outcome(timeout=20) == (grpc.StatusCode.OK, "", ())
    assert len(call.messages) == count
    assert call.messages == [u32(i) + pattern(size - 4) for i in range(count)]


async def test_messages_larger_than_the_windows_arrive_intact_both_ways(server, connections):
    conn = await server.connect(connections, max_message_bytes=8 * MiB)
    big = pattern(3 * MiB)
    stream, call = open_call(conn, "Bidi")
    stream.write(big)
    stream.write(b"after")
    stream.write(big[::-1])
    stream.end()
    assert await call.outcome(timeout=20) == (grpc.StatusCode.OK, "", ())
    assert [len(m) for m in call.messages] == [len(big), 5, len(big)]
    assert call.messages == [big, b"after", big[::-1]]
    # A large response to a small request, on the same connection.
    stream, call = open_call(conn, "Big")
    stream.write(str(3 * MiB + 1).encode())
    stream.end()
    assert (await call.outcome(timeout=20))[0] == grpc.StatusCode.OK
    assert call.messages == [pattern(3 * MiB + 1)]


async def test_100_concurrent_streams_on_one_connection(server, connections):
    conn = await server.connect(connections)
    calls = []
    for i in range(100):
        stream, call = open_call(conn, "Bidi")
        calls.append((stream, call))
        stream.write(u32(i) + b"a")
    assert conn.streams == 100
    for i, (stream, _) in enumerate(calls):
        stream.write(u32(i) + b"b")
        stream.end()
    outcomes = await asyncio.gather(*(call.outcome(timeout=20) for _, call in calls))
    assert outcomes == [(grpc.StatusCode.OK, "", ())] * 100
    for i, (_, call) in enumerate(calls):
        assert call.messages == [u32(i) + b"a", u32(i) + b"b"]
    assert conn.streams == 0 and not conn.lost.done()


async def test_metadata_both_ways(server, connections):
    conn = await server.connect(connections)
    stream, call = open_call(conn, "Meta", metadata=(("x-key", "v"), ("X-Upper", "lowered"), ("x-bin", b"\x00\x01")))
    stream.write(b"m")
    stream.end()
    code, details, trailing = await call.outcome()
    assert (code, details, call.messages) == (grpc.StatusCode.OK, "", [b"m"])
    assert xs(server.probe.metadata) == (("x-key", "v"), ("x-upper", "lowered"), ("x-bin", b"\x00\x01"))
    assert xs(stream.initial_metadata) == (("x-init", "i"), ("x-init-bin", b"\x00\xff"))
    assert xs(trailing) == (("x-trail", "t"), ("x-trail-bin", b"\x01\x02\x03"))
    # Transport headers are not metadata.
    assert not any(key.startswith((":", "grpc-")) or key == "content-type"
                   for key, _ in stream.initial_metadata + trailing)


@pytest.mark.parametrize("code,details", [
    (grpc.StatusCode.NOT_FOUND, "no such thing"),
    (grpc.StatusCode.INVALID_ARGUMENT, "bad thing: ünïcode % 100, 日本語 🚀"),
    (grpc.StatusCode.FAILED_PRECONDITION, "literal %41 and %2 and 100%, tab\tnewline\nend"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
], ids=["ascii", "non-ascii", "percent-and-controls", "empty"])
async def test_error_statuses_reach_on_close_exactly(server, connections, code, details):
    conn = await server.connect(connections)
    stream, call = open_call(conn, "Status")
    stream.write(f"{code.value[0]}:{details}".encode())
    stream.end()
    assert await call.outcome() == (code, details, (("x-why", "because"),))
    assert call.messages == []
    assert not conn.lost.done()  # an error status ends the call, not the connection


async def test_grpc_timeout_ends_a_hung_call_with_deadline_exceeded(server, connections):
    conn = await server.connect(connections)
    started = time.monotonic()
    stream, call = open_call(conn, "Hang", timeout=0.2)
    stream.write(b"x")
    code, _, _ = await call.outcome()
    elapsed = time.monotonic() - started
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.15 < elapsed < 3, elapsed
    assert call.messages == [b"x"]
    await server.probe.until("cancelled")
    assert not conn.lost.done()


async def test_cancel_cancels_the_server_handler(server, connections):
    conn = await server.connect(connections)
    stream, call = open_call(conn, "Hang")
    stream.write(b"x")
    await server.probe.until("started")
    stream.cancel()
    assert call.closes == [(grpc.StatusCode.CANCELLED, "cancelled by the client", ())]  # at once
    await server.probe.until("cancelled")
    stream.cancel()  # a second cancel is a no-op
    with pytest.raises(RuntimeError):
        stream.write(b"late")
    assert len(call.closes) == 1
    # The connection goes on.
    stream, call = open_call(conn, "Unary")
    stream.write(b"still here")
    stream.end()
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    assert call.messages == [b"still here"]


async def test_server_stop_ends_pending_streams_unavailable(server, connections):
    conn = await server.connect(connections)
    calls = []
    for _ in range(3):
        stream, call = open_call(conn, "Hang")
        stream.write(b"x")
        calls.append(call)
    await server.probe.until("started", 3)
    await asyncio.wait_for(server.stop(0), WAIT)
    for call in calls:
        code, _, _ = await call.outcome()
        assert code == grpc.StatusCode.UNAVAILABLE
    reason = await asyncio.wait_for(conn.lost, WAIT)
    assert reason
    assert conn.going_away
    with pytest.raises(ConnectionResetError):
        open_call(conn, "Unary")


async def test_a_response_over_max_message_bytes_is_resource_exhausted(server, connections):
    conn = await server.connect(connections, max_message_bytes=1000)
    stream, call = open_call(conn, "Big")
    stream.write(b"2000")
    stream.end()
    code, details, _ = await call.outcome()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == "received message larger than max (2000 vs. 1000)"
    assert call.messages == []
    # Exactly at the limit is fine, and the connection is unharmed.
    stream, call = open_call(conn, "Big")
    stream.write(b"1000")
    stream.end()
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    assert call.messages == [pattern(1000)]
    stream, _ = open_call(conn, "Unary")
    with pytest.raises(ValueError):
        stream.write(bytes(1001))  # our own limit applies to what we send too


async def test_unknown_method_is_unimplemented(server, connections):
    conn = await server.connect(connections)
    stream, call = open_call(conn, "Nope")
    stream.write(b"x")
    stream.end()
    code, details, _ = await call.outcome()
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert "not found" in details.lower()
    assert call.messages == []
    assert not conn.lost.done()


async def test_connect_to_a_closed_port_is_refused_and_early_streams_unavailable(connections):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conn = connections(f"127.0.0.1:{port}")
    stream, call = open_call(conn, "Unary")  # opened before connect: its frames wait for the socket
    stream.write(b"early")
    stream.end()
    assert not call.done
    with pytest.raises(ConnectionRefusedError) as info:
        await conn.connect("127.0.0.1", port, timeout=WAIT)
    assert f"cannot connect to 127.0.0.1:{port}" in str(info.value)
    code, details, trailing = await call.outcome()
    assert (code, trailing) == (grpc.StatusCode.UNAVAILABLE, ())
    assert details == str(info.value)
    assert conn.lost.done() and conn.lost.result() == str(info.value)
    with pytest.raises(ConnectionResetError):
        open_call(conn, "Unary")


async def test_streams_opened_before_connect_are_served(server, connections):
    conn = connections(f"127.0.0.1:{server.port}")
    stream, call = open_call(conn, "Bidi")
    stream.write(b"one")
    stream.write(b"two")
    stream.end()
    await conn.connect("127.0.0.1", server.port, timeout=WAIT)
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    assert call.messages == [b"one", b"two"]


# == (b) a scripted raw HTTP/2 peer ==========================================================================


class Peer:
    """The server end of one client connection, driven frame by frame by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.frames: list[tuple[int, int, int, bytes]] = []  # every frame received
        self.headers: dict[int, list[dict[bytes, bytes]]] = collections.defaultdict(list)  # blocks per stream
        self.body: dict[int, bytearray] = collections.defaultdict(bytearray)  # request DATA per stream
        self.ended: set[int] = set()  # streams whose request ended (END_STREAM)
        self.answer_pings = True
        self._block: bytearray | None = None

    async def handshake(self, settings: dict[int, int] | None = None) -> None:
        """Read the client's preface, send our SETTINGS and wait until the client has applied them."""
        assert await asyncio.wait_for(self.reader.readexactly(len(wire.PREFACE)), WAIT) == wire.PREFACE
        self.send(wire.settings_frame(settings or {}))
        await self.expect(wire.SETTINGS, flags=wire.ACK)

    # -- in ----------------------------------------------------------------------------------------

    async def read_frame(self, timeout: float = WAIT) -> tuple[int, int, int, bytes] | None:
        """The next frame from the client (None at EOF); the client's SETTINGS and PINGs are answered."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
            length = int.from_bytes(head[:3], "big")
            payload = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None
        kind, flags, stream_id = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        self.frames.append((kind, flags, stream_id, payload))
        if kind == wire.HEADERS:
            self._block = bytearray(payload)
            self.ended.update((stream_id,) if flags & wire.END_STREAM else ())
        elif kind == wire.CONTINUATION:
            assert self._block is not None
            self._block += payload
        elif kind == wire.DATA:
            self.body[stream_id] += payload
            self.ended.update((stream_id,) if flags & wire.END_STREAM else ())
        elif kind == wire.SETTINGS and not flags & wire.ACK:
            self.send(wire.frame(wire.SETTINGS, wire.ACK, 0))
        elif kind == wire.PING and not flags & wire.ACK and self.answer_pings:
            self.send(wire.frame(wire.PING, wire.ACK, 0, payload))
        if kind in (wire.HEADERS, wire.CONTINUATION) and flags & wire.END_HEADERS:
            self.headers[stream_id].append(dict(self.decoder.decode(bytes(self._block), raw=True)))
            self._block = None
        return kind, flags, stream_id, payload

    async def expect(self, kind: int, stream_id: int | None = None, flags: int = 0) -> tuple[int, int, int, bytes]:
        """Read frames until one of `kind` (on `stream_id`, with `flags` set) arrives."""
        while True:
            got = await self.read_frame()
            assert got is not None, f"EOF while waiting for a frame of type {kind}"
            if got[0] == kind and (stream_id is None or got[2] == stream_id) and got[1] & flags == flags:
                return got

    async def request_ended(self, stream_id: int) -> None:
        while stream_id not in self.ended:
            assert await self.read_frame() is not None, "EOF before the request ended"

    async def body_of(self, stream_id: int, size: int) -> bytes:
        while len(self.body[stream_id]) < size:
            assert await self.read_frame() is not None, "EOF before the request body arrived"
        return bytes(self.body[stream_id])

    async def drain(self, quiet: float = 0.1) -> None:
        """Read frames until none arrives for `quiet` seconds."""
        while True:
            try:
                await asyncio.wait_for(self._peek(), quiet)
            except TimeoutError:
                return
            assert await self.read_frame() is not None, "EOF while draining"

    async def _peek(self) -> None:
        while not self.reader._buffer and not self.reader.at_eof():  # a look ahead, nothing consumed
            await asyncio.sleep(0.005)

    async def until_eof(self) -> list[tuple[int, int, int, bytes]]:
        """Read to EOF; the frames seen on the way."""
        seen = []
        while (got := await self.read_frame()) is not None:
            seen.append(got)
        return seen

    # -- out ---------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def send_headers(self, stream_id: int, headers, *, end_stream: bool = False) -> None:
        flags = wire.END_HEADERS | (wire.END_STREAM if end_stream else 0)
        self.send(wire.frame(wire.HEADERS, flags, stream_id, self.encoder.encode(headers)))

    def head(self, stream_id: int, *extra) -> None:
        self.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc"), *extra])

    def message(self, stream_id: int, message: bytes, flag: int = 0) -> None:
        self.send(wire.frame(wire.DATA, 0, stream_id, framed(message, flag)))

    def trailers(self, stream_id: int, status: int = 0, *extra) -> None:
        self.send_headers(stream_id, [("grpc-status", str(status)), *extra], end_stream=True)

    def answer(self, stream_id: int, *messages: bytes) -> None:
        self.head(stream_id)
        for message in messages:
            self.message(stream_id, message)
        self.trailers(stream_id)


class ScriptedServer:
    def __init__(self) -> None:
        self._accepted: asyncio.Queue[Peer] = asyncio.Queue()
        self._peers: list[Peer] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self._peers.append(peer)
        await self._accepted.put(peer)

    async def connect(self, make, settings: dict[int, int] | None = None, **kwargs) -> tuple[H2GrpcConnection, Peer]:
        """A client connection to this server and the peer end of it, past the SETTINGS exchange."""
        conn = make(f"127.0.0.1:{self.port}", **kwargs)
        await conn.connect("127.0.0.1", self.port, timeout=WAIT)
        peer = await asyncio.wait_for(self._accepted.get(), WAIT)
        await peer.handshake(settings)
        return conn, peer

    async def close(self) -> None:
        for peer in self._peers:
            peer.writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def scripted():
    server = ScriptedServer()
    await server.start()
    yield server
    await server.close()


async def test_request_headers_on_the_wire(scripted, connections):
    conn, peer = await scripted.connect(connections, user_agent="tester/1")
    open_call(conn, "/pkg.Svc/Method", metadata=(("x-key", "v"), ("x-bin", b"\x00\xff\x01")), timeout=1.5)
    await peer.expect(wire.HEADERS, 1, wire.END_HEADERS)
    (headers,) = peer.headers[1]
    assert headers == {
        b":method": b"POST", b":scheme": b"http", b":path": b"/pkg.Svc/Method", b":authority": conn._authority,
        b"content-type": b"application/grpc", b"te": b"trailers", b"user-agent": b"tester/1",
        b"grpc-timeout": b"1500000u", b"x-key": b"v", b"x-bin": b"AP8B",
    }
    assert conn._authority == f"127.0.0.1:{scripted.port}".encode()
    # A second stream gets the next odd id.
    open_call(conn, "M")
    await peer.expect(wire.HEADERS, 3)


async def test_invalid_metadata_is_refused_without_opening_a_stream(scripted, connections):
    conn, peer = await scripted.connect(connections)
    for metadata in ((("x-bad", "naïve"),), (("grpc-reserved", "v"),), ((":path", "/other"),)):
        with pytest.raises(ValueError):
            open_call(conn, "M", metadata=metadata)
    assert conn.streams == 0
    stream, call = open_call(conn, "M")
    _, _, stream_id, _ = await peer.expect(wire.HEADERS)
    assert stream_id == stream.stream_id == 1  # no stream id was spent on the refused calls
    # No phantom stream is left to hold the connection open after a graceful GOAWAY.
    peer.send(wire.goaway(1, wire.NO_ERROR))
    stream.end()
    await peer.request_ended(1)
    peer.answer(1)
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    assert "went away" in await asyncio.wait_for(conn.lost, WAIT)


async def test_large_request_headers_are_split_over_continuation_frames(scripted, connections):
    conn, peer = await scripted.connect(connections)  # the peer's max frame size: 16,384 (the default)
    value = "m" * 40_000
    open_call(conn, "M", metadata=(("x-large", value), ("x-after", "1")))
    kinds = []
    while True:
        kind, flags, stream_id, payload = await peer.read_frame()
        if kind in (wire.HEADERS, wire.CONTINUATION):
            assert stream_id == 1 and len(payload) <= wire.DEFAULT_MAX_FRAME
            kinds.append((kind, bool(flags & wire.END_HEADERS)))
            if flags & wire.END_HEADERS:
                break
    assert kinds == [(wire.HEADERS, False), (wire.CONTINUATION, False), (wire.CONTINUATION, True)]
    (headers,) = peer.headers[1]
    assert headers[b"x-large"] == value.encode() and headers[b"x-after"] == b"1"


async def test_flow_control_holds_writes_and_skips_unwanted_ones(scripted, connections):
    conn, peer = await scripted.connect(connections, settings={wire.SETTINGS_INITIAL_WINDOW_SIZE: 10})
    assert conn.peer_initial_window == 10
    stream, call = open_call(conn, "M")
    await peer.expect(wire.HEADERS, 1)
    first = framed(b"first-message")  # 18 bytes: 10 fit now, the rest waits
    stream.write(b"first-message")
    assert stream.queued == 1
    wanted = {"second": True}
    stream.write(b"second", wanted=lambda: wanted["second"])
    assert stream.queued == 2
    _, flags, _, payload = await peer.expect(wire.DATA, 1)
    assert payload == first[:10] and not flags & wire.END_STREAM
    wanted["second"] = False  # its caller gave up while it waited for window
    peer.send(wire.window_update(1, 100))
    await wait_until(lambda: stream.queued == 0)
    stream.write(b"third")  # fits in what is left of the window: straight out
    stream.end()
    await peer.request_ended(1)
    assert bytes(peer.body[1]) == first + framed(b"third")  # "second" never went out
    assert stream.send_window == 10 + 100 - len(first) - len(framed(b"third"))
    peer.answer(1, b"ok")
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    assert call.messages == [b"ok"]


async def test_end_waits_behind_queued_messages(scripted, connections):
    conn, peer = await scripted.connect(connections, settings={wire.SETTINGS_INITIAL_WINDOW_SIZE: 0})
    stream, call = open_call(conn, "M")
    stream.write(b"held")
    stream.end()
    with pytest.raises(RuntimeError):
        stream.write(b"after end")
    await peer.expect(wire.HEADERS, 1)
    # Nothing may be sent on a zero window: neither the message nor the END_STREAM behind it.
    await peer.drain()
    assert 1 not in peer.body and 1 not in peer.ended and stream.queued == 1
    # SETTINGS raising the initial window applies to open streams too.
    peer.send(wire.settings_frame({wire.SETTINGS_INITIAL_WINDOW_SIZE: 1000}))
    await peer.request_ended(1)
    assert bytes(peer.body[1]) == framed(b"held")
    peer.answer(1)
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())


async def test_end_behind_only_unwanted_messages_goes_out_at_once(scripted, connections):
    conn, peer = await scripted.connect(connections, settings={wire.SETTINGS_INITIAL_WINDOW_SIZE: 0})
    stream, call = open_call(conn, "M")
    wanted = [True, True]
    stream.write(b"a", wanted=lambda: wanted[0])
    stream.write(b"b", wanted=lambda: wanted[1])
    assert stream.queued == 2
    wanted[:] = [False, False]
    stream.end()  # the window is still zero, but nothing wanted is left in front of the END_STREAM
    assert stream.queued == 0
    await peer.request_ended(1)
    assert 1 not in peer.body or peer.body[1] == b""
    peer.answer(1)
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())


async def test_connection_window_holds_writes_until_window_update(scripted, connections):
    # The stream window is large; the connection window stays at its 65,535-byte default.
    conn, peer = await scripted.connect(connections, settings={wire.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    stream, call = open_call(conn, "M")
    message = pattern(100_000)
    stream.write(message)
    assert stream.queued == 1
    body = await peer.body_of(1, wire.DEFAULT_WINDOW)
    assert len(body) == wire.DEFAULT_WINDOW and conn.send_window == 0
    assert all(len(payload) <= wire.DEFAULT_MAX_FRAME for kind, _, _, payload in peer.frames if kind == wire.DATA)
    # Another stream's small message waits for the connection window too, though its own is open.
    other, other_call = open_call(conn, "M")
    other.write(b"small")
    assert other.queued == 1
    await peer.expect(wire.HEADERS, 3)
    await peer.drain()
    assert 3 not in peer.body
    peer.send(wire.window_update(0, 50_000))
    stream.end()
    other.end()
    await peer.request_ended(1)
    await peer.request_ended(3)
    assert bytes(peer.body[1]) == framed(message)
    assert bytes(peer.body[3]) == framed(b"small")
    assert stream.queued == 0 and other.queued == 0
    assert conn.send_window == wire.DEFAULT_WINDOW + 50_000 - len(framed(message)) - len(framed(b"small"))
    peer.answer(1, b"done")
    peer.answer(3)
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    assert await other_call.outcome() == (grpc.StatusCode.OK, "", ())


async def test_goaway_ends_streams_above_last_stream_id_and_lets_the_others_finish(scripted, connections):
    conn, peer = await scripted.connect(connections)
    stream1, call1 = open_call(conn, "M")
    _, call3 = open_call(conn, "M")
    stream1.write(b"one")
    await peer.expect(wire.HEADERS, 3)
    hooked: list[tuple] = []
    conn.on_going_away = lambda: hooked.append((conn.going_away, call3.done, call1.done))
    peer.send(wire.goaway(1, wire.NO_ERROR))
    code, details, _ = await call3.outcome()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "going away" in details and "error code 0" in details
    assert not call1.done and conn.going_away and not conn.lost.done()
    assert hooked == [(True, True, False)]  # told once, after the dropped streams ended
    with pytest.raises(ConnectionResetError):
        open_call(conn, "M")
    stream1.write(b"after goaway")  # the surviving stream still works both ways
    stream1.end()
    await peer.request_ended(1)
    assert split_messages(bytes(peer.body[1])) == [b"one", b"after goaway"]
    assert 3 not in peer.body
    peer.answer(1, b"answer")
    assert await call1.outcome() == (grpc.StatusCode.OK, "", ())
    assert call1.messages == [b"answer"]
    # With no call left, the client closes the connection.
    assert "went away" in await asyncio.wait_for(conn.lost, WAIT)
    await asyncio.wait_for(peer.until_eof(), WAIT)


async def test_goaway_with_an_error_ends_the_connection(scripted, connections):
    conn, peer = await scripted.connect(connections)
    _, call = open_call(conn, "M")
    await peer.expect(wire.HEADERS, 1)
    hooked = []
    conn.on_going_away = lambda: hooked.append(True)
    peer.send(wire.goaway(1, wire.ENHANCE_YOUR_CALM, b"too_many_pings"))
    code, details, _ = await call.outcome()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == "the server is going away (HTTP/2 error code 11: too_many_pings)"
    assert await asyncio.wait_for(conn.lost, WAIT) == details
    assert hooked == []  # the connection is over: there is nothing left to wind down


async def test_a_peer_that_never_answers_ping_is_dropped(scripted, connections):
    conn, peer = await scripted.connect(connections, keepalive_seconds=0.2, keepalive_timeout_seconds=0.2)
    peer.answer_pings = False
    started = time.monotonic()
    _, call = open_call(conn, "M")
    await peer.expect(wire.HEADERS, 1)
    reason = await asyncio.wait_for(asyncio.shield(conn.lost), WAIT)
    assert 0.3 < time.monotonic() - started < 3
    assert "keep-alive" in reason
    assert await call.outcome() == (grpc.StatusCode.UNAVAILABLE, reason, ())
    frames = await peer.until_eof()
    pings = [f for f in peer.frames if f[0] == wire.PING and not f[1] & wire.ACK]
    assert len(pings) == 1 and len(pings[0][3]) == 8
    assert not [f for f in frames if f[0] == wire.DATA]


async def test_a_peer_that_answers_pings_is_kept_and_idle_pings_are_capped(scripted, connections):
    conn, peer = await scripted.connect(connections, keepalive_seconds=0.1, keepalive_timeout_seconds=0.2)
    stream, call = open_call(conn, "M")
    reading = asyncio.ensure_future(peer.until_eof())
    await asyncio.sleep(1.0)
    # Like grpc's clients: at most two pings until we send data again (servers punish more).
    pings = [f for f in peer.frames if f[0] == wire.PING and not f[1] & wire.ACK]
    assert len(pings) == 2
    assert not conn.lost.done() and not call.done
    stream.write(b"data")  # data resets the count
    await wait_until(lambda: len([f for f in peer.frames if f[0] == wire.PING and not f[1] & wire.ACK]) == 3)
    peer.answer(1, b"ok")
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    conn.close()
    await asyncio.wait_for(reading, WAIT)


@pytest.mark.parametrize("error,code", [
    (wire.REFUSED_STREAM, grpc.StatusCode.UNAVAILABLE),
    (wire.CANCEL, grpc.StatusCode.CANCELLED),
    (wire.ENHANCE_YOUR_CALM, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (wire.INTERNAL_ERROR, grpc.StatusCode.INTERNAL),
], ids=["refused", "cancel", "calm", "internal"])
async def test_rst_stream_maps_to_status(scripted, connections, error, code):
    conn, peer = await scripted.connect(connections)
    stream, call = open_call(conn, "M")
    stream.write(b"x")
    await peer.expect(wire.HEADERS, 1)
    peer.send(wire.rst_stream(1, error))
    assert await call.outcome() == (code, f"the server reset the stream (HTTP/2 error code {error})", ())
    with pytest.raises(RuntimeError):
        stream.write(b"y")
    # Only the stream ended.
    stream, call = open_call(conn, "M")
    stream.end()
    await peer.request_ended(3)
    peer.answer(3, b"fine")
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    assert not conn.lost.done()


@pytest.mark.parametrize("http_status,code", [
    (503, grpc.StatusCode.UNAVAILABLE),
    (404, grpc.StatusCode.UNIMPLEMENTED),
    (401, grpc.StatusCode.UNAUTHENTICATED),
    (500, grpc.StatusCode.UNKNOWN),
])
async def test_a_non_200_status_maps_to_grpc(scripted, connections, http_status, code):
    conn, peer = await scripted.connect(connections)
    _, call = open_call(conn, "M")
    await peer.expect(wire.HEADERS, 1)
    peer.send_headers(1, [(":status", str(http_status)), ("content-type", "text/html")], end_stream=True)
    assert await call.outcome() == (code, f"the server answered HTTP status {http_status}", ())
    _, _, _, payload = await peer.expect(wire.RST_STREAM, 1)
    assert int.from_bytes(payload, "big") == wire.CANCEL
    assert not conn.lost.done()


async def test_trailers_without_grpc_status_are_unknown(scripted, connections):
    conn, peer = await scripted.connect(connections)
    stream, call = open_call(conn, "M")
    stream.end()
    await peer.request_ended(1)
    peer.head(1)
    peer.message(1, b"m")
    peer.send_headers(1, [("x-other", "1")], end_stream=True)
    assert await call.outcome() == (grpc.StatusCode.UNKNOWN, "the server sent no grpc-status", (("x-other", "1"),))
    assert call.messages == [b"m"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_response_messages_are_decompressed(scripted, connections, encoding):
    conn, peer = await scripted.connect(connections)
    stream, call = open_call(conn, "M")
    stream.end()
    await peer.request_ended(1)
    payload = pattern(50_000)
    compressed = gzip.compress(payload) if encoding == "gzip" else zlib.compress(payload)
    assert len(compressed) < len(payload)
    peer.head(1, ("grpc-encoding", encoding))
    peer.message(1, compressed, flag=1)
    peer.message(1, b"plain")  # flag 0 in the same response: not compressed
    peer.trailers(1)
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    assert call.messages == [payload, b"plain"]


@pytest.mark.parametrize("case", ["no-encoding", "corrupt", "too-large-inflated"])
async def test_unreadable_compressed_messages_fail_the_call(scripted, connections, case):
    conn, peer = await scripted.connect(connections, max_message_bytes=10_000)
    stream, call = open_call(conn, "M")
    stream.end()
    await peer.request_ended(1)
    peer.head(1, *(() if case == "no-encoding" else (("grpc-encoding", "gzip"),)))
    body = {"no-encoding": gzip.compress(b"x"), "corrupt": b"not gzip at all",
            "too-large-inflated": gzip.compress(bytes(20_000))}[case]
    peer.message(1, body, flag=1)
    code, details, _ = await call.outcome()
    expected = grpc.StatusCode.RESOURCE_EXHAUSTED if case == "too-large-inflated" else grpc.StatusCode.INTERNAL
    assert code == expected, details
    assert call.messages == []
    assert not conn.lost.done()


async def test_trailers_only_response(scripted, connections):
    conn, peer = await scripted.connect(connections)
    stream, call = open_call(conn, "M")
    stream.write(b"request still open")
    await peer.expect(wire.HEADERS, 1)
    peer.send_headers(1, [
        (":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "5"),
        ("grpc-message", "no%20such %C3%BC"), ("x-t", "v"),
    ], end_stream=True)
    assert await call.outcome() == (grpc.StatusCode.NOT_FOUND, "no such ü", (("x-t", "v"),))
    assert stream.initial_metadata == () and call.messages == []
    # Our request was still open: the client tells the server it will send no more (NO_ERROR).
    _, _, _, payload = await peer.expect(wire.RST_STREAM, 1)
    assert int.from_bytes(payload, "big") == wire.NO_ERROR


@pytest.mark.parametrize("case", [
    "data-before-headers", "end-without-trailers", "ended-inside-a-message", "not-grpc-content-type",
    "bad-message-flag", "second-head-without-end-stream",
])
async def test_malformed_responses_end_only_their_stream(scripted, connections, case):
    conn, peer = await scripted.connect(connections)
    stream, call = open_call(conn, "M")
    stream.end()
    await peer.request_ended(1)
    if case == "data-before-headers":
        peer.message(1, b"m")
    elif case == "end-without-trailers":
        peer.head(1)
        peer.send(wire.frame(wire.DATA, wire.END_STREAM, 1, framed(b"m")))
    elif case == "ended-inside-a-message":
        peer.head(1)
        peer.send(wire.frame(wire.DATA, 0, 1, framed(b"message")[:7]))
        peer.trailers(1)
    elif case == "not-grpc-content-type":
        peer.send_headers(1, [(":status", "200"), ("content-type", "text/html")])
    elif case == "bad-message-flag":
        peer.head(1)
        peer.message(1, b"m", flag=2)
    else:
        peer.head(1)
        peer.head(1)
    code, details, _ = await call.outcome()
    expected = grpc.StatusCode.UNKNOWN if case == "not-grpc-content-type" else grpc.StatusCode.INTERNAL
    assert code == expected, details
    # A whole message before the missing trailers was delivered; nothing else was.
    assert call.messages == ([b"m"] if case == "end-without-trailers" else [])
    # The connection is fine.
    stream, call = open_call(conn, "M")
    stream.end()
    await peer.request_ended(3)
    peer.answer(3, b"fine")
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    assert call.messages == [b"fine"]


async def test_message_framing_across_and_within_data_frames(scripted, connections):
    conn, peer = await scripted.connect(connections)
    stream, call = open_call(conn, "M")
    stream.end()
    await peer.request_ended(1)
    peer.head(1)
    peer.send(wire.frame(wire.DATA, 0, 1, framed(b"a") + framed(b"") + framed(b"bc")))  # three in one frame
    split = framed(pattern(1000))
    for start, stop in ((0, 3), (3, 5), (5, 600), (600, len(split))):  # one over four (inside the prefix too)
        peer.send(wire.frame(wire.DATA, 0, 1, split[start:stop]))
    # A padded DATA frame (pad length byte, data, padding).
    peer.send(wire.frame(wire.DATA, wire.PADDED, 1, b"\x04" + framed(b"padded") + b"\x00" * 4))
    peer.trailers(1)
    assert await call.outcome() == (grpc.StatusCode.OK, "", ())
    assert call.messages == [b"a", b"", b"bc", pattern(1000), b"padded"]


async def test_header_blocks_over_continuation_frames_decode(scripted, connections):
    conn, peer = await scripted.connect(connections)
    stream, call = open_call(conn, "M")
    stream.end()
    await peer.request_ended(1)
    long_value = "v" * 3000
    head = peer.encoder.encode([(":status", "200"), ("content-type", "application/grpc"),
                                ("x-long", long_value), ("x-bin-bin", "AAEC")])
    third = len(head) // 3
    peer.send(wire.frame(wire.HEADERS, 0, 1, head[:third])
              + wire.frame(wire.CONTINUATION, 0, 1, head[third:2 * third])
              + wire.frame(wire.CONTINUATION, wire.END_HEADERS, 1, head[2 * third:]))
    peer.message(1, b"body")
    # Trailers: a HEADERS frame with padding and a priority block, continued once.
    trailers = peer.encoder.encode([("grpc-status", "0"), ("x-long", long_value), ("x-trail", "t")])
    half = len(trailers) // 2
    peer.send(wire.frame(wire.HEADERS, wire.END_STREAM | wire.PADDED | wire.PRIORITY_FLAG, 1,
                         b"\x03" + b"\x00\x00\x00\x00\x10" + trailers[:half] + b"\x00" * 3)
              + wire.frame(wire.CONTINUATION, wire.END_HEADERS, 1, trailers[half:]))
    code, details, trailing = await call.outcome()
    assert (code, details) == (grpc.StatusCode.OK, "")
    assert stream.initial_metadata == (("x-long", long_value), ("x-bin-bin", b"\x00\x01\x02"))
    assert trailing == (("x-long", long_value), ("x-trail", "t"))
    assert call.messages == [b"body"]


_GARBAGE = {
    # name: (bytes the peer sends, the GOAWAY error code the client answers with)
    "http1-answer": (b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n", wire.FRAME_SIZE_ERROR),
    "data-on-stream-0": (wire.frame(wire.DATA, 0, 0, b"x"), wire.PROTOCOL_ERROR),
    "zero-window-update": (wire.window_update(0, 0), wire.PROTOCOL_ERROR),
    "window-overflow": (wire.window_update(0, 2**31 - 1), wire.FLOW_CONTROL_ERROR),
    "bad-hpack": (wire.frame(wire.HEADERS, wire.END_HEADERS, 1, b"\xff" * 8), wire.COMPRESSION_ERROR),
    "push-promise": (wire.frame(wire.PUSH_PROMISE, wire.END_HEADERS, 1, u32(2)), wire.PROTOCOL_ERROR),
    "settings-bad-length": (wire.frame(wire.SETTINGS, 0, 0, b"\x00" * 5), wire.FRAME_SIZE_ERROR),
    "settings-tiny-max-frame": (wire.settings_frame({wire.SETTINGS_MAX_FRAME_SIZE: 100}), wire.PROTOCOL_ERROR),
    "settings-huge-window": (wire.settings_frame({wire.SETTINGS_INITIAL_WINDOW_SIZE: 2**31}), wire.FLOW_CONTROL_ERROR),
    "settings-on-a-stream": (wire.frame(wire.SETTINGS, 0, 1), wire.PROTOCOL_ERROR),
    "interrupted-header-block": (wire.frame(wire.HEADERS, 0, 1, b"\x88") + wire.frame(wire.DATA, 0, 1, b""),
                                 wire.PROTOCOL_ERROR),
    "stray-continuation": (wire.frame(wire.CONTINUATION, wire.END_HEADERS, 1, b"\x88"), wire.PROTOCOL_ERROR),
    "headers-on-a-stream-never-opened": (wire.frame(wire.HEADERS, wire.END_HEADERS, 5, b"\x88"), wire.PROTOCOL_ERROR),
    "data-on-an-idle-stream": (wire.frame(wire.DATA, 0, 7, b""), wire.PROTOCOL_ERROR),
    "rst-on-an-idle-stream": (wire.rst_stream(7, wire.CANCEL), wire.PROTOCOL_ERROR),
    "short-ping": (wire.frame(wire.PING, 0, 0, b"123"), wire.FRAME_SIZE_ERROR),
    "short-goaway": (wire.frame(wire.GOAWAY, 0, 0, b"\x00\x00"), wire.FRAME_SIZE_ERROR),
    "frame-over-max-size": (b"\x20\x00\x00\x00\x00\x00\x00\x00\x01", wire.FRAME_SIZE_ERROR),
}


@pytest.mark.parametrize("case", list(_GARBAGE))
async def test_garbage_from_the_peer_ends_the_connection_cleanly(scripted, connections, loop_errors, case):
    garbage, error = _GARBAGE[case]
    conn, peer = await scripted.connect(connections)
    stream, call = open_call(conn, "M")
    stream.write(b"x")
    await peer.expect(wire.HEADERS, 1)
    peer.send(garbage)
    reason = await asyncio.wait_for(asyncio.shield(conn.lost), WAIT)
    assert reason.startswith("HTTP/2 protocol error from the server: "), reason
    assert await call.outcome() == (grpc.StatusCode.UNAVAILABLE, reason, ())
    frames = await asyncio.wait_for(peer.until_eof(), WAIT)
    goaways = [payload for kind, _, _, payload in frames if kind == wire.GOAWAY]
    assert len(goaways) == 1
    assert int.from_bytes(goaways[0][4:8], "big") == error
    assert conn.going_away
    with pytest.raises(ConnectionResetError):
        open_call(conn, "M")
    assert not loop_errors


async def test_the_peer_closing_the_socket_ends_streams_unavailable(scripted, connections):
    conn, peer = await scripted.connect(connections)
    _, call = open_call(conn, "M")
    await peer.expect(wire.HEADERS, 1)
    peer.writer.close()
    code, details, _ = await call.outcome()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == await asyncio.wait_for(conn.lost, WAIT)


async def test_close_sends_goaway_and_ends_open_streams(scripted, connections):
    conn, peer = await scripted.connect(connections)
    _, call = open_call(conn, "M")
    await peer.expect(wire.HEADERS, 1)
    conn.close("done here")
    assert call.closes == [(grpc.StatusCode.UNAVAILABLE, "done here", ())]
    assert conn.lost.result() == "done here"
    frames = await asyncio.wait_for(peer.until_eof(), WAIT)
    assert [(kind, payload) for kind, _, _, payload in frames if kind == wire.GOAWAY] == [
        (wire.GOAWAY, wire.goaway(0, wire.NO_ERROR)[9:])]


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what is written (for frame-level checks without a socket)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return default


async def test_server_pings_are_answered_while_our_own_requests_fill_the_buffer():
    """A client's buffer fills with its own requests when the server is slow; the server's pings are
    no flood then (a server, by contrast, refuses PINGs while its answers go unread)."""
    conn = H2GrpcConnection("node:1")
    transport = RecordingTransport()
    conn.connection_made(transport)
    conn.pause_writing()
    sent = len(transport.written)
    conn.data_received(wire.settings_frame({}) + wire.frame(wire.PING, 0, 0, b"pingpong"))
    assert not transport.closed and not conn.lost.done()
    assert transport.written[sent:].endswith(wire.frame(wire.PING, wire.ACK, 0, b"pingpong"))
    conn.close()
