"""The REST port's inference lane (services.gateway.rest.lane, served by services.gateway.http_app's
protocol) on real uvicorn servers, spoken to over raw TCP so that every test chooses the exact bytes
and how they are split into writes.

The data plane is a small deterministic fake (the HTTP layer is under test): it echoes the first
input as output "y", raises domain errors by model name, and holds model "slow" until the test
releases it. `app.lane.served` tells which path answered a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pytest
import structlog

from inference import grpc_predict_v2_pb2 as pb
from services.common.auth import AuthSettings
from services.common.auth.authenticator import Authenticator
from services.common.errors import NotFound, ResourceExhausted, Unavailable
from services.gateway.http_app import build_http_app, serve_http
from services.gateway.settings import GatewayServerSettings, GatewaySettings, LimitSettings

TIMEOUT = 5.0
TOKEN = "t" * 40
AUTH = ("Authorization", f"Bearer {TOKEN}")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


# ----------------------------------------------------------------------------------- the data plane


@dataclass
class Call:
    request: pb.ModelInferRequest
    timeout: float | None
    sticky_key: str | None
    metadata: dict[str, str]


class FakeDataPlane:
    """Deterministic GatewayDataPlane stand-in: model "missing" -> NotFound, "busy" -> Unavailable,
    "full" -> ResourceExhausted (429), "boom" -> RuntimeError (500), "slow" waits for `release`,
    "big" answers 64 KiB; anything else echoes its first input."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.events: list[tuple[str, str]] = []  # ("start" | "end", model), in order
        self.slow_entered = asyncio.Event()
        self.release = asyncio.Event()

    async def server_live(self) -> bool:
        return True

    async def server_ready(self) -> bool:
        return True

    async def model_ready(self, model: str, version: str = "") -> bool:
        return True

    async def model_metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        return pb.ModelMetadataResponse(name=model, versions=["1"], platform="fake")

    async def model_statistics(self, model: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        return pb.ModelStatisticsResponse()

    async def repository_index(self) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse()

    async def model_infer(self, request: pb.ModelInferRequest, *, principal, timeout, sticky_key=None, metadata=()):
        copy = pb.ModelInferRequest()
        copy.CopyFrom(request)
        self.calls.append(Call(copy, timeout, sticky_key, dict(metadata)))
        model = request.model_name
        self.events.append(("start", model))
        if model == "missing":
            raise NotFound(f"model '{model}' is not deployed")
        if model == "busy":
            raise Unavailable(f"no replica of '{model}' is available")
        if model == "full":
            raise ResourceExhausted(f"the queue of '{model}' is full")
        if model == "boom":
            raise RuntimeError("secret internals /etc/passwd")
        if model == "slow":
            self.slow_entered.set()
            await asyncio.wait_for(self.release.wait(), 10)
        self.events.append(("end", model))
        response = pb.ModelInferResponse(model_name=model, model_version=request.model_version or "1", id=request.id)
        if model == "big":  # a 64 KiB answer to any request
            response.outputs.add(name="y", datatype="INT32", shape=[16384])
            response.raw_output_contents.append(bytes(65536))
            return response
        first = request.inputs[0]
        response.outputs.add(name="y", datatype=first.datatype, shape=first.shape)
        response.raw_output_contents.append(request.raw_input_contents[0])
        return response


# ------------------------------------------------------------------------------------- HTTP on raw TCP


def http_request(path: str = "/v2/models/m/infer", body: bytes = b"", headers=(), *, method: str = "POST",
                 version: str = "HTTP/1.1", length: bool = True) -> bytes:
    """One request, byte for byte (Content-Length of `body` unless `length` is False)."""
    lines = [f"{method} {path} {version}", "Host: gateway"]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def json_body(values, datatype: str = "INT32", *, request_id: str | None = None) -> bytes:
    document = {"inputs": [{"name": "x", "shape": [len(values)], "datatype": datatype, "data": list(values)}]}
    if request_id is not None:
        document["id"] = request_id
    return json.dumps(document).encode()


def binary_body(values) -> tuple[bytes, int]:
    """A binary-extension body (input and requested output in binary form) and its JSON length."""
    data = np.asarray(values, dtype=np.int32).tobytes()
    header = json.dumps({
        "inputs": [{"name": "x", "shape": [len(values)], "datatype": "INT32",
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }).encode()
    return header + data, len(header)


def infer(values, path: str = "/v2/models/m/infer", headers=(AUTH,), **kwargs) -> bytes:
    return http_request(path, json_body(values), [("Content-Type", "application/json"), *headers], **kwargs)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        assert len(values) <= 1, (name, self.headers)
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)

    def echoed(self) -> list:
        """The output "y" of a JSON inference response."""
        assert self.status == 200, (self.status, self.body)
        (output,) = self.json()["outputs"]
        assert output["name"] == "y"
        return output["data"]


async def read_response(reader: asyncio.StreamReader) -> Response:
    """One response (an interim 1xx included) with a Content-Length, chunked or close-delimited body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    lines = head[:-4].decode("latin-1").split("\r\n")
    version, status, _ = (lines[0] + " ").split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        assert colon and name == name.strip(), line
        headers.append((name.lower(), value.strip()))
    response = Response(int(status), headers, b"")
    if 100 <= response.status < 200:
        return response
    if response.header("transfer-encoding") == "chunked":
        chunks = []
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), TIMEOUT)).strip(), 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), TIMEOUT)
            if size == 0:
                break
            chunks.append(chunk[:-2])
        response.body = b"".join(chunks)
    elif response.header("content-length") is not None:
        response.body = await asyncio.wait_for(reader.readexactly(int(response.header("content-length"))), TIMEOUT)
    else:
        response.body = await asyncio.wait_for(reader.read(), TIMEOUT)
    return response


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        """`data` in one write."""
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    async def response(self) -> Response:
        return await read_response(self.reader)

    async def exchange(self, data: bytes) -> Response:
        await self.send(data)
        return await self.response()

    async def closed_by_server(self) -> bool:
        """Waits (at most TIMEOUT) for the server to close; True when it did with nothing more sent."""
        try:
            return await asyncio.wait_for(self.reader.read(1), TIMEOUT) == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)


def capture_logger(lines: list[dict]):
    """A structlog logger that appends each event (with its level) to `lines`."""
    def capture(_logger, method, event):
        lines.append({**event, "level": method})
        raise structlog.DropEvent

    return structlog.wrap_logger(None, processors=[capture],
                                 wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))


class Gateway:
    def __init__(self, app, server, dataplane: FakeDataPlane, logs: list[dict]) -> None:
        self.app = app
        self.server = server
        self.dataplane = dataplane
        self.logs = logs
        self._connections: list[Connection] = []

    @property
    def served(self) -> int:
        return self.app.lane.served

    async def connect(self) -> Connection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.server.port), TIMEOUT)
        connection = Connection(reader, writer)
        self._connections.append(connection)
        return connection

    def access(self) -> list[dict]:
        return [line for line in self.logs if line.get("event") == "http request"]

    def errors(self) -> list[dict]:
        return [line for line in self.logs if line["level"] in ("error", "critical", "exception")]

    async def close(self) -> None:
        for connection in self._connections:
            await connection.close()


@contextlib.asynccontextmanager
async def gateway(*, lane: bool = True, limits: LimitSettings | None = None, auth: AuthSettings | None = None,
                  keep_alive_seconds: float = 5.0):
    settings = GatewaySettings(gateway=GatewayServerSettings(
        limits=limits or LimitSettings(), auth=auth or AuthSettings(enabled=False), rest_infer_lane=lane))
    dataplane = FakeDataPlane()
    logs: list[dict] = []
    app = build_http_app(dataplane, Authenticator(None, settings.gateway.auth), settings, logger=capture_logger(logs))
    assert (app.lane is not None) == lane
    server = await serve_http(app, "127.0.0.1", 0, keep_alive_seconds=keep_alive_seconds)
    gw = Gateway(app, server, dataplane, logs)
    try:
        yield gw
    finally:
        dataplane.release.set()
        await gw.close()
        await asyncio.wait_for(server.stop(), 15)


async def until(condition, what: str) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


# ------------------------------------------------------------------------- lane and ASGI answer alike


def _cases() -> list[tuple[str, int, bytes]]:
    binary, header_length = binary_body([1, -2, 3])
    small = json_body([4, 5])
    return [
        ("binary extension", 200, http_request("/v2/models/m/infer", binary, [
            AUTH, ("Inference-Header-Content-Length", str(header_length))])),
        ("json", 200, http_request("/v2/models/m/infer", json_body([1, 2, 3], request_id="r-1"), [
            AUTH, ("Content-Type", "application/json"), ("X-AIMaaS-Session", "user-7")])),
        ("bytes tensor", 200, http_request("/v2/models/m/infer", json_body(["a", "bc"], "BYTES"), [AUTH])),
        ("versioned path", 200, http_request("/v2/models/m/versions/3/infer", small, [AUTH])),
        ("connection keep-alive, lowercase names", 200, http_request("/v2/models/m/infer", small, [
            ("authorization", f"Bearer {TOKEN}"), ("connection", "Keep-Alive")])),
        ("unknown model", 404, http_request("/v2/models/missing/infer", small, [AUTH])),
        ("malformed JSON", 400, http_request("/v2/models/m/infer", b"{not json", [AUTH])),
        ("empty body", 400, http_request("/v2/models/m/infer", b"", [AUTH])),
        ("bad version", 400, http_request("/v2/models/m/versions/x/infer", small, [AUTH])),
        ("header length beyond the body", 400, http_request("/v2/models/m/infer", binary, [
            AUTH, ("Inference-Header-Content-Length", "99999")])),
        ("gzip body", 200, http_request("/v2/models/m/infer", gzip.compress(small), [
            AUTH, ("Content-Encoding", "gzip")])),
        ("unsupported Content-Encoding", 400, http_request("/v2/models/m/infer", small, [
            AUTH, ("Content-Encoding", "br")])),
        ("body over the limit", 413, http_request("/v2/models/m/infer", b" " * 2000, [AUTH])),
        ("data plane unavailable", 503, http_request("/v2/models/busy/infer", small, [AUTH])),
        ("data plane overloaded", 429, http_request("/v2/models/full/infer", small, [AUTH])),
        ("unexpected error", 500, http_request("/v2/models/boom/infer", small, [AUTH])),
        ("bad bearer token", 401, http_request("/v2/models/m/infer", small, [("Authorization", "Bearer nope")])),
        ("wrong scheme", 401, http_request("/v2/models/m/infer", small, [("Authorization", f"Basic {TOKEN}")])),
        ("missing token", 401, http_request("/v2/models/m/infer", small)),
        ("bootstrap token", 200, http_request("/v2/models/m/infer", small, [AUTH])),
    ]


async def test_lane_and_asgi_answer_every_request_alike():
    cases = _cases()
    limits = LimitSettings(max_body_bytes=1024)
    auth = AuthSettings(enabled=True, bootstrap_admin_token=TOKEN)
    answers: dict[bool, list[Response]] = {}
    calls: dict[bool, list[Call]] = {}
    access: dict[bool, list[dict]] = {}
    for lane in (True, False):
        async with gateway(lane=lane, limits=limits, auth=auth) as gw:
            before = gw.served if lane else None
            answers[lane] = []
            for _, _, data in cases:
                connection = await gw.connect()
                answers[lane].append(await connection.exchange(data))
                await connection.close()
            if lane:
                assert gw.served - before == len(cases)  # every one of them took the lane
            else:
                assert gw.app.lane is None
            calls[lane] = gw.dataplane.calls
            access[lane] = gw.access()

    for (name, status, _), on_lane, on_asgi in zip(cases, answers[True], answers[False], strict=True):
        assert on_lane.status == on_asgi.status == status, (name, on_lane, on_asgi)
        assert on_lane.header("date") and on_asgi.header("date"), name
        assert sorted(h for h in on_lane.headers if h[0] != "date") == \
            sorted(h for h in on_asgi.headers if h[0] != "date"), name
        assert on_lane.body == on_asgi.body, name
        if status != 200:
            assert set(on_lane.json()) == {"error"}, name

    by_name = {name: response for (name, _, _), response in zip(cases, answers[True], strict=True)}
    binary = by_name["binary extension"]
    assert binary.header("content-type") == "application/octet-stream"
    length = int(binary.header("inference-header-content-length"))
    assert json.loads(binary.body[:length])["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert binary.body[length:] == np.array([1, -2, 3], dtype=np.int32).tobytes()
    assert by_name["json"].json()["id"] == "r-1" and by_name["json"].echoed() == [1, 2, 3]
    assert by_name["bytes tensor"].echoed() == ["a", "bc"]
    assert by_name["versioned path"].json()["model_version"] == "3"
    assert by_name["gzip body"].echoed() == [4, 5]
    assert "passwd" not in by_name["unexpected error"].body.decode()
    assert "1024" in by_name["body over the limit"].json()["error"]
    assert by_name["data plane overloaded"].header("retry-after") == "1"

    # The data plane saw the same requests, deadlines and sticky keys either way.
    assert [c.request.SerializeToString(deterministic=True) for c in calls[True]] == \
        [c.request.SerializeToString(deterministic=True) for c in calls[False]]
    assert [c.sticky_key for c in calls[True]] == [c.sticky_key for c in calls[False]]
    assert "user-7" in [c.sticky_key for c in calls[True]]
    assert all(c.timeout is not None and 0 < c.timeout <= 60 for c in calls[True] + calls[False])
    # One access log line per request, with the same status and key either way.
    assert [(a["method"], a["path"], a["status"], a["key_id"]) for a in access[True]] == \
        [(a["method"], a["path"], a["status"], a["key_id"]) for a in access[False]]
    assert [a["status"] for a in access[True]] == [status for _, status, _ in cases]


# ------------------------------------------------------------------------------------ limits


async def test_concurrency_limit_on_the_lane_is_429_and_released_after():
    limits = LimitSettings(max_concurrency=1, retry_after_seconds=2)
    async with gateway(limits=limits) as gw:
        before = gw.served
        slow = await gw.connect()
        await slow.send(infer([1], "/v2/models/slow/infer"))
        await asyncio.wait_for(gw.dataplane.slow_entered.wait(), TIMEOUT)

        other = await gw.connect()
        refused = await other.exchange(infer([2]))
        assert refused.status == 429
        assert refused.header("retry-after") == "2"
        assert refused.header("content-type") == "application/json"
        assert set(refused.json()) == {"error"} and "concurrent" in refused.json()["error"]
        assert [c.request.model_name for c in gw.dataplane.calls] == ["slow"]  # never reached the data plane
        # Probes are never limited (answered by uvicorn meanwhile, on the same connection).
        health = await other.exchange(http_request("/v2/health/live", method="GET", length=False))
        assert health.status == 200 and health.json() == {"live": True}

        gw.dataplane.release.set()
        assert (await slow.response()).echoed() == [1]
        assert (await other.exchange(infer([3]))).echoed() == [3]  # the slot was released
        assert (await slow.exchange(infer([4]))).echoed() == [4]
        assert gw.served - before == 4
        assert [a["status"] for a in gw.access() if a["path"] != "/v2/health/live"] == [429, 200, 200, 200]


# ---------------------------------------------------------------------------------------- fallbacks


async def _split_body(connection: Connection) -> Response:
    data = infer([7, 8])
    await connection.send(data[:-5])
    await asyncio.sleep(0.05)
    await connection.send(data[-5:])
    return await connection.response()


async def _chunked(connection: Connection) -> Response:
    body = json_body([7, 8])
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    return await connection.exchange(http_request("/v2/models/m/infer", chunked, [
        AUTH, ("Transfer-Encoding", "chunked")], length=False))


async def _http10(connection: Connection) -> Response:
    response = await connection.exchange(infer([7, 8], version="HTTP/1.0"))
    assert response.header("connection") == "close"
    assert await connection.closed_by_server()
    return response


async def _query(connection: Connection) -> Response:
    return await connection.exchange(infer([7, 8], "/v2/models/m/infer?verbose=1"))


async def _expect_in_one_write(connection: Connection) -> Response:
    await connection.send(infer([7, 8], headers=[AUTH, ("Expect", "100-continue")]))
    interim = await connection.response()
    assert interim.status == 100
    return await connection.response()


async def _expect_then_body(connection: Connection) -> Response:
    data = infer([7, 8], headers=[AUTH, ("Expect", "100-continue")])
    head_end = data.index(b"\r\n\r\n") + 4
    await connection.send(data[:head_end])
    assert (await connection.response()).status == 100
    return await connection.exchange(data[head_end:])


async def _connection_close(connection: Connection) -> Response:
    response = await connection.exchange(infer([7, 8], headers=[AUTH, ("Connection", "close")]))
    assert response.header("connection") == "close"
    assert await connection.closed_by_server()
    return response


async def _in_one_write_behind_an_asgi_request(connection: Connection) -> Response:
    await connection.send(http_request("/v2/health/live", method="GET", length=False) + infer([7, 8]))
    assert (await connection.response()).json() == {"live": True}
    return await connection.response()


FALLBACKS = {
    "body over two writes": _split_body,
    "chunked body": _chunked,
    "HTTP/1.0": _http10,
    "query string": _query,
    "Expect: 100-continue in one write": _expect_in_one_write,
    "Expect: 100-continue, then the body": _expect_then_body,
    "Connection: close": _connection_close,
    "in one write behind a request uvicorn answers": _in_one_write_behind_an_asgi_request,
}


@pytest.mark.parametrize("scenario", FALLBACKS.values(), ids=FALLBACKS.keys())
async def test_requests_the_lane_leaves_are_answered_by_uvicorn(scenario):
    async with gateway() as gw:
        before = gw.served
        connection = await gw.connect()
        response = await scenario(connection)
        assert response.echoed() == [7, 8]
        assert gw.served == before  # uvicorn answered it
        assert [c.request.model_name for c in gw.dataplane.calls] == ["m"]
        if not connection.writer.is_closing() and not connection.reader.at_eof():
            # The connection goes on, and a simple request on it takes the lane again.
            assert (await connection.exchange(infer([9]))).echoed() == [9]
            assert gw.served == before + 1


# -------------------------------------------------------------------------------------------- order


async def test_two_lane_requests_in_one_write_are_answered_in_order():
    async with gateway() as gw:
        before = gw.served
        connection = await gw.connect()
        await connection.send(infer([1]) + infer([2], "/v2/models/m/versions/2/infer"))
        first, second = await connection.response(), await connection.response()
        assert first.echoed() == [1] and first.json()["model_version"] == "1"
        assert second.echoed() == [2] and second.json()["model_version"] == "2"
        assert gw.served - before == 2


async def test_a_lane_request_then_a_health_probe_in_one_write():
    async with gateway() as gw:
        before = gw.served
        connection = await gw.connect()
        await connection.send(infer([1]) + http_request("/v2/health/live", method="GET", length=False))
        assert (await connection.response()).echoed() == [1]
        probe = await connection.response()
        assert probe.status == 200 and probe.json() == {"live": True}
        assert gw.served - before == 1
        assert (await connection.exchange(infer([3]))).echoed() == [3]
        assert gw.served - before == 2


async def test_a_fast_request_behind_a_slow_one_is_answered_second():
    async with gateway() as gw:
        before = gw.served
        connection = await gw.connect()
        await connection.send(infer([1], "/v2/models/slow/infer") + infer([2]))
        await asyncio.wait_for(gw.dataplane.slow_entered.wait(), TIMEOUT)
        await asyncio.sleep(0.1)  # room for a wrongly concurrent fast request to be answered first
        gw.dataplane.release.set()
        first, second = await connection.response(), await connection.response()
        assert first.echoed() == [1] and first.json()["model_name"] == "slow"
        assert second.echoed() == [2] and second.json()["model_name"] == "m"
        # The fast one was held until the slow one was answered, then took the lane too.
        assert gw.dataplane.events == [("start", "slow"), ("end", "slow"), ("start", "m"), ("end", "m")]
        assert gw.served - before == 2


async def test_bytes_arriving_while_a_lane_request_is_open_wait_for_its_answer():
    async with gateway() as gw:
        before = gw.served
        connection = await gw.connect()
        await connection.send(infer([1], "/v2/models/slow/infer"))
        await asyncio.wait_for(gw.dataplane.slow_entered.wait(), TIMEOUT)
        await connection.send(infer([2]) + http_request("/v2/health/ready", method="GET", length=False))
        await asyncio.sleep(0.1)
        assert [model for _, model in gw.dataplane.events] == ["slow"]  # held, not served
        gw.dataplane.release.set()
        assert (await connection.response()).echoed() == [1]
        assert (await connection.response()).echoed() == [2]
        assert (await connection.response()).json() == {"ready": True}
        assert gw.served - before == 2


async def test_a_request_arriving_while_uvicorn_answers_one_waits_behind_it():
    async with gateway() as gw:
        before = gw.served
        connection = await gw.connect()
        await connection.send(infer([1], "/v2/models/slow/infer?via=uvicorn"))
        await asyncio.wait_for(gw.dataplane.slow_entered.wait(), TIMEOUT)
        await connection.send(infer([2]))  # simple and whole, but uvicorn has a request open
        await asyncio.sleep(0.1)
        assert [model for _, model in gw.dataplane.events] == ["slow"]
        gw.dataplane.release.set()
        first, second = await connection.response(), await connection.response()
        assert first.json()["model_name"] == "slow" and first.echoed() == [1]
        assert second.json()["model_name"] == "m" and second.echoed() == [2]
        assert gw.served == before  # both answered by uvicorn, in order
        assert (await connection.exchange(infer([3]))).echoed() == [3]
        assert gw.served == before + 1


async def test_body_bytes_that_look_like_a_request_are_never_taken_for_one():
    # A request whose body arrives in a later read is uvicorn's to the end, even when that body
    # is, byte for byte, a simple inference request (else a body could smuggle in a request).
    async with gateway() as gw:
        before = gw.served
        connection = await gw.connect()
        inner = infer([2])
        await connection.send(http_request("/v2/models/m/infer?outer=1", b"", [AUTH], length=False)[:-2]
                              + b"Content-Length: %d\r\n\r\n" % len(inner))
        await asyncio.sleep(0.05)
        await connection.send(inner)
        response = await connection.response()
        assert response.status == 400 and "not valid JSON" in response.json()["error"]
        assert gw.served == before and gw.dataplane.calls == []
        assert (await connection.exchange(infer([3]))).echoed() == [3]  # and nothing more was answered before it
        assert gw.served == before + 1
        # The same with a head cut inside a header value: what follows continues that value.
        inner = infer([4], "/v2/models/inner/infer")
        await connection.send(b"POST /v2/models/outer/infer HTTP/1.1\r\nX-Note: ")
        await asyncio.sleep(0.05)
        await connection.send(inner)
        response = await connection.response()
        assert response.json()["model_name"] == "outer" and response.echoed() == [4]
        assert gw.served == before + 1
        assert [c.request.model_name for c in gw.dataplane.calls] == ["m", "outer"]


async def test_a_partial_request_behind_a_lane_request_is_completed_by_uvicorn():
    async with gateway() as gw:
        before = gw.served
        connection = await gw.connect()
        second = infer([2])
        await connection.send(infer([1]) + second[:20])
        assert (await connection.response()).echoed() == [1]
        await asyncio.sleep(0.05)
        await connection.send(second[20:])
        assert (await connection.response()).echoed() == [2]
        assert gw.served - before == 1  # the first only: the second was not whole in one read
        assert (await connection.exchange(infer([3]))).echoed() == [3]
        assert gw.served - before == 2


async def test_many_pipelined_requests_in_one_write_are_all_answered_in_order():
    count = 1000
    async with gateway() as gw:
        before = gw.served
        connection = await gw.connect()
        await connection.send(b"".join(infer([i]) for i in range(count)))
        for i in range(count):
            assert (await connection.response()).echoed() == [i]
        # Reads may split the stream (the part after a split goes to uvicorn), but most take the lane.
        assert gw.served - before > 0
        assert len(gw.access()) == count
        assert not gw.errors()


# --------------------------------------------------------------------------------- connection life


async def test_keep_alive_timer_is_armed_after_a_lane_answer():
    async with gateway(keep_alive_seconds=0.3) as gw:
        before = gw.served
        connection = await gw.connect()
        assert (await connection.exchange(infer([1]))).echoed() == [1]
        assert gw.served - before == 1
        # Idle after the answer: the server closes it after the keep-alive timeout (TIMEOUT >> 0.3 s).
        assert await connection.closed_by_server()


async def test_graceful_stop_answers_the_open_lane_request_then_closes():
    async with gateway() as gw:
        before = gw.served
        connection = await gw.connect()
        await connection.send(infer([1], "/v2/models/slow/infer"))
        await asyncio.wait_for(gw.dataplane.slow_entered.wait(), TIMEOUT)
        stopping = asyncio.create_task(gw.server.stop())

        async def refused() -> bool:  # uvicorn closes its listener, then asks each connection to shut down
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
            except (ConnectionRefusedError, ConnectionResetError):  # reset: accepted by the kernel, then closed
                return True
            writer.close()
            return False

        for _ in range(500):
            if await refused():
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the server kept listening after stop()")
        assert not stopping.done()  # it waits for the open request
        gw.dataplane.release.set()
        response = await connection.response()
        assert response.echoed() == [1]
        assert response.header("connection") == "close"  # the client learns not to send more here
        assert await connection.closed_by_server()
        await asyncio.wait_for(stopping, TIMEOUT)
        assert gw.served - before == 1


async def test_a_client_gone_while_its_lane_request_is_open_does_no_harm(caplog):
    caplog.set_level(logging.WARNING)
    async with gateway(limits=LimitSettings(max_concurrency=1)) as gw:
        before = gw.served
        gone = await gw.connect()
        await gone.send(infer([1], "/v2/models/slow/infer"))
        await asyncio.wait_for(gw.dataplane.slow_entered.wait(), TIMEOUT)
        await gone.close()
        connections = gw.server._server.server_state.connections  # uvicorn's, private: to know it saw the close
        await until(lambda: not connections, "the server to see the client go")
        gw.dataplane.release.set()
        await until(lambda: gw.access(), "the slow request to end")
        assert gw.dataplane.events == [("start", "slow"), ("end", "slow")]

        connection = await gw.connect()
        assert (await connection.exchange(infer([2]))).echoed() == [2]  # its concurrency slot was released
        assert gw.served - before == 2
        assert not gw.errors()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


# ---------------------------------------------------------------------------------- trace and log


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "asgi"])
async def test_traceparent_reaches_the_data_plane_and_the_access_log(lane):
    async with gateway(lane=lane) as gw:
        before = gw.served if lane else 0
        connection = await gw.connect()
        traceparent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
        response = await connection.exchange(infer([1], headers=[AUTH, ("traceparent", traceparent)]))
        assert response.echoed() == [1]
        if lane:
            assert gw.served - before == 1
        (call,) = gw.dataplane.calls
        version, trace_id, span_id, _ = call.metadata["traceparent"].split("-")
        assert (version, trace_id) == ("00", TRACE_ID)
        assert len(span_id) == 16 and span_id != CALLER_SPAN  # the gateway's own span, in the caller's trace
        (line,) = gw.access()
        assert line["method"] == "POST" and line["path"] == "/v2/models/m/infer"
        assert line["status"] == 200 and line["model"] == "m" and line["trace_id"] == TRACE_ID
        assert line["level"] == "info" and line["duration_ms"] >= 0 and "key_id" in line
        # Without a traceparent each request gets a trace of its own.
        assert (await connection.exchange(infer([2]))).echoed() == [2]
        fresh = gw.access()[-1]["trace_id"]
        assert len(fresh) == 32 and fresh != TRACE_ID
        assert gw.dataplane.calls[-1].metadata["traceparent"].split("-")[1] == fresh


# ------------------------------------------------------------------------- request timeout, backpressure


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "asgi"])
async def test_a_request_past_the_request_timeout_is_answered_504(lane):
    # The slow model ignores the deadline it is given: the edge's own timeout must end the request.
    async with gateway(lane=lane, limits=LimitSettings(request_timeout_seconds=0.3)) as gw:
        connection = await gw.connect()
        started = asyncio.get_running_loop().time()
        response = await connection.exchange(infer([1], path="/v2/models/slow/infer"))
        assert response.status == 504
        assert json.loads(response.body) == {"error": "request timed out after 0.3 s"}
        assert asyncio.get_running_loop().time() - started < 3
        assert gw.app.lane is None or gw.served == 1
        # The connection goes on, and the limit was released.
        assert (await connection.exchange(infer([2]))).status == 200
        assert [line["status"] for line in gw.access()] == [504, 200]


async def test_a_client_that_does_not_read_its_answers_is_not_read_from_either():
    # Pipelined requests whose answers the client never reads: the gateway stops reading when its
    # write buffer is full (as uvicorn's own cycle does) instead of holding every answer in memory,
    # and goes on once the client reads (from where the stream then stands, uvicorn may answer the
    # rest: a read that ends inside a request leaves it to uvicorn's parser).
    count = 600
    body, header_length = binary_body([1])
    request = http_request("/v2/models/big/infer", body, [("Inference-Header-Content-Length", str(header_length))])
    async with gateway() as gw:
        connection = await gw.connect()
        writer = asyncio.get_running_loop().create_task(connection.send(request * count))
        await until(lambda: gw.served > 0, "the first answer")
        protocols = gw.server._server.server_state.connections
        buffered = []
        served = -1
        while served != gw.served:  # until the lane stops taking requests
            served = gw.served
            buffered.extend(p.transport.get_write_buffer_size() for p in protocols)
            await asyncio.sleep(0.2)
        assert served < count
        assert max(buffered) < 1024 * 1024, max(buffered)  # 600 answers are 38 MiB
        for _ in range(count):
            response = await connection.response()
            assert response.status == 200
        await asyncio.wait_for(writer, TIMEOUT)
        assert len(gw.access()) == count
