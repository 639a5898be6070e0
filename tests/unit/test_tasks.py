"""The task-model contract (aimaas.tasks): manifest validation, the ONNX metadata reader, the
registry's streaming inspection of a task model, and the gateway's pure request/answer shaping."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import onnx
import pytest

from aimaas.tasks import (
    MANIFEST_KEY, TOKENIZER_KEY, InvalidTaskManifest, MalformedOnnx, TaskManifest, read_onnx_metadata,
)  # fmt: skip
from aimaas.types.v1 import types_pb2
from services.common.errors import InvalidArgument
from services.gateway.rest import tasks as rest
from services.registry.inspect import ArtifactInspector, InvalidArtifact
from tests.support.models import mlp_model

TEXT = {"task": "text-classification", "labels": ["neg", "pos"], "max_length": 16,
        "text": {"pad_token": "[PAD]", "pad_token_id": 0}}  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "summarization"}, "task"),
        ({"text": None}, "needs text processing"),
        ({"labels": []}, "needs its label names"),
        ({"labels": ["a", "a"]}, "unique"),
        ({"max_length": 1}, "max_length >= 2"),
        ({"format": 99}, "newer than this version understands"),
        ({"task": "feature-extraction", "labels": []}, "embedding_dimension"),
        ({"task": "image-classification", "text": None}, "image processing"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_manifest_validation_names_the_problem(changes, message):
    document = {**TEXT, **changes}
    with pytest.raises(InvalidTaskManifest, match=message):
        TaskManifest.parse(json.dumps({k: v for k, v in document.items() if v is not None}))


def test_manifest_served_signature_and_public_fields():
    manifest = TaskManifest.parse(json.dumps(TEXT))
    inputs, outputs = manifest.served()
    assert inputs == [("text", "BYTES", (-1,))]
    assert outputs == [("label", "BYTES", (-1,)), ("score", "FP32", (-1,)), ("scores", "FP32", (-1, 2)),
                       ("truncated", "BOOL", (-1,))]  # fmt: skip
    assert manifest.public() == {"task": "text-classification", "labels": ["neg", "pos"], "max_length": 16}
    image = TaskManifest(task="image-classification", labels=("a",), image={"height": 8, "width": 9})
    assert image.served()[0] == [("image", "BYTES", (-1,))] and "truncated" not in [o[0] for o in image.served()[1]]
    with pytest.raises(ValueError, match="mean and std go together"):
        TaskManifest(task="image-classification", labels=("a",), image={"height": 8, "width": 9, "mean": (0, 0, 0)})


def _with_props(model: onnx.ModelProto, props: dict[str, str]) -> onnx.ModelProto:
    onnx.helper.set_model_props(model, props)
    return model


def test_metadata_is_read_by_seeking_past_the_graph(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_with_props(mlp_model(), {MANIFEST_KEY: "{}", "other": "x"}).SerializeToString())
    assert read_onnx_metadata(path) == {MANIFEST_KEY: "{}", "other": "x"}
    assert read_onnx_metadata(path, frozenset({MANIFEST_KEY})) == {MANIFEST_KEY: "{}"}
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(MalformedOnnx, match="truncated"):
        read_onnx_metadata(path)


def _inspect(data: bytes, chunk: int = 4096):
    inspector = ArtifactInspector(types_pb2.MODEL_FORMAT_UNSPECIFIED)
    for start in range(0, len(data), chunk):
        inspector.feed(data[start : start + chunk])
    return inspector.finish()


def test_the_registry_records_the_task_and_the_served_signature(task_models):
    data = task_models.onnx["sentiment"].read_bytes()
    inspection = _inspect(data, chunk=3)  # the push parser across every possible split
    assert inspection.task.task == "text-classification" and list(inspection.task.labels) == ["negative", "positive"]
    assert inspection.task.max_length == 64 and inspection.task.source == "sentiment"
    assert [(t.name, t.datatype, list(t.shape)) for t in inspection.signature.inputs] == [("text", "BYTES", [-1])]
    assert [t.name for t in inspection.signature.outputs] == ["label", "score", "scores", "truncated"]
    assert inspection.details["task"] == "text-classification" and int(inspection.details["tokenizer_bytes"]) > 100
    plain = _inspect(mlp_model().SerializeToString())
    assert plain.task is None and [t.name for t in plain.signature.inputs] == ["x"]


def test_a_tokenizer_too_large_to_keep_is_skipped_but_seen(task_models):
    model = onnx.load(str(task_models.onnx["sentiment"]))
    props = {e.key: e.value for e in model.metadata_props}
    tokenizer = json.loads(props[TOKENIZER_KEY])
    tokenizer["padding_for_the_test"] = "x" * (3 << 20)
    props[TOKENIZER_KEY] = json.dumps(tokenizer)
    inspection = _inspect(_with_props(model, props).SerializeToString(), chunk=1 << 16)
    assert inspection.task.task == "text-classification"
    assert int(inspection.details["tokenizer_bytes"]) > 3 << 20


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.pop(TOKENIZER_KEY), "carries no tokenizer"),
        (lambda p: p.update({TOKENIZER_KEY: "[1, 2]"}), "not a Hugging Face tokenizer.json"),
        (lambda p: p.update({MANIFEST_KEY: "{"}), "invalid task manifest"),
        (lambda p: p.update({MANIFEST_KEY: json.dumps({**json.loads(p[MANIFEST_KEY]), "labels": ["a"]})}),
         "does not fit 1 labels"),
        (lambda p: p.update({MANIFEST_KEY: json.dumps({**json.loads(p[MANIFEST_KEY]), "task": "feature-extraction",
                                                       "labels": [], "embedding_dimension": 8})}),
         "no 'embedding' output"),
    ],
)
def test_a_broken_task_model_is_refused_with_the_reason(task_models, edit, message):
    model = onnx.load(str(task_models.onnx["sentiment"]))
    props = {e.key: e.value for e in model.metadata_props}
    edit(props)
    with pytest.raises(InvalidArtifact, match=message):
        _inspect(_with_props(model, props).SerializeToString())


def test_a_tensor_graph_with_a_task_manifest_is_refused():
    with pytest.raises(InvalidArtifact, match="no 'input_ids' input"):
        _inspect(_with_props(mlp_model(), {MANIFEST_KEY: json.dumps(TEXT), TOKENIZER_KEY: '{"model": {}}'}).SerializeToString())


# -- gateway shaping --------------------------------------------------------------------------------

CARD = rest.TaskCard(task="text-classification", labels=("neg", "pos", "neutral"), max_length=16)
IMAGES = rest.TaskCard(task="image-classification", labels=("cat", "dog"))


def test_predict_bodies_parse_into_one_or_many_inputs():
    one = rest.parse_json_request(b'{"text": "hi", "parameters": {"top_k": 2, "truncation": false}}', CARD, "m")
    assert (one.items, one.single, one.top_k, one.truncation) == ([b"hi"], True, 2, False)
    many = rest.parse_json_request(json.dumps({"inputs": ["a", "b"]}).encode(), CARD, "m")
    assert (many.items, many.single) == ([b"a", b"b"], False)
    assert rest.parse_json_request(b'{"inputs": "a"}', CARD, "m").single
    png = base64.b64encode(b"\x89PNG...").decode()
    assert rest.parse_json_request(json.dumps({"image": f"data:image/png;base64,{png}"}).encode(), IMAGES, "m").items == [b"\x89PNG..."]


@pytest.mark.parametrize(
    ("body", "card", "message"),
    [
        (b"[]", CARD, "must be a JSON object"),
        (b'{"text": 3}', CARD, "'text' must be a string"),
        (b'{"text": "a", "inputs": ["b"]}', CARD, "not both"),
        (b'{"parameters": {"top_k": 1}}', CARD, "send {\"text\""),
        (b'{"text": "a", "parameters": {"temperature": 1}}', CARD, "unknown parameter 'temperature'"),
        (b'{"text": "a", "parameters": {"top_k": true}}', CARD, "'top_k' must be a positive integer"),
        (b'{"text": "a", "parameters": {"truncation": "no"}}', CARD, "'truncation' must be true or false"),
        (json.dumps({"inputs": ["a"] * (rest.MAX_INPUTS + 1)}).encode(), CARD, "more than the 1024"),
        (b'{"image": "data:image/png,abc"}', IMAGES, "must be base64-encoded"),
        (b'{"image": ""}', IMAGES, "is empty"),
        (b'{"inputs": [1]}', IMAGES, "inputs[0] must be a base64 string"),
    ],
)
def test_bad_predict_bodies_are_refused_precisely(body, card, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        rest.parse_json_request(body, card, "m")


def test_answers_list_the_top_k_labels_by_score():
    outputs = {
        "label": np.array([b"pos"], dtype=object), "score": np.array([0.6], np.float32),
        "scores": np.array([[0.1, 0.6, 0.3]], np.float32), "truncated": np.array([True]),
    }  # fmt: skip
    [answer] = rest.predictions(CARD, outputs, top_k=2)
    assert answer["label"] == "pos" and answer["truncated"] is True
    assert [(x["label"], round(x["score"], 3)) for x in answer["labels"]] == [("pos", 0.6), ("neutral", 0.3)]
    [plain] = rest.predictions(CARD, outputs, top_k=None)
    assert "labels" not in plain
    [everything] = rest.predictions(CARD, outputs, top_k=10)
    assert len(everything["labels"]) == 3


async def test_cards_are_cached_per_version_and_forgotten_with_their_model():
    from inference import grpc_predict_v2_pb2 as pb

    class Plane:  # what TaskCatalog needs of the gateway data plane
        calls = 0

        def resolve_version(self, deployment, version=""):
            return "sentiment-model", int(version or 1), True

        async def model_config(self, deployment, version):
            Plane.calls += 1
            config = pb.ModelConfig(name=deployment)
            config.parameters["aimaas.task"].string_value = json.dumps({"task": "text-classification", "labels": ["a"]})
            return pb.ModelConfigResponse(config=config)

    catalog = rest.TaskCatalog(Plane())
    assert (await catalog.card("sentiment"))[1].labels == ("a",)
    await catalog.card("sentiment", "1")
    assert Plane.calls == 1
    catalog.retain({"sentiment-model"})
    await catalog.card("sentiment")
    assert Plane.calls == 1
    catalog.retain(set())  # undeployed (and perhaps deleted, its name free for a new model)
    await catalog.card("sentiment")
    assert Plane.calls == 2


def test_a_batch_runs_in_length_groups_that_bound_padding():
    from services.inference.backends.task import length_groups

    def padding(groups, lengths):
        return sum(int(lengths[g].max()) * len(g) - int(lengths[g].sum()) for g in groups)

    same = np.full(32, 17)
    assert [len(g) for g in length_groups(same)] == [32]  # nothing to pad: one execution
    mixed = np.array([5, 120, 6, 7, 118, 5, 119, 6])
    groups = length_groups(mixed)
    assert sorted(sorted(g.tolist()) for g in groups) == [[0, 2, 3, 5, 7], [1, 4, 6]]
    assert padding(groups, mixed) == 9  # 6 + 3: one padded batch would pad 5 x ~114 tokens
    assert sorted(i for g in groups for i in g.tolist()) == list(range(len(mixed)))
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 200, 64)
    groups = length_groups(lengths)
    assert padding(groups, lengths) <= 0.25 * lengths.sum() + 32 * len(groups)
    assert len(groups) < 16
