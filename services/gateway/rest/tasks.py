"""Task endpoints of the REST edge: text or images in, task-shaped JSON out (aimaas.tasks).

- `POST /v1/models/{name}/predict`: `{"text": "..."}` (one) or `{"inputs": [...]}` (many) for text
  tasks; `{"image": "<base64>"}`, `{"inputs": [...]}`, multipart files or a raw `image/*` body for
  image tasks; optional `"parameters": {"top_k": k, "truncation": bool}`. Answers labels with
  scores (and the top k), entities with character offsets, or embeddings, and says when a text was
  truncated.
- `POST /v1/embeddings`: the OpenAI embeddings API over feature-extraction deployments (float or
  base64 encoding, token usage), so OpenAI clients work with `base_url=<gateway>/v1`.
- The `data` of `GET /v1/models` (OpenAI's model list): feature-extraction deployments
  (`TaskCatalog.embedding_models`, used by the management router).

Translation only: every call becomes one Open Inference Protocol request (BYTES `text`/`image`)
through the one GatewayDataPlane, so routing, traffic splits, retries, statistics and auth are
those of /v2 inference; the node runs the pre- and post-processing. The answer's labels come from
the task card the node publishes in its model config (cached per model version: versions are
immutable), so a control-plane outage does not stop task endpoints either.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aimaas import tasks
from inference import grpc_predict_v2_pb2 as pb
from services.common.auth import Permission, Principal
from services.common.errors import InvalidArgument
from services.gateway.rest.edge import PRINCIPAL_STATE, REQUEST_DEADLINE_STATE, read_body, set_model
from services.gateway.rest.oip import json_response, remaining_seconds
from services.inference import tensors

JSON = "application/json"
# Inputs one predict or embeddings request may carry.
MAX_INPUTS = 1024
_CARDS = 4096
_PROPAGATOR = TraceContextTextMapPropagator()
# A valid 8x8 PNG: the docs' working image example.
EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mNkYGAQwAaYBHCAwSkBAJIkC+CfPPRKAAAAAElFTkSuQmCC"
_PREDICT_KEYS = {"text", "image", "inputs", "parameters"}
_PARAMETER_KEYS = {"top_k", "truncation"}


@dataclass(frozen=True)
class TaskCard:
    """What a task model version does (aimaas.tasks' public manifest fields)."""

    task: str
    labels: tuple[str, ...] = ()
    max_length: int = 0
    embedding_dimension: int = 0

    @property
    def is_text(self) -> bool:
        return self.task in tasks.TEXT_TASKS

    @classmethod
    def of(cls, config: pb.ModelConfig) -> TaskCard | None:
        parameter = config.parameters.get(tasks.CONFIG_PARAMETER)
        if parameter is None or not parameter.string_value:
            return None
        document = json.loads(parameter.string_value)
        return cls(
            task=document["task"],
            labels=tuple(document.get("labels", ())),
            max_length=int(document.get("max_length", 0)),
            embedding_dimension=int(document.get("embedding_dimension", 0)),
        )


class TaskCatalog:
    """Task cards of deployed versions, read from a replica's model config once per version."""

    def __init__(self, dataplane: Any) -> None:
        self._dataplane = dataplane
        self._cards: collections.OrderedDict[tuple[str, str], TaskCard | None] = collections.OrderedDict()

    async def card(self, deployment: str, version: str = "", *, wait: bool = True) -> tuple[str, TaskCard | None]:
        """(version, card) of `version` of a deployment, by default the one answering unversioned
        calls; card None for a tensor model. NotFound / Unavailable as for inference; a version
        scaled to zero is brought back first, unless `wait` is False (then None until it is known).
        """
        model, number, ready = self._dataplane.resolve_version(deployment, version)
        key = (model, str(number))
        if key in self._cards:
            self._cards.move_to_end(key)
            return key[1], self._cards[key]
        if not wait and not ready:
            return key[1], None
        response = await self._dataplane.model_config(deployment, str(number))
        card = TaskCard.of(response.config)
        self._cards[key] = card
        if len(self._cards) > _CARDS:
            self._cards.popitem(last=False)
        return key[1], card

    def retain(self, models: set[str]) -> None:
        """Forget the cards of models no deployment routes to any more: a model can only be deleted
        once undeployed, and one created again under its name numbers its versions from 1 again."""
        for key in [key for key in self._cards if key[0] not in models]:
            del self._cards[key]

    async def embedding_models(self, principal: Principal) -> list[dict[str, Any]]:
        """OpenAI model objects for the feature-extraction deployments the caller may use."""
        found = []
        for name in self._dataplane.deployments():
            if not principal.in_scope(name):
                continue
            try:
                _, card = await self.card(name, wait=False)
            except Exception:  # noqa: BLE001 - a deployment without a replica now is not listed
                continue
            if card is not None and card.task == tasks.FEATURE_EXTRACTION:
                found.append({"id": name, "object": "model", "created": 0, "owned_by": "aimaas"})
        return found


# ----------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class TaskRequest:
    items: list[bytes]
    # One input given as a scalar ("text": "..."): the answer is one object, not a list.
    single: bool
    top_k: int | None = None
    truncation: bool | None = None


def _parameters(value: Any) -> tuple[int | None, bool | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise InvalidArgument("'parameters' must be a JSON object")
    unknown = set(value) - _PARAMETER_KEYS
    if unknown:
        raise InvalidArgument(f"unknown parameter {sorted(unknown)[0]!r} (known: {', '.join(sorted(_PARAMETER_KEYS))})")
    top_k, truncation = value.get("top_k"), value.get("truncation")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InvalidArgument("'top_k' must be a positive integer")
    if truncation is not None and not isinstance(truncation, bool):
        raise InvalidArgument("'truncation' must be true or false")
    return top_k, truncation


def _image_bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where} must be a base64 string (optionally a data: URL)")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise InvalidArgument(f"{where}: a data: URL must be base64-encoded")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{where} is not valid base64") from None
    if not data:
        raise InvalidArgument(f"{where} is empty")
    return data


def _text_bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where} must be a string")
    return value.encode("utf-8")


def json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidArgument("the request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return document


def parse_json_request(body: bytes, card: TaskCard, deployment: str) -> TaskRequest:
    """A predict body in JSON; precise InvalidArgument for anything else."""
    document = json_object(body)
    unknown = set(document) - _PREDICT_KEYS
    if unknown:
        raise InvalidArgument(f"unknown field {sorted(unknown)[0]!r} (known: {', '.join(sorted(_PREDICT_KEYS))})")
    top_k, truncation = _parameters(document.get("parameters"))
    key = "text" if card.is_text else "image"
    other = "image" if card.is_text else "text"
    if other in document:
        raise InvalidArgument(f"model '{deployment}' is a {card.task} model: send {_shape_hint(card)}, not {other!r}")
    convert = _text_bytes if card.is_text else _image_bytes
    if key in document and "inputs" in document:
        raise InvalidArgument(f"give either {key!r} (one input) or 'inputs' (a list), not both")
    if key in document:
        return TaskRequest([convert(document[key], f"'{key}'")], True, top_k, truncation)
    if "inputs" not in document:
        raise InvalidArgument(f"model '{deployment}' is a {card.task} model: send {_shape_hint(card)}")
    inputs = document["inputs"]
    if not isinstance(inputs, list):
        return TaskRequest([convert(inputs, "'inputs'")], True, top_k, truncation)
    _check_count(len(inputs))
    return TaskRequest([convert(v, f"inputs[{i}]") for i, v in enumerate(inputs)], False, top_k, truncation)


async def parse_form_request(request: Request, card: TaskCard, deployment: str) -> TaskRequest:
    """multipart/form-data: image files (any field name) or `text` fields, plus a `parameters` JSON field."""
    try:
        form = await request.form(max_files=MAX_INPUTS, max_fields=MAX_INPUTS + 1)
    except Exception as exc:  # noqa: BLE001 - the multipart parser raises several types
        raise InvalidArgument(f"the multipart body cannot be parsed: {exc}") from None
    items: list[bytes] = []
    parameters = None
    try:
        for field_name, value in form.multi_items():
            if field_name == "parameters":
                if not isinstance(value, str):
                    raise InvalidArgument("the 'parameters' part must be a JSON text field")
                try:
                    parameters = json.loads(value)
                except ValueError:
                    raise InvalidArgument("the 'parameters' part is not valid JSON") from None
            elif isinstance(value, str):
                if not card.is_text:
                    raise InvalidArgument(f"model '{deployment}' is an image model: send image files, not text field {field_name!r}")
                items.append(value.encode("utf-8"))
            else:
                if card.is_text:
                    raise InvalidArgument(f"model '{deployment}' is a {card.task} model: send text fields, not files")
                items.append(await value.read())
    finally:
        await form.close()
    if not items:
        raise InvalidArgument(f"the multipart body has no {'text' if card.is_text else 'image'} to predict on")
    _check_count(len(items))
    top_k, truncation = _parameters(parameters)
    return TaskRequest(items, len(items) == 1, top_k, truncation)


def _check_count(count: int) -> None:
    if count == 0:
        raise InvalidArgument("'inputs' is empty")
    if count > MAX_INPUTS:
        raise InvalidArgument(f"'inputs' has {count} items, more than the {MAX_INPUTS} one request may carry")


def _shape_hint(card: TaskCard) -> str:
    if card.is_text:
        return '{"text": "..."} or {"inputs": ["...", ...]}'
    return '{"image": "<base64>"}, {"inputs": ["<base64>", ...]}, multipart image files or an image/* body'


def infer_request(deployment: str, card: TaskCard, task_request: TaskRequest) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=deployment)
    array = np.empty(len(task_request.items), dtype=object)
    array[:] = task_request.items
    tensors.add_raw_input(request, tasks.TEXT_INPUT if card.is_text else tasks.IMAGE_INPUT, array)
    for name in answer_outputs(card):
        request.outputs.add(name=name)
    if task_request.truncation is not None:
        request.parameters["truncation"].bool_param = task_request.truncation
    return request


def answer_outputs(card: TaskCard) -> tuple[str, ...]:
    """The served outputs the JSON answer of `card`'s task is built from."""
    if card.task in (tasks.TEXT_CLASSIFICATION, tasks.IMAGE_CLASSIFICATION):
        outputs: tuple[str, ...] = ("label", "score", "scores")
    elif card.task == tasks.TOKEN_CLASSIFICATION:
        outputs = ("entities",)
    else:
        outputs = ("embedding", "tokens")
    if card.is_text:
        outputs += ("truncated",)
    return outputs


def response_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    raw = response.raw_output_contents
    if len(raw) != len(response.outputs):
        raise InvalidArgument("the model answered without raw output contents")  # never from our nodes
    return {
        output.name: tensors.decode_raw(output.name, output.datatype, output.shape, data)
        for output, data in zip(response.outputs, raw)
    }


def predictions(card: TaskCard, outputs: dict[str, np.ndarray], top_k: int | None) -> list[dict[str, Any]]:
    """One task-shaped answer per input."""
    rows = len(next(iter(outputs.values())))
    answers: list[dict[str, Any]] = []
    for row in range(rows):
        if card.task in (tasks.TEXT_CLASSIFICATION, tasks.IMAGE_CLASSIFICATION):
            answer: dict[str, Any] = {"label": _text(outputs["label"][row]), "score": float(outputs["score"][row])}
            if top_k is not None:
                scores = outputs["scores"][row]
                order = np.argsort(-scores, kind="stable")[: min(top_k, len(scores))]
                answer["labels"] = [{"label": card.labels[i], "score": float(scores[i])} for i in order]
        elif card.task == tasks.TOKEN_CLASSIFICATION:
            answer = {"entities": json.loads(_text(outputs["entities"][row]))}
        else:
            answer = {"embedding": outputs["embedding"][row].tolist(), "tokens": int(outputs["tokens"][row])}
        if "truncated" in outputs:
            answer["truncated"] = bool(outputs["truncated"][row])
        answers.append(answer)
    return answers


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------------- the router

_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_ERRORS = {
    status: {"description": text, "content": {JSON: {"schema": _ERROR_SCHEMA}}}
    for status, text in (
        (400, "malformed request, or input the model cannot take"), (401, "missing or invalid API key"),
        (403, "not permitted"), (404, "unknown deployment"), (413, "request body too large"),
        (429, "too many concurrent requests"), (503, "no replica available"), (504, "request timed out"),
    )
}  # fmt: skip


def predict_schemas(card: TaskCard | None = None) -> dict[str, Any]:
    """OpenAPI request body and 200 response of predict, for one task (`card`) or all of them."""
    text_body = {
        "type": "object",
        "properties": {
            "text": {"type": "string", "minLength": 1, "description": "One text; the answer is one object."},
            "inputs": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_INPUTS,
                       "description": "Many texts; the answer lists one prediction per text."},
            "parameters": {"type": "object", "properties": {
                "top_k": {"type": "integer", "minimum": 1, "description": "Also list the k best labels (classification)."},
                "truncation": {"type": "boolean", "description": "false: refuse texts over the model's max length "
                               "instead of truncating them (the default, said in `truncated`)."}}},
        },
    }  # fmt: skip
    image_body = {
        "type": "object",
        "properties": {
            "image": {"type": "string", "format": "byte", "minLength": 1, "description": "One image, base64 (or a data: URL)."},
            "inputs": {"type": "array", "items": {"type": "string", "format": "byte", "minLength": 1}, "minItems": 1,
                       "maxItems": MAX_INPUTS},
            "parameters": {"type": "object", "properties": {"top_k": {"type": "integer", "minimum": 1}}},
        },
    }
    label = {"type": "object", "properties": {"label": {"type": "string"}, "score": {"type": "number"}}}
    answers = {
        tasks.TEXT_CLASSIFICATION: {**label, "properties": {**label["properties"], "labels": {"type": "array", "items": label},
                                                            "truncated": {"type": "boolean"}}},
        tasks.IMAGE_CLASSIFICATION: {**label, "properties": {**label["properties"], "labels": {"type": "array", "items": label}}},
        tasks.TOKEN_CLASSIFICATION: {"type": "object", "properties": {
            "entities": {"type": "array", "items": {"type": "object", "properties": {
                "entity_group": {"type": "string"}, "score": {"type": "number"}, "word": {"type": "string"},
                "start": {"type": "integer", "description": "character offset"}, "end": {"type": "integer"}}}},
            "truncated": {"type": "boolean"}}},
        tasks.FEATURE_EXTRACTION: {"type": "object", "properties": {
            "embedding": {"type": "array", "items": {"type": "number"}}, "tokens": {"type": "integer"},
            "truncated": {"type": "boolean"}}},
    }  # fmt: skip
    if card is None:
        body = {"oneOf": [text_body, image_body]}
        answer = {"oneOf": list(answers.values())}
        content = {JSON: {"schema": body}, "multipart/form-data": {"schema": {"type": "object"}},
                   "image/*": {"schema": {"type": "string", "format": "binary"}}}  # fmt: skip
    else:
        body = text_body if card.is_text else image_body
        answer = answers[card.task]
        example = {"text": "I love this product!"} if card.is_text else {"image": EXAMPLE_PNG}
        if card.task in (tasks.TEXT_CLASSIFICATION, tasks.IMAGE_CLASSIFICATION):
            example["parameters"] = {"top_k": min(3, len(card.labels))}
        content = {JSON: {"schema": body, "example": example}}
        if not card.is_text:
            content["multipart/form-data"] = {"schema": {"type": "object", "properties": {
                "image": {"type": "string", "format": "binary"}, "parameters": {"type": "string"}}}}  # fmt: skip
            content["image/*"] = {"schema": {"type": "string", "format": "binary"}}
    wrapped = {"type": "object", "properties": {
        "model": {"type": "string"}, "model_version": {"type": "string"}, "task": {"type": "string"},
        "predictions": {"type": "array", "items": answer, "description": "With 'inputs': one per input."}},
        "description": "With 'text'/'image' the prediction's fields are at the top level."}  # fmt: skip
    return {
        "requestBody": {"required": True, "content": content},
        "responses": {"200": {"description": "Task-shaped prediction", "content": {JSON: {"schema": wrapped}}}},
    }


_EMBEDDINGS_BODY = {
    "requestBody": {"required": True, "content": {JSON: {"schema": {
        "type": "object", "required": ["model", "input"],
        "properties": {
            "model": {"type": "string", "minLength": 1, "description": "A feature-extraction deployment."},
            "input": {"oneOf": [{"type": "string", "minLength": 1},
                                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                                 "maxItems": MAX_INPUTS}]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": {"type": "integer", "description": "Must equal the model's embedding length."},
            "user": {"type": "string"},
        }}, "example": {"model": "all-minilm-l6-v2", "input": ["first text", "second text"]}}}},
}  # fmt: skip


def build_task_router(dataplane: Any, auth: Any, catalog: TaskCatalog, *, sticky_header: str = "") -> APIRouter:
    router = APIRouter(prefix="/v1", responses=_ERRORS)
    sticky = sticky_header.lower()

    async def principal_for(request: Request, model: str) -> Principal:
        principal = request.scope.get("state", {}).get(PRINCIPAL_STATE)
        if principal is None:
            principal = await auth.authenticate(request.headers.get("authorization"))
        auth.authorize(principal, Permission.INFER, model)
        return principal

    async def run(request: Request, principal: Principal, deployment: str, version: str, card: TaskCard,
                  task_request: TaskRequest) -> tuple[pb.ModelInferResponse, TaskCard]:
        """The OIP call (its version chosen by the traffic split), and the card of the version that answered."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        response = await dataplane.model_infer(
            infer_request(deployment, card, task_request),
            principal=principal,
            timeout=remaining_seconds(request.scope.get("state", {}).get(REQUEST_DEADLINE_STATE), None),
            sticky_key=request.headers.get(sticky) if sticky else None,
            metadata=tuple(carrier.items()),
        )
        if response.model_version == version:
            return response, card
        _, served = await catalog.card(deployment, response.model_version)  # another version of the split
        return response, served or card

    @router.post("/models/{name}/predict", tags=["tasks"], summary="Predict on text or images (task models)",
                 openapi_extra=predict_schemas())
    async def predict(request: Request, name: str) -> Response:
        set_model(request, name)
        principal = await principal_for(request, name)
        version, card = await catalog.card(name)
        if card is None:
            raise InvalidArgument(
                f"model '{name}' is not a task model (it takes tensors): call POST /v2/models/{name}/infer"
            )
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type == "multipart/form-data":
            task_request = await parse_form_request(request, card, name)
        elif content_type.startswith("image/"):
            if card.is_text:
                raise InvalidArgument(f"model '{name}' is a {card.task} model: send {_shape_hint(card)}")
            body = await read_body(request)
            if not body:
                raise InvalidArgument("the image body is empty")
            task_request = TaskRequest([body], True)
        else:
            task_request = parse_json_request(await read_body(request), card, name)
        response, card = await run(request, principal, name, version, card, task_request)
        answers = predictions(card, response_arrays(response), task_request.top_k)
        head = {"model": name, "model_version": response.model_version, "task": card.task}
        return json_response({**head, **answers[0]} if task_request.single else {**head, "predictions": answers})

    @router.post("/embeddings", tags=["tasks"], summary="Embeddings (OpenAI-compatible)", openapi_extra=_EMBEDDINGS_BODY)
    async def embeddings(request: Request) -> Response:
        document = json_object(await read_body(request))
        name = document.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("'model' must name a feature-extraction deployment")
        set_model(request, name)
        principal = await principal_for(request, name)
        encoding = document.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise InvalidArgument("'encoding_format' must be 'float' or 'base64'")
        texts = document.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts:
            raise InvalidArgument("'input' must be a string or a non-empty list of strings")
        if any(not isinstance(t, str) for t in texts):
            raise InvalidArgument("'input' must hold strings: token-id arrays are not supported, send the text")
        _check_count(len(texts))
        version, card = await catalog.card(name)
        if card is None or card.task != tasks.FEATURE_EXTRACTION:
            kind = "a tensor model" if card is None else f"a {card.task} model"
            raise InvalidArgument(f"model '{name}' is {kind}; /v1/embeddings needs a feature-extraction model")
        dimensions = document.get("dimensions")
        if dimensions is not None and dimensions != card.embedding_dimension:
            raise InvalidArgument(
                f"model '{name}' makes embeddings of {card.embedding_dimension} dimensions; 'dimensions' cannot change that"
            )
        task_request = TaskRequest([t.encode("utf-8") for t in texts], False)
        response, _ = await run(request, principal, name, version, card, task_request)
        outputs = response_arrays(response)
        vectors = outputs["embedding"].astype("<f4", copy=False)
        data = [
            {"object": "embedding", "index": i,
             "embedding": base64.b64encode(vector.tobytes()).decode() if encoding == "base64" else vector.tolist()}
            for i, vector in enumerate(vectors)
        ]  # fmt: skip
        tokens = int(outputs["tokens"].sum())
        return json_response({"object": "list", "data": data, "model": name,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip

    return router
