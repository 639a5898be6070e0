"""Permissions, roles and the authenticated principal."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from aimaas.auth.v1 import auth_pb2


class Permission(StrEnum):
    READ = "read"  # metadata, health of models, listings, statistics
    INFER = "infer"  # run inference
    WRITE = "write"  # push models, manage deployments, aliases, alert rules
    ADMIN = "admin"  # API keys and internal operations


ROLE_PERMISSIONS: dict[int, frozenset[Permission]] = {
    auth_pb2.ROLE_ADMIN: frozenset(Permission),
    auth_pb2.ROLE_DEVELOPER: frozenset({Permission.READ, Permission.INFER, Permission.WRITE}),
    auth_pb2.ROLE_INVOKER: frozenset({Permission.READ, Permission.INFER}),
    auth_pb2.ROLE_VIEWER: frozenset({Permission.READ}),
}


def role_name(role: int) -> str:
    """`admin`, `developer`, ... (the enum name without its prefix); `unknown(7)` for other values."""
    try:
        return auth_pb2.Role.Name(role).removeprefix("ROLE_").lower()
    except ValueError:
        return f"unknown({role})"


def parse_role(text: str) -> int:
    """The Role value of `admin`, `ROLE_ADMIN`, ... (case-insensitive); ValueError otherwise."""
    name = text.strip().upper()
    name = name if name.startswith("ROLE_") else f"ROLE_{name}"
    try:
        role = auth_pb2.Role.Value(name)
    except ValueError:
        role = None
    if role not in ROLE_PERMISSIONS:
        raise ValueError(f"unknown role {text!r}: use one of {', '.join(role_name(r) for r in ROLE_PERMISSIONS)}")
    return role


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key, the bootstrap admin token, or the anonymous admin (auth disabled)."""

    key_id: str
    name: str
    role: int
    # Models this principal may touch; empty: all.
    model_scope: frozenset[str] = frozenset()

    @property
    def role_name(self) -> str:
        return role_name(self.role)

    def has(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS.get(self.role, frozenset())

    def in_scope(self, model: str) -> bool:
        """Whether this principal may touch `model` (use to filter listings)."""
        return not self.model_scope or model in self.model_scope


ANONYMOUS_ADMIN = Principal(key_id="anonymous", name="anonymous (auth disabled)", role=auth_pb2.ROLE_ADMIN)
BOOTSTRAP_ADMIN = Principal(key_id="bootstrap", name="bootstrap admin token", role=auth_pb2.ROLE_ADMIN)
