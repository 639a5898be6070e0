"""etcd values are protobuf messages in their JSON form, so `etcdctl get --prefix /aimaas/` is readable."""

from __future__ import annotations

import json
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


class CodecError(ValueError):
    """A stored value is not valid JSON for the expected message type."""


def to_json(message: Message) -> bytes:
    """Compact JSON with proto field names (as in the .proto files) and enum names, keys sorted."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True, use_integers_for_enums=False)
    return json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def from_json(data: bytes | str, message_type: type[M]) -> M:
    """Parse a value written by `to_json`; unknown fields are ignored so older readers accept newer
    writers (additive changes inside v1)."""
    message = message_type()
    try:
        json_format.Parse(data, message, ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        raise CodecError(f"invalid {message_type.DESCRIPTOR.full_name} JSON: {exc}") from exc
    return message
