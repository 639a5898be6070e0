"""Task models (aimaas.tasks) on a real inference node, called with stock tritonclient: text and
images in, labels, entities and embeddings out, each checked against the same model run in-process
by transformers (or sentence-transformers); batching of variable-length texts; precise errors."""

from __future__ import annotations

import asyncio
import json
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.inference.settings import BatchingDefaults
from tests.support.hf_models import CORPUS, png, pipeline
from tests.support.inference import inference_settings, running_inference, write_model

LONG_TEXT = " ".join(CORPUS * 3)  # well over the tiny models' 64 tokens


@pytest.fixture(scope="module")
def repository(task_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("task-repository")
    for name, path in task_models.onnx.items():
        write_model(root, name, path.read_bytes())
    return root


@pytest.fixture
async def client(repository):
    # A queue delay so that concurrent requests surely meet in one batch.
    batching = BatchingDefaults(enabled=True, max_batch_size=64, max_queue_delay_us=20_000)
    async with running_inference(inference_settings(repository, batching=batching)) as app:
        client = triton_aio.InferenceServerClient(app.grpc.address)
        yield client
        await client.close()


def texts_input(texts: list[str], name: str = "text") -> triton.InferInput:
    array = np.array([t.encode() for t in texts], dtype=object)
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def images_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


async def test_text_classification_matches_transformers(client, task_models):
    texts = ["i love this movie", "an awful experience never again", "the weather in rome"]
    result = await client.infer("sentiment", [texts_input(texts)])
    reference = pipeline("text-classification", task_models.sources["sentiment"], top_k=None)(texts)
    labels = ["negative", "positive"]
    for row, expected in enumerate(reference):
        by_label = {entry["label"]: entry["score"] for entry in expected}
        np.testing.assert_allclose(result.as_numpy("scores")[row], [by_label[l] for l in labels], atol=1e-5)
        best = max(expected, key=lambda e: e["score"])
        assert result.as_numpy("label")[row].decode() == best["label"]
        assert result.as_numpy("score")[row] == pytest.approx(best["score"], abs=1e-5)
    assert result.as_numpy("truncated").tolist() == [False, False, False]


async def test_variable_length_texts_merge_into_one_batch_padded_per_batch(client):
    texts = [" ".join(CORPUS[: 1 + i % len(CORPUS)])[: 5 + 9 * i] for i in range(12)]
    alone = [(await client.infer("sentiment", [texts_input([t])])).as_numpy("scores")[0] for t in texts]
    before = await client.get_inference_statistics("sentiment", as_json=True)
    together = await asyncio.gather(*(client.infer("sentiment", [texts_input([t])]) for t in texts))
    after = await client.get_inference_statistics("sentiment", as_json=True)
    # Padding to the batch's longest text changes no answer.
    for single, merged in zip(alone, together):
        np.testing.assert_allclose(merged.as_numpy("scores")[0], single, atol=1e-5)

    def executions(stats):
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["model_stats"][0]["batch_stats"]}

    grown = {size: count - executions(before).get(size, 0) for size, count in executions(after).items()}
    assert max(size for size, count in grown.items() if count) > 1, grown


async def test_token_classification_entities_match_the_simple_aggregation(client, task_models):
    texts = ["bob went to london and berlin last week", "what a great day in paris with alice"]
    result = await client.infer("entities", [texts_input(texts)])
    reference = pipeline("token-classification", task_models.sources["entities"], aggregation_strategy="simple")(texts)
    for row, expected in enumerate(reference):
        entities = json.loads(result.as_numpy("entities")[row])
        assert expected, "the fixture's model should tag something"
        assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in entities] == [
            (e["entity_group"], e["start"], e["end"], e["word"]) for e in expected
        ]
        np.testing.assert_allclose([e["score"] for e in entities], [float(e["score"]) for e in expected], atol=1e-5)
        for entity in entities:  # offsets are character offsets into the text
            assert texts[row][entity["start"]:entity["end"]].lower().replace(" ", "") == entity["word"].replace(" ", "")


async def test_embeddings_match_sentence_transformers(client, task_models):
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "A man is riding a horse.", "the new movie is awesome"]
    result = await client.infer("minilm", [texts_input(texts)])
    expected = SentenceTransformer(str(task_models.sources["minilm"]), device="cpu").encode(texts)
    embedding = result.as_numpy("embedding")
    assert embedding.shape == (3, 384)
    np.testing.assert_allclose(embedding, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    assert result.as_numpy("tokens").tolist() == [8, 9, 7]  # [CLS] ... [SEP]


async def test_image_classification_matches_transformers(client, task_models):
    import io

    from PIL import Image

    images = [png(40, 30, seed=1), png(64, 64, seed=2)]
    result = await client.infer("pets", [images_input(images)])
    classify = pipeline("image-classification", task_models.sources["pets"], top_k=None)
    labels = ["cat", "dog", "bird"]
    for row, data in enumerate(images):
        expected = {e["label"]: e["score"] for e in classify(Image.open(io.BytesIO(data)))}
        np.testing.assert_allclose(result.as_numpy("scores")[row], [expected[l] for l in labels], atol=1e-4)
        assert result.as_numpy("label")[row].decode() == max(expected, key=expected.get)


async def test_long_text_is_truncated_and_says_so_or_refused_when_asked(client):
    result = await client.infer("sentiment", [texts_input([LONG_TEXT, "short"])])
    assert result.as_numpy("truncated").tolist() == [True, False]
    refused = texts_input([LONG_TEXT])
    with pytest.raises(InferenceServerException, match=r"text 0 has \d+ tokens, more than the model's maximum of 64") as caught:
        await client.infer("sentiment", [refused], parameters={"truncation": False})
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    # Much text to count goes to the preprocessing threads; same verdict.
    with pytest.raises(InferenceServerException, match=r"text 0 has \d+ tokens"):
        await client.infer("sentiment", [texts_input([LONG_TEXT * 20])], parameters={"truncation": False})
    # Allowed explicitly, or within the limit, it answers.
    await client.infer("sentiment", [texts_input(["short"])], parameters={"truncation": False})


@pytest.mark.parametrize(
    ("model", "tensor", "message"),
    [
        ("sentiment", lambda: texts_input(["fine", "   "]), "text 1 is empty"),
        ("sentiment", lambda: _raw_bytes_input("text", [b"\xff\xfe"]), "BYTES element 0 is not valid UTF-8"),
        ("sentiment", lambda: images_input([b"x"]), "unknown input 'image'"),
        ("pets", lambda: images_input([png(), b"GIF89a not really"]), "element 1 is not a readable image"),
        ("pets", lambda: images_input([png()[:60]]), "element 0 is not a readable image"),
    ],
)
async def test_bad_input_gets_a_precise_error(client, model, tensor, message):
    with pytest.raises(InferenceServerException, match=message) as caught:
        await client.infer(model, [tensor()])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


def _raw_bytes_input(name: str, items: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object))
    return tensor


async def test_the_model_config_publishes_the_task(client):
    config = (await client.get_model_config("sentiment", as_json=True))["config"]
    task = json.loads(config["parameters"]["aimaas.task"]["string_value"])
    assert task["task"] == "text-classification" and task["labels"] == ["negative", "positive"]
    assert task["max_length"] == 64
    metadata = await client.get_model_metadata("sentiment", as_json=True)
    assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [("text", "BYTES")]
    assert [o["name"] for o in metadata["outputs"]] == ["label", "score", "scores", "truncated"]


async def test_a_task_model_without_its_tokenizer_fails_to_load(task_models, tmp_path):
    import onnx

    model = onnx.load(str(task_models.onnx["sentiment"]))
    kept = [e for e in model.metadata_props if e.key != "aimaas.tokenizer"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    write_model(tmp_path, "broken", model)
    async with running_inference(inference_settings(tmp_path)) as app:
        client = triton_aio.InferenceServerClient(app.grpc.address)
        try:
            [entry] = (await client.get_model_repository_index(as_json=True))["models"]
        finally:
            await client.close()
    assert entry["state"] == "UNAVAILABLE"
    assert "carries no tokenizer" in entry["reason"]
