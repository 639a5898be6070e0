"""Task models (aimaas.tasks): text or images in, labels, entities or embeddings out.

`TaskBackend` wraps the backend that runs the graph (ONNX Runtime, or TensorRT on a GPU node) and
adds the model's pre- and post-processing next to it, so both are batched with the model:

- Text: each request is checked on the event loop (`prepare_request`: no empty text, and with
  `truncation: false` no text over max_length); the merged batch is tokenized at once on the
  model's thread (the `tokenizers` library, its Rust core) and padded per batch, not per request:
  its texts run in groups of similar length (`length_groups`), each padded to its longest text, so
  short texts merged with long ones do not pay for their padding. A text over max_length is
  truncated and says so (`truncated`).
- Images: each request's images are decoded, resized and normalised per request off the event loop
  (Pillow, on the data plane's preprocessing threads), so a bad image fails only its own request
  and decoding runs in parallel with the model; the batch merges fixed-size `pixel_values`.
- Post-processing turns logits into scores (softmax or sigmoid as the model's config says), the top
  label, entities grouped as Hugging Face's "simple" aggregation does, or returns the embedding the
  graph pooled.

The served signature is the manifest's (aimaas.tasks); the graph's own tensors stay internal.
"""

from __future__ import annotations

import io
import json
import pathlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from aimaas.tasks import (
    FEATURE_EXTRACTION,
    IMAGE_CLASSIFICATION,
    IMAGE_INPUT,
    MANIFEST_KEY,
    TEXT_INPUT,
    TOKEN_CLASSIFICATION,
    TOKENIZER_KEY,
    InvalidTaskManifest,
    MalformedOnnx,
    TaskManifest,
    read_onnx_metadata,
)
from services.common.errors import InvalidArgument
from services.inference.backends.base import Backend, BackendLoadError, LoadOptions, Runner, TensorInfo

if TYPE_CHECKING:
    from services.common.objectstore.base import ObjectStore

# Formats Pillow may decode for an image request (no PDF, EPS or other formats that run code paths
# nobody asked for).
_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Larger images are refused before decoding (Pillow's decompression-bomb guard, made an error).
_MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# Padding tokens a length group may add whatever its size (about the cost of one more execution).
_PADDING_ALLOWANCE_TOKENS = 32
# Counting the tokens of more text than this (truncation refused) runs off the event loop.
_TEXT_ON_LOOP_CHARS = 16 * 1024


def read_task(artifact: pathlib.Path) -> tuple[TaskManifest, str | None] | None:
    """(manifest, tokenizer JSON) of a task model's ONNX file; None for a plain tensor model, and for
    bytes that are no well-formed ONNX file (the backend's load then says what is wrong with them)."""
    try:
        metadata = read_onnx_metadata(artifact, frozenset({MANIFEST_KEY, TOKENIZER_KEY}))
    except MalformedOnnx:
        return None
    raw = metadata.get(MANIFEST_KEY)
    if raw is None:
        return None
    manifest = TaskManifest.parse(raw)
    tokenizer = metadata.get(TOKENIZER_KEY)
    if manifest.is_text and not tokenizer:
        raise InvalidTaskManifest(f"the {manifest.task} model carries no tokenizer ({TOKENIZER_KEY})")
    return manifest, tokenizer


class TaskBackend(Backend):
    """See the module docstring. `inner` runs the graph; this class owns everything around it."""

    name: ClassVar[str] = "task"
    platform: ClassVar[str] = "aimaas_task"

    def __init__(self, inner: Backend, manifest: TaskManifest, tokenizer_json: str | None) -> None:
        self.inner = inner
        self.manifest = manifest
        # Reported as the graph's backend: placement, statistics and model config name what runs it.
        self.name = inner.name  # type: ignore[misc]
        self.platform = inner.platform  # type: ignore[misc]
        self.bytes_as_text = manifest.is_text  # type: ignore[misc]
        inputs, outputs = manifest.served()
        self.inputs = [TensorInfo(n, d, s) for n, d, s in inputs]
        self.outputs = [TensorInfo(n, d, s) for n, d, s in outputs]
        self._tokenizer_json = tokenizer_json
        self._tokenizer: Any = None
        self._untruncated: Any = None
        self._feeds: tuple[str, ...] = ()
        self._labels = np.array(manifest.labels, dtype=object)

    @property
    def providers(self) -> list[str]:
        return list(getattr(self.inner, "providers", ()))

    @classmethod
    def probe(cls) -> str | None:
        return None

    # ------------------------------------------------------------------------------ loading

    def load(self, artifact: pathlib.Path, options: LoadOptions) -> None:
        self.inner.load(artifact, options)
        self._setup()

    async def load_shared(
        self, artifact: pathlib.Path, options: LoadOptions, *, store: ObjectStore, sha256: str, run: Runner
    ) -> str | None:
        shared = await self.inner.load_shared(artifact, options, store=store, sha256=sha256, run=run)
        if shared is not None:
            await run(self._setup)
        return shared

    def _setup(self) -> None:
        manifest = self.manifest
        graph_inputs = {t.name: t for t in self.inner.inputs}
        unknown = set(graph_inputs) - set(manifest.graph_inputs())
        if unknown:
            raise BackendLoadError(f"the {manifest.task} graph has inputs the node cannot feed: {', '.join(sorted(unknown))}")
        if manifest.graph_output() not in {t.name for t in self.inner.outputs}:
            raise BackendLoadError(f"the {manifest.task} graph has no '{manifest.graph_output()}' output")
        self._feeds = tuple(name for name in manifest.graph_inputs() if name in graph_inputs)
        if manifest.is_text:
            if "input_ids" not in graph_inputs:
                raise BackendLoadError(f"the {manifest.task} graph has no 'input_ids' input")
            self._tokenizer = self._build_tokenizer(truncate=True)
            self._untruncated = self._build_tokenizer(truncate=False)

    def _build_tokenizer(self, *, truncate: bool) -> Any:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise BackendLoadError(f"the tokenizers library is not installed ({exc})") from exc
        assert self._tokenizer_json is not None and self.manifest.text is not None
        try:
            tokenizer = Tokenizer.from_str(self._tokenizer_json)
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions
            raise BackendLoadError(f"the model's tokenizer cannot be loaded: {exc}") from exc
        if truncate:
            tokenizer.enable_truncation(self.manifest.max_length)
        else:
            tokenizer.no_truncation()
        tokenizer.no_padding()  # each batch is padded per length group (length_groups)
        return tokenizer

    def max_rows(self) -> int | None:
        return self.inner.max_rows()

    def sample_inputs(self) -> dict[str, np.ndarray]:
        if self.manifest.is_text:
            return {TEXT_INPUT: np.array(["warm up"], dtype=object)}
        image = self.manifest.image
        assert image is not None
        return {IMAGE_INPUT: np.zeros((1, 3, image.height, image.width), dtype=np.float32)}

    def unload(self) -> None:
        self.inner.unload()
        self._tokenizer = self._untruncated = None

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes()

    # ------------------------------------------------------------------------------ per request

    def prepare_off_loop(self, inputs: list[np.ndarray], parameters: Mapping[str, Any]) -> bool:
        # Images are decoded on the preprocessing threads; texts are checked on the loop, unless
        # refused truncation means counting the tokens of much text.
        if not self.manifest.is_text:
            return True
        return _refuses_truncation(parameters) and sum(len(t) for t in inputs[0].flat) > _TEXT_ON_LOOP_CHARS

    def prepare_request(self, inputs: list[np.ndarray], parameters: Mapping[str, Any]) -> list[np.ndarray]:
        """Check (text) or decode (images) one request's inputs; InvalidArgument names the element."""
        if not self.manifest.is_text:
            return [self._decode_images(inputs[0])]
        texts = inputs[0]
        if texts.ndim != 1:
            raise InvalidArgument(f"input '{TEXT_INPUT}' must be a list of texts (shape [n]), got shape {list(texts.shape)}")
        for index, text in enumerate(texts.tolist()):
            if not text.strip():
                raise InvalidArgument(f"input '{TEXT_INPUT}': text {index} is empty")
        if _refuses_truncation(parameters):
            limit = self.manifest.max_length
            for index, encoding in enumerate(self._untruncated.encode_batch(texts.tolist())):
                if len(encoding.ids) > limit:
                    raise InvalidArgument(
                        f"input '{TEXT_INPUT}': text {index} has {len(encoding.ids)} tokens, more than the model's "
                        f"maximum of {limit}; shorten it or allow truncation"
                    )
        return inputs

    def _decode_images(self, images: np.ndarray) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if images.ndim != 1:
            raise InvalidArgument(f"input '{IMAGE_INPUT}' must be a list of images (shape [n]), got shape {list(images.shape)}")
        spec = self.manifest.image
        assert spec is not None
        pixels = np.empty((len(images), 3, spec.height, spec.width), dtype=np.float32)
        for index, data in enumerate(images.tolist()):
            try:
                with Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS) as opened:
                    if opened.width * opened.height > _MAX_IMAGE_PIXELS:
                        raise InvalidArgument(
                            f"input '{IMAGE_INPUT}': image {index} has {opened.width}x{opened.height} pixels, more than "
                            f"the {_MAX_IMAGE_PIXELS} allowed"
                        )
                    image = opened.convert("RGB")
            except InvalidArgument:
                raise
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
                raise InvalidArgument(
                    f"input '{IMAGE_INPUT}': element {index} is not a readable image "
                    f"({', '.join(f.lower() for f in _IMAGE_FORMATS)}): {exc}"
                ) from None
            pixels[index] = _pixel_values(image, spec)
        return pixels

    # ------------------------------------------------------------------------------ per batch

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        manifest = self.manifest
        graph_output = manifest.graph_output()
        if manifest.task == IMAGE_CLASSIFICATION:
            logits = self.inner.infer({"pixel_values": inputs[IMAGE_INPUT]}, [graph_output])[graph_output]
            produced = self._classify(logits)
        else:
            texts = inputs[TEXT_INPUT].tolist()
            encodings = self._tokenizer.encode_batch(texts)
            lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
            rows: list[Any] = [None] * len(encodings)
            for group in length_groups(lengths):
                result = self.inner.infer(self._feed(encodings, group, int(lengths[group].max())), [graph_output])
                for row, index in enumerate(group):
                    rows[index] = result[graph_output][row]
            if manifest.task == FEATURE_EXTRACTION:
                produced = {"embedding": np.stack(rows).astype(np.float32, copy=False), "tokens": lengths.astype(np.int32)}
            elif manifest.task == TOKEN_CLASSIFICATION:
                produced = {"entities": self._entities(texts, encodings, rows)}
            else:
                produced = self._classify(np.stack(rows))
            produced["truncated"] = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings))
        return {name: produced[name] for name in output_names}

    def _feed(self, encodings: list[Any], group: np.ndarray, width: int) -> dict[str, np.ndarray]:
        """Graph inputs of the texts `group` (indices into `encodings`), padded to `width` tokens."""
        assert self.manifest.text is not None
        ids = np.full((len(group), width), self.manifest.text.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        types = np.zeros((len(group), width), dtype=np.int64) if "token_type_ids" in self._feeds else None
        for row, index in enumerate(group):
            encoding = encodings[index]
            length = len(encoding.ids)
            ids[row, :length] = encoding.ids
            mask[row, :length] = 1
            if types is not None:
                types[row, :length] = encoding.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            feeds["token_type_ids"] = types
        return {name: feeds[name] for name in self._feeds}

    def _scores(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float32, copy=False)
        if self.manifest.scores == "sigmoid":
            return 1.0 / (1.0 + np.exp(-logits))
        if self.manifest.scores == "none":
            return logits
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)

    def _classify(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        scores = self._scores(logits)
        best = scores.argmax(axis=1)
        return {
            "label": self._labels[best],
            "score": scores[np.arange(len(best)), best].astype(np.float32),
            "scores": np.ascontiguousarray(scores, dtype=np.float32),
        }

    def _entities(self, texts: list[str], encodings: list[Any], logits: list[np.ndarray]) -> np.ndarray:
        """Entities per text (`logits`: [tokens, tags] per text), grouped as Hugging Face's
        token-classification "simple" aggregation: adjacent tokens of one tag (B-X then I-X ...)
        form one entity with the mean score; "O" is dropped. Offsets are character offsets into
        the text."""
        labels = self.manifest.labels
        tokenizer = self._tokenizer
        decoder = tokenizer.decoder
        unk = _unk_id(tokenizer)
        result = np.empty(len(texts), dtype=object)
        for row, (text, encoding) in enumerate(zip(texts, encodings)):
            scores = self._scores(logits[row])
            tokens = []
            for index, (token_id, special, (start, end)) in enumerate(
                zip(encoding.ids, encoding.special_tokens_mask, encoding.offsets)
            ):
                if special:
                    continue
                best = int(scores[index].argmax())
                word = text[start:end] if token_id == unk else encoding.tokens[index]
                tokens.append((labels[best], float(scores[index, best]), word, start, end))
            groups: list[list[tuple]] = []
            for token in tokens:
                bi, tag = _tag(token[0])
                if groups and bi != "B" and _tag(groups[-1][-1][0])[1] == tag:
                    groups[-1].append(token)
                else:
                    groups.append([token])
            entities = []
            for group in groups:
                tag = group[0][0].split("-", 1)[-1]
                if tag == "O":
                    continue
                words = [t[2] for t in group]
                entities.append({
                    "entity_group": tag,
                    "score": round(float(np.mean([t[1] for t in group])), 6),
                    "word": decoder.decode(words) if decoder is not None else " ".join(words),
                    "start": group[0][3],
                    "end": group[-1][4],
                })  # fmt: skip
            result[row] = json.dumps(entities, separators=(",", ":"))
        return result


def length_groups(lengths: np.ndarray) -> list[np.ndarray]:
    """The texts of a batch (their token counts) in groups that run as one padded execution each.

    Sorted by length, a text joins the group before it while the padding that adds stays within a
    quarter of the group's real tokens (or 32 tokens: one more execution costs about that much):
    a merged batch of short and long texts then computes little padding, and similar texts still
    run together, which is where batching's speed comes from.
    """
    order = np.argsort(lengths, kind="stable")
    groups: list[list[int]] = []
    real = 0
    for index in order.tolist():
        length = int(lengths[index])
        if groups:
            group = groups[-1]
            padded = length * (len(group) + 1)  # sorted: this text is the group's longest
            if padded - (real + length) <= max(0.25 * (real + length), _PADDING_ALLOWANCE_TOKENS):
                group.append(index)
                real += length
                continue
        groups.append([index])
        real = length
    return [np.asarray(group) for group in groups]


def _refuses_truncation(parameters: Mapping[str, Any]) -> bool:
    truncation = parameters.get("truncation")
    return (
        truncation is not None
        and truncation.WhichOneof("parameter_choice") == "bool_param"
        and not truncation.bool_param
    )


def _tag(label: str) -> tuple[str, str]:
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label  # not in B-/I- form: a continuation


def _unk_id(tokenizer: Any) -> int | None:
    model = tokenizer.model
    token = getattr(model, "unk_token", None)
    return tokenizer.token_to_id(token) if token else None


def _pixel_values(image: Any, spec: Any) -> np.ndarray:
    """One RGB PIL image → float32 [3, height, width], as the model's image processor prepares it."""
    if spec.shortest_edge is not None:
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        image = image.resize(size, resample=spec.resample)
        left = (image.width - spec.width) // 2
        top = (image.height - spec.height) // 2
        image = image.crop((left, top, left + spec.width, top + spec.height))
    elif image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), resample=spec.resample)
    array = np.asarray(image, dtype=np.float32)
    if spec.rescale_factor is not None:
        array = array * np.float32(spec.rescale_factor)
    if spec.mean is not None:
        array = (array - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return array.transpose(2, 0, 1)
