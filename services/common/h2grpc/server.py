"""A gRPC server written on asyncio over HTTP/2, for the inference node's data plane.

Why: grpcio's asyncio server costs ~200 µs of CPU per unary call before any servicer code runs (its
core polls on a thread of its own and hands every event to the loop through a socket), which alone
caps a Python node below what the inference issue asks of it. This server parses HTTP/2 in the
loop's own protocol callback and, when a handler needs no I/O (a small model run inline), writes the
whole response (headers, message, trailers) in one send from that same callback.

Scope (RFC 9113 and grpc/doc/PROTOCOL-HTTP2.md): cleartext HTTP/2 with prior knowledge and TLS with
ALPN h2; all four call shapes; deadlines (grpc-timeout), cancellation (RST_STREAM), metadata and
`-bin` metadata, trailers and trailers-only responses, gzip-compressed requests, flow control both
ways, GOAWAY on shutdown, grpc.aio server interceptors and generated `add_*_to_server` functions;
limits on abuse: streams reset as fast as they open (rapid reset), PING and SETTINGS floods, PINGs
from a peer that leaves our answers unread (ENHANCE_YOUR_CALM), a preface not followed by SETTINGS.
Handlers see a context with grpc.aio's ServicerContext methods (see `ServicerContext`).
Not here: server push (gRPC never uses it), compressing responses, HTTP/2 priorities (ignored).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import ssl as ssl_module
from collections.abc import Iterable
from typing import Any

import grpc

from services.common.aio import start_eagerly
from services.common.h2grpc import wire
from services.common.h2grpc.connection import STREAM_WINDOW, FloodGuard, H2Connection
from services.common.h2grpc.wire import ConnectionError_

# Complete request messages a stream may hold that its handler has not read yet, before we stop
# replenishing the stream's window (backpressure on a client that streams faster than we serve).
STREAM_QUEUE_LIMIT = 4 << 20
# Streams a client may reset a second (bursts of twice that) before the connection is closed.
RESETS_PER_SECOND = 1000
# Response bytes a streaming handler may have waiting for window before `write` waits.
WRITE_BUFFER_LIMIT = 1 << 20

# Request headers that are transport, not metadata (grpc.aio leaves them out of invocation_metadata).
_RESERVED_HEADERS = frozenset((b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"))
_ACCEPT_ENCODING = wire.literal(b"grpc-accept-encoding", b"identity,gzip,deflate")
_EOF = grpc.aio.EOF


class Metadatum(collections.namedtuple("Metadatum", ("key", "value"))):
    """One metadata pair, with grpc.aio's `.key` / `.value` (what interceptors such as
    OpenTelemetry's read) and a plain (key, value) tuple's shape."""

    __slots__ = ()


class _Cancelled(Exception):
    """The call ended (client reset, deadline, connection gone) while a handler wrote to it."""


class _ErrorStatus(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _CallDetails(grpc.HandlerCallDetails):
    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str, invocation_metadata: tuple) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class ServicerContext:
    """One call: its HTTP/2 stream and grpc.aio's ServicerContext interface for the handler."""

    __slots__ = (
        "_conn", "_stream_id", "_method", "_metadata", "_deadline", "_timer", "_encoding", "_handler",
        "_code", "_details", "_trailing", "_initial", "_head_sent", "_finished", "_cancelled",
        "_send_window", "_out", "_out_trailers", "_drained", "_recv_window", "_recv_uncredited",
        "_request_closed", "_buffer", "_queue", "_queued_bytes", "_reader", "_dispatch", "_task", "_done_callbacks",
    )

    def __init__(self, conn: _Connection, stream_id: int, method: str, metadata: tuple, deadline: float | None,
                 encoding: bytes | None, handler: grpc.RpcMethodHandler) -> None:
        self._conn = conn
        self._stream_id = stream_id
        self._method = method
        self._metadata = metadata
        self._deadline = deadline
        self._timer: asyncio.TimerHandle | None = None
        self._encoding = encoding
        self._handler = handler
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple = ()
        self._initial: tuple = ()
        self._head_sent = False
        self._finished = False  # trailers queued: nothing more goes out
        self._cancelled = False
        self._send_window = conn.peer_initial_window
        self._out = bytearray()  # DATA waiting for window
        self._out_trailers: bytes | None = None
        self._drained: asyncio.Future[None] | None = None
        self._recv_window = STREAM_WINDOW
        self._recv_uncredited = 0
        self._request_closed = False
        self._buffer = bytearray()
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._reader: asyncio.Future[None] | None = None
        self._dispatch: Any = None  # RequestStream.dispatch's callback while it runs
        self._task: asyncio.Future[Any] | None = None
        self._done_callbacks: list = []

    # -- grpc.aio.ServicerContext ------------------------------------------------------------------

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - self._conn.loop.time(), 0.0)

    def peer(self) -> str:
        return self._conn.peer

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict:
        return {}

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: tuple = ()) -> None:
        if code is grpc.StatusCode.OK:
            raise ValueError("abort with OK is not allowed")
        self._code = code
        self._details = details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: tuple) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple:
        return self._trailing

    async def send_initial_metadata(self, initial_metadata: tuple) -> None:
        if self._head_sent:
            raise RuntimeError("initial metadata was already sent")
        self._initial = tuple(initial_metadata)
        self._send_head()

    async def write(self, message: Any) -> None:
        if self._finished or self._cancelled:
            raise _Cancelled(f"the call to {self._method} has ended")
        serializer = self._handler.response_serializer
        self._send_message(serializer(message) if serializer is not None else message)
        if self._out:
            await self._wait_drained()

    async def read(self) -> Any:
        payload = await self._next_message()
        if payload is None:
            return _EOF
        return self._deserialize(payload)

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._finished or self._cancelled

    def add_done_callback(self, callback) -> None:
        self._done_callbacks.append(callback)

    def set_compression(self, compression) -> None:  # responses are never compressed
        pass

    def disable_next_message_compression(self) -> None:
        pass

    # -- requests ----------------------------------------------------------------------------------

    def _deserialize(self, payload: bytes) -> Any:
        deserializer = self._handler.request_deserializer
        if deserializer is None:
            return payload
        try:
            return deserializer(payload)
        except Exception as exc:  # noqa: BLE001 - a malformed message is the caller's error
            raise _ErrorStatus(grpc.StatusCode.INTERNAL, f"cannot deserialize the request: {exc}") from exc

    def _data(self, payload: bytes) -> None:
        """Bytes of the request body, as gRPC messages."""
        try:
            for message in wire.messages(self._buffer, payload, self._conn.server.max_message_bytes, self._encoding):
                self._message(message)
        except OverflowError as exc:
            raise _ErrorStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except ValueError as exc:
            raise _ErrorStatus(grpc.StatusCode.INTERNAL, f"cannot read the request: {exc}") from exc

    def _message(self, message: bytes) -> None:
        if self._dispatch is not None:
            self._push(message)
            return
        self._queue.append(message)
        self._queued_bytes += len(message)
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _push(self, payload: bytes) -> None:
        """Hand a request to the dispatch callback now; a failure ends the dispatch with it."""
        try:
            self._dispatch(self._deserialize(payload))
        except Exception as exc:  # noqa: BLE001 - raised in the handler, which ends the call
            self._dispatch = None
            ended = self._reader
            if ended is not None and not ended.done():
                ended.set_exception(exc)

    def _close_request(self) -> None:
        self._request_closed = True
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    async def _next_message(self) -> bytes | None:
        while not self._queue:
            if self._request_closed or self._cancelled:
                if self._buffer and not self._cancelled:
                    raise _ErrorStatus(grpc.StatusCode.INTERNAL, "the request ended inside a message")
                return None
            self._reader = self._conn.loop.create_future()
            await self._reader
        message = self._queue.popleft()
        self._queued_bytes -= len(message)
        self._conn.credit(self)
        return message

    async def _dispatch_to(self, on_request) -> None:
        for_now, self._queue = self._queue, collections.deque()
        self._queued_bytes = 0
        for payload in for_now:
            on_request(self._deserialize(payload))
        self._conn.credit(self)
        if not self._request_closed and not self._cancelled:
            self._dispatch = on_request
            self._reader = self._conn.loop.create_future()
            try:
                await self._reader
            finally:
                self._dispatch = None
        if self._buffer and not self._cancelled:
            raise _ErrorStatus(grpc.StatusCode.INTERNAL, "the request ended inside a message")

    def _single_request(self) -> Any:
        if len(self._queue) != 1 or self._buffer:
            found = "no request message" if not self._queue else "more than one request message"
            raise _ErrorStatus(grpc.StatusCode.INTERNAL, f"a unary call needs exactly one request message; got {found}")
        return self._deserialize(self._queue.popleft())

    # -- responses ---------------------------------------------------------------------------------

    def _head_block(self) -> bytes:
        if not self._initial:
            return wire.RESPONSE_HEAD
        return wire.RESPONSE_HEAD + wire.metadata_block(self._initial)

    def _send_head(self) -> None:
        if not self._head_sent:
            self._head_sent = True
            self._conn.send_headers(self._stream_id, self._head_block(), end_stream=False)

    def _send_message(self, payload: bytes) -> None:
        limit = self._conn.server.max_message_bytes
        if len(payload) > limit:
            raise _ErrorStatus(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"response message larger than max ({len(payload)} vs. {limit})")
        self._send_head()
        self._conn.send_data(self, len(payload).to_bytes(5, "big") + payload)

    def _trailer_block(self) -> bytes:
        code = self._code
        if (code is None or code is grpc.StatusCode.OK) and not self._trailing and not self._details:
            return wire.TRAILER_OK
        value = 0 if code is None else code.value[0]
        block = wire.literal(b"grpc-status", str(value).encode())
        if self._details:
            block += wire.literal(b"grpc-message", wire.encode_grpc_message(self._details))
        if self._trailing:
            try:
                block += wire.metadata_block(self._trailing)
            except ValueError as exc:
                block = wire.literal(b"grpc-status", b"13") + wire.literal(
                    b"grpc-message", wire.encode_grpc_message(f"invalid trailing metadata: {exc}"))
        return block

    def _finish(self, response_payload: bytes | None = None) -> None:
        """Send the unary response (if any) and the trailers, in one write when windows allow."""
        if self._finished or self._cancelled:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        trailers = self._trailer_block()
        if not self._head_sent:
            if response_payload is None:
                # Trailers-only: status in the one HEADERS frame.
                block = wire.RESPONSE_HEAD + trailers
                if self._code is grpc.StatusCode.UNIMPLEMENTED:
                    block += _ACCEPT_ENCODING
                self._conn.send_headers(self._stream_id, block, end_stream=True)
                self._conn.stream_sent_end(self)
                return
            self._head_sent = True
            self._conn.send_response(self, self._head_block(), len(response_payload).to_bytes(5, "big")
                                     + response_payload, trailers)
            return
        if response_payload is not None:
            self._conn.send_data(self, len(response_payload).to_bytes(5, "big") + response_payload)
        self._conn.send_trailers(self, trailers)

    def _fail(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details
        self._finish()

    async def _wait_drained(self) -> None:
        while self._out and len(self._out) > WRITE_BUFFER_LIMIT or self._conn.write_paused:
            if self._cancelled:
                raise _Cancelled(f"the call to {self._method} has ended")
            self._drained = self._conn.loop.create_future()
            await self._drained

    def _wake_writer(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _cancel(self) -> None:
        """The client reset the stream, its deadline passed, or the connection is gone."""
        if self._cancelled:
            return
        self._cancelled = True
        if self._timer is not None:
            self._timer.cancel()
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)
        self._wake_writer()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        self._run_done_callbacks()

    def _run_done_callbacks(self) -> None:
        callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - a callback's failure must not break the connection
                pass

    def _expire(self) -> None:
        self._timer = None
        if not self._finished and not self._cancelled:
            self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            self._conn.reset(self, wire.CANCEL)
        self._cancel()


class RequestStream:
    """A streaming call's requests: an async iterator, as grpc.aio hands to handlers, which can also
    push them (`dispatch`), saving the trip through the event loop that each awaited message costs."""

    __slots__ = ("_call",)

    def __init__(self, call: ServicerContext) -> None:
        self._call = call

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Any:
        payload = await self._call._next_message()
        if payload is None:
            raise StopAsyncIteration
        return self._call._deserialize(payload)

    async def dispatch(self, on_request) -> None:
        """Call `on_request(request)` for each request, in order, as it arrives (from the connection's
        protocol callback, so it must not block); return once the requests end. An unreadable request
        ends the dispatch with the call's error."""
        await self._call._dispatch_to(on_request)


class _Connection(H2Connection):
    refuse_control_frames_while_paused = True

    def __init__(self, server: H2GrpcServer) -> None:
        super().__init__()
        self.server = server
        self.loop = server.loop
        self.peer = "unknown"
        # Streams a client opens and resets at once still start their handlers: a flood of them
        # (HTTP/2 rapid reset, CVE-2023-44487) ends the connection.
        self._resets = FloodGuard(RESETS_PER_SECOND, 2 * RESETS_PER_SECOND)
        self._settings_seen = False
        self._preface = False
        self._calls: dict[int, ServicerContext] = {}
        self._last_stream_id = 0
        self._blocked: dict[int, ServicerContext] = {}  # calls with DATA waiting for window
        self._going_away = False

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            host = peername[0]
            self.peer = f"ipv6:[{host}]:{peername[1]}" if ":" in host else f"ipv4:{host}:{peername[1]}"
        transport.write(self._our_settings({wire.SETTINGS_MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams}))
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call._cancel()
        self._blocked.clear()

    def resume_writing(self) -> None:
        super().resume_writing()
        for call in list(self._calls.values()):
            call._wake_writer()

    # -- frames in -------------------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        position = 0
        if not self._preface:
            if len(buffer) < len(wire.PREFACE):
                if not wire.PREFACE.startswith(buffer):
                    raise ConnectionError_(wire.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._buffer = buffer
                return
            if not buffer.startswith(wire.PREFACE):
                raise ConnectionError_(wire.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self._preface = True
            position = len(wire.PREFACE)
        if not self._settings_seen and len(buffer) - position >= 9:
            if buffer[position + 3] != wire.SETTINGS:  # RFC 9113 §3.4: the preface ends with SETTINGS
                raise ConnectionError_(wire.PROTOCOL_ERROR, "the client preface must end with a SETTINGS frame")
            self._settings_seen = True
        self._receive_frames(buffer, position)

    def _on_header_block(self, stream_id: int, flags: int, headers: list[tuple[bytes, bytes]]) -> None:
        call = self._calls.get(stream_id)
        if call is not None:  # trailers of a client stream: they end the request
            if not flags & wire.END_STREAM:
                raise ConnectionError_(wire.PROTOCOL_ERROR, "request trailers without END_STREAM")
            self._end_request(call)
            return
        if stream_id <= self._last_stream_id or stream_id % 2 == 0:
            raise ConnectionError_(wire.PROTOCOL_ERROR, f"stream {stream_id} cannot be opened")
        self._last_stream_id = stream_id
        if self._going_away or len(self._calls) >= self.server.max_concurrent_streams:
            self._write(wire.rst_stream(stream_id, wire.REFUSED_STREAM))
            return
        self._open_call(stream_id, flags, headers)

    def _open_call(self, stream_id: int, flags: int, headers: list[tuple[bytes, bytes]]) -> None:
        path = method = content_type = timeout = encoding = None
        metadata = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":path":
                    path = value
                elif name == b":method":
                    method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"grpc-encoding":
                encoding = value
            elif name not in _RESERVED_HEADERS:
                key = name.decode("latin-1")
                try:
                    metadata.append(Metadatum(key, wire.decode_metadata_value(key, value)))
                except ValueError:
                    self._refuse(stream_id, flags, grpc.StatusCode.INTERNAL, f"malformed metadata {key}")
                    return
        if method != b"POST" or path is None:
            self._write(wire.frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, stream_id,
                                   wire.status_only(405 if path is not None else 400)))
            self._reset_if_open(stream_id, flags)
            return
        if content_type is None or not content_type.startswith(b"application/grpc"):
            self._write(wire.frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, stream_id, wire.status_only(415)))
            self._reset_if_open(stream_id, flags)
            return
        path_text = path.decode("latin-1")
        metadata_tuple = tuple(metadata)
        handler = self.server.lookup(path_text, metadata_tuple)
        if handler is None:
            self._refuse(stream_id, flags, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path_text}")
            return
        if encoding in (b"identity", b""):
            encoding = None
        elif encoding is not None and encoding not in (b"gzip", b"deflate"):
            self._refuse(stream_id, flags, grpc.StatusCode.UNIMPLEMENTED,
                         f"grpc-encoding {encoding.decode('latin-1')} is not supported")
            return
        deadline = None
        if timeout is not None:
            try:
                deadline = self.loop.time() + wire.parse_timeout(timeout)
            except ValueError as exc:
                self._refuse(stream_id, flags, grpc.StatusCode.INTERNAL, str(exc))
                return
        call = ServicerContext(self, stream_id, path_text, metadata_tuple, deadline, encoding, handler)
        self._calls[stream_id] = call
        if deadline is not None:
            call._timer = self.loop.call_at(deadline, call._expire)
        if handler.request_streaming:
            call._task = start_eagerly(self.server.serve(call))
        if flags & wire.END_STREAM:
            self._end_request(call)

    def _refuse(self, stream_id: int, flags: int, code: grpc.StatusCode, details: str) -> None:
        block = wire.RESPONSE_HEAD + wire.literal(b"grpc-status", str(code.value[0]).encode()) \
            + wire.literal(b"grpc-message", wire.encode_grpc_message(details))
        if code is grpc.StatusCode.UNIMPLEMENTED:
            block += _ACCEPT_ENCODING
        self.send_headers(stream_id, block, end_stream=True)
        self._reset_if_open(stream_id, flags)

    def _reset_if_open(self, stream_id: int, flags: int) -> None:
        # The client may still be sending a request we will not read: tell it to stop.
        if not flags & wire.END_STREAM:
            self._write(wire.rst_stream(stream_id, wire.NO_ERROR))

    def _end_request(self, call: ServicerContext) -> None:
        call._close_request()
        if not call._handler.request_streaming and call._task is None and not call._finished:
            call._task = start_eagerly(self.server.serve(call))
        elif call._finished and not call._out:
            self._forget(call)

    def _on_data(self, stream_id: int, flags: int, payload: bytes, length: int) -> None:
        call = self._calls.get(stream_id)
        if call is None:
            if stream_id > self._last_stream_id:
                raise ConnectionError_(wire.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream we closed or reset: the bytes are dropped (the connection window is credited)
        if call._request_closed:
            self._write(wire.rst_stream(stream_id, wire.STREAM_CLOSED))
            self._forget(call)
            call._cancel()
            return
        call._recv_window -= length
        if call._recv_window < 0:
            self._write(wire.rst_stream(stream_id, wire.FLOW_CONTROL_ERROR))
            self._forget(call)
            call._cancel()
            return
        call._recv_uncredited += length
        if not call._finished:
            try:
                call._data(wire.unpad(flags, payload) if flags & wire.PADDED else payload)
            except _ErrorStatus as exc:
                call._fail(exc.code, exc.details)
                self.reset(call, wire.NO_ERROR if exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED else wire.CANCEL)
                call._cancel()
                return
        if flags & wire.END_STREAM:
            self._end_request(call)
        else:
            self.credit(call)

    def credit(self, call: ServicerContext) -> None:
        """Give a stream back the window its request bytes used, unless its handler lags behind."""
        if call._request_closed or call._recv_uncredited < STREAM_WINDOW // 4 \
                or call._queued_bytes > STREAM_QUEUE_LIMIT:
            return
        if call._stream_id in self._calls:
            self._write(wire.window_update(call._stream_id, call._recv_uncredited))
        call._recv_window += call._recv_uncredited
        call._recv_uncredited = 0

    def _adjust_stream_windows(self, delta: int) -> None:
        for call in self._calls.values():
            call._send_window += delta

    def _on_stream_window_update(self, stream_id: int, increment: int) -> None:
        call = self._calls.get(stream_id)
        if call is None:
            if stream_id > self._last_stream_id:
                raise ConnectionError_(wire.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return
        call._send_window += increment
        if call._send_window > wire.MAX_WINDOW:
            self.reset(call, wire.FLOW_CONTROL_ERROR)
            call._cancel()
            return
        if call._out:
            self._flush(call)

    def _on_goaway(self, payload: bytes) -> None:
        self._going_away = True
        if not self._calls:
            self._close()

    def _on_rst_stream(self, stream_id: int, code: int) -> None:
        if stream_id == 0 or stream_id > self._last_stream_id:
            raise ConnectionError_(wire.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        call = self._calls.pop(stream_id, None)
        if call is not None:
            if not self._resets.allow():
                raise ConnectionError_(wire.ENHANCE_YOUR_CALM, "too many streams reset by the client")
            self._blocked.pop(stream_id, None)
            call._cancel()
            self._maybe_close()

    # -- frames out ------------------------------------------------------------------------------------

    def send_headers(self, stream_id: int, block: bytes, *, end_stream: bool) -> None:
        self._write(self._header_frames(stream_id, block, end_stream))

    def send_response(self, call: ServicerContext, head: bytes, message: bytes, trailers: bytes) -> None:
        """A unary response: head, message and trailers in one write when the windows allow."""
        size = len(message)
        if size <= call._send_window and size <= self.send_window and size <= self.peer_max_frame:
            call._send_window -= size
            self.send_window -= size
            sid = call._stream_id
            self._write(self._header_frames(sid, head, False) + wire.frame(wire.DATA, 0, sid, message)
                        + self._header_frames(sid, trailers, True))
            self.stream_sent_end(call)
            return
        self.send_headers(call._stream_id, head, end_stream=False)
        self.send_data(call, message)
        self.send_trailers(call, trailers)

    def send_data(self, call: ServicerContext, data: bytes) -> None:
        if call._out:
            call._out += data
            return
        size = len(data)
        if size <= call._send_window and size <= self.send_window and size <= self.peer_max_frame:
            call._send_window -= size
            self.send_window -= size
            self._write(wire.frame(wire.DATA, 0, call._stream_id, data))
            return
        call._out += data
        self._flush(call)

    def send_trailers(self, call: ServicerContext, trailers: bytes) -> None:
        if call._out:
            call._out_trailers = trailers  # after the DATA still waiting for window
            return
        self._write(self._header_frames(call._stream_id, trailers, True))
        self.stream_sent_end(call)

    def _flush(self, call: ServicerContext) -> None:
        out = call._out
        frames = []
        limit = self.peer_max_frame
        while out and call._send_window > 0 and self.send_window > 0:
            size = min(len(out), call._send_window, self.send_window, limit)
            frames.append(wire.frame(wire.DATA, 0, call._stream_id, bytes(out[:size])))
            del out[:size]
            call._send_window -= size
            self.send_window -= size
        if out:
            self._blocked[call._stream_id] = call
        else:
            self._blocked.pop(call._stream_id, None)
            if call._out_trailers is not None:
                frames.append(self._header_frames(call._stream_id, call._out_trailers, True))
                call._out_trailers = None
        if frames:
            self._write(b"".join(frames))
        if not out:
            call._wake_writer()
            if call._finished:
                self.stream_sent_end(call)
        elif len(out) <= WRITE_BUFFER_LIMIT:
            call._wake_writer()

    def _flush_blocked(self) -> None:
        for call in list(self._blocked.values()):
            if self.send_window <= 0:
                return
            self._flush(call)

    def stream_sent_end(self, call: ServicerContext) -> None:
        """Our END_STREAM went out; the stream closes once the client's request has ended too.

        A response that ends before its request (an early error, such as a rejected credential on a
        streaming call) leaves the stream open until the client ends or resets it; what it still
        sends is dropped. Resetting the stream at once (RST_STREAM NO_ERROR, which RFC 9113 allows)
        makes grpcio's clients fail a request write still in flight and report INTERNAL instead of
        the status they were sent."""
        if call._request_closed:
            self._forget(call)
        call._run_done_callbacks()

    def reset(self, call: ServicerContext, code: int) -> None:
        if call._stream_id in self._calls:
            self._write(wire.rst_stream(call._stream_id, code))
            self._forget(call)

    def _forget(self, call: ServicerContext) -> None:
        if self._calls.get(call._stream_id) is call:
            del self._calls[call._stream_id]
        self._blocked.pop(call._stream_id, None)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._going_away and not self._calls:
            self._close()

    # -- connection lifecycle --------------------------------------------------------------------------

    def go_away(self) -> None:
        """Graceful shutdown: no new streams; close once the open ones finish."""
        if self._closed:
            return
        self._going_away = True
        self._write(wire.goaway(self._last_stream_id, wire.NO_ERROR))
        self._maybe_close()

    def abort_calls(self) -> None:
        for call in list(self._calls.values()):
            if not call._finished:
                call._fail(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            call._cancel()
        self._close()

    def _fail_connection(self, code: int, message: str) -> None:
        self.server.log_protocol_error(self.peer, message)
        self._write(wire.goaway(self._last_stream_id, code, message.encode("utf-8", "replace")[:256]))
        self._close()

    def _close(self) -> None:
        if not self._closed and self._transport is not None:
            self._closed = True
            self._transport.close()


class H2GrpcServer:
    """A gRPC server on the running event loop: register handlers, `start`, later `stop`."""

    def __init__(self, *, interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
                 max_message_bytes: int = 4 << 20, max_concurrent_streams: int = 1000, logger: Any = None) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.connections: set[_Connection] = set()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment] - set by start
        self._interceptors = list(interceptors)
        self._intercept = self._interceptor_chain()
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._log = logger

    # -- registration (what generated add_*_to_server functions call) ---------------------------------

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        for name, handler in method_handlers.items():
            self._methods[f"/{service_name}/{name}"] = handler

    def lookup(self, method: str, metadata: tuple) -> grpc.RpcMethodHandler | None:
        handler = self._methods.get(method)
        if handler is not None:
            return handler
        details = _CallDetails(method, metadata)
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    # -- calls ------------------------------------------------------------------------------------------

    async def _intercepted(self, call: ServicerContext) -> grpc.RpcMethodHandler | None:
        if self._intercept is None:
            return call._handler
        return await self._intercept(_CallDetails(call._method, call._metadata))

    def _interceptor_chain(self):
        """The interceptors around handler lookup, composed once (calls only run the chain)."""
        if not self._interceptors:
            return None

        async def innermost(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            return self.lookup(details.method, details.invocation_metadata)

        continuation = innermost
        for interceptor in reversed(self._interceptors):
            continuation = _bind(interceptor, continuation)
        return continuation

    async def serve(self, call: ServicerContext) -> None:
        """Run one call's handler and send its outcome."""
        try:
            handler = await self._intercepted(call)
            if handler is None:
                call._fail(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {call._method}")
                return
            call._handler = handler
            if handler.unary_unary is not None:
                response = await handler.unary_unary(call._single_request(), call)
                self._respond(call, response)
            elif handler.stream_unary is not None:
                response = await handler.stream_unary(RequestStream(call), call)
                self._respond(call, response)
            else:
                behavior = handler.unary_stream or handler.stream_stream
                request = call._single_request() if handler.unary_stream is not None else RequestStream(call)
                result = behavior(request, call)
                if inspect.isasyncgen(result):
                    async for response in result:
                        await call.write(response)
                else:
                    await result
                call._finish()
        except grpc.aio.AbortError:
            call._finish()
        except _ErrorStatus as exc:
            call._fail(exc.code, exc.details)
        except _Cancelled:
            call._finish()
        except asyncio.CancelledError:
            if not call._cancelled:  # we were stopped: the client gets a status, not a hang
                call._fail(grpc.StatusCode.CANCELLED, "the call was cancelled on the server")
                call._cancel()
        except Exception as exc:  # noqa: BLE001 - grpc.aio's answer to an escaped exception
            if self._log is not None:
                self._log.exception("unexpected error in an RPC handler", method=call._method)
            call._fail(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")

    def _respond(self, call: ServicerContext, response: Any) -> None:
        code = call._code
        if code is not None and code is not grpc.StatusCode.OK:
            call._finish()
            return
        if response is None:
            call._fail(grpc.StatusCode.INTERNAL, "the handler returned no response")
            return
        serializer = call._handler.response_serializer
        payload = serializer(response) if serializer is not None else response
        limit = self.max_message_bytes
        if len(payload) > limit:
            call._fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"response message larger than max ({len(payload)} vs. {limit})")
            return
        call._finish(payload)

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self, host: str, port: int, *, ssl: ssl_module.SSLContext | None = None) -> int:
        """Listen on host:port (0: a free port); returns the port."""
        self.loop = asyncio.get_running_loop()
        if ssl is not None:
            ssl.set_alpn_protocols(["h2"])
        server = await self.loop.create_server(lambda: _Connection(self), host, port, ssl=ssl, reuse_address=True)
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls (GOAWAY), let open ones finish for up to `grace` seconds, then cancel them."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.go_away()
        if grace:
            deadline = self.loop.time() + grace
            while any(conn._calls for conn in self.connections) and self.loop.time() < deadline:
                await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort_calls()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def log_protocol_error(self, peer: str, message: str) -> None:
        if self._log is not None:
            self._log.info("HTTP/2 connection closed on a protocol error", peer=peer, error=message)


def _bind(interceptor: grpc.aio.ServerInterceptor, continuation):
    async def next_step(details: grpc.HandlerCallDetails):
        return await interceptor.intercept_service(continuation, details)

    return next_step
