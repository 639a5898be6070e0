"""What both ends of an HTTP/2 connection do alike (RFC 9113): splitting the byte stream into frames,
header blocks (HPACK, CONTINUATION), SETTINGS, connection-level flow control, PING answers.

The server (server.py) and the client (client.py) subclass `H2Connection` and handle the frames that
concern their streams: DATA, complete header blocks, stream window updates, RST_STREAM and GOAWAY.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import hpack

from services.common.h2grpc import wire
from services.common.h2grpc.wire import ConnectionError_

# What we grant a peer: generous windows so a small call never waits for a WINDOW_UPDATE.
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_FRAME_SIZE = 1 << 20  # what we accept; fewer, larger DATA frames for big tensors
MAX_HEADER_LIST_SIZE = 64 << 10
# Control frames that make us answer (PING, SETTINGS): at most this many a second per connection,
# bursts of twice that. Real peers send a few; a flood (CVE-2019-9512, -9515) ends the connection.
CONTROL_FRAMES_PER_SECOND = 500
# PING/SETTINGS answered while the write buffer is full and not draining (nghttp2 allows 1000
# queued such answers too): real clients probe bandwidth with PINGs while they read a large
# answer slowly; one that keeps sending them but never reads would grow our buffer without bound.
MAX_CONTROL_ANSWERS_WHILE_PAUSED = 1000


class FloodGuard:
    """A token bucket: `allow()` turns false once events come faster than `rate` a second for longer
    than a burst of `burst` allows."""

    __slots__ = ("_rate", "_burst", "_tokens", "_stamp", "_clock")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._clock = clock
        self._stamp = clock()

    def allow(self) -> bool:
        now = self._clock()
        tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True


class HeaderBlockDecoder:
    """HPACK decoding (RFC 7541), with the result of a header block kept while the dynamic table
    stays as it was.

    A client repeating a call sends the same bytes each time (its fields indexed in the table), and
    hpack decodes them in pure Python (~20 µs a call here). A block whose decoding changed nothing
    in the table decodes to the same fields for as long as nothing else changes the table, so it is
    decoded once; any insertion or size change makes every kept result stale.
    """

    _KEEP = 64  # blocks kept (a connection's calls use a handful)
    _KEEP_BYTES = 1024  # longer blocks are not kept

    def __init__(self) -> None:
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self._decoder.max_allowed_table_size = 4096
        self._table = self._decoder.header_table
        self._generation = 0
        self._kept: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}
        add = self._table.add

        def counting_add(name: bytes, value: bytes) -> None:
            self._generation += 1
            add(name, value)

        self._table.add = counting_add  # type: ignore[method-assign]

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The block's fields as raw (name, value) pairs; the list is shared, not to be changed."""
        kept = self._kept.get(block)
        if kept is not None and kept[0] == self._generation:
            return kept[1]
        generation, size = self._generation, self._table.maxsize
        headers = self._decoder.decode(block, raw=True)
        if self._table.maxsize != size:
            self._generation += 1  # a size update may have evicted entries
        elif self._generation == generation and len(block) <= self._KEEP_BYTES:
            if len(self._kept) >= self._KEEP:
                self._kept.clear()
            self._kept[block] = (generation, headers)
        return headers


class H2Connection(asyncio.Protocol):
    """Frame handling shared by both ends; `_receive_frames` feeds the handlers below."""

    # A client's buffer fills with its own requests when the server is slow: the server's pings are
    # no abuse then. A server's fills with answers its client does not read.
    refuse_control_frames_while_paused = False

    def __init__(self) -> None:
        self.peer_initial_window = wire.DEFAULT_WINDOW
        self.peer_max_frame = wire.DEFAULT_MAX_FRAME
        self.send_window = wire.DEFAULT_WINDOW  # what the peer lets us send on the connection
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._decoder = HeaderBlockDecoder()
        self._headers: tuple[int, int, bytearray] | None = None  # a header block awaiting CONTINUATION
        self._recv_window = CONNECTION_WINDOW
        self._recv_uncredited = 0
        self._closed = False
        self.write_paused = False  # the transport's buffer is over its high-water mark
        self._answers_while_paused = 0
        self._control_frames = FloodGuard(CONTROL_FRAMES_PER_SECOND, 2 * CONTROL_FRAMES_PER_SECOND)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._answers_while_paused = 0

    def _answer_control_frame(self, what: str) -> None:
        """Before answering a PING or SETTINGS: a peer that floods them, or (on a server) keeps
        sending them while it leaves our answers unread (our buffer would only grow), loses the
        connection."""
        if self.write_paused and self.refuse_control_frames_while_paused:
            self._answers_while_paused += 1
            if self._answers_while_paused > MAX_CONTROL_ANSWERS_WHILE_PAUSED:
                raise ConnectionError_(wire.ENHANCE_YOUR_CALM, f"{what} frames while our answers go unread")
        if not self._control_frames.allow():
            raise ConnectionError_(wire.ENHANCE_YOUR_CALM, f"too many {what} frames")

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except ConnectionError_ as exc:
            self._fail_connection(exc.code, str(exc))
        except hpack.HPACKError as exc:
            self._fail_connection(wire.COMPRESSION_ERROR, f"header block: {exc}")

    def eof_received(self) -> bool:
        return False

    def _our_settings(self, extra: dict[int, int]) -> bytes:
        """Our SETTINGS and the connection window we grant, sent first on a new connection."""
        return wire.settings_frame({
            **extra,
            wire.SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            wire.SETTINGS_MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            wire.SETTINGS_MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        }) + wire.window_update(0, CONNECTION_WINDOW - wire.DEFAULT_WINDOW)

    def _receive_frames(self, buffer: bytes, position: int) -> None:
        end = len(buffer)
        while end - position >= 9 and not self._closed:
            length = int.from_bytes(buffer[position:position + 3], "big")
            if length > MAX_FRAME_SIZE:
                raise ConnectionError_(wire.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds the maximum")
            if end - position - 9 < length:
                break
            kind = buffer[position + 3]
            flags = buffer[position + 4]
            stream_id = int.from_bytes(buffer[position + 5:position + 9], "big") & 0x7FFFFFFF
            payload = buffer[position + 9:position + 9 + length]
            position += 9 + length
            if self._headers is not None and kind != wire.CONTINUATION:
                raise ConnectionError_(wire.PROTOCOL_ERROR, "a header block was interrupted")
            if kind == wire.DATA:
                if stream_id == 0:
                    raise ConnectionError_(wire.PROTOCOL_ERROR, "DATA on stream 0")
                self._consume_connection_window(length)
                self._on_data(stream_id, flags, payload, length)
            elif kind == wire.HEADERS:
                self._on_headers(stream_id, flags, payload)
            elif kind == wire.CONTINUATION:
                self._on_continuation(stream_id, flags, payload)
            elif kind == wire.SETTINGS:
                self._on_settings(stream_id, flags, payload)
            elif kind == wire.WINDOW_UPDATE:
                self._on_window_update(stream_id, payload)
            elif kind == wire.PING:
                if length != 8 or stream_id:
                    raise ConnectionError_(wire.FRAME_SIZE_ERROR if length != 8 else wire.PROTOCOL_ERROR, "bad PING")
                if not flags & wire.ACK:
                    self._answer_control_frame("PING")
                    self._write(wire.frame(wire.PING, wire.ACK, 0, payload))
                else:
                    self._on_ping_ack(payload)
            elif kind == wire.RST_STREAM:
                if length != 4:
                    raise ConnectionError_(wire.FRAME_SIZE_ERROR, "RST_STREAM is 4 bytes")
                self._on_rst_stream(stream_id, int.from_bytes(payload, "big"))
            elif kind == wire.GOAWAY:
                self._on_goaway(payload)
            elif kind == wire.PUSH_PROMISE:
                raise ConnectionError_(wire.PROTOCOL_ERROR, "PUSH_PROMISE is not allowed here")
            # PRIORITY and unknown frame types are ignored (RFC 9113 §5.5).
        self._buffer = buffer[position:] if position < end else b""

    def _consume_connection_window(self, length: int) -> None:
        self._recv_window -= length
        if self._recv_window < 0:
            raise ConnectionError_(wire.FLOW_CONTROL_ERROR, "the peer overran the connection window")
        self._recv_uncredited += length
        if self._recv_uncredited >= CONNECTION_WINDOW // 2:
            self._write(wire.window_update(0, self._recv_uncredited))
            self._recv_window += self._recv_uncredited
            self._recv_uncredited = 0

    def _on_headers(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionError_(wire.PROTOCOL_ERROR, "HEADERS on stream 0")
        payload = wire.unpad(flags, payload)
        if flags & wire.PRIORITY_FLAG:
            payload = payload[5:]
        if not flags & wire.END_HEADERS:
            self._headers = (stream_id, flags, bytearray(payload))
            return
        self._header_block(stream_id, flags, payload)

    def _on_continuation(self, stream_id: int, flags: int, payload: bytes) -> None:
        pending = self._headers
        if pending is None or pending[0] != stream_id:
            raise ConnectionError_(wire.PROTOCOL_ERROR, "unexpected CONTINUATION")
        pending[2].extend(payload)
        if len(pending[2]) > MAX_HEADER_LIST_SIZE:
            raise ConnectionError_(wire.ENHANCE_YOUR_CALM, "header block too large")
        if flags & wire.END_HEADERS:
            self._headers = None
            self._header_block(stream_id, pending[1], bytes(pending[2]))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decoder.decode(block)  # always: the decoder's table must stay in step
        self._on_header_block(stream_id, flags, headers)

    def _on_settings(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id:
            raise ConnectionError_(wire.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & wire.ACK:
            return
        self._answer_control_frame("SETTINGS")
        for key, value in wire.parse_settings(payload):
            if key == wire.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > wire.MAX_WINDOW:
                    raise ConnectionError_(wire.FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                self._adjust_stream_windows(delta)
            elif key == wire.SETTINGS_MAX_FRAME_SIZE:
                if not wire.DEFAULT_MAX_FRAME <= value <= 2**24 - 1:
                    raise ConnectionError_(wire.PROTOCOL_ERROR, "invalid SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
        self._write(wire.frame(wire.SETTINGS, wire.ACK, 0))
        self._flush_blocked()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(wire.FRAME_SIZE_ERROR, "WINDOW_UPDATE is 4 bytes")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id:
            self._on_stream_window_update(stream_id, increment)
            return
        if increment == 0:
            raise ConnectionError_(wire.PROTOCOL_ERROR, "a zero WINDOW_UPDATE")
        self.send_window += increment
        if self.send_window > wire.MAX_WINDOW:
            raise ConnectionError_(wire.FLOW_CONTROL_ERROR, "connection window overflow")
        self._flush_blocked()

    def _write(self, data: bytes) -> None:
        if not self._closed and self._transport is not None:
            self._transport.write(data)

    def _header_frames(self, stream_id: int, block: bytes, end_stream: bool) -> bytes:
        return wire.header_frames(stream_id, block, end_stream, self.peer_max_frame)

    # -- what each end does with its streams -------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        raise NotImplementedError

    def _fail_connection(self, code: int, message: str) -> None:
        """A connection error (RFC 9113 §5.4.1): GOAWAY with `code`, then close."""
        raise NotImplementedError

    def _on_data(self, stream_id: int, flags: int, payload: bytes, length: int) -> None:
        raise NotImplementedError

    def _on_header_block(self, stream_id: int, flags: int, headers: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    def _adjust_stream_windows(self, delta: int) -> None:
        raise NotImplementedError

    def _on_stream_window_update(self, stream_id: int, increment: int) -> None:
        raise NotImplementedError

    def _flush_blocked(self) -> None:
        raise NotImplementedError

    def _on_rst_stream(self, stream_id: int, code: int) -> None:
        raise NotImplementedError

    def _on_goaway(self, payload: bytes) -> None:
        raise NotImplementedError

    def _on_ping_ack(self, payload: bytes) -> None:
        pass
