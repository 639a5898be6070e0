"""Artifact inspection while the bytes stream past: format detection, the ONNX signature, and the
task of a task model (its manifest in the ONNX metadata, see aimaas.tasks), checked against the graph.

An ONNX model is a protobuf `ModelProto`. Its weights (graph initializers) can be gigabytes, so the
inspector walks the protobuf wire format incrementally, keeps only the small messages it needs
(graph inputs/outputs, opsets, initializer names) and skips everything else without buffering it.
Memory stays bounded whatever the artifact size, and a truncated or garbled artifact is detected
because the message structure does not close exactly at the end of the bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum, auto

from google.protobuf import json_format
from onnx import OperatorSetIdProto, TensorProto, ValueInfoProto

from aimaas.tasks import (
    FEATURE_EXTRACTION, IMAGE_GRAPH_INPUT, MANIFEST_KEY, TOKEN_CLASSIFICATION, TOKENIZER_KEY, InvalidTaskManifest,
    TaskManifest,
)
from aimaas.types.v1 import types_pb2

# TensorRT engines start with a 4-byte magic tag; seen values across TensorRT versions.
TENSORRT_MAGIC_TAGS = (b"ftrt", b"ptrt")

# ONNX element type → Open Inference Protocol datatype.
ONNX_TO_PROTOCOL_DATATYPE = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.STRING: "BYTES",
}

# Field numbers from onnx.proto (ModelProto, GraphProto, TensorProto, StringStringEntryProto).
_MODEL_IR_VERSION, _MODEL_PRODUCER_NAME, _MODEL_PRODUCER_VERSION, _MODEL_GRAPH, _MODEL_OPSET = 1, 2, 3, 7, 8
_MODEL_METADATA_PROPS = 14
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 5, 11, 12
_TENSOR_NAME = 8
_ENTRY_KEY, _ENTRY_VALUE = 1, 2

# Largest message kept whole (a graph input/output description, an opset entry, a name, a metadata
# value). Larger metadata values (a big tokenizer) are skipped; only their size is kept.
_MAX_CAPTURE_BYTES = 1 << 20


class InvalidArtifact(ValueError):
    """The bytes are not a model this registry accepts; the message says why."""


class _Frame(Enum):
    MODEL = auto()
    GRAPH = auto()
    INITIALIZER = auto()
    METADATA_ENTRY = auto()


@dataclass
class OnnxSummary:
    ir_version: int = 0
    producer: str = ""
    opsets: dict[str, int] = field(default_factory=dict)
    inputs: list[ValueInfoProto] = field(default_factory=list)
    outputs: list[ValueInfoProto] = field(default_factory=list)
    initializer_names: set[str] = field(default_factory=set)
    has_graph: bool = False
    # metadata_props: key -> value, or -> None when the value was too large to keep.
    metadata: dict[str, str | None] = field(default_factory=dict)
    metadata_sizes: dict[str, int] = field(default_factory=dict)


class OnnxStreamInspector:
    """Feed chunks with `feed`, then call `finish` once: a push parser over protobuf wire format."""

    def __init__(self) -> None:
        self.summary = OnnxSummary()
        self._buffer = bytearray()
        self._offset = 0  # absolute offset of _buffer[0]
        # (frame kind, absolute end offset or None for the top level)
        self._stack: list[tuple[_Frame, int | None]] = [(_Frame.MODEL, None)]
        self._skip = 0
        self._capture: tuple[_Frame, int, int] | None = None  # (frame, field, length)
        # The metadata entry being read: [key, value, value size].
        self._entry: list = [None, None, 0]
        self.error: str | None = None

    def feed(self, chunk: bytes) -> None:
        if self.error is not None:
            return
        if self._skip > len(chunk) and not self._buffer:
            # Fast path: the middle of a large initializer needs no copy. (Strictly inside: a skip that
            # ends with this chunk goes through _drain, which closes the frames ending there.)
            self._skip -= len(chunk)
            self._offset += len(chunk)
            return
        self._buffer += chunk
        try:
            self._drain()
        except InvalidArtifact as exc:
            self.error = str(exc)
            self._buffer.clear()

    def finish(self) -> OnnxSummary:
        if self.error is None and (self._skip or self._capture or self._buffer or len(self._stack) != 1):
            self.error = "the ONNX message is truncated"
        if self.error is None and not self.summary.has_graph:
            self.error = "no ONNX graph found"
        if self.error is None and self.summary.ir_version <= 0:
            self.error = "no ONNX IR version found"
        if self.error is None and not self.summary.outputs:
            self.error = "the ONNX graph declares no outputs"
        if self.error is not None:
            raise InvalidArtifact(self.error)
        return self.summary

    def _consume(self, count: int) -> bytes:
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        self._offset += count
        return data

    def _read_varint(self, start: int) -> tuple[int, int] | None:
        """(value, bytes used) of the varint at buffer index `start`, or None if incomplete."""
        value = 0
        for index in range(10):
            if start + index >= len(self._buffer):
                return None
            byte = self._buffer[start + index]
            value |= (byte & 0x7F) << (7 * index)
            if not byte & 0x80:
                return value, index + 1
        raise InvalidArtifact("malformed protobuf varint")

    def _drain(self) -> None:
        while True:
            if self._skip:
                step = min(self._skip, len(self._buffer))
                del self._buffer[:step]
                self._offset += step
                self._skip -= step
                if self._skip:
                    return
            if self._capture is not None:
                frame, number, length = self._capture
                if len(self._buffer) < length:
                    return
                self._capture = None
                self._handle_capture(frame, number, self._consume(length))
            self._pop_finished_frames()
            if not self._buffer:
                return
            tag = self._read_varint(0)
            if tag is None:
                return
            key, tag_size = tag
            number, wire_type = key >> 3, key & 7
            if number == 0:
                raise InvalidArtifact("invalid protobuf field number 0")
            frame, end = self._stack[-1]
            if wire_type == 0:
                parsed = self._read_varint(tag_size)
                if parsed is None:
                    return
                value, size = parsed
                self._consume(tag_size + size)
                if frame is _Frame.MODEL and number == _MODEL_IR_VERSION:
                    self.summary.ir_version = value
            elif wire_type in (1, 5):
                size = 8 if wire_type == 1 else 4
                if len(self._buffer) < tag_size + size:
                    return
                self._consume(tag_size + size)
            elif wire_type == 2:
                parsed = self._read_varint(tag_size)
                if parsed is None:
                    return
                length, size = parsed
                self._consume(tag_size + size)
                if end is not None and self._offset + length > end:
                    raise InvalidArtifact("a protobuf field overruns its enclosing message")
                self._start_field(frame, number, length)
            else:
                raise InvalidArtifact(f"unsupported protobuf wire type {wire_type}")
            if end is not None and self._offset > end:
                raise InvalidArtifact("a protobuf field overruns its enclosing message")

    def _pop_finished_frames(self) -> None:
        while len(self._stack) > 1 and self._stack[-1][1] == self._offset and not self._skip and self._capture is None:
            frame, _ = self._stack.pop()
            if frame is _Frame.METADATA_ENTRY:
                key, value, size = self._entry
                if key is not None:
                    self.summary.metadata[key] = value
                    self.summary.metadata_sizes[key] = size

    def _start_field(self, frame: _Frame, number: int, length: int) -> None:
        end = self._offset + length
        if frame is _Frame.MODEL and number == _MODEL_GRAPH:
            if self.summary.has_graph:
                raise InvalidArtifact("more than one ONNX graph")
            self.summary.has_graph = True
            self._stack.append((_Frame.GRAPH, end))
        elif frame is _Frame.GRAPH and number == _GRAPH_INITIALIZER:
            self._stack.append((_Frame.INITIALIZER, end))
        elif frame is _Frame.MODEL and number == _MODEL_METADATA_PROPS:
            self._entry = [None, None, 0]
            self._stack.append((_Frame.METADATA_ENTRY, end))
        elif frame is _Frame.METADATA_ENTRY and number == _ENTRY_VALUE and length > _MAX_CAPTURE_BYTES:
            self._entry[2] = length
            self._skip = length
        elif (frame, number) in _CAPTURED_FIELDS:
            if length > _MAX_CAPTURE_BYTES:
                raise InvalidArtifact("an ONNX graph input/output description is implausibly large")
            self._capture = (frame, number, length)
        else:
            self._skip = length

    def _handle_capture(self, frame: _Frame, number: int, data: bytes) -> None:
        try:
            if frame is _Frame.MODEL and number == _MODEL_OPSET:
                opset = OperatorSetIdProto.FromString(data)
                self.summary.opsets[opset.domain or "ai.onnx"] = opset.version
            elif frame is _Frame.MODEL and number in (_MODEL_PRODUCER_NAME, _MODEL_PRODUCER_VERSION):
                text = data.decode("utf-8")
                self.summary.producer = f"{self.summary.producer} {text}".strip()
            elif frame is _Frame.GRAPH and number == _GRAPH_INPUT:
                self.summary.inputs.append(ValueInfoProto.FromString(data))
            elif frame is _Frame.GRAPH and number == _GRAPH_OUTPUT:
                self.summary.outputs.append(ValueInfoProto.FromString(data))
            elif frame is _Frame.INITIALIZER and number == _TENSOR_NAME:
                self.summary.initializer_names.add(data.decode("utf-8"))
            elif frame is _Frame.METADATA_ENTRY and number == _ENTRY_KEY:
                self._entry[0] = data.decode("utf-8")
            elif frame is _Frame.METADATA_ENTRY and number == _ENTRY_VALUE:
                self._entry[1], self._entry[2] = data.decode("utf-8"), len(data)
        except (ValueError, UnicodeDecodeError) as exc:  # DecodeError is a ValueError subclass
            raise InvalidArtifact(f"malformed ONNX field: {exc}") from exc


_CAPTURED_FIELDS = {
    (_Frame.MODEL, _MODEL_OPSET),
    (_Frame.MODEL, _MODEL_PRODUCER_NAME),
    (_Frame.MODEL, _MODEL_PRODUCER_VERSION),
    (_Frame.GRAPH, _GRAPH_INPUT),
    (_Frame.GRAPH, _GRAPH_OUTPUT),
    (_Frame.INITIALIZER, _TENSOR_NAME),
    (_Frame.METADATA_ENTRY, _ENTRY_KEY),
    (_Frame.METADATA_ENTRY, _ENTRY_VALUE),
}


def _tensor_spec(value_info: ValueInfoProto) -> types_pb2.TensorSpec:
    tensor_type = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type"):
        raise InvalidArtifact(f"ONNX graph input/output {value_info.name!r} is not a tensor")
    datatype = ONNX_TO_PROTOCOL_DATATYPE.get(tensor_type.elem_type)
    if datatype is None:
        raise InvalidArtifact(
            f"ONNX tensor {value_info.name!r} has element type {tensor_type.elem_type}, which the "
            "Open Inference Protocol cannot carry"
        )
    shape = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim]
    return types_pb2.TensorSpec(name=value_info.name, datatype=datatype, shape=shape)


def onnx_signature(summary: OnnxSummary) -> types_pb2.Signature:
    # Before IR 4, initializers were also listed as graph inputs; they are not caller inputs.
    inputs = [vi for vi in summary.inputs if vi.name not in summary.initializer_names]
    return types_pb2.Signature(
        inputs=[_tensor_spec(vi) for vi in inputs], outputs=[_tensor_spec(vi) for vi in summary.outputs]
    )


def task_signature(summary: OnnxSummary) -> tuple[types_pb2.TaskSpec, types_pb2.Signature] | None:
    """The task and the served signature of a task model (its manifest in `aimaas.task`), checked
    against the graph; None for a plain tensor model. Raises InvalidArtifact with the reason."""
    if MANIFEST_KEY not in summary.metadata:
        return None
    raw = summary.metadata[MANIFEST_KEY]
    if raw is None:
        raise InvalidArtifact(f"the task manifest ({MANIFEST_KEY}) is implausibly large")
    try:
        manifest = TaskManifest.parse(raw)
    except InvalidTaskManifest as exc:
        raise InvalidArtifact(str(exc)) from None
    graph = onnx_signature(summary)
    inputs = {t.name: t for t in graph.inputs}
    outputs = {t.name: t for t in graph.outputs}
    label = f"the {manifest.task} graph"
    if manifest.is_text:
        if TOKENIZER_KEY not in summary.metadata:
            raise InvalidArtifact(f"the {manifest.task} model carries no tokenizer ({TOKENIZER_KEY}); re-import it with its tokenizer files")
        tokenizer = summary.metadata[TOKENIZER_KEY]
        if tokenizer is not None and not _looks_like_tokenizer(tokenizer):
            raise InvalidArtifact(f"the tokenizer ({TOKENIZER_KEY}) is not a Hugging Face tokenizer.json")
        if "input_ids" not in inputs:
            raise InvalidArtifact(f"{label} has no 'input_ids' input (its inputs: {', '.join(inputs) or 'none'})")
        expected_rank = {"input_ids": 2}
    else:
        if IMAGE_GRAPH_INPUT not in inputs:
            raise InvalidArtifact(f"{label} has no '{IMAGE_GRAPH_INPUT}' input (its inputs: {', '.join(inputs) or 'none'})")
        expected_rank = {IMAGE_GRAPH_INPUT: 4}
    unknown = set(inputs) - set(manifest.graph_inputs())
    if unknown:
        raise InvalidArtifact(f"{label} has inputs the node cannot feed: {', '.join(sorted(unknown))}")
    for name, rank in expected_rank.items():
        if len(inputs[name].shape) != rank:
            raise InvalidArtifact(f"{label}'s input '{name}' has rank {len(inputs[name].shape)}, not {rank}")
    output = outputs.get(manifest.graph_output())
    if output is None:
        raise InvalidArtifact(
            f"{label} has no '{manifest.graph_output()}' output (its outputs: {', '.join(outputs) or 'none'})"
        )
    rank = 3 if manifest.task == TOKEN_CLASSIFICATION else 2
    width = manifest.embedding_dimension if manifest.task == FEATURE_EXTRACTION else len(manifest.labels)
    if len(output.shape) != rank or output.shape[-1] not in (-1, width):
        raise InvalidArtifact(
            f"{label}'s output '{output.name}' has shape {list(output.shape)}, which does not fit "
            f"{width} {'dimensions' if manifest.task == FEATURE_EXTRACTION else 'labels'}"
        )
    served_inputs, served_outputs = manifest.served()
    signature = types_pb2.Signature(
        inputs=[types_pb2.TensorSpec(name=n, datatype=d, shape=s) for n, d, s in served_inputs],
        outputs=[types_pb2.TensorSpec(name=n, datatype=d, shape=s) for n, d, s in served_outputs],
    )
    return json_format.ParseDict(manifest.public(), types_pb2.TaskSpec()), signature


def _looks_like_tokenizer(text: str) -> bool:
    try:
        document = json.loads(text)
    except ValueError:
        return False
    return isinstance(document, dict) and isinstance(document.get("model"), dict)


@dataclass
class Inspection:
    format: int
    signature: types_pb2.Signature
    details: dict[str, str]
    task: types_pb2.TaskSpec | None = None


class ArtifactInspector:
    """Sees every chunk of an upload once; at the end tells the format, signature and details."""

    def __init__(self, declared_format: int) -> None:
        self._declared = declared_format
        self._head = bytearray()
        self._onnx = OnnxStreamInspector() if declared_format != types_pb2.MODEL_FORMAT_TENSORRT_PLAN else None
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if len(self._head) < 16:
            self._head += chunk[: 16 - len(self._head)]
        if self._onnx is not None:
            self._onnx.feed(chunk)

    def finish(self) -> Inspection:
        """What the artifact is; raises InvalidArtifact with the reason."""
        if self.size == 0:
            raise InvalidArtifact("the artifact is empty")
        looks_like_plan = bytes(self._head[:4]) in TENSORRT_MAGIC_TAGS
        if self._declared == types_pb2.MODEL_FORMAT_TENSORRT_PLAN:
            # A plan can only be fully checked by the TensorRT runtime of a matching GPU node.
            return Inspection(types_pb2.MODEL_FORMAT_TENSORRT_PLAN, types_pb2.Signature(), {})
        assert self._onnx is not None
        try:
            summary = self._onnx.finish()
        except InvalidArtifact as exc:
            if self._declared == types_pb2.MODEL_FORMAT_UNSPECIFIED and looks_like_plan:
                return Inspection(types_pb2.MODEL_FORMAT_TENSORRT_PLAN, types_pb2.Signature(), {})
            if self._declared == types_pb2.MODEL_FORMAT_ONNX:
                raise InvalidArtifact(f"not a valid ONNX model: {exc}") from exc
            raise InvalidArtifact(f"not a valid ONNX model or TensorRT plan: {exc}") from exc
        details = {"ir_version": str(summary.ir_version)}
        details.update({f"opset.{domain}": str(version) for domain, version in summary.opsets.items()})
        if summary.producer:
            details["producer"] = summary.producer
        task = task_signature(summary)
        if task is None:
            return Inspection(types_pb2.MODEL_FORMAT_ONNX, onnx_signature(summary), details)
        details["task"] = task[0].task
        if TOKENIZER_KEY in summary.metadata_sizes:
            details["tokenizer_bytes"] = str(summary.metadata_sizes[TOKENIZER_KEY])
        return Inspection(types_pb2.MODEL_FORMAT_ONNX, task[1], details, task[0])
