"""The task-model contract: what an imported Hugging Face model carries and what it serves.

A task model is one ONNX file (one immutable, content-addressed registry version like any other)
whose `metadata_props` hold:

- `aimaas.task`: the manifest (JSON of `TaskManifest`): task, label names, limits, and how inputs
  are pre-processed (tokenizer padding, image resizing and normalisation);
- `aimaas.tokenizer`: the Hugging Face `tokenizer.json` of text tasks.

The importer (aimaas.huggingface) writes both; the registry reads the manifest while the upload
streams past and records the task and the *served* signature; the inference node reads both from
the verified artifact and runs pre- and post-processing next to the graph; the gateway shapes
task JSON from the outputs. This module is the one definition all of them share, so it depends
on nothing heavier than pydantic.

Served signatures (Open Inference Protocol, every tensor batched on its first dimension, so stock
clients such as tritonclient call task models with BYTES inputs):

    text-classification   text BYTES[-1]  -> label BYTES[-1], score FP32[-1], scores FP32[-1,C], truncated BOOL[-1]
    token-classification  text BYTES[-1]  -> entities BYTES[-1] (JSON per text), truncated BOOL[-1]
    feature-extraction    text BYTES[-1]  -> embedding FP32[-1,D], tokens INT32[-1], truncated BOOL[-1]
    image-classification  image BYTES[-1] -> label BYTES[-1], score FP32[-1], scores FP32[-1,C]

The graph itself takes `input_ids`/`attention_mask`[/`token_type_ids`] (INT64 [batch, sequence])
or `pixel_values` (FP32 [batch, 3, H, W]) and returns `logits`, or `embedding` (pooled in the graph).
"""

from __future__ import annotations

import json
import pathlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TEXT_CLASSIFICATION = "text-classification"
TOKEN_CLASSIFICATION = "token-classification"
FEATURE_EXTRACTION = "feature-extraction"
IMAGE_CLASSIFICATION = "image-classification"
TASKS = (TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, FEATURE_EXTRACTION, IMAGE_CLASSIFICATION)
TEXT_TASKS = frozenset({TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, FEATURE_EXTRACTION})
Task = Literal["text-classification", "token-classification", "feature-extraction", "image-classification"]

MANIFEST_KEY = "aimaas.task"
TOKENIZER_KEY = "aimaas.tokenizer"
# Model config parameter (ModelConfig.parameters) in which a node publishes the public manifest.
CONFIG_PARAMETER = "aimaas.task"
# Bump when the meaning of a manifest field changes; nodes refuse manifests newer than they know.
MANIFEST_FORMAT = 1

# Graph tensor names the exporter writes and the node feeds.
TEXT_GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_GRAPH_INPUT = "pixel_values"
LOGITS = "logits"
EMBEDDING = "embedding"

# Served tensor names.
TEXT_INPUT = "text"
IMAGE_INPUT = "image"


class InvalidTaskManifest(ValueError):
    """The manifest is not one this version understands; the message says what is wrong."""


class MalformedOnnx(ValueError):
    """The bytes are not a well-formed ONNX ModelProto (read_onnx_metadata)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextProcessing(_Strict):
    """How texts become graph inputs: the tokenizer (in `aimaas.tokenizer`) truncates to the
    manifest's max_length and pads each batch to its longest text with this token."""

    pad_token: str = Field(min_length=1)
    pad_token_id: int = Field(ge=0)


class ImageProcessing(_Strict):
    """How an image becomes `pixel_values`, as the model's Hugging Face image processor does it:
    RGB, resized (to height x width, or its short side to `shortest_edge` then centre-cropped to
    height x width), scaled by `rescale_factor`, normalised by mean/std, channels first."""

    height: int = Field(ge=1, le=8192)
    width: int = Field(ge=1, le=8192)
    shortest_edge: int | None = Field(default=None, ge=1, le=8192)
    # PIL resampling filter number (2: bilinear, 3: bicubic), as in the processor's config.
    resample: int = Field(default=2, ge=0, le=5)
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _std_positive(self) -> ImageProcessing:
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("image std values must be positive")
        if (self.mean is None) != (self.std is None):
            raise ValueError("image mean and std go together")
        return self


class TaskManifest(_Strict):
    format: int = MANIFEST_FORMAT
    task: Task
    # Class names in score order (classification) or entity tags (token classification).
    labels: tuple[str, ...] = ()
    # How class scores are computed from logits (Hugging Face's function_to_apply).
    scores: Literal["softmax", "sigmoid", "none"] = "softmax"
    max_length: int = Field(default=0, ge=0)
    embedding_dimension: int = Field(default=0, ge=0)
    source: str = ""
    architecture: str = ""
    text: TextProcessing | None = None
    image: ImageProcessing | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TaskManifest:
        if self.format > MANIFEST_FORMAT:
            raise ValueError(f"manifest format {self.format} is newer than this version understands ({MANIFEST_FORMAT})")
        if self.task in TEXT_TASKS:
            if self.text is None:
                raise ValueError(f"a {self.task} model needs text processing (its tokenizer's padding)")
            if self.max_length < 2:
                raise ValueError(f"a {self.task} model needs max_length >= 2 tokens")
        elif self.image is None:
            raise ValueError(f"an {self.task} model needs image processing settings")
        if self.task != FEATURE_EXTRACTION and not self.labels:
            raise ValueError(f"a {self.task} model needs its label names")
        if self.task == FEATURE_EXTRACTION and self.embedding_dimension < 1:
            raise ValueError("a feature-extraction model needs its embedding_dimension")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("label names must be unique")
        return self

    @classmethod
    def parse(cls, raw: str | bytes) -> TaskManifest:
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or 'manifest'}: {error['msg']}" for error in exc.errors()
            )
            raise InvalidTaskManifest(f"invalid task manifest ({MANIFEST_KEY}): {problems}") from None

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @property
    def is_text(self) -> bool:
        return self.task in TEXT_TASKS

    def graph_inputs(self) -> tuple[str, ...]:
        """Graph inputs the node can feed for this task (a text graph needs input_ids and may take the others)."""
        return TEXT_GRAPH_INPUTS if self.is_text else (IMAGE_GRAPH_INPUT,)

    def graph_output(self) -> str:
        return EMBEDDING if self.task == FEATURE_EXTRACTION else LOGITS

    def served(self) -> tuple[list[TensorDef], list[TensorDef]]:
        """(inputs, outputs) of the served signature: (name, datatype, shape) with -1 dynamic."""
        classes = len(self.labels)
        if self.task == IMAGE_CLASSIFICATION:
            inputs = [(IMAGE_INPUT, "BYTES", (-1,))]
        else:
            inputs = [(TEXT_INPUT, "BYTES", (-1,))]
        truncated = ("truncated", "BOOL", (-1,))
        if self.task in (TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION):
            outputs = [("label", "BYTES", (-1,)), ("score", "FP32", (-1,)), ("scores", "FP32", (-1, classes))]
            if self.task == TEXT_CLASSIFICATION:
                outputs.append(truncated)
        elif self.task == TOKEN_CLASSIFICATION:
            outputs = [("entities", "BYTES", (-1,)), truncated]
        else:
            outputs = [("embedding", "FP32", (-1, self.embedding_dimension)), ("tokens", "INT32", (-1,)), truncated]
        return inputs, outputs

    def public(self) -> dict:
        """The fields callers see (the registry's TaskSpec, the node's model config): no processing details."""
        document = {
            "task": self.task, "labels": list(self.labels), "max_length": self.max_length,
            "embedding_dimension": self.embedding_dimension, "multi_label": self.scores == "sigmoid",
            "source": self.source, "architecture": self.architecture,
        }  # fmt: skip
        if self.image is not None:
            document["image_height"], document["image_width"] = self.image.height, self.image.width
        return {key: value for key, value in document.items() if value not in ("", 0, [], False)}


TensorDef = tuple[str, str, tuple[int, ...]]


def public_json(manifest: TaskManifest) -> str:
    return json.dumps(manifest.public(), separators=(",", ":"))


# ------------------------------------------------------------------------------ ONNX metadata


def read_onnx_metadata(path: pathlib.Path | str, keys: frozenset[str] | None = None) -> dict[str, str]:
    """`metadata_props` of an ONNX file (only `keys`, if given), read by seeking past the graph.

    ModelProto's fields are walked at the top level only: the graph (with its weights) is one
    length-delimited field that is skipped with a seek, so this costs a few reads whatever the
    model's size. Raises MalformedOnnx when the bytes are not a well-formed ModelProto.
    """
    found: dict[str, str] = {}
    with open(path, "rb") as stream:
        size = stream.seek(0, 2)
        stream.seek(0)
        while stream.tell() < size:
            key = _read_varint(stream)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _read_varint(stream)
            elif wire_type == 1:
                stream.seek(8, 1)
            elif wire_type == 5:
                stream.seek(4, 1)
            elif wire_type == 2:
                length = _read_varint(stream)
                if stream.tell() + length > size:
                    raise MalformedOnnx("the ONNX file is truncated")
                if number == _MODEL_METADATA_PROPS:
                    entry_key, value = _metadata_entry(stream.read(length))
                    if keys is None or entry_key in keys:
                        found[entry_key] = value
                else:
                    stream.seek(length, 1)
            else:
                raise MalformedOnnx(f"the ONNX file has an unsupported protobuf wire type {wire_type}")
    return found


_MODEL_METADATA_PROPS = 14


def _read_varint(stream) -> int:
    value = 0
    for index in range(10):
        byte = stream.read(1)
        if not byte:
            raise MalformedOnnx("the ONNX file is truncated")
        value |= (byte[0] & 0x7F) << (7 * index)
        if not byte[0] & 0x80:
            return value
    raise MalformedOnnx("the ONNX file has a malformed varint")


def _metadata_entry(data: bytes) -> tuple[str, str]:
    """(key, value) of a StringStringEntryProto."""
    from onnx import StringStringEntryProto

    try:
        entry = StringStringEntryProto.FromString(data)
    except ValueError as exc:
        raise MalformedOnnx(f"malformed ONNX metadata entry: {exc}") from None
    return entry.key, entry.value
