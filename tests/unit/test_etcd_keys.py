"""Key schema (services.common.etcd.keys) and the JSON value codec."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2, timestamp_pb2, type_pb2

from services.common.etcd import CodecError, KeyBuilder, from_json, to_json


@pytest.fixture
def keys() -> KeyBuilder:
    return KeyBuilder()


def test_keys_follow_the_design_schema(keys: KeyBuilder) -> None:
    assert keys.model("resnet") == "/aimaas/v1/models/resnet"
    assert keys.models_prefix() == "/aimaas/v1/models/"
    assert keys.version("resnet", 3) == "/aimaas/v1/models/resnet/versions/0000000003"
    assert keys.versions_prefix("resnet") == "/aimaas/v1/models/resnet/versions/"
    assert keys.alias("resnet", "production") == "/aimaas/v1/models/resnet/aliases/production"
    assert keys.aliases_prefix("resnet") == "/aimaas/v1/models/resnet/aliases/"
    assert keys.deployment("web") == "/aimaas/v1/deployments/web"
    assert keys.deployments_prefix() == "/aimaas/v1/deployments/"
    assert keys.node("n1") == "/aimaas/v1/nodes/n1"
    assert keys.nodes_prefix() == "/aimaas/v1/nodes/"
    assert keys.assignment("n1", "resnet", 2) == "/aimaas/v1/assignments/n1/resnet/0000000002"
    assert keys.assignments_prefix() == "/aimaas/v1/assignments/"
    assert keys.assignments_prefix("n1") == "/aimaas/v1/assignments/n1/"
    assert keys.status("n1", "resnet", 2) == "/aimaas/v1/status/n1/resnet/0000000002"
    assert keys.statuses_prefix() == "/aimaas/v1/status/"
    assert keys.statuses_prefix("n1") == "/aimaas/v1/status/n1/"
    assert keys.leader("scheduler") == "/aimaas/v1/leader/scheduler"
    assert keys.api_key("k1") == "/aimaas/v1/auth/keys/k1"
    assert keys.api_keys_prefix() == "/aimaas/v1/auth/keys/"
    assert keys.alert_rule("r1") == "/aimaas/v1/alerts/rules/r1"
    assert keys.alert_rules_prefix() == "/aimaas/v1/alerts/rules/"


def test_custom_namespace() -> None:
    keys = KeyBuilder("/test-abc/aimaas/v1")
    assert keys.node("n") == "/test-abc/aimaas/v1/nodes/n"
    assert keys.parse_node_key("/test-abc/aimaas/v1/nodes/n") == "n"
    assert keys.parse_node_key("/aimaas/v1/nodes/n") is None


@pytest.mark.parametrize("namespace", ["", "aimaas", "/aimaas/", "/"])
def test_invalid_namespace(namespace: str) -> None:
    with pytest.raises(ValueError):
        KeyBuilder(namespace)


def test_version_keys_sort_numerically(keys: KeyBuilder) -> None:
    # etcd lists keys in byte order; padding makes that numeric order.
    built = [keys.version("m", n) for n in (1, 2, 10, 100, 9)]
    assert [keys.parse_version_key(k)[1] for k in sorted(built)] == [1, 2, 9, 10, 100]


@pytest.mark.parametrize("bad", ["", "a/b", "/", "a\x00b"])
def test_invalid_segments_raise(keys: KeyBuilder, bad: str) -> None:
    for build in (
        lambda: keys.model(bad),
        lambda: keys.version(bad, 1),
        lambda: keys.alias("m", bad),
        lambda: keys.deployment(bad),
        lambda: keys.node(bad),
        lambda: keys.assignment(bad, "m", 1),
        lambda: keys.assignment("n", bad, 1),
        lambda: keys.assignments_prefix(bad),
        lambda: keys.status("n", bad, 1),
        lambda: keys.statuses_prefix(bad),
        lambda: keys.leader(bad),
        lambda: keys.api_key(bad),
        lambda: keys.alert_rule(bad),
    ):
        with pytest.raises(ValueError):
            build()


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "1", 10**10])
def test_invalid_versions_raise(keys: KeyBuilder, bad: object) -> None:
    with pytest.raises(ValueError):
        keys.version("m", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        keys.status("n", "m", bad)  # type: ignore[arg-type]


def test_parse_model_key_only_matches_bare_model_records(keys: KeyBuilder) -> None:
    assert keys.parse_model_key(keys.model("m")) == "m"
    assert keys.parse_model_key(keys.version("m", 1)) is None
    assert keys.parse_model_key(keys.alias("m", "prod")) is None
    assert keys.parse_model_key(keys.models_prefix()) is None
    assert keys.parse_model_key(keys.node("m")) is None


def test_parse_round_trips(keys: KeyBuilder) -> None:
    assert keys.parse_version_key(keys.version("m", 42)) == ("m", 42)
    assert keys.parse_alias_key(keys.alias("m", "canary")) == ("m", "canary")
    assert keys.parse_node_key(keys.node("gpu-1")) == "gpu-1"
    assert keys.parse_deployment_key(keys.deployment("d")) == "d"
    assert keys.parse_assignment_key(keys.assignment("n1", "m", 7)) == ("n1", "m", 7)
    assert keys.parse_status_key(keys.status("n1", "m", 7)) == ("n1", "m", 7)
    assert keys.parse_api_key_key(keys.api_key("k")) == "k"
    assert keys.parse_alert_rule_key(keys.alert_rule("r")) == "r"


def test_parse_rejects_other_kinds_and_malformed_keys(keys: KeyBuilder) -> None:
    assert keys.parse_version_key(keys.alias("m", "5")) is None
    assert keys.parse_version_key("/aimaas/v1/models/m/versions/abc") is None
    assert keys.parse_version_key("/aimaas/v1/models/m/versions/0") is None
    assert keys.parse_version_key("/aimaas/v1/models/m/versions/1/extra") is None
    assert keys.parse_alias_key(keys.version("m", 1)) is None
    assert keys.parse_node_key(keys.nodes_prefix()) is None
    assert keys.parse_node_key(keys.node("n") + "/x") is None
    assert keys.parse_assignment_key(keys.status("n", "m", 1)) is None
    assert keys.parse_status_key(keys.assignment("n", "m", 1)) is None
    assert keys.parse_status_key("/aimaas/v1/status/n//0000000001") is None
    assert keys.parse_status_key("/aimaas/v1/status/n/m/x") is None


# -- codec ------------------------------------------------------------------------------------------


def test_codec_round_trip_uses_proto_field_names() -> None:
    message = struct_pb2.Struct()
    message.update({"max_batch_size": 8, "name": "résumé"})
    data = to_json(message)
    assert isinstance(data, bytes)
    assert b'"max_batch_size":8' in data
    assert from_json(data, struct_pb2.Struct) == message


def test_codec_prints_enum_names_and_ignores_unknown_fields() -> None:
    # A well-known type with an enum keeps this test independent of our evolving protos.
    field = type_pb2.Field(kind=type_pb2.Field.TYPE_STRING, json_name="x", number=3)
    data = to_json(field)
    assert data == b'{"json_name":"x","kind":"TYPE_STRING","number":3}'
    newer_writer = data[:-1] + b',"added_in_a_later_release":{"a":1}}'
    assert from_json(newer_writer, type_pb2.Field) == field
    assert to_json(timestamp_pb2.Timestamp(seconds=1)) == b'"1970-01-01T00:00:01Z"'


def test_codec_rejects_garbage() -> None:
    with pytest.raises(CodecError):
        from_json(b"{not json", struct_pb2.Struct)
    with pytest.raises(ValueError):
        from_json(b'{"fields": 3}', timestamp_pb2.Timestamp)
