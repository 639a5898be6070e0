"""Property-based fuzzing of the REST edge over real HTTP: arbitrary bodies, headers, encodings, paths and
methods never produce a 5xx, a non-JSON error, a dropped connection or a hang (client timeout)."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from services.gateway.settings import LimitSettings
from tests.integration.test_gateway_rest import gateway
from tests.support.inference import inference_settings, running_inference, write_model
from tests.support.models import identity_model, mlp_model
from tests.unit.test_gateway_rest_codec import REQUESTS

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    """A node and the REST edge in front of it, on their own event loop thread (hypothesis drives a
    synchronous client)."""
    root = tmp_path_factory.mktemp("models")
    write_model(root, "mlp", mlp_model())
    write_model(root, "strings", identity_model(TensorProto.STRING, ["batch", 2]))
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    async def main() -> None:
        holder["stop"] = asyncio.Event()
        async with running_inference(inference_settings(root)) as node:
            async with gateway(node, limits=LimitSettings(max_body_bytes=64 * 1024, request_timeout_seconds=5)) as (url, _):
                holder["url"] = url
                started.set()
                await holder["stop"].wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert started.wait(60), "gateway did not start"
    yield holder["url"]
    loop.call_soon_threadsafe(holder["stop"].set)
    thread.join(30)
    loop.close()


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code != 200:
        try:
            body = response.json()
        except ValueError:
            raise AssertionError(f"non-JSON error {response.status_code}: {response.text[:200]!r}") from None
        assert isinstance(body.get("error"), str) and body["error"], body


MODELS = st.sampled_from(["mlp", "strings", "nope"])
# Header values a client can send at all: visible ASCII (httpx refuses the rest itself).
HEADER_LENGTHS = st.none() | st.integers(-3, 400).map(str) | st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=5)
ENCODINGS = st.none() | st.sampled_from(["gzip", "deflate", "identity", "br", "x"])


@FUZZ
@given(model=MODELS, body=st.binary(max_size=300), header_length=HEADER_LENGTHS, encoding=ENCODINGS,
       version=st.none() | st.sampled_from(["1", "2", "0", "x", "99999999999999999999"]))
def test_arbitrary_bodies_and_headers(client, model, body, header_length, encoding, version):
    headers = {}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    check(client.post(path, content=body, headers=headers))


@FUZZ
@given(model=MODELS, document=REQUESTS, tail=st.binary(max_size=64), announce=st.booleans())
def test_structured_requests_with_binary_tails(client, model, document, tail, announce):
    header = json.dumps(document).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))} if announce else {}
    check(client.post(f"/v2/models/{model}/infer", content=header + tail, headers=headers))


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       path=st.lists(st.sampled_from(["v2", "models", "mlp", "versions", "1", "ready", "stats", "infer",
                                      "repository", "index", "health", "live", "x", "%00", ".."]), max_size=6),
       body=st.binary(max_size=40))
def test_arbitrary_routes_and_methods(client, method, path, body):
    check(client.request(method, "/" + "/".join(path), content=body))
