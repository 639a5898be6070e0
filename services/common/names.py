"""Name and label rules shared by every service (models, aliases, deployments, key scopes)."""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument

# DNS-label style: names appear in etcd keys, URLs and Kubernetes-like tooling.
NAME_RE = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
MAX_LABELS = 64
MAX_LABEL_VALUE = 256


def validate_name(kind: str, name: str) -> None:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid {kind} name {name!r}: use 1-63 characters of lower-case letters, digits and '-', "
            "starting with a letter and not ending with '-'"
        )


def validate_labels(labels: dict[str, str] | None) -> None:
    if not labels:
        return
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels are allowed, got {len(labels)}")
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            raise InvalidArgument(f"invalid label key {key!r}: 1-63 characters of letters, digits, '.', '_', '/', '-'")
        if len(value) > MAX_LABEL_VALUE:
            raise InvalidArgument(f"label {key!r} value is longer than {MAX_LABEL_VALUE} characters")
