"""Pure logic of the SDK: input validation and conversion, OIP request/response codecs, settings."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest

from aimaas.sdk.errors import AimaasError
from aimaas.sdk.service import Traffic
from aimaas.sdk.settings import ClientSettings, default_http_url
from aimaas.sdk.tensors import (
    ModelSignature,
    TensorSpec,
    build_request,
    parse_response,
    prepare_inputs,
)
from inference import grpc_predict_v2_pb2 as oip

MLP = ModelSignature("mlp", ("1",), (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),))
TWO = ModelSignature(
    "two", ("1",), (TensorSpec("ids", "INT32", (-1, 2)), TensorSpec("text", "BYTES", (-1,))), ()
)


def invalid_argument(excinfo: pytest.ExceptionInfo[AimaasError]) -> str:
    assert excinfo.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert excinfo.value.status() == "INVALID_ARGUMENT"
    return excinfo.value.message()


def test_plain_list_single_input_becomes_model_dtype() -> None:
    arrays = prepare_inputs(MLP, [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert arrays["x"].dtype == np.float32 and arrays["x"].shape == (2, 4)
    assert arrays["x"][1, 3] == 8.0


def test_float64_numpy_is_narrowed_to_fp32() -> None:
    source = np.random.default_rng(0).standard_normal((3, 4))
    arrays = prepare_inputs(MLP, {"x": source})
    assert arrays["x"].dtype == np.float32
    np.testing.assert_allclose(arrays["x"], source, rtol=1e-6)


def test_exact_dtype_is_passed_through_without_copy() -> None:
    source = np.ones((1, 4), dtype=np.float32)
    assert prepare_inputs(MLP, source)["x"] is source


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"x": [[1, 2, 3]]}, "shape [1, 3], model expects [-1, 4]"),
        ({"x": [1, 2, 3, 4]}, "shape [4], model expects [-1, 4]"),
        ({"z": [[1, 2, 3, 4]]}, "has no input 'z'"),
        ({}, "needs input x FP32 [-1, 4]"),
        ({"x": [["a", "b", "c", "d"]]}, "dtype <U1, model expects FP32"),
        ({"x": [[1, 2], [3]]}, "not a rectangular array"),
    ],
)
def test_bad_inputs_are_rejected_before_sending(inputs: dict, expected: str) -> None:
    with pytest.raises(AimaasError) as excinfo:
        prepare_inputs(MLP, inputs)
    assert expected in invalid_argument(excinfo)


def test_float_to_int_and_out_of_range_ints_are_rejected() -> None:
    with pytest.raises(AimaasError) as excinfo:
        prepare_inputs(TWO, {"ids": np.ones((1, 2)), "text": ["a"]})
    assert "dtype float64, model expects INT32" in invalid_argument(excinfo)
    with pytest.raises(AimaasError) as excinfo:
        prepare_inputs(TWO, {"ids": [[1, 2**40]], "text": ["a"]})
    assert "outside the range of INT32" in invalid_argument(excinfo)
    arrays = prepare_inputs(TWO, {"ids": [[1, 2]], "text": ["héllo"]})
    assert arrays["ids"].dtype == np.int32


def test_single_array_for_a_multi_input_model_is_rejected() -> None:
    with pytest.raises(AimaasError) as excinfo:
        prepare_inputs(TWO, [[1, 2]])
    assert "has 2 inputs (ids, text); pass a dict" in invalid_argument(excinfo)


def test_bytes_elements_must_be_text_or_bytes() -> None:
    with pytest.raises(AimaasError) as excinfo:
        prepare_inputs(TWO, {"ids": [[1, 2]], "text": [3]})
    assert "every element must be str or bytes, not int" in invalid_argument(excinfo)


def test_request_carries_raw_little_endian_contents() -> None:
    arrays = prepare_inputs(TWO, {"ids": [[1, 2]], "text": ["ab", b"c"]})
    request = build_request(TWO, arrays, "two", "3", "req-1")
    assert (request.model_name, request.model_version, request.id) == ("two", "3", "req-1")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("ids", "INT32", [1, 2]),
        ("text", "BYTES", [2]),
    ]
    assert request.raw_input_contents[0] == struct.pack("<ii", 1, 2)
    assert request.raw_input_contents[1] == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"


def test_response_raw_and_typed_contents_decode_to_numpy() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    response = oip.ModelInferResponse(model_name="m")
    response.outputs.add(name="y", datatype="FP32", shape=[2, 3])
    response.outputs.add(name="s", datatype="BYTES", shape=[2])
    response.raw_output_contents.append(values.tobytes())
    response.raw_output_contents.append(struct.pack("<I", 1) + b"a" + struct.pack("<I", 0))
    decoded = parse_response(response)
    np.testing.assert_array_equal(decoded["y"], values)
    assert decoded["s"].tolist() == [b"a", b""]

    typed = oip.ModelInferResponse()
    tensor = typed.outputs.add(name="n", datatype="INT64", shape=[3])
    tensor.contents.int64_contents.extend([1, -2, 3])
    assert parse_response(typed)["n"].tolist() == [1, -2, 3]


@pytest.mark.parametrize(
    ("raw", "shape", "expected"),
    [(b"\x00" * 7, [2], "not a multiple of 4"), (b"\x00" * 8, [3], "2 values for shape [3]")],
)
def test_malformed_responses_are_errors_not_crashes(raw: bytes, shape: list[int], expected: str) -> None:
    response = oip.ModelInferResponse()
    response.outputs.add(name="y", datatype="FP32", shape=shape)
    response.raw_output_contents.append(raw)
    with pytest.raises(AimaasError) as excinfo:
        parse_response(response)
    assert expected in invalid_argument(excinfo)


def test_signature_from_metadata() -> None:
    metadata = oip.ModelMetadataResponse(name="mlp", versions=["1", "2"])
    metadata.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
    signature = ModelSignature.from_metadata(metadata)
    assert signature.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    assert signature.versions == ("1", "2")


def test_traffic_entries() -> None:
    assert Traffic.of({"version": 2, "weight": 90}).to_proto().version == 2
    assert Traffic.of({"alias": "canary", "weight": 10}).to_proto().alias == "canary"
    for bad in ({"weight": 10}, {"version": 1, "alias": "a", "weight": 5}, {"version": 1}, {"version": 1, "weight": 1, "x": 2}):
        with pytest.raises(AimaasError) as excinfo:
            Traffic.of(bad).to_proto()
        invalid_argument(excinfo)


def test_settings_read_the_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMAAS_API_KEY", "aimaas_k1_secret")
    monkeypatch.setenv("AIMAAS_ENDPOINT", "gateway.example:9001")
    settings = ClientSettings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "aimaas_k1_secret"
    assert "aimaas_k1_secret" not in repr(settings)
    assert default_http_url(settings.endpoint) == "http://gateway.example:9000"
    monkeypatch.setenv("AIMAAS_ENDPOINT", "http://gateway")
    with pytest.raises(ValueError, match="must be host:port"):
        ClientSettings()
