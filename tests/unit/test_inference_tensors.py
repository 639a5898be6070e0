"""The protocol tensor codec: every datatype both ways, precise errors, and fuzzing."""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidArgument
from services.inference.tensors import (
    DATATYPES,
    add_output,
    add_raw_input,
    datatype_of,
    decode_inputs,
    decode_raw,
    decode_typed,
    join_bytes,
    raw_bytes,
    typed_contents,
)

NUMERIC = [name for name in DATATYPES if name not in ("BYTES", "BOOL")]


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = DATATYPES[datatype].dtype
    if datatype == "BYTES":
        flat = np.empty(int(np.prod(shape)), dtype=object)
        flat[:] = [bytes(rng.integers(0, 256, size=int(rng.integers(0, 6)), dtype=np.uint8)) for _ in range(flat.size)]
        return flat.reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(size=shape).astype(dtype)


def request_with(*tensors: tuple[str, np.ndarray]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, array in tensors:
        add_raw_input(request, name, array)
    return request


def assert_invalid(call, *fragments: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        call()
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value


# --------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_every_datatype_round_trips_raw(datatype):
    array = sample(datatype, (2, 3))
    decoded = decode_inputs(request_with(("t", array)))["t"]
    assert decoded.dtype == DATATYPES[datatype].dtype
    assert decoded.shape == (2, 3)
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("datatype", [d for d, row in DATATYPES.items() if row.typed_field])
def test_every_typed_datatype_round_trips_typed(datatype):
    array = sample(datatype, (3, 2), seed=1)
    dt, contents = typed_contents(array)
    request = pb.ModelInferRequest()
    request.inputs.add(name="t", datatype=dt.name, shape=array.shape, contents=contents)
    decoded = decode_inputs(request)["t"]
    assert decoded.dtype == DATATYPES[datatype].dtype
    np.testing.assert_array_equal(decoded, array)


def test_raw_decoding_does_not_copy():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    request = request_with(("x", array))
    decoded = decode_inputs(request)["x"]
    assert not decoded.flags.owndata and not decoded.flags.writeable


def test_bytes_raw_form_is_length_prefixed():
    array = np.array([b"ab", b"", b"\x00\xff"], dtype=object)
    raw = join_bytes(array)
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 2) + b"\x00\xff"
    # str (what ONNX Runtime returns for string tensors) encodes as UTF-8.
    assert join_bytes(np.array(["é"], dtype=object)) == struct.pack("<I", 2) + "é".encode()


def test_bf16_uses_ml_dtypes_and_keeps_the_bits():
    array = np.array([1.5, -2.0, 3.140625], dtype=ml_dtypes.bfloat16)
    dt, raw = raw_bytes(array)
    assert dt.name == "BF16" and raw == array.view(np.uint16).tobytes()
    decoded = decode_raw("b", "BF16", [3], raw)
    np.testing.assert_array_equal(decoded.view(np.uint16), array.view(np.uint16))


def test_bool_raw_bytes_are_normalized():
    decoded = decode_raw("flags", "BOOL", [3], b"\x00\x01\x07")
    assert decoded.tolist() == [False, True, True]


def test_outputs_encode_raw_with_datatype_and_shape():
    response = pb.ModelInferResponse()
    add_output(response, "y", np.arange(6, dtype=np.int64).reshape(2, 3))
    add_output(response, "s", np.array([["a", "bc"]], dtype=object))
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("y", "INT64", [2, 3]),
        ("s", "BYTES", [1, 2]),
    ]
    assert np.frombuffer(response.raw_output_contents[0], dtype="<i8").tolist() == list(range(6))
    assert response.raw_output_contents[1] == struct.pack("<I", 1) + b"a" + struct.pack("<I", 2) + b"bc"


def test_big_endian_arrays_are_sent_little_endian():
    array = np.arange(3, dtype=">i4")
    dt, raw = raw_bytes(array)
    assert dt.name == "INT32" and raw == np.arange(3, dtype="<i4").tobytes()


def test_datatype_of_unsupported_dtype():
    with pytest.raises(ValueError, match="complex64"):
        datatype_of(np.dtype(np.complex64))


# --------------------------------------------------------------------------------------- errors


def test_unknown_datatype_is_named():
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP8", shape=[1])
    request.raw_input_contents.append(b"\x00")
    assert_invalid(lambda: decode_inputs(request), "input 'x'", "unknown datatype 'FP8'")


def test_negative_dimension():
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP32", shape=[2, -1])
    request.raw_input_contents.append(b"")
    assert_invalid(lambda: decode_inputs(request), "input 'x'", "negative dimension", "[2, -1]")


def test_raw_size_mismatch_names_sizes():
    request = request_with(("x", np.zeros((2, 3), np.float32)))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    assert_invalid(lambda: decode_inputs(request), "input 'x'", "23 bytes", "[2, 3]", "FP32", "24 bytes")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"\x01\x00", "too few"),  # fewer bytes than two length prefixes
        (struct.pack("<I", 1) + b"a" + b"\x01\x00\x00", "inside the length prefix of element 1"),
        (struct.pack("<I", 50) + b"ab" + struct.pack("<I", 0), "element 0 declares 50 bytes but only 6 remain"),
        (struct.pack("<I", 0) + struct.pack("<I", 0) + b"zz", "2 bytes after the 2 elements"),
    ],
)
def test_malformed_bytes_raw(raw, fragment):
    assert_invalid(lambda: decode_raw("s", "BYTES", [2], raw), "input 's'", fragment)


def test_raw_count_must_match_inputs():
    request = request_with(("a", np.zeros(1, np.float32)), ("b", np.zeros(1, np.float32)))
    del request.raw_input_contents[1]
    assert_invalid(lambda: decode_inputs(request), "raw_input_contents has 1 entries", "2 inputs")


def test_raw_and_typed_both_set():
    request = request_with(("x", np.zeros(2, np.float32)))
    request.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
    assert_invalid(lambda: decode_inputs(request), "input 'x'", "typed contents", "raw_input_contents")


def test_duplicate_input_names():
    request = request_with(("x", np.zeros(1, np.float32)), ("x", np.zeros(1, np.float32)))
    assert_invalid(lambda: decode_inputs(request), "input 'x' appears more than once")


def test_typed_count_mismatch():
    contents = pb.InferTensorContents(fp32_contents=[1, 2, 3])
    assert_invalid(lambda: decode_typed("x", "FP32", [2, 2], contents), "input 'x'", "3 values", "needs 4")


def test_typed_wrong_field():
    contents = pb.InferTensorContents(int_contents=[1, 2])
    assert_invalid(lambda: decode_typed("x", "FP32", [2], contents), "input 'x'", "fp32_contents", "not int_contents")


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_has_no_typed_form(datatype):
    assert_invalid(
        lambda: decode_typed("h", datatype, [1], pb.InferTensorContents(fp32_contents=[1.0])),
        "input 'h'", f"{datatype} has no typed contents form", "raw_input_contents",
    )


def test_typed_values_out_of_range():
    contents = pb.InferTensorContents(int_contents=[1, 300])
    assert_invalid(lambda: decode_typed("x", "INT8", [2], contents), "input 'x'", "outside the range of INT8")


def test_absurd_zero_size_shape():
    assert_invalid(lambda: decode_raw("x", "FP32", [0, 2**62, 2**62], b""), "input 'x'", "unsupported shape")


def test_missing_data_for_typed_input():
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="INT32", shape=[2])
    assert_invalid(lambda: decode_inputs(request), "input 'x'", "0 values", "needs 2")


# --------------------------------------------------------------------------------------- properties

_shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datatype=st.sampled_from(list(DATATYPES)), shape=_shapes, seed=st.integers(0, 2**32 - 1))
def test_property_raw_round_trip(datatype, shape, seed):
    array = sample(datatype, shape, seed)
    decoded = decode_inputs(request_with(("t", array)))["t"]
    assert decoded.shape == array.shape and decoded.dtype == DATATYPES[datatype].dtype
    if datatype in ("FP16", "FP32", "FP64", "BF16"):
        np.testing.assert_array_equal(decoded.view(f"u{decoded.dtype.itemsize}"), array.view(f"u{array.dtype.itemsize}"))
    else:
        np.testing.assert_array_equal(decoded, array)
    # And back out as an output: same bytes as the input.
    response = pb.ModelInferResponse()
    add_output(response, "t", decoded)
    assert response.raw_output_contents[0] == request_with(("t", array)).raw_input_contents[0]


@settings(max_examples=100, deadline=None)
@given(
    datatype=st.sampled_from([d for d, row in DATATYPES.items() if row.typed_field]),
    shape=_shapes,
    seed=st.integers(0, 2**32 - 1),
)
def test_property_typed_round_trip(datatype, shape, seed):
    array = sample(datatype, shape, seed)
    dt, contents = typed_contents(array)
    decoded = decode_typed("t", dt.name, array.shape, contents)
    np.testing.assert_array_equal(decoded, array)


_datatype_names = st.one_of(st.sampled_from(list(DATATYPES)), st.text(max_size=6))
_dims = st.lists(st.integers(-3, 2**40), max_size=5) | st.lists(st.integers(-1, 6), max_size=4)


@st.composite
def _fuzzed_requests(draw):
    request = pb.ModelInferRequest(model_name="m")
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["a", "b", "c"])), datatype=draw(_datatype_names), shape=draw(_dims)
        )
        if draw(st.booleans()):
            field = draw(st.sampled_from(list(pb.InferTensorContents.DESCRIPTOR.fields_by_name)))
            if field == "bytes_contents":
                values = draw(st.lists(st.binary(max_size=4), max_size=6))
            elif field == "bool_contents":
                values = draw(st.lists(st.booleans(), max_size=6))
            elif field in ("fp32_contents", "fp64_contents"):
                values = draw(st.lists(st.floats(width=32), max_size=6))
            elif field in ("uint_contents",):
                values = draw(st.lists(st.integers(0, 2**32 - 1), max_size=6))
            elif field in ("uint64_contents",):
                values = draw(st.lists(st.integers(0, 2**64 - 1), max_size=6))
            elif field == "int_contents":
                values = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6))
            else:
                values = draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6))
            getattr(tensor.contents, field).extend(values)
        if use_raw:
            request.raw_input_contents.append(draw(st.binary(max_size=64)))
    if use_raw and draw(st.booleans()):
        request.raw_input_contents.append(draw(st.binary(max_size=8)))
    return request


@settings(max_examples=400, deadline=None)
@given(request=_fuzzed_requests())
def test_fuzz_requests_decode_or_fail_with_invalid_argument(request):
    try:
        arrays = decode_inputs(request)
    except InvalidArgument as exc:
        assert exc.message
        return
    for tensor in request.inputs:
        assert arrays[tensor.name].shape == tuple(tensor.shape)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=256), datatype=st.sampled_from(list(DATATYPES)), shape=_dims)
def test_fuzz_raw_bytes_decode_or_fail_with_invalid_argument(data, datatype, shape):
    try:
        decoded = decode_raw("x", datatype, shape, data)
    except InvalidArgument:
        return
    assert decoded.shape == tuple(shape)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=512))
def test_fuzz_serialized_messages(data):
    request = pb.ModelInferRequest()
    try:
        request.ParseFromString(data)
    except Exception:  # noqa: BLE001 - not a message at all: the gRPC layer rejects it before us
        return
    try:
        decode_inputs(request)
    except InvalidArgument:
        pass
