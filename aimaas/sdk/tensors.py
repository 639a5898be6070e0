"""Pure tensor logic of the SDK: model signatures, input validation and conversion, OIP messages.

Inputs are checked against the model metadata before anything is sent (like tritonclient): unknown
or missing names, rank and fixed dimensions, and dtypes. Plain lists are converted to the model's
dtype; numpy arrays must already have it or a same-kind dtype that converts without loss of range
(float64 -> FP32 is accepted, float -> INT32 is not).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aimaas.sdk.errors import invalid
from inference import grpc_predict_v2_pb2 as oip

# Open Inference Protocol datatype -> numpy dtype (little endian, as raw contents carry them).
NUMPY_DTYPES: Mapping[str, np.dtype] = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}  # fmt: skip
BYTES = "BYTES"

Inputs = Mapping[str, Any] | np.ndarray | Sequence[Any]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    # -1 marks a dynamic dimension.
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {list(self.shape)}"


@dataclass(frozen=True)
class ModelSignature:
    name: str
    versions: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_metadata(cls, response: oip.ModelMetadataResponse) -> ModelSignature:
        def specs(tensors: Any) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in tensors)

        return cls(response.name, tuple(response.versions), specs(response.inputs), specs(response.outputs))


def prepare_inputs(signature: ModelSignature, inputs: Inputs) -> dict[str, np.ndarray]:
    """Validated arrays by input name, in the model's dtypes. Raises AimaasError(INVALID_ARGUMENT)."""
    if not isinstance(inputs, Mapping):
        if len(signature.inputs) != 1:
            names = ", ".join(spec.name for spec in signature.inputs)
            raise invalid(
                f"model {signature.name!r} has {len(signature.inputs)} inputs ({names}); pass a dict by input name"
            )
        inputs = {signature.inputs[0].name: inputs}
    known = {spec.name for spec in signature.inputs}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise invalid(
            f"model {signature.name!r} has no input {', '.join(map(repr, unknown))} "
            f"(inputs: {', '.join(sorted(known))})"
        )
    missing = [spec.describe() for spec in signature.inputs if spec.name not in inputs]
    if missing:
        raise invalid(f"model {signature.name!r} needs input {', '.join(missing)}")
    return {spec.name: convert(spec, inputs[spec.name]) for spec in signature.inputs}


def convert(spec: TensorSpec, value: Any) -> np.ndarray:
    """One input as an array of the spec's dtype and a shape the spec allows."""
    array = _to_bytes(spec, value) if spec.datatype == BYTES else _to_numeric(spec, value)
    check_shape(spec, array.shape)
    return array


def check_shape(spec: TensorSpec, shape: tuple[int, ...]) -> None:
    expected = spec.shape
    if len(shape) != len(expected) or any(want >= 0 and got != want for got, want in zip(shape, expected, strict=True)):
        raise invalid(f"input {spec.name!r} has shape {list(shape)}, model expects {list(expected)} (-1: any size)")


def _to_numeric(spec: TensorSpec, value: Any) -> np.ndarray:
    target = NUMPY_DTYPES.get(spec.datatype)
    if target is None:
        raise invalid(f"input {spec.name!r} has datatype {spec.datatype}, which the SDK cannot encode")
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise invalid(f"input {spec.name!r} is not a rectangular array: {exc}") from None
    if array.dtype == target:
        return array
    source = array.dtype
    if source.kind not in "biuf" or not _convertible(source, target):
        raise invalid(f"input {spec.name!r} has dtype {source}, model expects {spec.datatype} ({target})")
    if target.kind in "iu" and array.size and source.kind in "iu":
        limits = np.iinfo(target)
        low, high = array.min(), array.max()
        if low < limits.min or high > limits.max:
            raise invalid(f"input {spec.name!r} has values outside the range of {spec.datatype} ({low}..{high})")
    return array.astype(target)


def _convertible(source: np.dtype, target: np.dtype) -> bool:
    if np.can_cast(source, target, "same_kind"):
        return True
    # Signed -> unsigned integers: allowed, the range is checked on the values.
    return source.kind in "iu" and target.kind in "iu"


def _to_bytes(spec: TensorSpec, value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=object)

    def encode(item: Any) -> bytes:
        if isinstance(item, bytes):
            return item
        if isinstance(item, str):
            return item.encode("utf-8")
        raise invalid(f"input {spec.name!r} is BYTES: every element must be str or bytes, not {type(item).__name__}")

    flat = [encode(item) for item in array.reshape(-1)]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


def raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == BYTES:
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


def build_request(
    signature: ModelSignature, arrays: Mapping[str, np.ndarray], model: str, version: str = "", request_id: str = ""
) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for spec in signature.inputs:
        array = arrays[spec.name]
        request.inputs.append(
            oip.ModelInferRequest.InferInputTensor(name=spec.name, datatype=spec.datatype, shape=list(array.shape))
        )
        request.raw_input_contents.append(raw_bytes(array, spec.datatype))
    return request


def decode_bytes(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise invalid("truncated BYTES tensor in the response")
        (length,) = struct.unpack_from("<I", raw, offset)
        end = offset + 4 + length
        if end > len(raw):
            raise invalid("truncated BYTES tensor in the response")
        items.append(raw[offset + 4 : end])
        offset = end
    return items


_TYPED_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP16": "fp32_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}  # fmt: skip


def parse_response(response: oip.ModelInferResponse) -> dict[str, np.ndarray]:
    """Output arrays by name, from raw contents or (when a server sends them) typed contents."""
    outputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(response.outputs):
        shape = tuple(int(d) for d in tensor.shape)
        datatype = tensor.datatype
        if datatype != BYTES and datatype not in NUMPY_DTYPES:
            raise invalid(f"output {tensor.name!r} has datatype {datatype}, which the SDK cannot decode")
        if index < len(response.raw_output_contents):
            raw = response.raw_output_contents[index]
            if datatype == BYTES:
                array = _object_array(decode_bytes(raw))
            else:
                dtype = NUMPY_DTYPES[datatype]
                if len(raw) % dtype.itemsize:
                    raise invalid(f"output {tensor.name!r} has {len(raw)} bytes, not a multiple of {dtype.itemsize}")
                array = np.frombuffer(raw, dtype=dtype)
        else:
            values = list(getattr(tensor.contents, _TYPED_FIELDS[datatype]))
            array = _object_array(values) if datatype == BYTES else np.asarray(values, dtype=NUMPY_DTYPES[datatype])
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise invalid(f"output {tensor.name!r} has {array.size} values for shape {list(shape)}")
        outputs[tensor.name] = array.reshape(shape)
    return outputs


def _object_array(items: list[bytes]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out
