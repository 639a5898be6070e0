"""The gateway's HTTP server sends a small response's head and body in one write, without holding back
the head of a response whose body comes later (event streams) or never (HEAD).

Unit part: services.gateway.http_app._CoalescingTransport against a recording transport. Server part:
a real uvicorn server from serve_http, read with a raw socket, so what crosses the wire is checked.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest

from services.gateway.http_app import _CoalescingTransport, serve_http


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    pause_reading = resume_reading = set_protocol = get_protocol = abort = lambda *args: None
    get_write_buffer_size = set_write_buffer_limits = can_write_eof = lambda *args: None


class Cycle:
    def __init__(self) -> None:
        self.response_started = False
        self.response_complete = False


class Protocol:
    cycle: Cycle | None = None


@pytest.fixture
async def wired():
    transport, protocol = RecordingTransport(), Protocol()
    return transport, protocol, _CoalescingTransport(transport, protocol, asyncio.get_running_loop())


async def test_head_and_body_leave_in_one_write(wired):
    transport, protocol, wrapper = wired
    protocol.cycle = cycle = Cycle()
    cycle.response_started = True
    wrapper.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert transport.writes == []
    wrapper.write(b"ok")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
    assert len(transport.writes) == 1
    # The next response on the connection (keep-alive) is coalesced as well.
    cycle.response_complete = True
    protocol.cycle = second = Cycle()
    second.response_started = True
    wrapper.write(b"HEAD2")
    wrapper.write(b"BODY2")
    assert transport.writes[1:] == [b"HEAD2BODY2"]


async def test_a_head_without_a_body_in_the_same_iteration_leaves_at_its_end(wired):
    transport, protocol, wrapper = wired
    protocol.cycle = cycle = Cycle()
    cycle.response_started = True
    wrapper.write(b"HEAD")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD"]
    # Later body chunks (an event stream) go straight out.
    wrapper.write(b"event 1")
    wrapper.write(b"event 2")
    assert transport.writes == [b"HEAD", b"event 1", b"event 2"]


async def test_writes_outside_a_started_response_pass_through(wired):
    transport, protocol, wrapper = wired
    wrapper.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # no cycle: the protocol's own error
    protocol.cycle = Cycle()
    wrapper.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response starts
    assert transport.writes == [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n"]


async def test_close_sends_a_held_head_first(wired):
    transport, protocol, wrapper = wired
    protocol.cycle = cycle = Cycle()
    cycle.response_started = True
    wrapper.write(b"HEAD")
    wrapper.close()
    assert transport.writes == [b"HEAD"]
    assert transport.closed
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD"]


# ------------------------------------------------------------------------------- on a real server


BODY_DELAY = 1.0


async def app(scope, receive, send):
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await asyncio.sleep(BODY_DELAY)
        await send({"type": "http.response.body", "body": b"data: late\n\n", "more_body": False})
        return
    body = b'{"ok":true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


@pytest.fixture
async def server():
    running = await serve_http(app, "127.0.0.1", 0)
    try:
        yield running
    finally:
        await running.stop()


def _exchange(port: int, request: bytes, until: Callable[[bytes], bool], timeout: float = 5.0) -> tuple[bytes, float]:
    """Send `request`; read until `until(data so far)`; the bytes and the seconds it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.monotonic()
        sock.sendall(request)
        data = b""
        while not until(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data, time.monotonic() - started


async def test_keep_alive_responses_and_head_requests_arrive_whole(server):
    request = b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n" * 3 + b"HEAD /small HTTP/1.1\r\nhost: x\r\n\r\n"
    # Four responses on one connection: three with a body, then the HEAD one (headers only).
    data, _ = await asyncio.to_thread(
        _exchange, server.port, request, lambda data: data.count(b"HTTP/1.1 200 OK\r\n") == 4 and data.endswith(b"\r\n\r\n")
    )
    assert data.count(b'{"ok":true}') == 3
    parts = data.split(b"\r\n\r\n")  # each body is followed by the next response's status line
    assert all(part.startswith(b'{"ok":true}HTTP/1.1 200 OK\r\n') for part in parts[1:4]) and parts[4] == b""
    data, _ = await asyncio.to_thread(_exchange, server.port, b"HEAD /small HTTP/1.1\r\nhost: x\r\n\r\n",
                                      lambda data: b"\r\n\r\n" in data)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\n")


async def test_an_event_stream_gets_its_headers_before_its_first_event(server):
    request = b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n"
    head, seconds = await asyncio.to_thread(_exchange, server.port, request, lambda data: b"\r\n\r\n" in data)
    assert b"text/event-stream" in head
    assert b"data: late" not in head
    assert seconds < BODY_DELAY * 0.8
