"""The REST tensor codec (JSON + binary tensor data extension <-> inference protobuf), including
property-based fuzzing: arbitrary bodies and headers give a request or InvalidArgument, nothing else."""

from __future__ import annotations

import gzip
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidArgument
from services.gateway.rest import codec
from services.inference import tensors

NUMERIC = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64", "BF16"]


def decode(document, binary: bytes = b"", header_length=None, model="m", version=""):
    header = json.dumps(document).encode()
    body = header + binary
    length = len(header) if binary or header_length == "auto" else header_length
    return codec.decode_infer_request(body, length, model=model, version=version)


def sample(datatype: str, shape=(2, 3), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = tensors.datatype(datatype).dtype
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("datatype", NUMERIC)
def test_json_and_binary_inputs_decode_to_the_same_raw_contents(datatype):
    array = sample(datatype)
    json_data = array.astype(np.float64).tolist() if datatype in ("BF16", "FP16") else array.tolist()
    from_json = decode({"inputs": [{"name": "x", "shape": [2, 3], "datatype": datatype, "data": json_data}]})
    from_binary = decode(
        {"inputs": [{"name": "x", "shape": [2, 3], "datatype": datatype, "parameters": {"binary_data_size": array.nbytes}}]},
        array.tobytes(),
    )
    for decoded in (from_json, from_binary):
        (got,) = tensors.decode_inputs(decoded.request).values()
        assert got.dtype == tensors.datatype(datatype).dtype and got.shape == (2, 3)
        np.testing.assert_array_equal(got.view(np.uint8), array.view(np.uint8))
        assert decoded.request.model_name == "m"
        assert "binary_data_size" not in decoded.request.inputs[0].parameters


def test_bytes_inputs_json_nested_and_binary():
    values = [["héllo", ""], ["a\x00b", "z"]]
    decoded = decode({"inputs": [{"name": "s", "shape": [2, 2], "datatype": "BYTES", "data": values}]})
    (got,) = tensors.decode_inputs(decoded.request).values()
    assert got.tolist() == [[v.encode() for v in row] for row in values]
    raw = b"".join(struct.pack("<I", len(v)) + v for v in (b"\xff\xfe", b"ok"))
    decoded = decode({"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}]}, raw)
    assert tensors.decode_inputs(decoded.request)["s"].tolist() == [b"\xff\xfe", b"ok"]


def test_request_fields_parameters_and_outputs():
    decoded = decode({
        "id": "r1",
        "parameters": {"binary_data_output": True, "timeout": 250_000, "flag": True, "n": -3, "big": 2**63,
                       "ratio": 0.5, "s": "x"},
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0], "parameters": {"tag": "a"}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": False, "top": 1}}, {"name": "z"}],
    }, version="3")
    request = decoded.request
    assert request.id == "r1" and request.model_version == "3"
    params = codec.parameters_to_json(request.parameters)
    assert params == {"timeout": 250_000, "flag": True, "n": -3, "big": 2**63, "ratio": 0.5, "s": "x"}
    assert decoded.binary_all is True and decoded.binary_outputs == {"y": False}
    assert decoded.timeout_s == pytest.approx(0.25)
    assert [o.name for o in request.outputs] == ["y", "z"]
    assert codec.parameters_to_json(request.outputs[0].parameters) == {"top": 1}
    assert codec.parameters_to_json(request.inputs[0].parameters) == {"tag": "a"}


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ([], "json object"),
        ({"inputs": "x"}, "non-empty list"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "extra": 1}, "unknown field"),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, "name"),
        ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}, "non-negative"),
        ({"inputs": [{"name": "x", "shape": [True], "datatype": "FP32", "data": [1]}]}, "non-negative"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, "needs 'data'"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": 1}]}, "must be a list"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}, "needs 2"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 300]}]}, "outside the range"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "UINT64", "data": [-1, 2]}]}, "outside the range"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2.5]}]}, "integer values"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}]}, "true/false"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [None]}]}, "regular"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [2**80]}]}, ""),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]}, "string values"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a", "b"]}]}, "more than"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2}, "more than once"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "parameters": {"p": [1]}}]}, "boolean, number or string"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "parameters": {"binary_data_output": 1}}, "boolean"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "parameters": {"timeout": -1}}, "timeout"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{"name": "y", "parameters": {"classification": 2}}]}, "not supported"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{"name": "y"}, {"name": "y"}]}, "more than once"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "id": 7}, "'id'"),
        ({"inputs": [{"name": "x", "shape": [1] * 65, "datatype": "FP32", "data": [1]}]}, "dimensions"),
    ],
)
def test_malformed_requests_are_invalid_argument(document, fragment):
    with pytest.raises(InvalidArgument, match=f"(?i){fragment}" if fragment else None):
        decode(document)


def test_binary_extension_errors():
    header = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}
    with pytest.raises(InvalidArgument, match="only 4 bytes"):
        decode(header, bytes(4))
    with pytest.raises(InvalidArgument, match="no input claims"):
        decode(header, bytes(12))
    wrong = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}
    with pytest.raises(InvalidArgument, match="needs 12 bytes"):
        decode(wrong, bytes(8))
    both = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2], "parameters": {"binary_data_size": 8}}]}
    with pytest.raises(InvalidArgument, match="both"):
        decode(both, bytes(8))
    strings = {"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}
    with pytest.raises(InvalidArgument, match="declares"):
        decode(strings, struct.pack("<I", 9) + b"ab")
    for value in ("-1", "abc", "1e3", "", "9" * 30):
        with pytest.raises(InvalidArgument, match="Inference-Header-Content-Length"):
            codec.parse_header_length(value, 100)
    with pytest.raises(InvalidArgument, match="holds only 10 bytes"):
        codec.parse_header_length("11", 10)
    assert codec.parse_header_length(" 10 ", 10) == 10 and codec.parse_header_length(None, 5) is None


def test_decompression_is_bounded():
    assert codec.decompress(gzip.compress(b"abc"), "gzip", 10) == b"abc"
    assert codec.decompress(b"abc", None, 10) == b"abc"
    with pytest.raises(codec.BodyTooLargeAfterDecoding):
        codec.decompress(gzip.compress(b"a" * 1000), "gzip", 100)
    with pytest.raises(InvalidArgument, match="not valid gzip"):
        codec.decompress(b"not gzip", "gzip", 100)
    with pytest.raises(InvalidArgument, match="truncated"):
        codec.decompress(gzip.compress(b"a" * 1000)[:-10], "gzip", 10_000)
    with pytest.raises(InvalidArgument, match="Content-Encoding"):
        codec.decompress(b"x", "br", 100)


def response_with(*arrays: tuple[str, np.ndarray]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="abc")
    for name, array in arrays:
        tensors.add_output(response, name, array)
    return response


def test_response_json_binary_and_mixed():
    f = np.arange(6, dtype=np.float32).reshape(2, 3)
    h = np.array([1.5, -2], dtype=np.float16)
    bf = np.array([0.5, 3], dtype=ml_dtypes.bfloat16)
    s = np.array([b"ab", b""], dtype=object)
    response = response_with(("f", f), ("h", h), ("bf", bf), ("s", s))
    response.parameters["note"].string_param = "n"
    encoded = codec.encode_infer_response(response, codec.DecodedRequest(request=pb.ModelInferRequest()))
    assert encoded.header_length is None
    document = json.loads(encoded.body)
    assert document["id"] == "abc" and document["parameters"] == {"note": "n"}
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["f"]["data"] == f.ravel().tolist() and outputs["f"]["shape"] == [2, 3]
    assert outputs["h"]["data"] == [1.5, -2.0] and outputs["bf"]["data"] == [0.5, 3.0]
    assert outputs["s"]["data"] == ["ab", ""]

    decoded = codec.DecodedRequest(request=pb.ModelInferRequest(), binary_all=True, binary_outputs={"s": False})
    encoded = codec.encode_infer_response(response, decoded)
    header = json.loads(encoded.body[: encoded.header_length])
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in header["outputs"]]
    assert sizes == [24, 4, 4, None]
    assert encoded.body[encoded.header_length:] == f.tobytes() + h.tobytes() + bf.tobytes()


def test_typed_output_contents_and_non_utf8_bytes():
    response = pb.ModelInferResponse(model_name="m")
    out = response.outputs.add(name="y", datatype="INT32", shape=[2])
    out.contents.int_contents.extend([4, -5])
    plain = codec.DecodedRequest(request=pb.ModelInferRequest())
    assert json.loads(codec.encode_infer_response(response, plain).body)["outputs"][0]["data"] == [4, -5]
    binary = codec.encode_infer_response(response, codec.DecodedRequest(request=pb.ModelInferRequest(), binary_all=True))
    assert binary.body[binary.header_length:] == np.array([4, -5], dtype=np.int32).tobytes()
    with pytest.raises(InvalidArgument, match="binary_data"):
        codec.encode_infer_response(response_with(("s", np.array([b"\xff"], dtype=object))), plain)


def test_statistics_json_keeps_numbers():
    stats = pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(name="m", version="1", inference_count=2**40)])
    stats.model_stats[0].inference_stats.success.ns = 12345
    stats.model_stats[0].batch_stats.add(batch_size=4)
    document = codec.message_to_json(stats)
    entry = document["model_stats"][0]
    assert entry["inference_count"] == 2**40 and entry["inference_stats"]["success"] == {"count": 0, "ns": 12345}
    assert entry["batch_stats"][0]["batch_size"] == 4 and entry["response_stats"] == {}


# ------------------------------------------------------------------------------------- fuzzing

JSON_SCALARS = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=True) | st.text(max_size=8)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)
SHAPES = st.lists(st.integers(min_value=-2, max_value=6), max_size=4) | JSON_VALUES
INPUTS = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "y", ""]) | JSON_SCALARS, "shape": SHAPES,
     "datatype": st.sampled_from([*tensors.DATATYPES, "FP99"]) | JSON_SCALARS},
    optional={"data": JSON_VALUES | st.lists(st.floats() | st.integers(-300, 300) | st.booleans(), max_size=12),
              "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-4, 40) | JSON_SCALARS})
              | JSON_VALUES},
)
REQUESTS = st.fixed_dictionaries(
    {"inputs": st.lists(INPUTS, max_size=3) | JSON_VALUES},
    optional={"id": JSON_SCALARS, "parameters": JSON_VALUES | st.fixed_dictionaries(
        {}, optional={"binary_data_output": JSON_SCALARS, "timeout": JSON_SCALARS}),
        "outputs": st.lists(st.fixed_dictionaries({"name": JSON_SCALARS}, optional={"parameters": JSON_VALUES}),
                            max_size=3) | JSON_VALUES},
)


def decode_or_reject(body: bytes, header: str | None) -> None:
    try:
        length = codec.parse_header_length(header, len(body))
        decoded = codec.decode_infer_request(body, length, model="m", version="")
    except InvalidArgument as exc:
        assert exc.message
        return
    # Whatever is accepted is a request the node's own decoder accepts as well.
    tensors.decode_inputs(decoded.request)
    decoded.request.SerializeToString()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=REQUESTS, binary=st.binary(max_size=64), header=st.none() | st.text(max_size=6) | st.integers(-5, 200).map(str))
def test_fuzz_structured_requests_never_raise_anything_but_invalid_argument(document, binary, header):
    decode_or_reject(json.dumps(document).encode() + binary, header)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200), header=st.none() | st.integers(0, 220).map(str))
def test_fuzz_arbitrary_bytes(body, header):
    decode_or_reject(body, header)


@settings(max_examples=200, deadline=None)
@given(datatype=st.sampled_from(list(tensors.DATATYPES)), shape=st.lists(st.integers(0, 4), max_size=3),
       raw=st.binary(max_size=48))
def test_fuzz_binary_tensor_payloads(datatype, shape, raw):
    header = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": datatype,
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    decode_or_reject(header + raw, str(len(header)))


def test_deeply_nested_json_is_rejected_quickly():
    for body in (b"[" * 100_000, b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        with pytest.raises(InvalidArgument):
            codec.decode_infer_request(body, None, model="m", version="")


# ------------------------------------------------------------------------ remembered headers

def binary_body(document, *arrays: np.ndarray) -> tuple[bytes, int]:
    """A binary-extension body: the JSON header, then the arrays' bytes; and the header's length."""
    header = json.dumps(document).encode()
    return header + b"".join(a.tobytes() for a in arrays), len(header)


BINARY_DOCUMENT = {
    "parameters": {"binary_data_output": True, "timeout": 250_000, "priority": 3, "tag": "t"},
    "inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24, "note": "a"}},
        {"name": "y", "shape": [4], "datatype": "INT64", "parameters": {"binary_data_size": 32}},
    ],
    "outputs": [{"name": "out", "parameters": {"binary_data": False, "top": 2}}, {"name": "other"}],
}


def binary_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    return sample("FP32", (2, 3), seed), sample("INT64", (4,), seed)


def assert_same_decoding(got: codec.DecodedRequest, expected: codec.DecodedRequest) -> None:
    assert got.request == expected.request
    assert got.request.SerializeToString(deterministic=True) == expected.request.SerializeToString(deterministic=True)
    assert got.binary_all == expected.binary_all
    assert got.binary_outputs == expected.binary_outputs
    assert got.timeout_s == expected.timeout_s


def counting_full_decodes(monkeypatch) -> list:
    """Count calls of codec.decode_infer_request (what RequestDecoder falls back to)."""
    calls = []
    real = codec.decode_infer_request

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(codec, "decode_infer_request", counted)
    return calls


def test_a_remembered_header_decodes_new_tensor_bytes_model_and_version_like_a_full_decode(monkeypatch):
    decoder = codec.RequestDecoder()
    first_body, length = binary_body(BINARY_DOCUMENT, *binary_arrays(1))
    second_body, second_length = binary_body(BINARY_DOCUMENT, *binary_arrays(2))
    assert second_length == length and first_body[:length] == second_body[:length]
    assert first_body[length:] != second_body[length:]
    expected_first = codec.decode_infer_request(first_body, length, model="m", version="1")
    expected_second = codec.decode_infer_request(second_body, length, model="other", version="7")

    calls = counting_full_decodes(monkeypatch)
    assert_same_decoding(decoder.decode(first_body, length, model="m", version="1"), expected_first)
    assert len(calls) == 1 and len(decoder._templates) == 1
    hit = decoder.decode(second_body, length, model="other", version="7")
    assert len(calls) == 1  # from the template: no full decode
    assert_same_decoding(hit, expected_second)
    assert hit.request.model_name == "other" and hit.request.model_version == "7"
    x, y = binary_arrays(2)
    assert list(hit.request.raw_input_contents) == [x.tobytes(), y.tobytes()]
    got = tensors.decode_inputs(hit.request)
    np.testing.assert_array_equal(got["x"], x)
    np.testing.assert_array_equal(got["y"], y)
    # The same header again, with the first request's bytes and names: still the template, still exact.
    assert_same_decoding(decoder.decode(first_body, length, model="m", version="1"), expected_first)
    assert len(calls) == 1 and len(decoder._templates) == 1


def test_a_hit_keeps_request_and_output_parameters_and_timeout(monkeypatch):
    decoder = codec.RequestDecoder()
    body, length = binary_body(BINARY_DOCUMENT, *binary_arrays(1))
    decoder.decode(body, length, model="m", version="")
    calls = counting_full_decodes(monkeypatch)
    hit = decoder.decode(binary_body(BINARY_DOCUMENT, *binary_arrays(3))[0], length, model="m", version="")
    assert calls == []
    request = hit.request
    assert codec.parameters_to_json(request.parameters) == {"timeout": 250_000, "priority": 3, "tag": "t"}
    assert codec.parameters_to_json(request.inputs[0].parameters) == {"note": "a"}
    assert codec.parameters_to_json(request.inputs[1].parameters) == {}
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [("x", "FP32", [2, 3]), ("y", "INT64", [4])]
    assert [o.name for o in request.outputs] == ["out", "other"]
    assert codec.parameters_to_json(request.outputs[0].parameters) == {"top": 2}
    assert hit.binary_all is True and hit.binary_outputs == {"out": False}
    assert hit.timeout_s == pytest.approx(0.25)


def test_a_hit_says_all_binary_like_the_full_decode():
    decoder = codec.RequestDecoder()
    body, length = binary_body(BINARY_DOCUMENT, *binary_arrays(1))
    assert decoder.decode(body, length, model="m", version="").all_binary is True
    assert len(decoder._templates) == 1
    hit = decoder.decode(body, length, model="m", version="")
    assert hit.all_binary == codec.decode_infer_request(body, length, model="m", version="").all_binary


def test_changing_a_decoded_request_leaves_later_hits_alone():
    decoder = codec.RequestDecoder()
    body, length = binary_body(BINARY_DOCUMENT, *binary_arrays(1))
    expected = codec.decode_infer_request(body, length, model="m", version="1")
    for _ in range(2):  # the first decode (which makes the template) and a hit
        decoded = decoder.decode(body, length, model="m", version="1")
        assert_same_decoding(decoded, expected)
        request = decoded.request
        request.model_name = "changed"
        request.id = "mine"
        request.parameters["timeout"].int64_param = 1
        request.parameters["added"].string_param = "x"
        request.inputs[0].shape.append(9)
        request.inputs.add(name="z", datatype="FP32", shape=[1])
        request.raw_input_contents.append(b"\0" * 4)
        request.outputs.add(name="more")
        decoded.timeout_s = 99.0
        decoded.binary_all = False
    assert_same_decoding(decoder.decode(body, length, model="m", version="1"), expected)
    assert len(decoder._templates) == 1


def test_changing_the_binary_outputs_of_a_hit_leaves_later_hits_alone():
    decoder = codec.RequestDecoder()
    body, length = binary_body(BINARY_DOCUMENT, *binary_arrays(1))
    decoder.decode(body, length, model="m", version="")
    hit = decoder.decode(body, length, model="m", version="")
    hit.binary_outputs["other"] = True  # each decode_infer_request gives a dict of its own
    hit.binary_outputs["out"] = True
    assert decoder.decode(body, length, model="m", version="").binary_outputs == {"out": False}


def test_a_remembered_header_with_binary_data_of_the_wrong_length_fails_like_a_full_decode():
    decoder = codec.RequestDecoder()
    body, length = binary_body(BINARY_DOCUMENT, *binary_arrays(1))
    decoder.decode(body, length, model="m", version="")
    assert len(decoder._templates) == 1
    for wrong in (body[:-1], body[:-8], body + b"\0", body + bytes(8), body[:length]):
        with pytest.raises(InvalidArgument) as full:
            codec.decode_infer_request(wrong, length, model="m", version="")
        with pytest.raises(InvalidArgument) as remembered:
            decoder.decode(wrong, length, model="m", version="")
        assert remembered.value.message == full.value.message and str(remembered.value) == str(full.value)
    # The template is still there and still right.
    assert len(decoder._templates) == 1
    other, _ = binary_body(BINARY_DOCUMENT, *binary_arrays(4))
    assert_same_decoding(decoder.decode(other, length, model="m", version=""),
                         codec.decode_infer_request(other, length, model="m", version=""))


def test_a_header_that_fails_is_not_remembered():
    decoder = codec.RequestDecoder()
    body, length = binary_body(BINARY_DOCUMENT, *binary_arrays(1))
    with pytest.raises(InvalidArgument):
        decoder.decode(body[:-1], length, model="m", version="")
    assert decoder._templates == {}
    with pytest.raises(InvalidArgument, match="binary_data_size"):
        decoder.decode(*binary_body({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                                                  "parameters": {"binary_data_size": 4}}]}, np.zeros(1, np.float32)),
                       model="m", version="")
    assert decoder._templates == {}


@pytest.mark.parametrize(
    ("document", "arrays"),
    [
        pytest.param({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]}]}, (),
                     id="json-data"),
        pytest.param({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]},
                                 {"name": "y", "shape": [1], "datatype": "INT32", "parameters": {"binary_data_size": 4}}]},
                     (np.array([7], np.int32),), id="json-data-and-binary"),
        pytest.param({"id": "r-1", "inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                                               "parameters": {"binary_data_size": 8}}]},
                     (np.array([1, 2], np.float32),), id="id"),
        pytest.param({"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 11}}]},
                     (np.frombuffer(struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0), np.uint8),), id="bytes"),
        pytest.param({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}},
                                 {"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]},
                     (np.array([1], np.float32), np.frombuffer(struct.pack("<I", 2) + b"hi", np.uint8)),
                     id="bytes-among-others"),
    ],
)
def test_headers_that_are_not_all_binary_fixed_size_and_anonymous_are_not_remembered(monkeypatch, document, arrays):
    decoder = codec.RequestDecoder()
    body, length = binary_body(document, *arrays)
    expected = codec.decode_infer_request(body, length, model="m", version="2")
    calls = counting_full_decodes(monkeypatch)
    for attempt in range(1, 4):
        assert_same_decoding(decoder.decode(body, length, model="m", version="2"), expected)
        assert len(calls) == attempt  # decoded in full every time
    assert decoder._templates == {}


def test_a_body_without_a_header_length_is_not_remembered(monkeypatch):
    decoder = codec.RequestDecoder()
    body = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}).encode()
    expected = codec.decode_infer_request(body, None, model="m", version="")
    calls = counting_full_decodes(monkeypatch)
    for attempt in range(1, 3):
        assert_same_decoding(decoder.decode(body, None, model="m", version=""), expected)
        assert len(calls) == attempt
    assert decoder._templates == {}


def test_a_header_over_the_size_limit_is_not_remembered(monkeypatch):
    body, length = binary_body(BINARY_DOCUMENT, *binary_arrays(1))
    expected = codec.decode_infer_request(body, length, model="m", version="")
    calls = counting_full_decodes(monkeypatch)
    small = codec.RequestDecoder(max_header_bytes=length - 1)
    for attempt in range(1, 3):
        assert_same_decoding(small.decode(body, length, model="m", version=""), expected)
        assert len(calls) == attempt
    assert small._templates == {}
    exact = codec.RequestDecoder(max_header_bytes=length)  # a header of exactly the limit is remembered
    exact.decode(body, length, model="m", version="")
    assert len(exact._templates) == 1


def test_at_most_max_entries_headers_are_remembered_the_oldest_going_first(monkeypatch):
    decoder = codec.RequestDecoder(max_entries=2)
    bodies = []
    for n in (1, 2, 3):
        document = {"inputs": [{"name": "x", "shape": [n], "datatype": "FP32", "parameters": {"binary_data_size": 4 * n}}]}
        bodies.append(binary_body(document, np.arange(n, dtype=np.float32)))
    headers = [body[:length] for body, length in bodies]
    expected = [codec.decode_infer_request(body, length, model="m", version="") for body, length in bodies]
    calls = counting_full_decodes(monkeypatch)
    for body, length in bodies:
        decoder.decode(body, length, model="m", version="")
    assert len(calls) == 3
    assert list(decoder._templates) == headers[1:]  # the first is gone
    for (body, length), want in zip(bodies[1:], expected[1:]):  # the two newest are hits
        assert_same_decoding(decoder.decode(body, length, model="m", version=""), want)
    assert len(calls) == 3
    body, length = bodies[0]  # the oldest is decoded in full again, and now evicts the second
    assert_same_decoding(decoder.decode(body, length, model="m", version=""), expected[0])
    assert len(calls) == 4
    assert list(decoder._templates) == [headers[2], headers[0]]
