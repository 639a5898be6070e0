"""The Hugging Face importer (aimaas.huggingface): sources (directories, hub ids through the local
cache, offline and unreachable hubs), task detection, and the precise errors of models that cannot
be imported. No hub is reachable here: the cache is built in the test, the hub endpoint is a closed port."""

from __future__ import annotations

import json
import shutil

import pytest

from aimaas import huggingface as hf
from tests.support.servers import free_port


def _config(directory, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


@pytest.mark.parametrize(
    ("architecture", "task"),
    [
        ("BertForSequenceClassification", "text-classification"),
        ("DistilBertForTokenClassification", "token-classification"),
        ("ViTForImageClassification", "image-classification"),
        ("BertModel", "feature-extraction"),
    ],
)
def test_the_task_is_told_by_the_architecture(tmp_path, architecture, task):
    assert hf.detect_task(_config(tmp_path / "m", architectures=[architecture])) == task


def test_a_sentence_transformers_directory_is_feature_extraction(tmp_path):
    directory = _config(tmp_path / "st", architectures=["BertForMaskedLM"])
    (directory / "modules.json").write_text("[]")
    assert hf.detect_task(directory) == "feature-extraction"


def test_unknown_or_untellable_tasks_are_refused(tmp_path):
    directory = _config(tmp_path / "m", architectures=["GPT2LMHeadModel"])
    with pytest.raises(hf.ImportFailed, match="cannot tell the task of architecture GPT2LMHeadModel; pass a task"):
        hf.detect_task(directory)
    with pytest.raises(hf.ImportFailed, match="unknown task 'summarization'") as caught:
        hf.detect_task(directory, "summarization")
    assert caught.value.kind == "invalid"


def test_an_architecture_transformers_cannot_build_is_refused(tmp_path):
    directory = _config(tmp_path / "m", architectures=["FooForSequenceClassification"], model_type="no-such-model")
    with pytest.raises(hf.ImportFailed, match="cannot be loaded as a text-classification model") as caught:
        hf.export_model(str(directory), tmp_path / "out.onnx")
    assert caught.value.kind == "invalid"


def test_a_text_model_without_its_tokenizer_is_refused(task_models, tmp_path):
    directory = tmp_path / "no-tokenizer"
    shutil.copytree(task_models.sources["sentiment"], directory)
    for path in directory.iterdir():
        if path.name.startswith(("tokenizer", "vocab", "special_tokens")):
            path.unlink()
    with pytest.raises(hf.ImportFailed, match="missing tokenizer"):
        hf.export_model(str(directory), tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists() or (tmp_path / "out.onnx").stat().st_size == 0


def test_not_a_model_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.ImportFailed, match="has no config.json"):
        hf.resolve_source(str(tmp_path / "empty"))
    with pytest.raises(hf.ImportFailed, match="neither a model directory nor a Hugging Face model id") as caught:
        hf.resolve_source("not a valid id!")
    assert caught.value.kind == "not_found"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A private Hugging Face cache, and a hub endpoint nobody listens on."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


def _cache(cache, repo_id: str, source) -> None:
    """The layout huggingface_hub writes: refs/main -> a commit, snapshots/<commit>/<files>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)


def test_a_hub_id_resolves_through_the_local_cache_without_a_hub(hub, task_models):
    _cache(hub, "acme/tiny-sentiment", task_models.sources["sentiment"])
    resolved = hf.resolve_source("acme/tiny-sentiment")
    assert resolved.name == "acme/tiny-sentiment" and (resolved.directory / "config.json").is_file()
    assert hf.model_name_for(resolved.name) == "tiny-sentiment"


def test_an_uncached_hub_id_offline_names_the_cache(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hf.ImportFailed) as caught:
        hf.resolve_source("acme/missing")
    assert caught.value.kind == "not_found"
    assert str(hub) in str(caught.value) and "HF_HUB_OFFLINE" in str(caught.value)


def test_an_uncached_hub_id_with_the_hub_unreachable_names_the_cache(hub):
    with pytest.raises(hf.ImportFailed) as caught:
        hf.resolve_source("acme/missing")
    assert caught.value.kind == "unavailable"
    assert str(hub) in str(caught.value) and "cannot be reached" in str(caught.value)


def test_source_digest_covers_files_and_task(task_models, tmp_path):
    source = task_models.sources["sentiment"]
    digest = hf.source_digest(source, "text-classification")
    assert digest == hf.source_digest(source, "text-classification")
    assert digest != hf.source_digest(source, "feature-extraction")
    changed = tmp_path / "changed"
    shutil.copytree(source, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "id2label": {"0": "bad", "1": "good"}}))
    assert hf.source_digest(changed, "text-classification") != digest


@pytest.mark.parametrize(
    ("source", "name"),
    [("bert-base-uncased", "bert-base-uncased"), ("distilbert/SST_2.English", "sst-2-english"),
     ("/models/123-model/", "m-123-model"), ("x" * 80, "x" * 63)],
)
def test_model_names_are_derived_from_the_source(source, name):
    assert hf.model_name_for(source) == name


def test_an_export_carries_its_manifest_and_checks_itself(task_models):
    from aimaas.tasks import MANIFEST_KEY, TOKENIZER_KEY, TaskManifest, read_onnx_metadata

    metadata = read_onnx_metadata(task_models.onnx["entities"])
    manifest = TaskManifest.parse(metadata[MANIFEST_KEY])
    assert manifest.task == "token-classification" and manifest.labels[:2] == ("O", "B-PER")
    assert manifest.text is not None and manifest.text.pad_token == "[PAD]"
    assert json.loads(metadata[TOKENIZER_KEY])["model"]["type"] == "WordPiece"
    pets = TaskManifest.parse(read_onnx_metadata(task_models.onnx["pets"])[MANIFEST_KEY])
    assert pets.image is not None and (pets.image.height, pets.image.width, pets.image.mean) == (32, 32, (0.5, 0.5, 0.5))
    assert TOKENIZER_KEY not in read_onnx_metadata(task_models.onnx["pets"])


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    import torch
    from transformers import BertForSequenceClassification

    from tests.support.hf_models import SENTIMENT, _bert_config, _tokenizer

    directory = tmp_path / "mismatched"
    directory.mkdir()
    tokenizer = _tokenizer(directory)
    torch.manual_seed(0)
    BertForSequenceClassification(_bert_config(len(tokenizer) - 20, SENTIMENT)).save_pretrained(directory)
    with pytest.raises(hf.ImportFailed, match=r"the tokenizer has \d+ tokens but the model's vocabulary only \d+"):
        hf.export_model(str(directory), tmp_path / "out.onnx")
