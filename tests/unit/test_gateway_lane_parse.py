"""The inference lane's request parser (services.gateway.rest.lane.parse_request): what it accepts and
the request it reads out of the bytes, and every request it leaves to uvicorn (None)."""

from __future__ import annotations

import pytest

from services.gateway.rest.lane import LaneRequest, parse_request

STICKY = b"x-aimaas-session"
BODY = b'{"inputs":[]}'


def raw(path: str = "/v2/models/mlp/infer", headers: list[str] | None = None, body: bytes = BODY, *,
        method: str = "POST", version: str = "HTTP/1.1", length: bool = True) -> bytes:
    """One request, byte for byte: request line, `headers` (Content-Length of `body` first unless
    `length` is False), blank line, body."""
    lines = [f"{method} {path} {version}", "Host: gateway"]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(headers or [])
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def parsed(data: bytes, sticky: bytes | None = STICKY) -> tuple[LaneRequest, bytes]:
    result = parse_request(data, sticky)
    assert result is not None, data
    return result


# ----------------------------------------------------------------------------------------- accepted


def test_unversioned_request():
    request, rest = parsed(raw())
    assert (request.path, request.model, request.version) == ("/v2/models/mlp/infer", "mlp", "")
    assert request.content_length == str(len(BODY)).encode()
    assert request.body == BODY
    assert rest == b""
    assert request.authorization is None and request.encoding is None
    assert request.header_length is None and request.sticky is None
    assert request.trace_carrier == {}


def test_versioned_request():
    request, _ = parsed(raw("/v2/models/resnet-50_v2.onnx/versions/12/infer"))
    assert (request.path, request.model, request.version) == (
        "/v2/models/resnet-50_v2.onnx/versions/12/infer", "resnet-50_v2.onnx", "12")


def test_a_version_the_handler_refuses_is_still_parsed():
    # "x" is not a version; the handler answers 400, as it would behind uvicorn.
    request, _ = parsed(raw("/v2/models/m/versions/x/infer"))
    assert (request.model, request.version) == ("m", "x")


def test_headers_the_handler_needs_are_read_case_insensitively_and_stripped():
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    data = raw(headers=[
        "AUTHORIZATION: \t Bearer abc \t",
        f"TraceParent:{traceparent}",
        "tracestate:   vendor=1,other=2  ",
        "Content-Encoding:\tgzip",
        "Inference-Header-Content-Length: 7 ",
        "X-AIMaaS-Session:  user-7",
        "Accept: */*",
        "X-Empty:",
    ])
    request, rest = parsed(data)
    assert request.authorization == "Bearer abc"
    assert request.trace_carrier == {"traceparent": traceparent, "tracestate": "vendor=1,other=2"}
    assert request.encoding == "gzip"
    assert request.header_length == "7"
    assert request.sticky == "user-7"
    assert request.body == BODY and rest == b""


def test_content_length_header_in_any_case_and_with_spaces():
    data = b"POST /v2/models/m/infer HTTP/1.1\r\ncOnTeNt-LeNgTh:   3 \t\r\n\r\nabc"
    request, rest = parsed(data)
    assert request.content_length == b"3" and request.body == b"abc" and rest == b""


def test_sticky_header_is_the_configured_one():
    data = raw(headers=["X-Route: a", "X-AIMaaS-Session: s"])
    assert parsed(data, b"x-route")[0].sticky == "a"
    assert parsed(data, None)[0].sticky is None


@pytest.mark.parametrize("value", ["keep-alive", "Keep-Alive", "KEEP-ALIVE", "  keep-alive  "])
def test_connection_keep_alive_in_any_case(value):
    assert parsed(raw(headers=[f"Connection: {value}"]))[0].model == "mlp"


def test_the_bytes_after_the_request_are_the_remainder():
    second = raw("/v2/models/other/infer", body=b"{}")
    request, rest = parsed(raw(body=b"12345") + second)
    assert request.body == b"12345"
    assert rest == second
    again, nothing = parsed(rest)
    assert again.model == "other" and again.body == b"{}" and nothing == b""
    # A partial second request (or anything else) after it is returned as it is.
    _, rest = parsed(raw(body=b"12345") + b"GET /v2/health/li")
    assert rest == b"GET /v2/health/li"


def test_binary_body_and_empty_body():
    body = bytes(range(256)) + b"\r\n\r\n"
    request, rest = parsed(raw(body=body) + b"x")
    assert request.body == body and rest == b"x"
    request, rest = parsed(raw(body=b""))
    assert request.content_length == b"0" and request.body == b"" and rest == b""


def test_request_with_only_the_content_length_header():
    data = b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    request, rest = parsed(data)
    assert request.body == b"{}" and rest == b""


def test_head_just_under_the_limit_is_accepted():
    head = raw(body=b"")
    pad = 16 * 1024 - len(head) - len("X-Pad: \r\n")
    data = raw(headers=[f"X-Pad: {'a' * pad}"], body=b"")
    assert len(data) == 16 * 1024
    assert parsed(data)[0].model == "mlp"


def test_path_characters_outside_percent_and_query_are_fine():
    request, _ = parsed(raw("/v2/models/a.b~c_d-e;f=g:h@i!$&'()*+,/infer"))
    assert request.model == "a.b~c_d-e;f=g:h@i!$&'()*+,"


# ----------------------------------------------------------------------------------------- refused


REFUSED = {
    "GET": raw(method="GET"),
    "PUT": raw(method="PUT"),
    "lowercase post": raw(method="post"),
    "not an infer path (ready)": raw("/v2/models/m/ready"),
    "not an infer path (no model)": raw("/v2/models//infer"),
    "not an infer path (extra segment)": raw("/v2/models/m/x/infer"),
    "not an infer path (empty version)": raw("/v2/models/m/versions//infer"),
    "not an infer path (infer prefix)": raw("/v2/models/m/inference"),
    "not under /v2/models": raw("/v1/models/m/infer"),
    "query string": raw("/v2/models/m/infer?x=1"),
    "empty query": raw("/v2/models/m/infer?"),
    "query ending in /infer": raw("/v2/models/m?x=/infer"),
    "percent-escaped path": raw("/v2/models/m%2Fx/infer"),
    "percent-escaped letter": raw("/v2/models/%6D/infer"),
    "fragment": raw("/v2/models/m/infer#x"),
    "HTTP/1.0": raw(version="HTTP/1.0"),
    "HTTP/2.0": raw(version="HTTP/2.0"),
    "lowercase version": raw(version="http/1.1"),
    "two spaces in the request line": b"POST  /v2/models/m/infer HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    "trailing space in the request line": b"POST /v2/models/m/infer HTTP/1.1 \r\nContent-Length: 2\r\n\r\n{}",
    "missing Content-Length": raw(length=False),
    "two Content-Length headers": raw(headers=[f"Content-Length: {len(BODY)}"]),
    "two Content-Length headers differing": raw(headers=["content-length: 1"]),
    "non-digit Content-Length": raw(length=False, headers=["Content-Length: abc"]),
    "negative Content-Length": raw(length=False, headers=["Content-Length: -1"]),
    "signed Content-Length": raw(length=False, headers=[f"Content-Length: +{len(BODY)}"]),
    "Content-Length list": raw(length=False, headers=[f"Content-Length: {len(BODY)}, {len(BODY)}"]),
    "empty Content-Length": raw(length=False, headers=["Content-Length:"]),
    "hex Content-Length": raw(length=False, headers=["Content-Length: 0x0d"]),
    "body shorter than Content-Length": raw()[:-1],
    "Content-Length beyond the body": raw(length=False, headers=[f"Content-Length: {len(BODY) + 1}"]),
    "head without its blank line": raw(body=b"")[:-2],
    "head only": b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 0\r\n",
    "request line only": b"POST /v2/models/m/infer HTTP/1.1",
    "Transfer-Encoding": raw(headers=["Transfer-Encoding: chunked"]),
    "Transfer-Encoding identity": raw(headers=["transfer-encoding: identity"]),
    "Expect": raw(headers=["Expect: 100-continue"]),
    "Upgrade": raw(headers=["Upgrade: h2c"]),
    "TE": raw(headers=["TE: trailers"]),
    "Trailer": raw(headers=["Trailer: x-checksum"]),
    "Connection: close": raw(headers=["Connection: close"]),
    "Connection: Close": raw(headers=["Connection: Close"]),
    "Connection: upgrade": raw(headers=["Connection: Upgrade"]),
    "Connection: keep-alive, close": raw(headers=["Connection: keep-alive, close"]),
    "Connection: keep-alive, upgrade": raw(headers=["Connection: keep-alive, Upgrade"]),
    "obs-fold line": raw(headers=["X-Long: part one", " part two"]),
    "obs-fold line with a tab": raw(headers=["X-Long: part one", "\tpart two"]),
    "space in a header name": raw(headers=["X Bad: 1"]),
    "space before the colon": raw(headers=["X-Bad : 1"]),
    "empty header name": raw(headers=[": 1"]),
    "header line without a colon": raw(headers=["X-Bad"]),
    "control character in a value": raw(headers=["X-Bad: a\x01b"]),
    "DEL in a value": raw(headers=["X-Bad: a\x7fb"]),
    "NUL in a value": raw(headers=["X-Bad: a\x00b"]),
    "bare CR in a value": raw(headers=["X-Bad: a\rb"]),
    "non-ASCII byte in a value": raw(headers=["X-Bad: caf\xe9"]),
    "non-ASCII byte in a name": raw(headers=["X-B\xe4d: 1"]),
    "non-ASCII authorization": raw(headers=["Authorization: Bearer \xff"]),
    "bare LF line ending": b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 2\nX-A: b\r\n\r\n{}",
    "bare LF after the request line": b"POST /v2/models/m/infer HTTP/1.1\nContent-Length: 2\r\n\r\n{}",
    "head over 16 KiB": raw(headers=[f"X-Pad: {'a' * (16 * 1024)}"]),
    "head one byte over 16 KiB": raw(
        headers=[f"X-Pad: {'a' * (16 * 1024 - len(raw(body=b'')) - len('X-Pad: ') - 2 + 1)}"], body=b""),
    "empty": b"",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
}


@pytest.mark.parametrize("data", REFUSED.values(), ids=REFUSED.keys())
def test_refused(data):
    assert parse_request(data, STICKY) is None


def test_the_limits_are_exact():
    # The 16 KiB refusal above is one byte past the head that test_head_just_under_the_limit_is_accepted takes.
    assert len(REFUSED["head one byte over 16 KiB"]) == 16 * 1024 + 1
    # A body one byte short of its Content-Length is refused, the whole one accepted.
    whole = raw(body=b"abc")
    assert parse_request(whole, STICKY) is not None
    assert parse_request(whole[:-1], STICKY) is None
