"""Import a Hugging Face model as a task model: one ONNX file with its task manifest and tokenizer.

`export_model(source)` takes a model directory (config.json, safetensors/bin weights, tokenizer or
image processor files; a sentence-transformers directory works too) or a hub id, resolved through
the local Hugging Face cache (HF_HOME / HF_HUB_CACHE; HF_TOKEN for private models when a hub is
reachable; offline, a clear error naming the cache path). It:

1. tells the task from the architecture (`...ForSequenceClassification` → text-classification,
   `...ForTokenClassification` → token-classification, `...ForImageClassification` →
   image-classification, a base model or a sentence-transformers directory → feature-extraction),
   or takes the one given;
2. exports the graph with torch.onnx (dynamic batch and sequence; embeddings pooled inside the
   graph the way the sentence-transformers config says, mean pooling otherwise);
3. checks ONNX Runtime's answer against PyTorch's on sample inputs;
4. writes the manifest (aimaas.tasks) and the tokenizer into the ONNX metadata.

The SDK pushes the result like any ONNX file (aimaas.sdk.service `import_huggingface`), so it is one
immutable, content-addressed registry version. Needs the `hf` extra (torch, transformers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import pathlib
import re
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

from aimaas.tasks import (
    EMBEDDING,
    FEATURE_EXTRACTION,
    IMAGE_CLASSIFICATION,
    IMAGE_GRAPH_INPUT,
    LOGITS,
    MANIFEST_KEY,
    TASKS,
    TEXT_CLASSIFICATION,
    TEXT_GRAPH_INPUTS,
    TOKEN_CLASSIFICATION,
    TOKENIZER_KEY,
    ImageProcessing,
    TaskManifest,
    TextProcessing,
)

# Changes whenever the exported graph for the same source would differ: part of the source digest,
# so an import after an exporter change makes a new version instead of reusing an old one.
EXPORTER_VERSION = "1"
OPSET = 17
# Version label with the digest of what was imported (source files, task, exporter).
SOURCE_DIGEST_LABEL = "aimaas.source-digest"
# Files of a model directory that decide the exported model (weights, config, tokenizer, processor).
_SOURCE_PATTERNS = (
    "config.json", "*.safetensors", "pytorch_model*.bin", "tokenizer*.json", "vocab.*", "merges.txt",
    "special_tokens_map.json", "*.model", "preprocessor_config.json", "modules.json", "sentence_bert_config.json",
    "1_Pooling/config.json", "*.safetensors.index.json", "pytorch_model.bin.index.json",
)  # fmt: skip
# Files one of which a text model's tokenizer is loaded from.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
# A hub id: "name" or "org/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
# ONNX files are single protobufs: beyond 2 GB weights need external data, which a single-file
# registry version cannot carry yet.
_MAX_ONNX_BYTES = 2 * 1024**3 - 1
# ONNX Runtime vs PyTorch on the sample inputs: largest absolute difference accepted.
_TOLERANCE = 1e-3

Progress = Callable[[str], None]


class ImportFailed(Exception):
    """The model cannot be imported; `kind` says why (for status codes), the message how to fix it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        # "not_found" | "invalid" | "unavailable" | "missing_dependency"
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    directory: pathlib.Path
    # The hub id, or the directory's name.
    name: str


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    path: pathlib.Path
    manifest: TaskManifest
    source_digest: str
    # Largest |ONNX Runtime - PyTorch| on the sample inputs.
    max_abs_error: float


# ----------------------------------------------------------------------------- source and task


def resolve_source(source: str, *, revision: str | None = None, token: str | None = None) -> ResolvedSource:
    """A local model directory, or a hub id through the local cache (downloading when a hub answers)."""
    path = pathlib.Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ImportFailed("invalid", f"{path} is not a Hugging Face model directory (it has no config.json)")
        return ResolvedSource(path.resolve(), path.resolve().name)
    if not _HUB_ID.match(source):
        raise ImportFailed("not_found", f"{source!r} is neither a model directory nor a Hugging Face model id")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
        )  # fmt: skip
    except ImportError as exc:
        raise _missing(exc) from None
    patterns = list(_SOURCE_PATTERNS)
    cache = constants.HF_HUB_CACHE
    try:
        directory = snapshot_download(source, revision=revision, token=token, local_files_only=True, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ImportFailed(
                "not_found",
                f"model {source!r} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
                f"download it where a hub is reachable (or copy the cache), or pass a model directory",
            ) from None
        try:
            directory = snapshot_download(source, revision=revision, token=token, allow_patterns=patterns)
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
            raise ImportFailed("not_found", f"the Hugging Face hub has no model {source!r} you can read: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - connection errors come in many types
            raise ImportFailed(
                "unavailable",
                f"model {source!r} is not in the local Hugging Face cache ({cache}) and the hub cannot be reached "
                f"({type(exc).__name__}: {exc}); set HF_HOME to a cache that has it, or pass a model directory",
            ) from None
    return ResolvedSource(pathlib.Path(directory), source)


def detect_task(directory: pathlib.Path, requested: str | None = None) -> str:
    """The task to export: `requested` when given, else told by the architecture."""
    if requested is not None:
        if requested not in TASKS:
            raise ImportFailed("invalid", f"unknown task {requested!r} (supported: {', '.join(TASKS)})")
        return requested
    if (directory / "modules.json").is_file():
        return FEATURE_EXTRACTION
    config = _read_json(directory / "config.json")
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else ""
    for suffix, task in (
        ("ForSequenceClassification", TEXT_CLASSIFICATION),
        ("ForTokenClassification", TOKEN_CLASSIFICATION),
        ("ForImageClassification", IMAGE_CLASSIFICATION),
    ):
        if architecture.endswith(suffix):
            return task
    if architecture.endswith("Model") and "For" not in architecture and "LMHead" not in architecture:
        return FEATURE_EXTRACTION  # a base model (BertModel): embeddings
    raise ImportFailed(
        "invalid",
        f"cannot tell the task of architecture {architecture or '(none in config.json)'}; "
        f"pass a task (one of {', '.join(TASKS)})",
    )


def source_digest(directory: pathlib.Path, task: str) -> str:
    """sha256 over the files that decide the export, the task and the exporter version."""
    digest = hashlib.sha256(f"aimaas-hf-export:{EXPORTER_VERSION}:{task}\n".encode())
    files = sorted({p for pattern in _SOURCE_PATTERNS for p in directory.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(f"{path.relative_to(directory).as_posix()}\n".encode())
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def model_name_for(source: str) -> str:
    """A registry/deployment name for a hub id or directory: its last part, lower-case, [a-z0-9-]."""
    base = source.rstrip("/").rsplit("/", 1)[-1].lower()
    name = re.sub(r"[^a-z0-9]+", "-", base).strip("-")
    if not name or not name[0].isalpha():
        name = f"m-{name}".rstrip("-")
    return name[:63].rstrip("-")


# ----------------------------------------------------------------------------- export


def export_model(
    source: str | ResolvedSource,
    output: pathlib.Path | None = None,
    *,
    task: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
) -> ExportedModel:
    """Export `source` (directory, hub id, or one resolved already) to a task-model ONNX file at
    `output` (default: a new temporary file, which the caller removes)."""
    say = progress or (lambda _message: None)
    if isinstance(source, str):
        say(f"resolving {source}")
        source = resolve_source(source, revision=revision, token=token)
    resolved = source
    chosen = detect_task(resolved.directory, task)
    digest = source_digest(resolved.directory, chosen)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise _missing(exc) from None
    say(f"loading {chosen} model from {resolved.directory}")
    exporter = _Exporter(resolved, chosen)
    if output is None:
        handle, name = tempfile.mkstemp(prefix="aimaas-hf-", suffix=".onnx")
        os.close(handle)
        output = pathlib.Path(name)
    say("exporting the graph to ONNX")
    exporter.export(output)
    say("checking ONNX Runtime against PyTorch")
    error = exporter.verify(output)
    say("writing the task manifest and tokenizer into the model")
    _embed(output, exporter.manifest, exporter.tokenizer_json)
    return ExportedModel(output, exporter.manifest, digest, error)


class _Exporter:
    """Loads the model with transformers and knows the sample inputs, the graph wrapper and the manifest."""

    def __init__(self, resolved: ResolvedSource, task: str) -> None:
        import torch
        import transformers

        # The caller shows its own progress (steps); transformers' weight-loading bars would interleave.
        transformers.utils.logging.disable_progress_bar()

        self.directory = resolved.directory
        self.task = task
        self.config = _read_json(self.directory / "config.json")
        self.architecture = (self.config.get("architectures") or [""])[0]
        self.tokenizer: Any = None
        self.tokenizer_json: str | None = None
        self.torch = torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = self._load_model()
            if task == IMAGE_CLASSIFICATION:
                image = self._image_processing()
                self.image_size = (image.height, image.width)
                text = None
            else:
                image = None
                text = self._load_tokenizer()
        self.model.eval()
        self.max_length = self._max_length() if text is not None else 0
        labels = self._labels()
        self.wrapper, self.input_names, self.output_name = self._wrapper()
        embedding_dimension = 0
        if task == FEATURE_EXTRACTION:
            with torch.no_grad():
                embedding_dimension = int(self.wrapper(*self.sample_inputs()).shape[-1])
        self.manifest = TaskManifest(
            task=task,
            labels=labels,
            scores=self._score_function(),
            max_length=self.max_length,
            embedding_dimension=embedding_dimension,
            source=resolved.name,
            architecture=self.architecture,
            text=text,
            image=image,
        )

    def _load_model(self) -> Any:
        import transformers

        classes = {
            TEXT_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
            TOKEN_CLASSIFICATION: transformers.AutoModelForTokenClassification,
            IMAGE_CLASSIFICATION: transformers.AutoModelForImageClassification,
            FEATURE_EXTRACTION: transformers.AutoModel,
        }
        try:
            # Eager attention exports to plain ONNX operators on every architecture.
            model = classes[self.task].from_pretrained(self.directory, attn_implementation="eager")
        except (ValueError, KeyError, OSError, TypeError) as exc:
            raise ImportFailed(
                "invalid",
                f"architecture {self.architecture or '?'} cannot be loaded as a {self.task} model by transformers "
                f"{transformers.__version__}: {exc}",
            ) from None
        return model.float()

    def _load_tokenizer(self) -> TextProcessing:
        from transformers import AutoTokenizer

        # Without its files transformers builds an empty tokenizer of special tokens only: refuse instead.
        if not any((self.directory / name).is_file() for name in _TOKENIZER_FILES):
            raise ImportFailed(
                "invalid",
                f"missing tokenizer: {self.directory} has none of {', '.join(_TOKENIZER_FILES)}; a text model needs its tokenizer",
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.directory)
        except (ValueError, OSError, TypeError) as exc:
            raise ImportFailed(
                "invalid", f"missing tokenizer: {self.directory} has no usable tokenizer files ({exc})"
            ) from None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ImportFailed(
                "invalid",
                f"missing tokenizer: {self.directory} has no fast (tokenizer.json) tokenizer, which the node needs",
            )
        if tokenizer.pad_token is None or tokenizer.pad_token_id is None:
            raise ImportFailed("invalid", "the tokenizer has no padding token, which batching needs")
        vocabulary = self.config.get("vocab_size")
        if isinstance(vocabulary, int) and len(tokenizer) > vocabulary:
            raise ImportFailed(
                "invalid",
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocabulary}: "
                "they do not belong together",
            )
        self.tokenizer = tokenizer
        self.tokenizer_json = backend.to_str()
        return TextProcessing(pad_token=tokenizer.pad_token, pad_token_id=int(tokenizer.pad_token_id))

    def _image_processing(self) -> ImageProcessing:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(self.directory)
        except (ValueError, OSError, TypeError) as exc:
            raise ImportFailed("invalid", f"missing image processor: {self.directory} has no usable preprocessor_config.json ({exc})") from None
        size = dict(getattr(processor, "size", None) or {})
        crop = dict(getattr(processor, "crop_size", None) or {}) if getattr(processor, "do_center_crop", False) else {}
        resample = getattr(processor, "resample", 2)
        resample = int(getattr(resample, "value", resample))
        mean = std = None
        if getattr(processor, "do_normalize", False):
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else None
        if "height" in size and "width" in size and not crop:
            height, width, shortest = size["height"], size["width"], None
        elif "shortest_edge" in size and crop:
            height, width, shortest = crop["height"], crop["width"], size["shortest_edge"]
        else:
            raise ImportFailed(
                "invalid",
                f"image processor {type(processor).__name__} resizes by {size} (crop {crop or 'none'}); supported: "
                "a fixed height/width, or shortest_edge with a centre crop",
            )
        self.processor = processor
        return ImageProcessing(
            height=height, width=width, shortest_edge=shortest, resample=resample, rescale_factor=rescale, mean=mean, std=std
        )

    def _max_length(self) -> int:
        limits = [int(self.tokenizer.model_max_length)] if self.tokenizer.model_max_length < 1_000_000 else []
        positions = self.config.get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
        sentence_config = self.directory / "sentence_bert_config.json"
        if sentence_config.is_file():
            seq = _read_json(sentence_config).get("max_seq_length")
            if isinstance(seq, int) and seq > 0:
                limits.append(seq)
        return min(limits) if limits else 512

    def _labels(self) -> tuple[str, ...]:
        if self.task == FEATURE_EXTRACTION:
            return ()
        id2label = getattr(self.model.config, "id2label", None) or {}
        count = int(self.model.config.num_labels)
        return tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(count))

    def _score_function(self) -> str:
        config = self.model.config
        if getattr(config, "problem_type", None) == "regression":
            return "none"
        if getattr(config, "problem_type", None) == "multi_label_classification" or (
            self.task != FEATURE_EXTRACTION and config.num_labels == 1
        ):
            return "sigmoid"
        return "softmax"

    # -- graph

    def _text_inputs(self) -> tuple[str, ...]:
        accepted = inspect.signature(self.model.forward).parameters
        wanted = set(self.tokenizer.model_input_names)
        return tuple(name for name in TEXT_GRAPH_INPUTS if name in accepted and (name in wanted or name == "input_ids"))

    def sample_inputs(self) -> tuple[Any, ...]:
        torch = self.torch
        if self.task == IMAGE_CLASSIFICATION:
            return (torch.randn(2, 3, *self.image_size),)
        encoded = self.tokenizer(
            ["a short text", "a somewhat longer text to export the graph with"], padding=True, return_tensors="pt"
        )
        return tuple(encoded[name] for name in self.input_names)

    def _wrapper(self) -> tuple[Any, tuple[str, ...], str]:
        torch = self.torch
        model = self.model
        task = self.task
        if task == IMAGE_CLASSIFICATION:
            names: tuple[str, ...] = (IMAGE_GRAPH_INPUT,)
        else:
            names = self._text_inputs()
        if task == FEATURE_EXTRACTION:
            pooling, normalize = _pooling(self.directory)

            class Embed(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.model = model

                def forward(self, *inputs: Any) -> Any:
                    feeds = dict(zip(names, inputs))
                    hidden = self.model(**feeds).last_hidden_state
                    mask = feeds["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    if pooling == "cls":
                        pooled = hidden[:, 0]
                    elif pooling == "max":
                        pooled = (hidden - (1 - mask) * 1e9).max(dim=1).values
                    else:
                        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                    if normalize:
                        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                    return pooled

            return Embed().eval(), names, EMBEDDING

        class Logits(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *inputs: Any) -> Any:
                return self.model(**dict(zip(names, inputs))).logits

        return Logits().eval(), names, LOGITS

    def export(self, output: pathlib.Path) -> None:
        torch = self.torch
        sequence_axes = {0: "batch"} if self.task == IMAGE_CLASSIFICATION else {0: "batch", 1: "sequence"}
        dynamic = {name: sequence_axes for name in self.input_names}
        dynamic[self.output_name] = {0: "batch", 1: "sequence"} if self.task == TOKEN_CLASSIFICATION else {0: "batch"}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                # The TorchScript exporter: fast, and proven on the encoder architectures served here.
                torch.onnx.export(
                    self.wrapper, self.sample_inputs(), str(output), input_names=list(self.input_names),
                    output_names=[self.output_name], dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - the exporter raises many types
                raise ImportFailed(
                    "invalid", f"architecture {self.architecture or '?'} cannot be exported to ONNX: {type(exc).__name__}: {exc}"
                ) from None
        if output.stat().st_size > _MAX_ONNX_BYTES:
            raise ImportFailed("invalid", "the exported model is over 2 GB, which needs ONNX external data (not supported yet)")

    def verify(self, output: pathlib.Path) -> float:
        """Largest |ONNX Runtime - PyTorch| on inputs of another batch size and length than the export's."""
        import numpy as np
        import onnxruntime as ort

        torch = self.torch
        if self.task == IMAGE_CLASSIFICATION:
            inputs: tuple[Any, ...] = (torch.randn(3, 3, *self.image_size),)
        else:
            encoded = self.tokenizer(["one", "two words", "a third and rather longer text for the check"],
                                     padding=True, return_tensors="pt")  # fmt: skip
            inputs = tuple(encoded[name] for name in self.input_names)
        with torch.no_grad():
            expected = self.wrapper(*inputs).numpy()
        session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        actual = session.run(None, {name: value.numpy() for name, value in zip(self.input_names, inputs)})[0]
        error = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
        scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
        if not np.isfinite(error) or error > _TOLERANCE * scale:
            raise ImportFailed(
                "invalid", f"the exported graph disagrees with PyTorch (max abs error {error:.3g}); it cannot be served"
            )
        return error


def _pooling(directory: pathlib.Path) -> tuple[str, bool]:
    """(pooling mode, normalize) from a sentence-transformers directory; mean pooling otherwise."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return "mean", False
    modules = _read_json(modules_file)
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules if isinstance(m, dict))
    pooling = "mean"
    for module in modules:
        if isinstance(module, dict) and str(module.get("type", "")).endswith("Pooling"):
            config = _read_json(directory / module.get("path", "") / "config.json")
            if config.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif config.get("pooling_mode_max_tokens"):
                pooling = "max"
            elif not config.get("pooling_mode_mean_tokens", True):
                raise ImportFailed("invalid", f"unsupported sentence-transformers pooling {config}; supported: mean, cls, max")
    return pooling, normalize


def _embed(path: pathlib.Path, manifest: TaskManifest, tokenizer_json: str | None) -> None:
    import onnx

    model = onnx.load(str(path))
    props = {entry.key: entry.value for entry in model.metadata_props}
    props[MANIFEST_KEY] = manifest.to_json()
    if tokenizer_json:
        props[TOKENIZER_KEY] = tokenizer_json
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def _read_json(path: pathlib.Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImportFailed("invalid", f"{path} is not valid JSON: {exc}") from None
    return document if isinstance(document, dict | list) else {}


def _missing(exc: ImportError) -> ImportFailed:
    return ImportFailed(
        "missing_dependency",
        f"importing Hugging Face models needs the hf extra (pip install 'aimaas[hf]'): {exc}",
    )
