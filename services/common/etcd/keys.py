"""The etcd key schema: the only place that formats or parses keys (see DESIGN.md, "etcd key schema").

Version numbers are zero-padded to a fixed width so that etcd's lexicographic key order equals
numeric order: prefix listings and `start_after` pagination then return versions as 1, 2, ..., 10.
"""

from __future__ import annotations

# Fixed width of version numbers in keys; 10 digits cover every uint32 version.
VERSION_DIGITS = 10
MAX_VERSION = 10**VERSION_DIGITS - 1


def _segment(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if "/" in value or "\x00" in value:
        raise ValueError(f"{what} {value!r} must not contain '/' or NUL")
    return value


def _version(value: int) -> str:
    # bool is an int subclass; True as a version is always a bug.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise ValueError(f"version must be an integer in [1, {MAX_VERSION}], got {value!r}")
    return f"{value:0{VERSION_DIGITS}d}"


def _parse_version(text: str) -> int | None:
    if not text.isascii() or not text.isdigit():
        return None
    number = int(text)
    return number if number >= 1 else None


class KeyBuilder:
    """Builds and parses every key under one namespace, e.g. `/aimaas/v1`."""

    def __init__(self, namespace: str = "/aimaas/v1") -> None:
        if not namespace.startswith("/") or namespace.endswith("/") or "\x00" in namespace:
            raise ValueError("etcd namespace must start with '/' and not end with '/'")
        self.namespace = namespace

    def __repr__(self) -> str:
        return f"KeyBuilder({self.namespace!r})"

    # -- models, versions, aliases -------------------------------------------------------------

    def models_prefix(self) -> str:
        """Matches model records AND their versions/aliases; filter with `parse_model_key`."""
        return f"{self.namespace}/models/"

    def model(self, name: str) -> str:
        return f"{self.models_prefix()}{_segment(name, 'model name')}"

    def versions_prefix(self, model: str) -> str:
        return f"{self.model(model)}/versions/"

    def version(self, model: str, version: int) -> str:
        return f"{self.versions_prefix(model)}{_version(version)}"

    def aliases_prefix(self, model: str) -> str:
        return f"{self.model(model)}/aliases/"

    def alias(self, model: str, alias: str) -> str:
        return f"{self.aliases_prefix(model)}{_segment(alias, 'alias')}"

    # -- deployments, nodes, assignments, status -----------------------------------------------

    def deployments_prefix(self) -> str:
        return f"{self.namespace}/deployments/"

    def deployment(self, name: str) -> str:
        return f"{self.deployments_prefix()}{_segment(name, 'deployment name')}"

    def deployment_statuses_prefix(self) -> str:
        """Observed state of deployments, written by the leading scheduler (not under `deployments/`,
        whose values are all DeploymentSpec records)."""
        return f"{self.namespace}/deployment-status/"

    def deployment_status(self, name: str) -> str:
        return f"{self.deployment_statuses_prefix()}{_segment(name, 'deployment name')}"

    def nodes_prefix(self) -> str:
        return f"{self.namespace}/nodes/"

    def node(self, node_id: str) -> str:
        return f"{self.nodes_prefix()}{_segment(node_id, 'node id')}"

    def assignments_prefix(self, node_id: str | None = None) -> str:
        base = f"{self.namespace}/assignments/"
        return base if node_id is None else f"{base}{_segment(node_id, 'node id')}/"

    def assignment(self, node_id: str, model: str, version: int) -> str:
        return f"{self.assignments_prefix(node_id)}{_segment(model, 'model name')}/{_version(version)}"

    def statuses_prefix(self, node_id: str | None = None) -> str:
        base = f"{self.namespace}/status/"
        return base if node_id is None else f"{base}{_segment(node_id, 'node id')}/"

    def status(self, node_id: str, model: str, version: int) -> str:
        return f"{self.statuses_prefix(node_id)}{_segment(model, 'model name')}/{_version(version)}"

    # -- leader election, auth, alerts ---------------------------------------------------------

    def leader(self, name: str) -> str:
        """Election key; candidates live under `leader(name) + "/"` (see etcd.election)."""
        return f"{self.namespace}/leader/{_segment(name, 'election name')}"

    def api_keys_prefix(self) -> str:
        return f"{self.namespace}/auth/keys/"

    def api_key(self, key_id: str) -> str:
        return f"{self.api_keys_prefix()}{_segment(key_id, 'api key id')}"

    def alert_rules_prefix(self) -> str:
        return f"{self.namespace}/alerts/rules/"

    def alert_rule(self, rule_id: str) -> str:
        return f"{self.alert_rules_prefix()}{_segment(rule_id, 'alert rule id')}"

    def alert_states_prefix(self) -> str:
        """Alert state of each rule (its alerts per subject), written by the leading monitor."""
        return f"{self.namespace}/alerts/state/"

    def alert_state(self, rule_id: str) -> str:
        return f"{self.alert_states_prefix()}{_segment(rule_id, 'alert rule id')}"

    # -- parsing: None when the key is not of the asked kind ------------------------------------

    def _rest(self, key: str, prefix: str, parts: int) -> list[str] | None:
        if not key.startswith(prefix):
            return None
        segments = key[len(prefix):].split("/")
        if len(segments) != parts or not all(segments):
            return None
        return segments

    def parse_model_key(self, key: str) -> str | None:
        """Model name of a bare model record key; None for versions, aliases and anything else."""
        rest = self._rest(key, self.models_prefix(), 1)
        return rest[0] if rest else None

    def parse_version_key(self, key: str) -> tuple[str, int] | None:
        rest = self._rest(key, self.models_prefix(), 3)
        if rest is None or rest[1] != "versions":
            return None
        version = _parse_version(rest[2])
        return None if version is None else (rest[0], version)

    def parse_alias_key(self, key: str) -> tuple[str, str] | None:
        rest = self._rest(key, self.models_prefix(), 3)
        if rest is None or rest[1] != "aliases":
            return None
        return rest[0], rest[2]

    def parse_deployment_key(self, key: str) -> str | None:
        rest = self._rest(key, self.deployments_prefix(), 1)
        return rest[0] if rest else None

    def parse_deployment_status_key(self, key: str) -> str | None:
        rest = self._rest(key, self.deployment_statuses_prefix(), 1)
        return rest[0] if rest else None

    def parse_node_key(self, key: str) -> str | None:
        rest = self._rest(key, self.nodes_prefix(), 1)
        return rest[0] if rest else None

    def _parse_node_model_version(self, key: str, prefix: str) -> tuple[str, str, int] | None:
        rest = self._rest(key, prefix, 3)
        if rest is None:
            return None
        version = _parse_version(rest[2])
        return None if version is None else (rest[0], rest[1], version)

    def parse_assignment_key(self, key: str) -> tuple[str, str, int] | None:
        """(node_id, model, version) of an assignment key."""
        return self._parse_node_model_version(key, self.assignments_prefix())

    def parse_status_key(self, key: str) -> tuple[str, str, int] | None:
        """(node_id, model, version) of a replica status key."""
        return self._parse_node_model_version(key, self.statuses_prefix())

    def parse_api_key_key(self, key: str) -> str | None:
        rest = self._rest(key, self.api_keys_prefix(), 1)
        return rest[0] if rest else None

    def parse_alert_rule_key(self, key: str) -> str | None:
        rest = self._rest(key, self.alert_rules_prefix(), 1)
        return rest[0] if rest else None
