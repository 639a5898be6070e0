"""Mesh mode of an inference node: the etcd-driven node agent and its local artifact cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.inference.node.cache import ArtifactCache, CorruptArtifact

if TYPE_CHECKING:
    from services.inference.node.agent import NodeAgent, default_node_id

__all__ = ["ArtifactCache", "CorruptArtifact", "NodeAgent", "default_node_id"]


def __getattr__(name: str) -> Any:
    # The agent pulls in the data plane (and its runtimes); importing the cache alone must not.
    if name in ("NodeAgent", "default_node_id"):
        from services.inference.node import agent

        return getattr(agent, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
