"""A gRPC client connection written on asyncio over HTTP/2, for the gateway's streams to nodes.

Why: with grpc.aio every message of a call crosses grpcio's core, which polls on a thread of its own
and hands each event to the event loop; on a 2-core host that is ~150 µs of latency each way per
message on the gateway's hop to a node. Here a message goes out with one `transport.write` from the
caller's own step and an answer is delivered from the loop's protocol callback (no task, no thread).

Scope (RFC 9113 and grpc/doc/PROTOCOL-HTTP2.md): cleartext HTTP/2 with prior knowledge; streaming
calls driven by callbacks (`ClientStream`: write, end, cancel; `on_message`, `on_close`); metadata,
grpc-timeout, trailers and trailers-only responses, gzip/deflate responses, flow control both ways,
the message size limit, GOAWAY, keep-alive pings that detect a silent peer. The gateway's unary calls
to nodes (metadata, statistics) stay on grpc.aio channels: they are not on the hot path.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable

import grpc

from services.common.h2grpc import wire
from services.common.h2grpc.connection import STREAM_WINDOW, H2Connection
from services.common.h2grpc.wire import ConnectionError_

# RST_STREAM codes as gRPC statuses (grpc/doc/PROTOCOL-HTTP2.md, "Errors").
_RESET_STATUS = {
    wire.REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE,
    wire.CANCEL: grpc.StatusCode.CANCELLED,
    wire.ENHANCE_YOUR_CALM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    0xC: grpc.StatusCode.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}
# HTTP statuses of a response that is not gRPC (grpc/doc/http-grpc-status-mapping.md).
_HTTP_STATUS = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_RESERVED = frozenset((b"content-type", b"grpc-status", b"grpc-message", b"grpc-encoding", b"grpc-accept-encoding"))

OnMessage = Callable[[bytes], None]
OnClose = Callable[[grpc.StatusCode, str, tuple], None]


class ClientStream:
    """One call on an `H2GrpcConnection`. Messages arrive through `on_message(bytes)` and the call's
    end, exactly once, through `on_close(code, details, trailing_metadata)`; both run in the loop's
    protocol callback, so they must not block."""

    __slots__ = (
        "stream_id", "_conn", "_on_message", "_on_close", "send_window", "_out", "_end_queued", "_local_closed",
        "closed", "reset_sent", "_head_received", "_encoding", "_buffer", "_recv_window", "_recv_uncredited",
        "initial_metadata",
    )

    def __init__(self, conn: H2GrpcConnection, stream_id: int, on_message: OnMessage, on_close: OnClose) -> None:
        self.stream_id = stream_id
        self._conn = conn
        self._on_message = on_message
        self._on_close = on_close
        self.send_window = conn.peer_initial_window
        # Messages waiting for window: [framed bytes, bytes sent so far, still-wanted check].
        self._out: collections.deque[list] = collections.deque()
        self._end_queued = False
        self._local_closed = False  # our END_STREAM went out
        self.closed = False  # on_close was called
        self.reset_sent = False
        self._head_received = False
        self._encoding: bytes | None = None
        self._buffer = bytearray()
        self._recv_window = STREAM_WINDOW
        self._recv_uncredited = 0
        self.initial_metadata: tuple = ()

    @property
    def queued(self) -> int:
        """Messages waiting for flow-control window (a server that stopped reading)."""
        return len(self._out)

    def write(self, message: bytes, wanted: Callable[[], bool] | None = None) -> None:
        """Send one message now, or as soon as the windows allow; a queued message whose `wanted()`
        is false by then (its caller gave up) is never sent."""
        if self.closed or self._local_closed or self._end_queued:
            raise RuntimeError("the stream is closed for writing")
        size = len(message)
        if size > self._conn.max_message_bytes:
            raise ValueError(f"message larger than max ({size} vs. {self._conn.max_message_bytes})")
        data = size.to_bytes(5, "big") + message
        if not self._out:
            conn = self._conn
            total = size + 5
            if total <= self.send_window and total <= conn.send_window and total <= conn.peer_max_frame:
                self.send_window -= total
                conn.send_window -= total
                conn.pings_without_data = 0
                conn.write(wire.frame(wire.DATA, 0, self.stream_id, data))
                return
        self._out.append([data, 0, wanted])
        self._conn.flush(self)

    def end(self) -> None:
        """Half-close: no more messages from us (after those still queued)."""
        if self.closed or self._local_closed or self._end_queued:
            return
        self._end_queued = True
        self._conn.flush(self)

    def cancel(self, details: str = "cancelled by the client") -> None:
        """Reset the stream (RST_STREAM CANCEL); on_close gets CANCELLED."""
        if self.closed:
            return
        self._conn.reset(self, wire.CANCEL)
        self._finish(grpc.StatusCode.CANCELLED, details, ())

    # -- called by the connection --------------------------------------------------------------------

    def _finish(self, code: grpc.StatusCode, details: str, trailing: tuple) -> None:
        if self.closed:
            return
        self.closed = True
        self._out.clear()
        self._conn.forget(self)
        self._on_close(code, details, trailing)

    def _headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        if not self._head_received:
            self._head_received = True
            status = next((value for name, value in headers if name == b":status"), None)
            if status != b"200":
                code = _HTTP_STATUS.get(int(status), grpc.StatusCode.UNKNOWN) if status and status.isdigit() \
                    else grpc.StatusCode.INTERNAL
                self._fail(code, f"the server answered HTTP status {(status or b'none').decode('latin-1')}")
                return
            content_type = next((value for name, value in headers if name == b"content-type"), b"")
            if not content_type.startswith(b"application/grpc"):
                self._fail(grpc.StatusCode.UNKNOWN,
                           f"the server answered content-type {content_type.decode('latin-1')!r}, not gRPC")
                return
            self._encoding = next((value for name, value in headers if name == b"grpc-encoding"), None)
            if not end_stream:
                self.initial_metadata = _metadata(headers)
                return
        elif not end_stream:
            self._fail(grpc.StatusCode.INTERNAL, "a second header block without END_STREAM")
            return
        # Trailers (or a trailers-only response).
        if self._buffer:
            self._fail(grpc.StatusCode.INTERNAL, "the response ended inside a message")
            return
        code_text = next((value for name, value in headers if name == b"grpc-status"), None)
        if code_text is None or not code_text.isdigit():
            code, details = grpc.StatusCode.UNKNOWN, "the server sent no grpc-status"
        else:
            code = _CODES.get(int(code_text), grpc.StatusCode.UNKNOWN)
            details = wire.decode_grpc_message(next((v for n, v in headers if n == b"grpc-message"), b""))
        self._finish(code, details, _metadata(headers))

    def _data(self, payload: bytes) -> None:
        try:
            for message in wire.messages(self._buffer, payload, self._conn.max_message_bytes, self._encoding):
                self._on_message(message)
                if self.closed:
                    return
        except OverflowError as exc:
            self._fail(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:
            self._fail(grpc.StatusCode.INTERNAL, str(exc))

    def _fail(self, code: grpc.StatusCode, details: str) -> None:
        """A response we cannot accept: reset the stream and end the call with `code`."""
        self._conn.reset(self, wire.CANCEL)
        self._finish(code, details, ())


def _metadata(headers: list[tuple[bytes, bytes]]) -> tuple:
    out = []
    for name, value in headers:
        if name[:1] == b":" or name in _RESERVED:
            continue
        key = name.decode("latin-1")
        try:
            out.append((key, wire.decode_metadata_value(key, value)))
        except ValueError:
            continue  # a malformed -bin value is dropped, as grpc's core does
    return tuple(out)


class H2GrpcConnection(H2Connection):
    """One client HTTP/2 connection to a gRPC server: `connect`, then `open_stream` calls on it.

    Streams may be opened before the socket is up (their frames wait for it). The connection ends
    for good on a transport error, a GOAWAY that drops streams, a keep-alive ping left unanswered,
    or `close`: open streams then end with UNAVAILABLE (the server may not have seen their requests,
    so callers may retry elsewhere) and `lost` resolves with the reason.
    """

    def __init__(self, authority: str, *, max_message_bytes: int = 4 << 20, keepalive_seconds: float = 10.0,
                 keepalive_timeout_seconds: float = 5.0, user_agent: str = "aimaas-h2grpc") -> None:
        super().__init__()
        self.loop = asyncio.get_running_loop()
        self.max_message_bytes = max_message_bytes
        self.lost: asyncio.Future[str] = self.loop.create_future()
        self.going_away = False  # GOAWAY received or `close` called: no new streams
        # Called when a graceful GOAWAY leaves streams open (their owner may end them once idle).
        self.on_going_away: Callable[[], None] | None = None
        self._authority = authority.encode("ascii")
        self._user_agent = user_agent.encode("ascii")
        self._keepalive = keepalive_seconds
        self._keepalive_timeout = keepalive_timeout_seconds
        self._early: list[bytes] = []  # frames written before the socket was up
        self._streams: dict[int, ClientStream] = {}
        self._blocked: dict[int, ClientStream] = {}  # streams with messages waiting for window
        self._next_stream_id = 1
        self._received = False  # any frame since the last keep-alive check
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._ping_deadline: asyncio.TimerHandle | None = None
        self._ping_payload = b""
        # gRPC servers count pings that come without data from us as abuse (grpcio's server sends
        # GOAWAY after a few): like grpc's own clients, at most two until we send data again.
        self.pings_without_data = 0

    @property
    def streams(self) -> int:
        return len(self._streams)

    async def connect(self, host: str, port: int, *, timeout: float) -> None:
        """Open the socket. A failure ends the connection (its early streams get UNAVAILABLE) and
        raises ConnectionRefusedError with the reason."""
        try:
            async with asyncio.timeout(timeout):
                await self.loop.create_connection(lambda: self, host, port)
        except (OSError, TimeoutError) as exc:
            reason = f"cannot connect to {host}:{port}: {exc or 'timed out'}"
            self._end(reason)
            raise ConnectionRefusedError(reason) from exc

    def open_stream(self, path: str, *, on_message: OnMessage, on_close: OnClose, metadata=(),
                    timeout: float | None = None) -> ClientStream:
        """Start a call to `path` (e.g. "/pkg.Service/Method"): its headers go out now."""
        if self._closed or self.going_away:
            raise ConnectionResetError("the connection is closed to new calls")
        block = (
            b"\x83\x86"  # :method POST, :scheme http (static table 3 and 6)
            + wire.literal(b":path", path.encode("ascii"))
            + wire.literal(b":authority", self._authority)
            + wire.literal(b"content-type", b"application/grpc")
            + wire.literal(b"te", b"trailers")
            + wire.literal(b"user-agent", self._user_agent)
        )
        if timeout is not None:
            block += wire.literal(b"grpc-timeout", wire.format_timeout(timeout))
        block += wire.metadata_block(metadata)
        # Only now (the block may raise ValueError on bad metadata) is a stream id spent on the call.
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        stream = ClientStream(self, stream_id, on_message, on_close)
        self._streams[stream_id] = stream
        self.pings_without_data = 0
        self.write(wire.header_frames(stream_id, block, False, self.peer_max_frame))
        self._arm_keepalive()
        return stream

    def close(self, reason: str = "the client closed the connection") -> None:
        """End every stream (UNAVAILABLE) and close the socket."""
        if self._transport is not None and not self._closed:
            self.write(wire.goaway(0, wire.NO_ERROR))
        self._end(reason)

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        if self._closed:
            transport.close()
            return
        self._transport = transport
        early, self._early = self._early, []
        transport.write(wire.PREFACE + self._our_settings({wire.SETTINGS_ENABLE_PUSH: 0}) + b"".join(early))
        self._arm_keepalive()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"the connection was lost: {exc}" if exc else "the server closed the connection")

    # -- frames in -------------------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        self._received = True
        self._receive_frames(self._buffer + data if self._buffer else data, 0)

    def _on_data(self, stream_id: int, flags: int, payload: bytes, length: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id >= self._next_stream_id:
                raise ConnectionError_(wire.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream we reset: the bytes are dropped (the connection window is credited)
        stream._recv_window -= length
        if stream._recv_window < 0:
            self.reset(stream, wire.FLOW_CONTROL_ERROR)
            stream._finish(grpc.StatusCode.INTERNAL, "the server overran the stream window", ())
            return
        if not stream._head_received:
            stream._fail(grpc.StatusCode.INTERNAL, "DATA before the response headers")
            return
        stream._data(wire.unpad(flags, payload) if flags & wire.PADDED else payload)
        if stream.closed:
            return
        if flags & wire.END_STREAM:
            stream._fail(grpc.StatusCode.INTERNAL, "the response ended without trailers")
            return
        # Messages are handed over as they arrive, so the window comes back at once.
        stream._recv_uncredited += length
        if stream._recv_uncredited >= STREAM_WINDOW // 4:
            self.write(wire.window_update(stream_id, stream._recv_uncredited))
            stream._recv_window += stream._recv_uncredited
            stream._recv_uncredited = 0

    def _on_header_block(self, stream_id: int, flags: int, headers: list[tuple[bytes, bytes]]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id >= self._next_stream_id or stream_id % 2 == 0:
                raise ConnectionError_(wire.PROTOCOL_ERROR, f"HEADERS on stream {stream_id} we never opened")
            return
        end_stream = bool(flags & wire.END_STREAM)
        request_open = not stream._local_closed
        stream._headers(headers, end_stream)
        if end_stream and request_open and not stream.reset_sent:
            # The response is complete before our request is: the rest of it is not wanted.
            self.write(wire.rst_stream(stream_id, wire.NO_ERROR))

    def _adjust_stream_windows(self, delta: int) -> None:
        for stream in self._streams.values():
            stream.send_window += delta

    def _on_stream_window_update(self, stream_id: int, increment: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.send_window += increment
        if stream.send_window > wire.MAX_WINDOW:
            self.reset(stream, wire.FLOW_CONTROL_ERROR)
            stream._finish(grpc.StatusCode.INTERNAL, "the server overflowed the stream window", ())
            return
        if stream._out or stream._end_queued:
            self.flush(stream)

    def _on_ping_ack(self, payload: bytes) -> None:
        if payload == self._ping_payload and self._ping_deadline is not None:
            self._ping_deadline.cancel()
            self._ping_deadline = None

    def _on_rst_stream(self, stream_id: int, code: int) -> None:
        if stream_id == 0 or stream_id >= self._next_stream_id:
            raise ConnectionError_(wire.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream._finish(_RESET_STATUS.get(code, grpc.StatusCode.INTERNAL),
                           f"the server reset the stream (HTTP/2 error code {code})", ())

    def _on_goaway(self, payload: bytes) -> None:
        if len(payload) < 8:
            raise ConnectionError_(wire.FRAME_SIZE_ERROR, "GOAWAY is at least 8 bytes")
        last_stream_id = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        code = int.from_bytes(payload[4:8], "big")
        self.going_away = True
        detail = payload[8:].decode("utf-8", "replace")
        reason = f"the server is going away (HTTP/2 error code {code}{': ' + detail if detail else ''})"
        # Streams the server never processed can safely go elsewhere; the others may still finish.
        for stream in [s for s in self._streams.values() if s.stream_id > last_stream_id]:
            stream._finish(grpc.StatusCode.UNAVAILABLE, reason, ())
        if code != wire.NO_ERROR or not self._streams:
            self._end(reason)
        elif self.on_going_away is not None:
            self.on_going_away()

    # -- frames out ------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Frames out; those written before the socket is up wait for it."""
        if self._closed:
            return
        if self._transport is None:
            self._early.append(data)
        else:
            self._transport.write(data)

    write = _write

    def flush(self, stream: ClientStream) -> None:
        """Send what the windows allow of the stream's queued messages (and its END_STREAM after them)."""
        frames = []
        out = stream._out
        limit = self.peer_max_frame
        while out and stream.send_window > 0 and self.send_window > 0:
            item = out[0]
            data, sent, wanted = item
            if sent == 0 and wanted is not None and not wanted():
                out.popleft()
                continue
            size = min(len(data) - sent, stream.send_window, self.send_window, limit)
            frames.append(wire.frame(wire.DATA, 0, stream.stream_id, data[sent:sent + size]))
            stream.send_window -= size
            self.send_window -= size
            item[1] = sent + size
            if item[1] == len(data):
                out.popleft()
        while out and out[0][1] == 0 and out[0][2] is not None and not out[0][2]():
            out.popleft()  # nothing left to send but messages nobody wants
        if out:
            self._blocked[stream.stream_id] = stream
        else:
            self._blocked.pop(stream.stream_id, None)
            if stream._end_queued and not stream._local_closed:
                stream._local_closed = True
                frames.append(wire.frame(wire.DATA, wire.END_STREAM, stream.stream_id))
        if frames:
            self.pings_without_data = 0
            self.write(b"".join(frames))

    def _flush_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self.send_window <= 0:
                return
            self.flush(stream)

    def reset(self, stream: ClientStream, code: int) -> None:
        if stream.stream_id in self._streams:
            stream.reset_sent = True
            self.write(wire.rst_stream(stream.stream_id, code))
            self.forget(stream)

    def forget(self, stream: ClientStream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
        self._blocked.pop(stream.stream_id, None)
        if self.going_away and not self._streams:
            self._end("the server went away and no call is left")

    # -- keep-alive and the end ----------------------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        if self._keepalive_timer is None and self._keepalive > 0 and self._transport is not None and not self._closed:
            self._keepalive_timer = self.loop.call_later(self._keepalive, self._check_alive)

    def _check_alive(self) -> None:
        self._keepalive_timer = None
        if self._closed or not self._streams:
            return  # re-armed by the next stream
        if not self._received and self._ping_deadline is None and self.pings_without_data < 2:
            self.pings_without_data += 1
            self._ping_payload = os.urandom(8)
            self.write(wire.frame(wire.PING, 0, 0, self._ping_payload))
            self._ping_deadline = self.loop.call_later(self._keepalive_timeout, self._ping_timed_out)
        self._received = False
        self._arm_keepalive()

    def _ping_timed_out(self) -> None:
        self._ping_deadline = None
        self._end(f"the server did not answer a keep-alive ping within {self._keepalive_timeout:g}s")

    def _fail_connection(self, code: int, message: str) -> None:
        self.write(wire.goaway(0, code, message.encode("utf-8", "replace")[:256]))
        self._end(f"HTTP/2 protocol error from the server: {message}")

    def _end(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.going_away = True
        for timer in (self._keepalive_timer, self._ping_deadline):
            if timer is not None:
                timer.cancel()
        if self._transport is not None:
            self._transport.close()
        streams, self._streams = self._streams, {}
        self._blocked.clear()
        for stream in streams.values():
            stream._finish(grpc.StatusCode.UNAVAILABLE, reason, ())
        if not self.lost.done():
            self.lost.set_result(reason)
