"""The inference lane: `POST /v2/models/{m}[/versions/{v}]/infer` answered straight from the bytes a
connection has read, without uvicorn's request cycle and the ASGI stack.

Small inference requests are the gateway's hot path. On them, uvicorn's request cycle, the ASGI
messages and the middleware's closures cost about as much as decoding, routing and encoding
together (bench/gateway: the lane takes ~100 µs off a REST binary round trip on a 2-core host).

The lane takes a request only when it is simple and whole in one read: HTTP/1.1, framed by one
Content-Length, no Transfer-Encoding, Expect, Upgrade or Connection option other than keep-alive,
ASCII headers, and a path with no query and no percent-encoding. Anything else (a body still
arriving, chunked bodies, HTTP/1.0, a request behind one uvicorn is still answering) goes to
uvicorn, into the same edge middleware and handler, so the lane's parser only ever has to be
right about what it accepts.

It runs the edge's steps from the edge's own code (services.gateway.rest.edge: span, key,
body limit, concurrency limits, access log), the handler's from the handler's
(services.gateway.rest.oip: decoding, data plane call, encoding), and the app's one error mapping.
The request timeout is the deadline given to the data plane call, which ends by it; as a backstop
the protocol cancels a lane request still open at that deadline, answered 504 as the edge does.
"""

from __future__ import annotations

import asyncio
import http
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.gateway.rest import codec
from services.gateway.rest.edge import EdgeMiddleware, error_body
from services.gateway.rest.oip import JSON, OCTET_STREAM, InferHandlers, infer_target

_START = b"POST /v2/models/"
_MAX_HEAD_BYTES = 16 * 1024  # a larger head goes to uvicorn
# The path characters of RFC 3986 without "%" (uvicorn decodes percent-escapes) and "?" (a query).
_PLAIN_PATH = re.compile(rb"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
# Header lines: a token, a colon, a value of visible ASCII, spaces and tabs (no obs-fold, no
# control characters, nothing beyond ASCII), each ending in CRLF.
_HEADER_LINES = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n)*")
# Headers whose meaning the lane leaves to uvicorn (framing, interim responses, connection options).
_DEFERRED = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"})
_HEADER_LENGTH = codec.HEADER_LENGTH.encode()
_PHRASES = {status.value: status.phrase.encode() for status in http.HTTPStatus}


@dataclass(slots=True)
class LaneRequest:
    """What the edge and the handler need of one inference request."""

    path: str
    model: str
    version: str
    content_length: bytes
    body: bytes
    authorization: str | None
    encoding: str | None
    header_length: str | None
    sticky: str | None
    trace_carrier: dict[str, str]
    # Loop time by which the request must be answered (set when served): the protocol cancels a
    # request still open then, and the lane answers 504.
    deadline: float = 0.0


def parse_request(data: bytes, sticky_header: bytes | None) -> tuple[LaneRequest, bytes] | None:
    """The inference request at the start of `data` and the bytes after it, or None when the request
    is not one for the lane (not an inference request, not whole yet, or not simple)."""
    if not data.startswith(_START):
        return None
    end = data.find(b"\r\n\r\n", 0, _MAX_HEAD_BYTES)
    if end < 0:
        return None
    line_end = data.find(b"\r\n")
    request_line = data[:line_end].split(b" ")
    if len(request_line) != 3 or request_line[2] != b"HTTP/1.1" or not _PLAIN_PATH.fullmatch(request_line[1]):
        return None
    path = request_line[1].decode("ascii")
    target = infer_target(path)
    if target is None:
        return None
    block = data[line_end + 2:end + 2]
    if not _HEADER_LINES.fullmatch(block):
        return None
    content_length = authorization = encoding = header_length = sticky = None
    carrier: dict[str, str] = {}
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if content_length is not None or not value.isdigit():
                return None
            content_length = value
        elif name == b"authorization":
            authorization = value.decode("ascii")
        elif name == b"traceparent" or name == b"tracestate":
            carrier[name.decode("ascii")] = value.decode("ascii")
        elif name == b"content-encoding":
            encoding = value.decode("ascii")
        elif name == _HEADER_LENGTH:
            header_length = value.decode("ascii")
        elif name == sticky_header:
            sticky = value.decode("ascii")
        elif name == b"connection":
            if value.lower() != b"keep-alive":
                return None
        elif name in _DEFERRED:
            return None
    if content_length is None:
        return None
    body_end = end + 4 + int(content_length)
    if len(data) < body_end:
        return None
    request = LaneRequest(path=path, model=target[0], version=target[1], content_length=content_length,
                          body=data[end + 4:body_end], authorization=authorization, encoding=encoding,
                          header_length=header_length, sticky=sticky, trace_carrier=carrier)
    return request, data[body_end:]


class InferLane:
    """Parses and answers the lane's inference requests (the connection side is
    services.gateway.http_app's protocol)."""

    def __init__(
        self,
        edge: EdgeMiddleware,
        handlers: InferHandlers,
        errors: Callable[[Exception, str], tuple[int, str, dict[str, str] | None]],
        *,
        request_timeout_seconds: float,
    ) -> None:
        self._edge = edge
        self._handlers = handlers
        self._errors = errors
        self._timeout = request_timeout_seconds
        self._sticky_header = handlers.sticky_header
        # Requests the lane answered (observability, and tests that must know which path ran).
        self.served = 0

    def parse(self, data: bytes) -> tuple[LaneRequest, bytes] | None:
        return parse_request(data, self._sticky_header)

    async def serve(self, request: LaneRequest, write: Callable[[bytes], None],
                    default_headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Answer `request` through `write` (one call with the whole response), then log it."""
        edge = self._edge
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        request.deadline = loop.time() + self._timeout
        path = request.path
        span, token = edge.open_span("POST", path, request.trace_carrier)
        status = 500
        key_id = principal = None
        self.served += 1
        try:
            if request.authorization is not None:
                principal = await edge.authenticate(request.authorization)
                key_id = principal.key_id if principal is not None else None
            refused = edge.content_length_refusal(request.content_length, edge.body_limit("POST", path))
            if refused is not None:
                status = refused[0]
                write(_error(status, refused[1], (), default_headers))
                return
            limited = edge.admit(path, key_id)
            if limited is not None:
                status = limited[0]
                write(_error(status, limited[1], limited[2], default_headers))
                return
            try:
                encoded = await self._handlers.lane(
                    request.model, request.version, request.body, principal=principal,
                    authorization=request.authorization, encoding=request.encoding,
                    header_length=request.header_length, sticky=request.sticky,
                    deadline=request.deadline,
                )
            except asyncio.CancelledError:
                if loop.time() < request.deadline:
                    raise
                status = 504  # the edge's request timeout, as EdgeMiddleware answers it
                write(_error(status, f"request timed out after {self._timeout:g} s", (), default_headers))
                return
            except Exception as exc:  # noqa: BLE001 - mapped exactly as the app's handlers do
                status, message, extra = self._errors(exc, path)
                headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                           for name, value in (extra or {}).items()]
                write(_error(status, message, headers, default_headers))
                return
            finally:
                edge.release(path, key_id)
            status = 200
            write(_ok(encoded, default_headers))
        finally:
            edge.finish(span, token, method="POST", path=path, status=status, started=started,
                        model=request.model, key_id=key_id)


def _head(status: int, default_headers: Sequence[tuple[bytes, bytes]], headers: list[bytes]) -> list[bytes]:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b""))]
    lines.extend(name + b": " + value + b"\r\n" for name, value in default_headers)
    lines.extend(headers)
    return lines


def _ok(encoded: codec.EncodedResponse, default_headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    if encoded.header_length is None:
        headers = [b"content-type: " + JSON.encode() + b"\r\n"]
    else:
        headers = [b"content-type: " + OCTET_STREAM.encode() + b"\r\n",
                   b"inference-header-content-length: %d\r\n" % encoded.header_length]
    headers.append(b"content-length: %d\r\n\r\n" % len(encoded.body))
    return b"".join([*_head(200, default_headers, headers), encoded.body])


def _error(status: int, message: str, headers: Sequence[tuple[bytes, bytes]],
           default_headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    body = error_body(message)
    lines = [b"content-type: application/json\r\n"]
    lines.extend(name + b": " + value + b"\r\n" for name, value in headers)
    lines.append(b"content-length: %d\r\n\r\n" % len(body))
    return b"".join([*_head(status, default_headers, lines), body])
