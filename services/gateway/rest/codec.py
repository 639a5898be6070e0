"""REST tensor codec of the Open Inference Protocol: JSON (+ binary tensor data extension) <-> protobuf.

The REST edge converts every request into the same `inference.ModelInferRequest` the gRPC edge
forwards, and every `ModelInferResponse` back, so both transports share one data plane.

Request body: a JSON object, optionally followed by binary tensor data. With the header
`Inference-Header-Content-Length: N` the first N bytes are the JSON and the rest holds, in input
order, the raw bytes of every input whose `parameters.binary_data_size` is set (BYTES elements each
prefixed by a 4-byte little-endian length, exactly the gRPC raw form). Every input travels to the
node as raw contents: JSON `data` is converted with numpy in one vectorised step per tensor, which
also gives FP16 and BF16 (no typed protobuf form) a JSON form.

Response: outputs requested with `parameters.binary_data: true` (or all, with request parameter
`binary_data_output: true`) are appended after the JSON in output order, each announced by
`parameters.binary_data_size`, and the JSON length goes into `Inference-Header-Content-Length`.

Datatypes and numpy forms come from services.inference.tensors (the one datatype table). Every
malformed request becomes InvalidArgument with a message naming the field, never another exception.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidArgument
from services.inference import tensors

HEADER_LENGTH = "inference-header-content-length"
# REST-only parameters: they shape the HTTP encoding and are not forwarded to the node.
_BINARY_DATA = "binary_data"
_BINARY_DATA_SIZE = "binary_data_size"
_BINARY_DATA_OUTPUT = "binary_data_output"
_TIMEOUT = "timeout"  # request parameter (tritonclient), in microseconds
_UNSUPPORTED_PARAMS = ("classification", "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_MAX_RANK = 64
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1
_INTEGER_KINDS = "iu"
_FLOAT_KINDS = "iuf"


@dataclass(slots=True)
class DecodedRequest:
    """A ModelInferRequest plus what only the REST encoding of its response needs."""

    request: pb.ModelInferRequest
    # All outputs in binary form (request parameter binary_data_output).
    binary_all: bool = False
    # Per requested output: its binary_data parameter (overrides binary_all).
    binary_outputs: dict[str, bool] = field(default_factory=dict)
    # The request's own timeout (parameter `timeout`, microseconds), in seconds.
    timeout_s: float | None = None
    # Every input came as binary data (none as JSON `data`).
    all_binary: bool = False


@dataclass(slots=True)
class EncodedResponse:
    body: bytes
    # Length of the JSON part when binary data follows it (the Inference-Header-Content-Length).
    header_length: int | None


# ------------------------------------------------------------------------------------ decoding


def parse_header_length(value: str | None, body_size: int) -> int | None:
    """The Inference-Header-Content-Length header as an int within the body, or None when absent."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise InvalidArgument(f"Inference-Header-Content-Length must be a non-negative integer, got {value[:40]!r}")
    length = int(text)
    if length > body_size:
        raise InvalidArgument(
            f"Inference-Header-Content-Length is {length} but the request body holds only {body_size} bytes"
        )
    return length


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body with its Content-Encoding (gzip, deflate; as tritonclient sends) undone, at most `limit` bytes."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    kind = encoding.strip().lower()
    if kind == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif kind == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise InvalidArgument(f"unsupported Content-Encoding {encoding[:40]!r} (use gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits)
    try:
        # max_length bounds the output, so a small "zip bomb" cannot exhaust memory.
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidArgument(f"request body is not valid {kind} data: {exc}") from None
    if len(data) > limit:
        raise BodyTooLargeAfterDecoding(limit)
    if not inflater.eof:
        raise InvalidArgument(f"request body is truncated {kind} data")
    return data


class BodyTooLargeAfterDecoding(Exception):
    """The decompressed body exceeds the body limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"decompressed request body exceeds the limit of {limit} bytes")
        self.limit = limit


def decode_infer_request(
    body: bytes, header_length: int | None, *, model: str, version: str
) -> DecodedRequest:
    """Parse an inference request body into a ModelInferRequest for `model` / `version`."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        header, binary = body[:header_length], memoryview(body)[header_length:]
    document = _load_json(header)
    if not isinstance(document, dict):
        raise InvalidArgument("inference request must be a JSON object")
    unknown = sorted(set(document) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise InvalidArgument(f"inference request has unknown field(s): {', '.join(unknown)[:200]}")

    request = pb.ModelInferRequest(model_name=model, model_version=version)
    decoded = DecodedRequest(request=request)
    request_id = document.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise InvalidArgument("'id' must be a string")
        request.id = request_id

    parameters = _object(document.get("parameters"), "request 'parameters'")
    binary_all = parameters.pop(_BINARY_DATA_OUTPUT, False)
    if not isinstance(binary_all, bool):
        raise InvalidArgument("request parameter 'binary_data_output' must be a boolean")
    decoded.binary_all = binary_all
    timeout = parameters.get(_TIMEOUT)
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise InvalidArgument("request parameter 'timeout' must be a non-negative integer (microseconds)")
        if timeout > 0:
            decoded.timeout_s = timeout / 1e6
    _set_parameters(request.parameters, parameters, "request")

    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("'inputs' must be a non-empty list of input tensors")
    offset = 0
    names: set[str] = set()
    for index, item in enumerate(inputs):
        offset = _decode_input(request, item, index, names, binary, offset)
    if offset != len(binary):
        raise InvalidArgument(
            f"request body has {len(binary) - offset} bytes of binary data that no input claims "
            "(check the inputs' binary_data_size and Inference-Header-Content-Length)"
        )
    decoded.all_binary = all("data" not in item for item in inputs)  # each input was checked to have one form

    outputs = document.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidArgument("'outputs' must be a list of requested outputs")
        seen: set[str] = set()
        for index, item in enumerate(outputs):
            if not isinstance(item, dict):
                raise InvalidArgument(f"output {index} must be a JSON object")
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidArgument(f"output {index} needs a non-empty string 'name'")
            if name in seen:
                raise InvalidArgument(f"output '{name}' is requested more than once")
            seen.add(name)
            extra = sorted(set(item) - {"name", "parameters"})
            if extra:
                raise InvalidArgument(f"output '{name}' has unknown field(s): {', '.join(extra)[:200]}")
            out_params = _object(item.get("parameters"), f"output '{name}' parameters")
            binary = out_params.pop(_BINARY_DATA, None)
            if binary is not None:
                if not isinstance(binary, bool):
                    raise InvalidArgument(f"output '{name}' parameter 'binary_data' must be a boolean")
                decoded.binary_outputs[name] = binary
            tensor = request.outputs.add(name=name)
            _set_parameters(tensor.parameters, out_params, f"output '{name}'")
    return decoded


@dataclass(slots=True)
class _Template:
    request: pb.ModelInferRequest  # without model, version and tensor data
    binary_sizes: tuple[int, ...]  # per input, in order
    binary_all: bool
    binary_outputs: dict[str, bool]
    timeout_s: float | None


class RequestDecoder:
    """decode_infer_request, remembering the decoded form of recent all-binary JSON headers.

    A client sending the binary extension repeats the same JSON header for every request of one
    shape (tritonclient does): names, datatypes, shapes and sizes, with the tensor bytes after it.
    For such a header seen before, decoding is a copy of the remembered request plus the new bytes,
    instead of a JSON parse and a check of every field. Only headers whose inputs are all binary
    and fixed-size are remembered (JSON `data` makes every header new; BYTES elements need a check
    of their length prefixes); any request that does not match its template exactly (its binary
    part's length) is decoded in full, so errors read as they always do.
    """

    def __init__(self, max_entries: int = 256, max_header_bytes: int = 4096) -> None:
        self._templates: dict[bytes, _Template] = {}
        self._max_entries = max_entries
        self._max_header_bytes = max_header_bytes

    def decode(self, body: bytes, header_length: int | None, *, model: str, version: str) -> DecodedRequest:
        if header_length is None or header_length > self._max_header_bytes:
            return decode_infer_request(body, header_length, model=model, version=version)
        header = body[:header_length]
        template = self._templates.get(header)
        if template is not None and sum(template.binary_sizes) == len(body) - header_length:
            request = pb.ModelInferRequest()
            request.CopyFrom(template.request)
            request.model_name = model
            request.model_version = version
            offset = header_length
            contents = []
            for size in template.binary_sizes:
                contents.append(body[offset:offset + size])
                offset += size
            request.raw_input_contents.extend(contents)
            return DecodedRequest(request=request, binary_all=template.binary_all,
                                  binary_outputs=dict(template.binary_outputs), timeout_s=template.timeout_s,
                                  all_binary=True)
        decoded = decode_infer_request(body, header_length, model=model, version=version)
        if template is None:
            self._remember(header, decoded)
        return decoded

    def _remember(self, header: bytes, decoded: DecodedRequest) -> None:
        request = decoded.request
        if not decoded.all_binary or request.id or any(tensor.datatype == "BYTES" for tensor in request.inputs):
            return  # JSON data or an id make every header new; BYTES prefixes are checked per request
        sizes = tuple(len(raw) for raw in request.raw_input_contents)
        if len(self._templates) >= self._max_entries:
            del self._templates[next(iter(self._templates))]  # the oldest
        stripped = pb.ModelInferRequest()
        stripped.CopyFrom(request)
        stripped.ClearField("model_name")
        stripped.ClearField("model_version")
        stripped.ClearField("raw_input_contents")
        self._templates[header] = _Template(stripped, sizes, decoded.binary_all, dict(decoded.binary_outputs),
                                            decoded.timeout_s)


def _load_json(data: bytes | memoryview) -> Any:
    try:
        return json.loads(bytes(data))
    except RecursionError:
        raise InvalidArgument("inference request JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"inference request is not valid JSON: {str(exc)[:200]}") from None


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return dict(value)


def _set_parameters(target: Any, values: dict, what: str) -> None:
    for key, value in values.items():
        if key in _UNSUPPORTED_PARAMS:
            raise InvalidArgument(f"{what} parameter '{key}' is not supported by this server")
        if key in (_BINARY_DATA, _BINARY_DATA_SIZE, _BINARY_DATA_OUTPUT):
            raise InvalidArgument(f"parameter '{key}' is not valid on the {what}")
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            if -(2**63) <= value <= _INT64_MAX:
                slot.int64_param = value
            elif 0 <= value <= _UINT64_MAX:
                slot.uint64_param = value
            else:
                raise InvalidArgument(f"{what} parameter '{key}' is outside the 64-bit integer range")
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise InvalidArgument(f"{what} parameter '{key}' must be a boolean, number or string")


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise InvalidArgument(f"input '{name}' needs 'shape', a list of non-negative integers")
    if len(value) > _MAX_RANK:
        raise InvalidArgument(f"input '{name}' has {len(value)} dimensions; at most {_MAX_RANK} are supported")
    for dim in value:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0 or dim > _INT64_MAX:
            raise InvalidArgument(f"input '{name}' shape {str(value)[:100]} must hold non-negative integers")
    return tuple(value)


def _decode_input(
    request: pb.ModelInferRequest, item: Any, index: int, names: set[str], binary: memoryview, offset: int
) -> int:
    if not isinstance(item, dict):
        raise InvalidArgument(f"input {index} must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"input {index} needs a non-empty string 'name'")
    if name in names:
        raise InvalidArgument(f"input '{name}' appears more than once in the request")
    names.add(name)
    extra = sorted(set(item) - {"name", "shape", "datatype", "parameters", "data"})
    if extra:
        raise InvalidArgument(f"input '{name}' has unknown field(s): {', '.join(extra)[:200]}")
    datatype_name = item.get("datatype")
    dt = tensors.DATATYPES.get(datatype_name) if isinstance(datatype_name, str) else None
    if dt is None:
        raise InvalidArgument(
            f"input '{name}' has unknown datatype {str(datatype_name)[:40]!r} "
            f"(expected one of {', '.join(tensors.DATATYPES)})"
        )
    dims = _shape(item.get("shape"), name)
    count = math.prod(dims)
    parameters = _object(item.get("parameters"), f"input '{name}' parameters")
    size = parameters.pop(_BINARY_DATA_SIZE, None)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"input '{name}' binary_data_size must be a non-negative integer")
        if "data" in item:
            raise InvalidArgument(f"input '{name}' has both 'data' and binary_data_size; send one of them")
        end = offset + size
        if end > len(binary):
            raise InvalidArgument(
                f"input '{name}' declares binary_data_size {size} but only {len(binary) - offset} bytes of "
                "binary data remain after the JSON header (check Inference-Header-Content-Length)"
            )
        raw = bytes(binary[offset:end])
        if dt.name == "BYTES":
            # Length prefixes checked with the node's own rules (per element by nature).
            tensors.decode_raw(name, dt.name, dims, raw)
        elif size != count * dt.dtype.itemsize:
            raise InvalidArgument(
                f"input '{name}': binary_data_size is {size} bytes but shape {tensors.format_shape(dims)} of "
                f"{dt.name} needs {count * dt.dtype.itemsize} bytes"
            )
        offset = end
    else:
        if "data" not in item:
            raise InvalidArgument(f"input '{name}' needs 'data' (or parameters.binary_data_size with binary data)")
        raw = _json_data_to_raw(name, dt, dims, count, item["data"])
    tensor = request.inputs.add(name=name, datatype=dt.name, shape=dims)
    _set_parameters(tensor.parameters, parameters, f"input '{name}'")
    request.raw_input_contents.append(raw)
    return offset


def _json_data_to_raw(name: str, dt: tensors.Datatype, dims: tuple[int, ...], count: int, data: Any) -> bytes:
    """The raw bytes of one input given as JSON `data` (flat or nested, row-major)."""
    if not isinstance(data, list):
        raise InvalidArgument(f"input '{name}' data must be a list (flat or nested by shape)")
    if dt.name == "BYTES":
        return _json_bytes(name, data, count)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        array = None
    if array is None or array.dtype.kind not in "biuf":
        raise InvalidArgument(
            f"input '{name}' data must be a regular (non-ragged) array of {dt.name} values, "
            "flat or nested by shape"
        )
    if array.size != count:
        raise InvalidArgument(
            f"input '{name}' data holds {array.size} values but shape {tensors.format_shape(dims)} needs {count}"
        )
    kind = array.dtype.kind
    if dt.name == "BOOL":
        if kind != "b" and array.size:
            raise InvalidArgument(f"input '{name}' of datatype BOOL needs true/false values")
    elif dt.dtype.kind in _INTEGER_KINDS:
        if array.size:
            if kind == "f" and dt.name == "UINT64":
                # numpy infers float64 for ints beyond int64 (precision lost): convert exactly instead.
                array = _exact_uint64(name, data, array)
                kind = "u"
            if kind not in _INTEGER_KINDS:
                raise InvalidArgument(f"input '{name}' of datatype {dt.name} needs integer values")
            info = np.iinfo(dt.dtype)
            # Compare as Python ints: mixing int64 and uint64 bounds in numpy would go through float.
            if int(array.min()) < info.min or int(array.max()) > info.max:
                raise InvalidArgument(
                    f"input '{name}' holds values outside the range of {dt.name} [{info.min}, {info.max}]"
                )
    elif kind not in _FLOAT_KINDS and array.size:
        raise InvalidArgument(f"input '{name}' of datatype {dt.name} needs numeric values")
    return array.astype(dt.dtype, copy=False).tobytes()


def _exact_uint64(name: str, data: list, inferred: np.ndarray) -> np.ndarray:
    try:
        exact = np.array(data, dtype=np.uint64)
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(f"input '{name}' holds values outside the range of UINT64 [0, {_UINT64_MAX}]") from None
    # A fraction (1.5) or a negative float would have been truncated or wrapped: refuse it.
    if not np.array_equal(exact.astype(np.float64), inferred):
        raise InvalidArgument(f"input '{name}' of datatype UINT64 needs integer values in [0, {_UINT64_MAX}]")
    return exact


def _json_bytes(name: str, data: list, count: int) -> bytes:
    # BYTES elements are JSON strings (UTF-8 on the wire); flattening nested lists is per element
    # by nature, as is the length prefix of each element.
    flat: list[bytes] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) >= _MAX_RANK:
                    raise InvalidArgument(f"input '{name}' data is nested deeper than {_MAX_RANK} levels")
                stack.append(iter(value))
                break
            if not isinstance(value, str):
                raise InvalidArgument(f"input '{name}' of datatype BYTES needs string values")
            if len(flat) >= count:
                raise InvalidArgument(f"input '{name}' data holds more than the {count} values its shape needs")
            flat.append(value.encode("utf-8", "surrogatepass"))
        else:
            stack.pop()
    if len(flat) != count:
        raise InvalidArgument(f"input '{name}' data holds {len(flat)} values but its shape needs {count}")
    array = np.empty(count, dtype=object)
    array[:] = flat
    return tensors.join_bytes(array)


# ------------------------------------------------------------------------------------ encoding


def encode_infer_response(response: pb.ModelInferResponse, decoded: DecodedRequest) -> EncodedResponse:
    """The REST body of `response`, with binary outputs after the JSON where requested."""
    raw_contents = response.raw_output_contents
    binary_outputs = decoded.binary_outputs
    binary_all = decoded.binary_all
    outputs: list[dict] = []
    blobs: list[bytes] = []
    for index, tensor in enumerate(response.outputs):
        name = tensor.name
        shape = list(tensor.shape)
        if raw_contents:
            raw = raw_contents[index] if index < len(raw_contents) else b""
        else:
            raw = _typed_to_raw(tensor)
        entry: dict[str, Any] = {"name": name, "datatype": tensor.datatype, "shape": shape}
        parameters = parameters_to_json(tensor.parameters) if tensor.parameters else {}
        if binary_outputs.get(name, binary_all):
            parameters[_BINARY_DATA_SIZE] = len(raw)
            blobs.append(raw)
        else:
            entry["data"] = _raw_to_json(name, tensor.datatype, shape, raw)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = parameters_to_json(response.parameters)
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return EncodedResponse(body=header, header_length=None)
    return EncodedResponse(body=b"".join([header, *blobs]), header_length=len(header))


def _typed_to_raw(tensor: pb.ModelInferResponse.InferOutputTensor) -> bytes:
    array = tensors.decode_typed(tensor.name, tensor.datatype, tensor.shape, tensor.contents)
    return tensors.raw_bytes(array)[1]


def _raw_to_json(name: str, datatype_name: str, shape: list[int], raw: bytes) -> list:
    array = tensors.decode_raw(name, datatype_name, shape, raw).ravel()
    if datatype_name == "BYTES":
        try:
            return [item.decode("utf-8") for item in array.tolist()]
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"output '{name}' holds BYTES that are not UTF-8 text; request it with "
                "parameters.binary_data: true"
            ) from None
    if datatype_name == "BF16":
        array = array.astype(np.float32)
    return array.tolist()


def parameters_to_json(parameters: Any) -> dict[str, Any]:
    """An InferParameter map as a plain JSON object."""
    result: dict[str, Any] = {}
    for key, value in parameters.items():
        which = value.WhichOneof("parameter_choice")
        result[key] = getattr(value, which) if which else None
    return result


# ----------------------------------------------------------------------- other protocol messages


def message_to_json(message: Any) -> dict[str, Any]:
    """A protobuf message as JSON with numbers kept numeric (MessageToDict turns 64-bit ints into strings)."""
    result: dict[str, Any] = {}
    for descriptor in message.DESCRIPTOR.fields:
        value = getattr(message, descriptor.name)
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            value_field = descriptor.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                result[descriptor.name] = {k: message_to_json(v) for k, v in value.items()}
            else:
                result[descriptor.name] = dict(value)
        elif descriptor.is_repeated:
            if descriptor.message_type is not None:
                result[descriptor.name] = [message_to_json(item) for item in value]
            else:
                result[descriptor.name] = list(value)
        elif descriptor.message_type is not None:
            result[descriptor.name] = message_to_json(value)
        else:
            result[descriptor.name] = value
    return result


def metadata_to_json(metadata: pb.ModelMetadataResponse) -> dict[str, Any]:
    return {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in metadata.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in metadata.outputs],
    }
