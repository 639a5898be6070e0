"""The Open Inference Protocol tensor codec: the one place where protocol datatypes meet numpy.

Datatypes and their numpy form (all little-endian, as the protocol's raw encoding is):

    BOOL → bool   INT8..INT64 → int8..int64   UINT8..UINT64 → uint8..uint64
    FP16 → float16   FP32 → float32   FP64 → float64
    BF16 → ml_dtypes.bfloat16 (numpy has none; ml_dtypes is a dependency of onnx and is what
           tritonclient uses, so the bits travel unchanged). Raw contents only.
    BYTES → object array of `bytes`; raw form: each element prefixed by its 4-byte little-endian length.

Raw contents (`raw_input_contents`, one entry per input in order) decode without copying
(`np.frombuffer`, read-only views). Typed contents (`InferTensorContents`) use the field the datatype
names; FP16 and BF16 have no typed form. Every malformed request becomes `InvalidArgument` with a
message naming the input, never another exception.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class Datatype:
    name: str
    dtype: np.dtype
    # InferTensorContents field for typed contents; None: raw only.
    typed_field: str | None
    # DataType enum used by ModelConfig.
    config_type: int
    # Bounds that typed contents must respect when the typed field is wider than the datatype.
    typed_range: tuple[int, int] | None = None


def _table() -> dict[str, Datatype]:
    rows = [
        Datatype("BOOL", np.dtype(np.bool_), "bool_contents", pb.TYPE_BOOL),
        Datatype("INT8", np.dtype("<i1"), "int_contents", pb.TYPE_INT8, (-(2**7), 2**7 - 1)),
        Datatype("INT16", np.dtype("<i2"), "int_contents", pb.TYPE_INT16, (-(2**15), 2**15 - 1)),
        Datatype("INT32", np.dtype("<i4"), "int_contents", pb.TYPE_INT32),
        Datatype("INT64", np.dtype("<i8"), "int64_contents", pb.TYPE_INT64),
        Datatype("UINT8", np.dtype("<u1"), "uint_contents", pb.TYPE_UINT8, (0, 2**8 - 1)),
        Datatype("UINT16", np.dtype("<u2"), "uint_contents", pb.TYPE_UINT16, (0, 2**16 - 1)),
        Datatype("UINT32", np.dtype("<u4"), "uint_contents", pb.TYPE_UINT32),
        Datatype("UINT64", np.dtype("<u8"), "uint64_contents", pb.TYPE_UINT64),
        Datatype("FP16", np.dtype("<f2"), None, pb.TYPE_FP16),
        Datatype("FP32", np.dtype("<f4"), "fp32_contents", pb.TYPE_FP32),
        Datatype("FP64", np.dtype("<f8"), "fp64_contents", pb.TYPE_FP64),
        Datatype("BF16", np.dtype(ml_dtypes.bfloat16), None, pb.TYPE_BF16),
        Datatype("BYTES", np.dtype(object), "bytes_contents", pb.TYPE_STRING),
    ]
    return {row.name: row for row in rows}


# Immutable lookup tables (constants, not state).
DATATYPES: dict[str, Datatype] = _table()
_BY_DTYPE: dict[np.dtype, Datatype] = {row.dtype: row for row in DATATYPES.values()}
_TYPED_FIELDS = tuple(pb.InferTensorContents.DESCRIPTOR.fields_by_name)
_LENGTH = struct.Struct("<I")
# numpy's limit on array rank.
_MAX_RANK = 64


def datatype(name: str) -> Datatype:
    """The protocol datatype `name`; KeyError when it is not one."""
    return DATATYPES[name]


def datatype_of(dtype: np.dtype) -> Datatype:
    """The protocol datatype of a numpy dtype; ValueError when the protocol has none."""
    found = _BY_DTYPE.get(dtype)
    if found is not None:
        return found
    if dtype.kind in "SU":  # fixed-width numpy strings travel as BYTES
        return DATATYPES["BYTES"]
    if dtype.byteorder == ">":
        found = _BY_DTYPE.get(dtype.newbyteorder("<"))
        if found is not None:
            return found
    raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")


def format_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --------------------------------------------------------------------------------------- decoding


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input of `request` as a numpy array, by name, in request order.

    Checks only what the request says about itself (datatype names, shapes, sizes, encodings);
    checking against a model's signature is the data plane's job.
    """
    inputs = request.inputs
    raw = request.raw_input_contents
    if raw and len(raw) != len(inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries but the request has {len(inputs)} inputs; "
            "send one raw entry per input, in the order of inputs"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(inputs):
        name = tensor.name
        if name in arrays:
            raise InvalidArgument(f"input '{name}' appears more than once in the request")
        if raw:
            if tensor.HasField("contents") and tensor.contents.ListFields():
                raise InvalidArgument(
                    f"input '{name}' sets typed contents while the request uses raw_input_contents; "
                    "use one or the other"
                )
            # shape[:] (a list) rather than the repeated field itself: copying a protobuf repeated
            # field into a tuple element by element costs several times more than slicing it.
            arrays[name] = decode_raw(name, tensor.datatype, tensor.shape[:], raw[index])
        else:
            arrays[name] = decode_typed(name, tensor.datatype, tensor.shape[:], tensor.contents)
    return arrays


def _datatype_and_count(name: str, datatype_name: str, shape: Iterable[int]) -> tuple[Datatype, tuple[int, ...], int]:
    found = DATATYPES.get(datatype_name)
    if found is None:
        raise InvalidArgument(
            f"input '{name}' has unknown datatype '{datatype_name}' (expected one of {', '.join(DATATYPES)})"
        )
    dims = tuple(shape)
    for dim in dims:
        if dim < 0:
            raise InvalidArgument(f"input '{name}' has a negative dimension in shape {format_shape(dims)}")
    if len(dims) > _MAX_RANK:
        raise InvalidArgument(f"input '{name}' has {len(dims)} dimensions; at most {_MAX_RANK} are supported")
    return found, dims, math.prod(dims)


def _reshape(name: str, flat: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    try:
        return flat.reshape(dims)
    except ValueError as exc:  # e.g. a zero-size shape whose other dimensions overflow numpy
        raise InvalidArgument(f"input '{name}' has an unsupported shape {format_shape(dims)}: {exc}") from None


def decode_raw(name: str, datatype_name: str, shape: Iterable[int], raw: bytes) -> np.ndarray:
    """One input from its raw bytes (a read-only view of `raw` except for BOOL and BYTES)."""
    dt, dims, count = _datatype_and_count(name, datatype_name, shape)
    if dt.name == "BYTES":
        return _reshape(name, split_bytes(name, raw, count), dims)
    expected = count * dt.dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input '{name}': raw contents hold {len(raw)} bytes but shape {format_shape(dims)} of "
            f"{dt.name} needs {expected} bytes"
        )
    if dt.name == "BOOL":
        # Any non-zero byte is true; normalizing keeps numpy's bool invariant (0 or 1) intact.
        flat = np.frombuffer(raw, dtype=np.uint8) != 0
    else:
        flat = np.frombuffer(raw, dtype=dt.dtype)
    return _reshape(name, flat, dims)


def split_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    """`count` length-prefixed BYTES elements of `raw` as a flat object array."""
    size = len(raw)
    if count * _LENGTH.size > size:
        raise InvalidArgument(
            f"input '{name}': BYTES raw contents hold {size} bytes, too few for the {count} elements "
            f"of its shape (each needs at least a 4-byte length prefix)"
        )
    items: list[bytes] = []
    append = items.append
    unpack = _LENGTH.unpack_from
    offset = 0
    for index in range(count):
        if offset + 4 > size:
            raise InvalidArgument(
                f"input '{name}': BYTES raw contents end inside the length prefix of element {index}"
            )
        (length,) = unpack(raw, offset)
        offset += 4
        end = offset + length
        if end > size:
            raise InvalidArgument(
                f"input '{name}': BYTES element {index} declares {length} bytes but only "
                f"{size - offset} remain in its raw contents"
            )
        append(raw[offset:end])
        offset = end
    if offset != size:
        raise InvalidArgument(
            f"input '{name}': BYTES raw contents have {size - offset} bytes after the {count} "
            "elements of its shape"
        )
    flat = np.empty(count, dtype=object)
    flat[:] = items
    return flat


def decode_typed(name: str, datatype_name: str, shape: Iterable[int], contents: pb.InferTensorContents) -> np.ndarray:
    """One input from typed contents (a copy: protobuf repeated fields are not buffers)."""
    dt, dims, count = _datatype_and_count(name, datatype_name, shape)
    if dt.typed_field is None:
        raise InvalidArgument(
            f"input '{name}': {dt.name} has no typed contents form; send it in raw_input_contents"
        )
    for field in _TYPED_FIELDS:
        if field != dt.typed_field and len(getattr(contents, field)):
            raise InvalidArgument(
                f"input '{name}' of datatype {dt.name} must use {dt.typed_field}, not {field}"
            )
    values = getattr(contents, dt.typed_field)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}': typed contents hold {len(values)} values but shape {format_shape(dims)} "
            f"needs {count}"
        )
    if dt.name == "BYTES":
        flat = np.empty(count, dtype=object)
        flat[:] = list(values)
        return _reshape(name, flat, dims)
    if dt.typed_range is not None and count:
        wide = np.fromiter(values, dtype=np.int64, count=count)
        low, high = dt.typed_range
        if int(wide.min()) < low or int(wide.max()) > high:
            raise InvalidArgument(
                f"input '{name}': typed contents hold values outside the range of {dt.name} [{low}, {high}]"
            )
        return _reshape(name, wide.astype(dt.dtype), dims)
    return _reshape(name, np.fromiter(values, dtype=dt.dtype, count=count), dims)


# --------------------------------------------------------------------------------------- encoding


def join_bytes(array: np.ndarray) -> bytes:
    """Raw BYTES form: every element (bytes, str as UTF-8, anything else as its str) length-prefixed."""
    pack = _LENGTH.pack
    parts: list[bytes] = []
    append = parts.append
    for item in array.ravel(order="C").tolist():
        if not isinstance(item, bytes):
            item = item.encode("utf-8") if isinstance(item, str) else str(item).encode("utf-8")
        append(pack(len(item)))
        append(item)
    return b"".join(parts)


def raw_bytes(array: np.ndarray) -> tuple[Datatype, bytes]:
    """The protocol datatype and raw little-endian bytes of `array` (row-major)."""
    dt = datatype_of(array.dtype)
    if dt.name == "BYTES":
        return dt, join_bytes(array)
    if array.dtype.byteorder == ">":
        array = array.astype(dt.dtype)
    # tobytes() is the one unavoidable copy: protobuf bytes fields own their memory.
    return dt, array.tobytes(order="C")


def add_output(response: pb.ModelInferResponse, name: str, array: np.ndarray) -> None:
    """Append `array` as output `name`, in raw form (what tritonclient and Triton use)."""
    dt, data = raw_bytes(array)
    response.outputs.add(name=name, datatype=dt.name, shape=array.shape)
    response.raw_output_contents.append(data)


def add_raw_input(request: pb.ModelInferRequest, name: str, array: np.ndarray) -> None:
    """Append `array` as a raw input (clients, tests and benchmarks build requests with it)."""
    dt, data = raw_bytes(array)
    request.inputs.add(name=name, datatype=dt.name, shape=array.shape)
    request.raw_input_contents.append(data)


def typed_contents(array: np.ndarray) -> tuple[Datatype, pb.InferTensorContents]:
    """The typed-contents form of `array`; InvalidArgument for FP16/BF16, which have none."""
    dt = datatype_of(array.dtype)
    if dt.typed_field is None:
        raise InvalidArgument(f"{dt.name} has no typed contents form; use raw contents")
    contents = pb.InferTensorContents()
    flat = array.ravel(order="C")
    if dt.name == "BYTES":
        values = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in flat.tolist()]
    else:
        values = flat.tolist()
    getattr(contents, dt.typed_field).extend(values)
    return dt, contents
